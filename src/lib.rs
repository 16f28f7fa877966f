//! downloader: fetches merchant files with per-aggregation limits and MIME checks,
//! makes thumbnails, stores both, and calls the client back when each job ends.
//!
//! See ARCHITECTURE.md for how the pieces fit together.

#[cfg(feature = "service")]
pub mod auth;
pub mod budget;
#[cfg(feature = "service")]
pub mod config;
#[cfg(feature = "service")]
pub mod connect;
#[cfg(feature = "service")]
pub mod disk;
#[cfg(feature = "service")]
pub mod errors;
#[cfg(feature = "service")]
pub mod job;
#[cfg(feature = "service")]
pub mod logging;
#[cfg(feature = "service")]
pub mod metrics;
#[cfg(feature = "service")]
pub mod net;
#[cfg(feature = "service")]
pub mod notifier;
#[cfg(feature = "service")]
pub mod processor;
#[cfg(feature = "service")]
pub mod secret;
#[cfg(feature = "service")]
pub mod stats;
#[cfg(feature = "service")]
pub mod store;
#[cfg(feature = "service")]
pub mod systemd;
pub mod thumbnail;
#[cfg(feature = "service")]
pub mod web;
#[cfg(feature = "service")]
pub mod worker;

/// `0.1.0 (commit 1a2b3c4d5e6f, built 2026-11-22)`.
pub const VERSION: &str = concat!(
    env!("CARGO_PKG_VERSION"),
    " (commit ",
    env!("DOWNLOADER_COMMIT"),
    ", built ",
    env!("DOWNLOADER_BUILD_DATE"),
    ")"
);

#[cfg(feature = "service")]
use tokio_util::sync::CancellationToken;
#[cfg(feature = "service")]
use tracing::Instrument;

// Kept at the crate's root for the binary, the tests and the benches; they live
// below the modules that use them (see ARCHITECTURE.md, Layers).
#[cfg(feature = "service")]
pub use connect::connect_store;
#[cfg(feature = "service")]
pub use net::install_crypto_provider;

#[cfg(feature = "service")]
/// A token cancelled on the first SIGTERM or SIGINT. SIGHUP (whose default action
/// would end the process) is logged and otherwise ignored: logs go to stderr and
/// the config is read once, so there is nothing to reopen.
pub fn shutdown_on_signals() -> CancellationToken {
    use tokio::signal::unix::{SignalKind, signal};
    let token = CancellationToken::new();
    // Installed before returning, so that a signal sent once the caller says it is
    // ready is never met by the default action (which ends the process on SIGHUP).
    let (Ok(mut term), Ok(mut int), Ok(mut hup)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
        signal(SignalKind::hangup()),
    ) else {
        tracing::error!("cannot install signal handlers");
        return token;
    };
    let t = token.clone();
    tokio::spawn(
        async move {
            loop {
                tokio::select! {
                    _ = term.recv() => tracing::info!("SIGTERM received: shutting down"),
                    _ = int.recv() => tracing::info!("SIGINT received: shutting down"),
                    _ = hup.recv() => {
                        tracing::info!("SIGHUP received: nothing to reopen (logs go to stderr; restart to reload the config)");
                        continue;
                    }
                }
                t.cancel();
                return;
            }
        }
        .in_current_span(),
    );
    token
}
