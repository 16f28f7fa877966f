//! The HTTP/1.1 server loop under the API: accepts connections, bounds every edge with
//! a timeout, and drains gracefully.
//!
//! Our own loop rather than `axum::serve` for two reasons:
//! - `axum::serve` cancels, at shutdown, a connection it has accepted but whose first
//!   bytes it has not read yet: the client's request fails although the socket had
//!   taken it. With socket activation that is a lost request on every restart. Here
//!   such a connection still gets its one request answered (keep-alive off), then closes.
//! - It has no header-read or body-read timeout: a slowloris client holds a
//!   connection (and a task) forever.

use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicI64, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use axum::Router;
use axum::extract::rejection::BytesRejection;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tower::ServiceBuilder;
use tower_http::timeout::RequestBodyTimeoutLayer;

/// Timeouts and drain bound of one server.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// From the moment a connection waits for a request until its whole header has
    /// arrived. hyper starts this timer whenever it waits for a request head, so it
    /// also bounds an idle keep-alive connection.
    pub header_timeout: Duration,
    /// Between two chunks of a request body.
    pub body_timeout: Duration,
    /// How long shutdown waits for open connections before dropping them.
    pub shutdown_grace: Duration,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            header_timeout: Duration::from_secs(30),
            body_timeout: Duration::from_secs(30),
            shutdown_grace: Duration::from_secs(30),
        }
    }
}

/// Open HTTP connections of this process's servers (for `/metrics`).
pub static OPEN_CONNECTIONS: AtomicI64 = AtomicI64::new(0);

struct ConnGuard;

impl ConnGuard {
    fn new() -> ConnGuard {
        OPEN_CONNECTIONS.fetch_add(1, Ordering::Relaxed);
        ConnGuard
    }
}

impl Drop for ConnGuard {
    fn drop(&mut self) {
        OPEN_CONNECTIONS.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Serves `app` on `listener` until `shutdown`; then stops accepting, lets open
/// connections finish their requests (at most `limits.shutdown_grace`) and returns.
pub async fn serve(
    listener: tokio::net::TcpListener,
    app: Router,
    shutdown: CancellationToken,
    limits: Limits,
) -> std::io::Result<()> {
    let service = ServiceBuilder::new()
        .layer(RequestBodyTimeoutLayer::new(limits.body_timeout))
        .service(app);
    let service = TowerToHyperService::new(service);
    let mut http = hyper::server::conn::http1::Builder::new();
    http.timer(TokioTimer::new())
        .header_read_timeout(limits.header_timeout);
    let http = Arc::new(http);
    let connections = TaskTracker::new();
    // Fired when the grace is over: connections still open are dropped.
    let abort = CancellationToken::new();
    loop {
        let stream = tokio::select! {
            biased;
            _ = shutdown.cancelled() => break,
            accepted = listener.accept() => match accepted {
                Ok((stream, peer)) => {
                    tracing::debug!(%peer, "connection accepted");
                    stream
                }
                // A connection reset before we took it: nothing to do.
                Err(e) if matches!(
                    e.kind(),
                    std::io::ErrorKind::ConnectionAborted | std::io::ErrorKind::ConnectionReset
                ) => continue,
                Err(e) => {
                    // EMFILE and friends: the listener stays usable; back off briefly
                    // instead of spinning on the error.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::select! {
                        _ = shutdown.cancelled() => break,
                        _ = tokio::time::sleep(Duration::from_millis(50)) => continue,
                    }
                }
            },
        };
        let _ = stream.set_nodelay(true);
        let (http, service, shutdown) = (http.clone(), service.clone(), shutdown.clone());
        let abort = abort.clone();
        connections.spawn(async move {
            let _open = ConnGuard::new();
            let stream = FirstByte::new(stream);
            let first_byte = stream.seen.clone();
            let conn = http.serve_connection(TokioIo::new(stream), service);
            let silent_until = tokio::time::Instant::now() + FIRST_BYTE_GRACE;
            tokio::select! {
                r = drain(conn, first_byte, silent_until, shutdown) => if let Err(e) = r {
                    tracing::debug!(error = %e, "connection ended with an error");
                },
                _ = abort.cancelled() => {}
            }
        });
    }
    // Dropping our listener leaves an activated socket open in systemd (and in the
    // next process), so connections that arrive now wait in its backlog.
    drop(listener);
    connections.close();
    if !connections.is_empty() {
        tracing::info!(connections = connections.len(), "draining open connections");
    }
    if tokio::time::timeout(limits.shutdown_grace, connections.wait())
        .await
        .is_err()
    {
        tracing::warn!(
            grace_secs = limits.shutdown_grace.as_secs_f64(),
            connections = connections.len(),
            "connections still open after the shutdown grace; dropping them"
        );
        abort.cancel();
        connections.wait().await;
    }
    Ok(())
}

type Conn = hyper::server::conn::http1::Connection<
    TokioIo<FirstByte>,
    TowerToHyperService<tower_http::timeout::RequestBodyTimeout<Router>>,
>;

/// How long after its accept a connection that has sent nothing yet may still be
/// carrying a request on its way: its first bytes follow within a round trip. Beyond
/// that, a silent connection is one a client opened ahead of need (connection pools
/// do), and shutdown closes it.
const FIRST_BYTE_GRACE: Duration = Duration::from_secs(1);

/// Runs `conn`; once `shutdown` fires, lets it finish the request in progress and closes
/// it. hyper's own graceful shutdown closes a connection that has not sent a byte yet,
/// yet the client may be sending its request this instant: such a connection first
/// gets until `silent_until` (its accept plus [`FIRST_BYTE_GRACE`]) for that byte.
/// (An idle keep-alive connection, past its first request, is closed at once: a
/// request its client sends at that instant fails as with any server; clients retry
/// those on a new connection.)
async fn drain(
    conn: Conn,
    first_byte: Arc<Notify>,
    silent_until: tokio::time::Instant,
    shutdown: CancellationToken,
) -> hyper::Result<()> {
    let mut conn = std::pin::pin!(conn);
    tokio::select! {
        r = conn.as_mut() => return r,
        _ = shutdown.cancelled() => {}
    }
    tokio::select! {
        r = conn.as_mut() => return r,
        _ = first_byte.notified() => {}
        _ = tokio::time::sleep_until(silent_until) => {}
    }
    conn.as_mut().graceful_shutdown();
    conn.await
}

/// A TCP stream that signals its first received bytes.
struct FirstByte {
    inner: tokio::net::TcpStream,
    seen: Arc<Notify>,
    signalled: bool,
}

impl FirstByte {
    fn new(inner: tokio::net::TcpStream) -> FirstByte {
        FirstByte {
            inner,
            seen: Arc::new(Notify::new()),
            signalled: false,
        }
    }
}

impl AsyncRead for FirstByte {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let r = Pin::new(&mut self.inner).poll_read(cx, buf);
        // EOF counts too: there is nothing left to wait for.
        if !self.signalled && matches!(r, Poll::Ready(_)) {
            self.signalled = true;
            // notify_one stores a permit, so a waiter that arrives later still sees it.
            self.seen.notify_one();
        }
        r
    }
}

impl AsyncWrite for FirstByte {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

/// True when reading a request body failed because it stalled past the body timeout.
pub fn is_body_timeout(rejection: &BytesRejection) -> bool {
    let mut source: Option<&(dyn std::error::Error + 'static)> = Some(rejection);
    while let Some(e) = source {
        if e.is::<tower_http::timeout::TimeoutError>() {
            return true;
        }
        source = e.source();
    }
    false
}
