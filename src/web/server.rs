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
//!
//! Every connection is also bounded by [`super::bounds`]: a slot out of
//! `api.max_connections`, a request-body budget and deadline, a response write deadline.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use axum::Router;
use axum::extract::rejection::BytesRejection;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tower::ServiceBuilder;
use tower_http::timeout::RequestBodyTimeoutLayer;

use super::bounds::{
    Admission, BodyFailure, Bounded, HEALTH_RESERVE, ServerIo, Slots, body_failure,
};
use crate::budget::ByteBudget;
use crate::config::{ApiConfig, DEFAULT_BODY_BUDGET};
use crate::metrics::OPEN_CONNECTIONS;

/// Timeouts, caps and drain bound of one server.
#[derive(Debug, Clone)]
pub struct Limits {
    /// From the moment a connection waits for a request until its whole header has
    /// arrived. hyper starts this timer whenever it waits for a request head, so it
    /// also bounds an idle keep-alive connection.
    pub header_timeout: Duration,
    /// Between two chunks of a request body.
    pub body_timeout: Duration,
    /// From a request's header to the end of its body.
    pub body_total_timeout: Duration,
    /// Longest a response write may wait for the client to read.
    pub response_timeout: Duration,
    /// How long shutdown waits for open connections before dropping them.
    pub shutdown_grace: Duration,
    /// Connections that serve requests (plus [`HEALTH_RESERVE`] for `/hb` and
    /// `/healthz`).
    pub max_connections: usize,
    /// Request bodies in flight, shared by every server given a clone.
    pub body_budget: ByteBudget,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            header_timeout: Duration::from_secs(30),
            body_timeout: Duration::from_secs(30),
            body_total_timeout: Duration::from_secs(120),
            response_timeout: Duration::from_secs(30),
            shutdown_grace: Duration::from_secs(30),
            max_connections: default_max_connections(fd_limit()),
            body_budget: ByteBudget::new(DEFAULT_BODY_BUDGET),
        }
    }
}

impl Limits {
    /// The `api.*` timeouts and caps, with a new body budget: make them once per
    /// process and give clones to its listeners, so that they share the budget.
    pub fn from_config(api: &ApiConfig) -> Limits {
        Limits {
            header_timeout: Duration::from_secs_f64(api.header_timeout_secs),
            body_timeout: Duration::from_secs_f64(api.body_timeout_secs),
            body_total_timeout: Duration::from_secs_f64(api.body_total_timeout_secs),
            response_timeout: Duration::from_secs_f64(api.response_timeout_secs),
            shutdown_grace: Duration::from_secs_f64(api.shutdown_grace_secs),
            max_connections: api
                .max_connections
                .unwrap_or_else(|| default_max_connections(fd_limit())),
            body_budget: ByteBudget::new(api.max_inflight_body_bytes),
        }
    }
}

/// The process's soft limit of open files (`RLIMIT_NOFILE`); `None`: unlimited.
pub fn fd_limit() -> Option<u64> {
    rustix::process::getrlimit(rustix::process::Resource::Nofile).current
}

/// Descriptors kept out of the connection count: stdio, the runtime, the listener,
/// Redis or the embedded store's file, stored files being read or written, outgoing
/// downloads and callbacks (`serve`): a quarter of the limit, at least 64.
fn fd_reserve(soft: u64) -> u64 {
    (soft / 4).max(64)
}

/// Connections the fd limit `soft` leaves room for (besides [`fd_reserve`] and
/// [`HEALTH_RESERVE`]).
pub fn connections_allowed_by(soft: Option<u64>) -> u64 {
    match soft {
        Some(soft) => soft.saturating_sub(fd_reserve(soft) + HEALTH_RESERVE as u64),
        None => u64::MAX,
    }
}

/// Smallest and largest default of `api.max_connections`. Past the ceiling an idle
/// connection's buffers (~10-20 KiB each) would add up to hundreds of MB.
const DEFAULT_CONNECTIONS: (u64, u64) = (16, 16_384);

/// `api.max_connections`'s default for the fd limit `soft`.
pub fn default_max_connections(soft: Option<u64>) -> usize {
    let (floor, ceiling) = DEFAULT_CONNECTIONS;
    connections_allowed_by(soft).clamp(floor, ceiling) as usize
}

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

/// How long a [`HEALTH_RESERVE`] connection may take to send its header (it answers
/// one request): short, so that clients that hold these slots silently free them soon.
const HEALTH_HEADER_TIMEOUT: Duration = Duration::from_secs(5);

/// How long a connection closed to make room may still finish a request that arrived
/// just as it was chosen.
const EVICT_GRACE: Duration = Duration::from_secs(1);

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
    let mut http = hyper::server::conn::http1::Builder::new();
    http.timer(TokioTimer::new())
        .header_read_timeout(limits.header_timeout);
    let http = Arc::new(http);
    // Health-only connections answer one request each.
    let mut health_http = hyper::server::conn::http1::Builder::new();
    health_http
        .timer(TokioTimer::new())
        .header_read_timeout(limits.header_timeout.min(HEALTH_HEADER_TIMEOUT))
        .keep_alive(false);
    let health_http = Arc::new(health_http);
    let allowed = connections_allowed_by(fd_limit());
    if limits.max_connections as u64 > allowed {
        tracing::warn!(
            max_connections = limits.max_connections,
            fd_limit = fd_limit().unwrap_or(u64::MAX),
            fits = allowed,
            "api.max_connections is more than the open-file limit leaves room for: \
             past that, accepts fail (EMFILE) and other work (Redis, files, downloads) \
             cannot open descriptors; raise the limit (LimitNOFILE=) or lower the key"
        );
    }
    tracing::debug!(
        max_connections = limits.max_connections,
        max_inflight_body_bytes = limits.body_budget.total(),
        "serving"
    );
    let slots = Slots::new(limits.max_connections, HEALTH_RESERVE);
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
        let slot = match slots.admit() {
            Admission::Admitted(slot) => slot,
            Admission::Refused => {
                tracing::debug!("connection refused: every slot is taken");
                super::bounds::refuse(stream);
                continue;
            }
        };
        let _ = stream.set_nodelay(true);
        let state = slot.state.clone();
        let http = if state.health_only {
            health_http.clone()
        } else {
            http.clone()
        };
        let service = TowerToHyperService::new(Bounded::new(
            service.clone(),
            state.clone(),
            limits.body_budget.clone(),
            limits.body_total_timeout,
        ));
        let (shutdown, abort) = (shutdown.clone(), abort.clone());
        let response_timeout = limits.response_timeout;
        connections.spawn(async move {
            let _open = ConnGuard::new();
            let _slot = slot;
            let stream = ServerIo::new(stream, state.clone(), response_timeout);
            let first_byte = stream.seen.clone();
            let conn = http.serve_connection(TokioIo::new(stream), service);
            let silent_until = tokio::time::Instant::now() + FIRST_BYTE_GRACE;
            tokio::select! {
                r = drain(conn, first_byte, silent_until, shutdown, state.evict.clone()) => {
                    if let Err(e) = r {
                        tracing::debug!(error = %e, "connection ended with an error");
                    }
                }
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
    TokioIo<ServerIo>,
    TowerToHyperService<Bounded<tower_http::timeout::RequestBodyTimeout<Router>>>,
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
/// those on a new connection.) Once `evict` fires (it was idle and its slot is given
/// to a new connection) it closes, after at most [`EVICT_GRACE`] for a request that
/// arrived just then.
async fn drain(
    conn: Conn,
    first_byte: Arc<Notify>,
    silent_until: tokio::time::Instant,
    shutdown: CancellationToken,
    evict: CancellationToken,
) -> hyper::Result<()> {
    let mut conn = std::pin::pin!(conn);
    tokio::select! {
        r = conn.as_mut() => return r,
        _ = shutdown.cancelled() => {}
        _ = evict.cancelled() => {
            conn.as_mut().graceful_shutdown();
            return tokio::time::timeout(EVICT_GRACE, conn).await.unwrap_or(Ok(()));
        }
    }
    tokio::select! {
        r = conn.as_mut() => return r,
        _ = first_byte.notified() => {}
        _ = tokio::time::sleep_until(silent_until) => {}
    }
    conn.as_mut().graceful_shutdown();
    conn.await
}

/// True when reading a request body failed because it stalled past the body timeout.
pub fn is_body_timeout(rejection: &BytesRejection) -> bool {
    body_failure(rejection) == Some(BodyFailure::Stalled)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_default_connection_cap_leaves_a_reserve_of_descriptors() {
        // `ulimit -n 256`: 64 kept for the rest of the process, 8 for health probes.
        assert_eq!(default_max_connections(Some(256)), 184);
        // systemd's default soft limit: a quarter kept.
        assert_eq!(default_max_connections(Some(1024)), 760);
        assert_eq!(connections_allowed_by(Some(1024)), 760);
        // A tiny limit still serves a few; a huge or no limit is capped.
        assert_eq!(default_max_connections(Some(40)), 16);
        assert_eq!(default_max_connections(Some(1 << 20)), 16_384);
        assert_eq!(default_max_connections(None), 16_384);
        assert!(fd_limit().is_none_or(|n| n > 0));
    }
}
