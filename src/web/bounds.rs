//! What one connection of [`super::server`] may hold, and for how long:
//!
//! - [`Slots`]: at most `api.max_connections` connections serve requests; when all are
//!   taken the oldest idle one is closed to make room, and when none is idle a few
//!   more ([`HEALTH_RESERVE`]) answer only `/hb` and `/healthz`; beyond those a new
//!   connection gets a `503` written straight to its socket.
//! - [`Bounded`]: every request body reserves its size from the process's
//!   [`ByteBudget`] (`api.max_inflight_body_bytes`) before a byte of it is read, and
//!   must be complete within `api.body_total_timeout_secs`.
//! - [`ServerIo`]: a response write that makes no progress for
//!   `api.response_timeout_secs` ends the connection.

use std::collections::HashMap;
use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use axum::body::{Body, Bytes, HttpBody};
use axum::http::{HeaderValue, Request, Response, StatusCode, header};
use axum::response::IntoResponse;
use http_body::{Frame, SizeHint};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use crate::budget::{ByteBudget, Reservation};
use crate::metrics::{REFUSAL_REASONS, ReasonLabel, metrics};

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// Connections beyond `api.max_connections` that may still answer `/hb` and
/// `/healthz` (and nothing else) when every regular slot is busy with a request:
/// the load balancer's probes get through even then.
pub const HEALTH_RESERVE: usize = 8;

/// Paths a [`HEALTH_RESERVE`] connection answers.
const HEALTH_PATHS: [&str; 2] = ["/hb", "/healthz"];

/// `Retry-After` of every refusal, in seconds.
const RETRY_AFTER_SECS: u32 = 1;

/// Granularity of the reservations of a body without `Content-Length` (chunked): it
/// reserves as its bytes arrive, at least this much more at a time.
const CHUNKED_STEP: u64 = 64 << 10;

/// Counts one refusal (`reason` is one of [`REFUSAL_REASONS`]).
pub fn count_refusal(reason: &'static str) {
    debug_assert!(REFUSAL_REASONS.contains(&reason));
    metrics()
        .http_refused
        .get_or_create(&ReasonLabel { reason })
        .inc();
}

// ------------------------------------------------------------------ connections

/// One open connection, as its slot, its requests and its socket see it.
#[derive(Debug)]
pub struct ConnState {
    id: u64,
    /// Answers only [`HEALTH_PATHS`] (a [`HEALTH_RESERVE`] connection).
    pub health_only: bool,
    /// Requests in the service (from their head until their response body is dropped).
    busy: AtomicUsize,
    /// A write to the socket is waiting for the client to read.
    writing: AtomicBool,
    /// Since when nothing has been in the service.
    idle_since: Mutex<Instant>,
    /// Fired when the connection is closed to make room for a new one.
    pub evict: CancellationToken,
}

impl ConnState {
    fn new(id: u64, health_only: bool) -> ConnState {
        ConnState {
            id,
            health_only,
            busy: AtomicUsize::new(0),
            writing: AtomicBool::new(false),
            idle_since: Mutex::new(Instant::now()),
            evict: CancellationToken::new(),
        }
    }

    /// When it became idle: no request in the service and no response waiting for the
    /// client. `None` while it is busy.
    fn idle_since(&self) -> Option<Instant> {
        if self.busy.load(Ordering::Acquire) > 0 || self.writing.load(Ordering::Acquire) {
            return None;
        }
        Some(*self.idle_since.lock().unwrap_or_else(|p| p.into_inner()))
    }

    fn enter(self: &Arc<Self>) -> Busy {
        self.busy.fetch_add(1, Ordering::AcqRel);
        Busy(self.clone())
    }
}

/// A request in the service; the connection is idle again when the last one drops.
struct Busy(Arc<ConnState>);

impl Drop for Busy {
    fn drop(&mut self) {
        let mut since = self.0.idle_since.lock().unwrap_or_else(|p| p.into_inner());
        if self.0.busy.fetch_sub(1, Ordering::AcqRel) == 1 {
            *since = Instant::now();
        }
    }
}

/// The connection slots of one listener.
#[derive(Debug)]
pub struct Slots {
    max: usize,
    reserve: usize,
    inner: Mutex<SlotsInner>,
}

#[derive(Debug, Default)]
struct SlotsInner {
    next_id: u64,
    regular: HashMap<u64, Arc<ConnState>>,
    health: usize,
}

/// What a new connection gets.
pub enum Admission {
    /// A slot (regular or health-only); given back when dropped.
    Admitted(Slot),
    /// No slot: answer the raw refusal and close.
    Refused,
}

/// A connection's slot, given back when dropped.
pub struct Slot {
    slots: Arc<Slots>,
    pub state: Arc<ConnState>,
}

impl Slots {
    /// `max` regular slots and `reserve` health-only ones.
    pub fn new(max: usize, reserve: usize) -> Arc<Slots> {
        Arc::new(Slots {
            max,
            reserve,
            inner: Mutex::new(SlotsInner::default()),
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, SlotsInner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A slot for a new connection: a free regular one; else the regular slot of the
    /// connection idle the longest, which is closed (its client sees a closed idle
    /// keep-alive connection, which HTTP clients retry on a new one); else a
    /// health-only one; else none.
    pub fn admit(self: &Arc<Self>) -> Admission {
        let mut s = self.lock();
        s.next_id += 1;
        let id = s.next_id;
        let mut health_only = false;
        if s.regular.len() >= self.max {
            let oldest = s
                .regular
                .values()
                .filter_map(|c| Some((c.idle_since()?, c.id)))
                .min();
            if let Some((_, victim)) = oldest {
                let c = s.regular.remove(&victim).expect("listed above");
                c.evict.cancel();
                metrics().http_idle_closed.inc();
                tracing::debug!("closing the connection idle the longest to make room");
            } else if s.health < self.reserve {
                health_only = true;
            } else {
                return Admission::Refused;
            }
        }
        let state = Arc::new(ConnState::new(id, health_only));
        if health_only {
            s.health += 1;
        } else {
            s.regular.insert(id, state.clone());
        }
        Admission::Admitted(Slot {
            slots: self.clone(),
            state,
        })
    }

    /// Regular and health-only connections open now.
    pub fn open(&self) -> (usize, usize) {
        let s = self.lock();
        (s.regular.len(), s.health)
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        let mut s = self.slots.lock();
        if self.state.health_only {
            s.health -= 1;
        } else {
            // An evicted connection's slot was taken over already.
            s.regular.remove(&self.state.id);
        }
    }
}

/// What a connection beyond every slot is told before it is closed.
pub fn raw_refusal() -> Vec<u8> {
    let body = serde_json::json!({
        "error": "too many connections: the server is at api.max_connections; retry later"
    })
    .to_string();
    format!(
        "HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/json\r\n\
         retry-after: {RETRY_AFTER_SECS}\r\nconnection: close\r\ncontent-length: {}\r\n\r\n{body}",
        body.len()
    )
    .into_bytes()
}

/// Refuses `stream` without a slot: the 503 goes into the socket's empty send buffer
/// (never waits), whatever the client already sent is read off so that closing sends
/// a FIN rather than a reset that could destroy the answer, and the socket is closed.
pub fn refuse(stream: tokio::net::TcpStream) {
    count_refusal("connections");
    let _ = stream.try_write(&raw_refusal());
    let mut buf = [0u8; 4096];
    for _ in 0..4 {
        match stream.try_read(&mut buf) {
            Ok(n) if n > 0 => continue,
            _ => break,
        }
    }
}

// ------------------------------------------------------------------------ bodies

/// A JSON refusal that also closes the connection.
fn refusal(status: StatusCode, msg: String, retry: bool) -> Response<Body> {
    let mut r = (status, axum::Json(serde_json::json!({ "error": msg }))).into_response();
    let h = r.headers_mut();
    h.insert(header::CONNECTION, HeaderValue::from_static("close"));
    if retry {
        h.insert(header::RETRY_AFTER, HeaderValue::from(RETRY_AFTER_SECS));
    }
    r
}

/// The body of a request was not complete within `api.body_total_timeout_secs`.
#[derive(Debug, thiserror::Error)]
#[error("request body not complete within {0:?} (api.body_total_timeout_secs)")]
pub struct BodyDeadline(pub Duration);

/// A chunked body grew past what `api.max_inflight_body_bytes` had left.
#[derive(Debug, thiserror::Error)]
#[error("server busy: request bodies in flight use the whole api.max_inflight_body_bytes")]
pub struct BodyBudgetSpent;

/// The service of one connection: bounds each request's body (budget, total
/// deadline), answers only health paths on a health-only connection, and marks the
/// connection busy while a request is in it.
#[derive(Clone)]
pub struct Bounded<S> {
    inner: S,
    conn: Arc<ConnState>,
    budget: ByteBudget,
    total_timeout: Duration,
}

impl<S> Bounded<S> {
    pub fn new(
        inner: S,
        conn: Arc<ConnState>,
        budget: ByteBudget,
        total_timeout: Duration,
    ) -> Bounded<S> {
        Bounded {
            inner,
            conn,
            budget,
            total_timeout,
        }
    }
}

type SharedReservation = Arc<Mutex<Reservation>>;

impl<S, B> tower::Service<Request<B>> for Bounded<S>
where
    S: tower::Service<Request<BoundedBody<B>>, Response = Response<Body>, Error = Infallible>
        + Clone
        + Send
        + 'static,
    S::Future: Send + 'static,
    B: HttpBody<Data = Bytes> + Unpin + Send + 'static,
    B::Error: Into<BoxError>,
{
    type Response = Response<Body>;
    type Error = Infallible;
    type Future = Pin<Box<dyn Future<Output = Result<Response<Body>, Infallible>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: Request<B>) -> Self::Future {
        let busy = self.conn.enter();
        if self.conn.health_only && !HEALTH_PATHS.contains(&req.uri().path()) {
            count_refusal("connections");
            let r = refusal(
                StatusCode::SERVICE_UNAVAILABLE,
                "too many connections: the server is at api.max_connections and answers only \
                 /hb and /healthz on this one; retry later"
                    .into(),
                true,
            );
            return Box::pin(async move { Ok(track(r, busy)) });
        }
        let mut reservation = None;
        let mut deadline = None;
        if !req.body().is_end_stream() {
            // Content-Length, or 0 for a chunked body, which reserves as it arrives.
            let declared = req.body().size_hint().exact().unwrap_or(0);
            if declared > self.budget.total() {
                let msg = format!(
                    "request body of {declared} bytes is over the limit of {} bytes \
                     (api.max_inflight_body_bytes)",
                    self.budget.total()
                );
                let r = refusal(StatusCode::PAYLOAD_TOO_LARGE, msg, false);
                return Box::pin(async move { Ok(track(r, busy)) });
            }
            let Ok(guard) = self.budget.try_acquire(declared) else {
                count_refusal("body_budget");
                tracing::debug!(bytes = declared, "request body refused: budget spent");
                let r = refusal(
                    StatusCode::SERVICE_UNAVAILABLE,
                    BodyBudgetSpent.to_string() + "; retry later",
                    true,
                );
                return Box::pin(async move { Ok(track(r, busy)) });
            };
            reservation = Some(Arc::new(Mutex::new(guard)));
            deadline = Some(Box::pin(tokio::time::sleep(self.total_timeout)));
        }
        let failed = Arc::new(AtomicBool::new(false));
        let req = req.map(|inner| BoundedBody {
            inner,
            reservation: reservation.clone(),
            received: 0,
            deadline,
            total_timeout: self.total_timeout,
            failed: failed.clone(),
        });
        // The clone that was ready serves this request (tower's rule).
        let clone = self.inner.clone();
        let mut inner = std::mem::replace(&mut self.inner, clone);
        Box::pin(async move {
            let Ok(mut r) = inner.call(req).await;
            // The handler is done with the body: its bytes are given back now.
            drop(reservation);
            if failed.load(Ordering::Acquire) {
                // The rest of the body is not worth reading: close after the answer.
                let h = r.headers_mut();
                h.insert(header::CONNECTION, HeaderValue::from_static("close"));
                if r.status() == StatusCode::SERVICE_UNAVAILABLE {
                    r.headers_mut()
                        .insert(header::RETRY_AFTER, HeaderValue::from(RETRY_AFTER_SECS));
                }
            }
            Ok(track(r, busy))
        })
    }
}

/// Keeps the connection busy until the response body is dropped (written).
fn track(r: Response<Body>, busy: Busy) -> Response<Body> {
    r.map(|inner| Body::new(Tracked { inner, _busy: busy }))
}

struct Tracked {
    inner: Body,
    _busy: Busy,
}

impl HttpBody for Tracked {
    type Data = Bytes;
    type Error = axum::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, axum::Error>>> {
        Pin::new(&mut self.inner).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// A request body that holds its budget reservation and ends with an error at its
/// total deadline.
pub struct BoundedBody<B> {
    inner: B,
    /// Shared with the request's future, which gives it back once the handler is done.
    reservation: Option<SharedReservation>,
    received: u64,
    deadline: Option<Pin<Box<tokio::time::Sleep>>>,
    total_timeout: Duration,
    /// Set when the body was cut short: the response closes the connection.
    failed: Arc<AtomicBool>,
}

impl<B> BoundedBody<B> {
    fn fail(
        &mut self,
        reason: &'static str,
        e: BoxError,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        count_refusal(reason);
        self.failed.store(true, Ordering::Release);
        self.deadline = None;
        Poll::Ready(Some(Err(e)))
    }
}

impl<B> HttpBody for BoundedBody<B>
where
    B: HttpBody<Data = Bytes> + Unpin,
    B::Error: Into<BoxError>,
{
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = self.get_mut();
        if this.failed.load(Ordering::Acquire) {
            return Poll::Ready(None);
        }
        if let Some(d) = &mut this.deadline
            && d.as_mut().poll(cx).is_ready()
        {
            let e = BodyDeadline(this.total_timeout);
            return this.fail("body_deadline", Box::new(e));
        }
        match Pin::new(&mut this.inner).poll_frame(cx) {
            Poll::Ready(Some(Ok(frame))) => {
                if let (Some(data), Some(res)) = (frame.data_ref(), &this.reservation) {
                    this.received += data.len() as u64;
                    let mut guard = res.lock().unwrap_or_else(|p| p.into_inner());
                    if this.received > guard.bytes() {
                        let need = this.received - guard.bytes();
                        if !guard.try_grow(need.max(CHUNKED_STEP)) && !guard.try_grow(need) {
                            drop(guard);
                            tracing::debug!(
                                bytes = this.received,
                                "chunked request body refused: budget spent"
                            );
                            return this.fail("body_budget", Box::new(BodyBudgetSpent));
                        }
                    }
                }
                Poll::Ready(Some(Ok(frame)))
            }
            Poll::Ready(None) => {
                this.deadline = None;
                Poll::Ready(None)
            }
            Poll::Ready(Some(Err(e))) => Poll::Ready(Some(Err(e.into()))),
            Poll::Pending => Poll::Pending,
        }
    }

    fn is_end_stream(&self) -> bool {
        self.failed.load(Ordering::Acquire) || self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// How a request body failed, if it was one of ours or the per-gap timeout.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BodyFailure {
    /// Stalled longer than `api.body_timeout_secs` between two chunks.
    Stalled,
    /// Not complete within `api.body_total_timeout_secs`.
    Deadline,
    /// A chunked body outgrew `api.max_inflight_body_bytes`.
    Budget,
}

/// Which of ours `e` (a body's error, or anything whose source chain holds one) is.
pub fn body_failure(e: &(dyn std::error::Error + 'static)) -> Option<BodyFailure> {
    use crate::errors::find_in_chain;
    if find_in_chain::<tower_http::timeout::TimeoutError>(e).is_some() {
        Some(BodyFailure::Stalled)
    } else if find_in_chain::<BodyDeadline>(e).is_some() {
        Some(BodyFailure::Deadline)
    } else if find_in_chain::<BodyBudgetSpent>(e).is_some() {
        Some(BodyFailure::Budget)
    } else {
        None
    }
}

// ------------------------------------------------------------------------ socket

/// A connection's socket: signals its first received bytes (for the drain at
/// shutdown), ends a write that makes no progress for `write_timeout`, and tells the
/// connection's [`ConnState`] while a write waits.
pub struct ServerIo {
    inner: tokio::net::TcpStream,
    pub seen: Arc<Notify>,
    signalled: bool,
    write_timeout: Duration,
    stall: Option<Pin<Box<tokio::time::Sleep>>>,
    timed_out: bool,
    conn: Arc<ConnState>,
}

impl ServerIo {
    pub fn new(
        inner: tokio::net::TcpStream,
        conn: Arc<ConnState>,
        write_timeout: Duration,
    ) -> ServerIo {
        ServerIo {
            inner,
            seen: Arc::new(Notify::new()),
            signalled: false,
            write_timeout,
            stall: None,
            timed_out: false,
            conn,
        }
    }

    fn timed_out_error(&self) -> std::io::Error {
        std::io::Error::new(
            std::io::ErrorKind::TimedOut,
            format!(
                "the client read nothing of its response for {:?} (api.response_timeout_secs)",
                self.write_timeout
            ),
        )
    }

    /// Passes a write's outcome on; a write that waits starts (or goes on with) the
    /// stall timer, and fails once it has run out. Only a finished write (`wrote`:
    /// bytes went into the socket) stops the timer, not a flush in between.
    fn progress<T>(
        &mut self,
        cx: &mut Context<'_>,
        r: Poll<std::io::Result<T>>,
        wrote: bool,
    ) -> Poll<std::io::Result<T>> {
        if self.timed_out {
            return Poll::Ready(Err(self.timed_out_error()));
        }
        match r {
            Poll::Ready(r) => {
                if wrote && self.stall.take().is_some() {
                    self.conn.writing.store(false, Ordering::Release);
                }
                Poll::Ready(r)
            }
            Poll::Pending => {
                let timeout = self.write_timeout;
                let stall = self
                    .stall
                    .get_or_insert_with(|| Box::pin(tokio::time::sleep(timeout)));
                self.conn.writing.store(true, Ordering::Release);
                if stall.as_mut().poll(cx).is_ready() {
                    self.timed_out = true;
                    // Closed with a reset: the kernel drops the unsent rest of the
                    // response at once instead of offering it to a client that does
                    // not read for minutes.
                    let _ = self.inner.set_zero_linger();
                    count_refusal("write_deadline");
                    tracing::debug!("response write timed out: the client does not read");
                    return Poll::Ready(Err(self.timed_out_error()));
                }
                Poll::Pending
            }
        }
    }
}

impl AsyncRead for ServerIo {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let this = self.get_mut();
        let r = Pin::new(&mut this.inner).poll_read(cx, buf);
        // EOF counts too: there is nothing left to wait for.
        if !this.signalled && matches!(r, Poll::Ready(_)) {
            this.signalled = true;
            // notify_one stores a permit, so a waiter that arrives later still sees it.
            this.seen.notify_one();
        }
        r
    }
}

impl AsyncWrite for ServerIo {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        let this = self.get_mut();
        let r = Pin::new(&mut this.inner).poll_write(cx, buf);
        this.progress(cx, r, true)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        let this = self.get_mut();
        let r = Pin::new(&mut this.inner).poll_write_vectored(cx, bufs);
        this.progress(cx, r, true)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        let this = self.get_mut();
        let r = Pin::new(&mut this.inner).poll_flush(cx);
        this.progress(cx, r, false)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_full_listener_closes_its_oldest_idle_connection_then_uses_its_reserve() {
        let slots = Slots::new(2, 1);
        let Admission::Admitted(a) = slots.admit() else {
            panic!("first slot")
        };
        let Admission::Admitted(b) = slots.admit() else {
            panic!("second slot")
        };
        // Both idle: the third takes the slot of the oldest, `a`.
        let Admission::Admitted(c) = slots.admit() else {
            panic!("room made")
        };
        assert!(a.state.evict.is_cancelled() && !b.state.evict.is_cancelled());
        assert!(!c.state.health_only);
        assert_eq!(slots.open(), (2, 0));
        drop(a);
        assert_eq!(
            slots.open(),
            (2, 0),
            "an evicted slot was taken over already"
        );
        // Both busy (a request each): the next is health-only, then none is left.
        let rb = b.state.enter();
        let rc = c.state.enter();
        let Admission::Admitted(d) = slots.admit() else {
            panic!("health reserve")
        };
        assert!(d.state.health_only);
        assert!(matches!(slots.admit(), Admission::Refused));
        assert_eq!(slots.open(), (2, 1));
        drop(d);
        assert_eq!(slots.open(), (2, 0));
        // A connection waiting for its client to read is busy too.
        drop(rc);
        c.state.writing.store(true, Ordering::Release);
        let Admission::Admitted(e) = slots.admit() else {
            panic!("health reserve again")
        };
        assert!(e.state.health_only && !c.state.evict.is_cancelled());
        drop(e);
        c.state.writing.store(false, Ordering::Release);
        let Admission::Admitted(f) = slots.admit() else {
            panic!("c is idle again")
        };
        assert!(c.state.evict.is_cancelled() && !f.state.health_only);
        drop(rb);
    }

    fn bounded<B>(inner: B, budget: &ByteBudget, total: Duration) -> BoundedBody<B> {
        BoundedBody {
            inner,
            reservation: Some(Arc::new(Mutex::new(budget.try_acquire(0).unwrap()))),
            received: 0,
            deadline: Some(Box::pin(tokio::time::sleep(total))),
            total_timeout: total,
            failed: Arc::new(AtomicBool::new(false)),
        }
    }

    fn chunks(sizes: &[usize]) -> impl HttpBody<Data = Bytes, Error = Infallible> + Unpin {
        let frames: Vec<Result<Frame<Bytes>, Infallible>> = sizes
            .iter()
            .map(|&n| Ok(Frame::data(Bytes::from(vec![7u8; n]))))
            .collect();
        http_body_util::StreamBody::new(futures_util::stream::iter(frames))
    }

    #[tokio::test]
    async fn a_chunked_body_reserves_as_it_arrives_and_stops_at_the_budget() {
        use http_body_util::BodyExt;
        let budget = ByteBudget::new(200 << 10);
        let long = Duration::from_secs(3600);
        // 150 KiB in three chunks fits, reserved in steps of at least CHUNKED_STEP.
        let mut body = bounded(chunks(&[1000, 100 << 10, 49 << 10]), &budget, long);
        while let Some(f) = body.frame().await {
            f.unwrap();
        }
        assert!(budget.used() >= 150 << 10 && budget.used() <= 200 << 10);
        assert!(!body.failed.load(Ordering::Acquire));
        drop(body);
        assert_eq!(budget.used(), 0, "given back with the body");
        // 250 KiB does not: the chunk that would overdraw it fails the body.
        let mut body = bounded(chunks(&[100 << 10, 100 << 10, 50 << 10]), &budget, long);
        let mut err = None;
        while let Some(f) = body.frame().await {
            if let Err(e) = f {
                err = Some(e);
            }
        }
        let err = err.expect("the body failed");
        assert_eq!(body_failure(&*err), Some(BodyFailure::Budget));
        assert!(body.failed.load(Ordering::Acquire) && body.is_end_stream());
        assert!(budget.used() <= 200 << 10);
        drop(body);
        assert_eq!(budget.used(), 0);
    }

    #[tokio::test]
    async fn a_body_past_its_total_deadline_fails() {
        use http_body_util::BodyExt;
        let budget = ByteBudget::new(1 << 20);
        let silent = http_body_util::StreamBody::new(futures_util::stream::pending::<
            Result<Frame<Bytes>, Infallible>,
        >());
        let mut body = bounded(silent, &budget, Duration::from_millis(50));
        let f = tokio::time::timeout(Duration::from_secs(30), body.frame())
            .await
            .expect("the deadline ended the wait");
        let err = f.expect("a frame").expect_err("an error");
        assert_eq!(body_failure(&*err), Some(BodyFailure::Deadline));
        assert!(body.failed.load(Ordering::Acquire));
    }

    #[test]
    fn the_raw_refusal_is_a_complete_response() {
        let r = String::from_utf8(raw_refusal()).unwrap();
        let (head, body) = r.split_once("\r\n\r\n").unwrap();
        assert!(head.starts_with("HTTP/1.1 503 "), "{head}");
        assert!(head.contains("connection: close") && head.contains("retry-after: 1"));
        assert!(head.contains(&format!("content-length: {}", body.len())));
        let v: serde_json::Value = serde_json::from_str(body).unwrap();
        assert!(v["error"].as_str().unwrap().contains("max_connections"));
    }

    #[test]
    fn our_body_failures_are_recognised_through_their_wrappers() {
        let e = axum::Error::new(BodyDeadline(Duration::from_secs(2)));
        assert_eq!(body_failure(&e), Some(BodyFailure::Deadline));
        let e = axum::Error::new(BodyBudgetSpent);
        assert_eq!(body_failure(&e), Some(BodyFailure::Budget));
        let e = axum::Error::new(std::io::Error::other("reset"));
        assert_eq!(body_failure(&e), None);
    }
}
