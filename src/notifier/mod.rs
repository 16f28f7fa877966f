//! The notifier: delivers each finished job's callback, retries failed deliveries,
//! and deletes files and job records once their time is up.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use crate::config::Config;
use crate::stats::Stats;
use crate::store::{Claimed, Queue, Store};
use crate::worker::{self, Handler, WorkerConfig, persist};

mod delivery;
pub mod fair;
pub mod http;
pub mod signing;

pub use delivery::DeliveryError;

pub struct Notifier {
    store: Arc<dyn Store>,
    /// Delivers HTTP callbacks (`http.rs`); another kind of callback is another sender.
    sender: http::HttpSender,
    download_url: String,
    stats: Arc<Stats>,
    backoff: Duration,
    /// Attempts of a callback in all (`notifier.callback_attempts`).
    attempts: u32,
    /// Callbacks in flight per receiver (`notifier.per_host_concurrency`).
    dests: Arc<fair::Destinations>,
    keep: Duration,
    /// `notifier.failed_retention`.
    failed_retention: Duration,
    root: PathBuf,
}

impl Notifier {
    pub fn new(cfg: &Config, store: Arc<dyn Store>) -> anyhow::Result<Notifier> {
        Ok(Notifier {
            store,
            sender: http::HttpSender::new(cfg)?,
            download_url: cfg.download_url().map_err(anyhow::Error::msg)?,
            stats: Arc::new(Stats::default()),
            backoff: cfg.notifier_backoff(),
            attempts: cfg.callback_attempts(),
            dests: fair::Destinations::new(cfg.callback_per_host()),
            keep: cfg.deletion_delay(),
            failed_retention: cfg.failed_retention(),
            root: cfg.storage_root().map_err(anyhow::Error::msg)?,
        })
    }

    pub async fn run(self: Arc<Self>, cfg: &Config, shutdown: CancellationToken) {
        let background = CancellationToken::new();
        let mut helpers = tokio::task::JoinSet::new();
        helpers.spawn(self.stats.clone().report(
            self.store.clone(),
            "notifier",
            Duration::from_millis(cfg.notifier.stats_interval),
            background.clone(),
        ));
        helpers.spawn(self.clone().delete_expired(background.clone()));
        let wc = WorkerConfig {
            queue: Queue::Callback,
            lease: Duration::from_secs(cfg.notifier.lease_secs),
            max_in_flight: cfg.notifier.concurrency,
            grace: Duration::from_secs(cfg.notifier.shutdown_grace_secs),
            may_claim: None,
        };
        worker::run(self.store.clone(), wc, self.clone(), shutdown).await;
        background.cancel();
        while helpers.join_next().await.is_some() {}
    }

    /// Deletes the files and records of jobs whose deletion is due, failed callbacks
    /// past `notifier.failed_retention` included.
    async fn delete_expired(self: Arc<Self>, stop: CancellationToken) {
        let period = self
            .keep
            .clamp(Duration::from_millis(200), Duration::from_secs(10));
        loop {
            tokio::select! {
                _ = tokio::time::sleep(period) => {}
                _ = stop.cancelled() => return,
            }
            match self.store.expire_failed(self.failed_retention, 500).await {
                Ok(0) => {}
                Ok(n) => tracing::info!(
                    jobs = n,
                    "failed callbacks past notifier.failed_retention: deleting"
                ),
                Err(e) => tracing::warn!(error = %e, "cannot expire failed callbacks"),
            }
            let ids = match self.store.due_deletions(500).await {
                Ok(ids) => ids,
                Err(e) => {
                    tracing::warn!(error = %e, "cannot read due deletions");
                    continue;
                }
            };
            if ids.is_empty() {
                continue;
            }
            let root = self.root.clone();
            let ids2 = ids.clone();
            let removed = tokio::task::spawn_blocking(move || {
                for id in &ids2 {
                    remove_job_files(&root, id);
                }
            })
            .await;
            if removed.is_ok() {
                match self.store.forget(&ids).await {
                    Ok(()) => tracing::debug!(jobs = ids.len(), "deleted expired jobs"),
                    Err(e) => tracing::warn!(error = %e, "cannot delete job records"),
                }
            }
        }
    }
}

/// Removes `<id>` and its derived files (`<id>.<anything>`) from the job's shard.
fn remove_job_files(root: &std::path::Path, id: &str) {
    if !crate::job::is_valid_id(id) {
        return;
    }
    let dir = root.join(&id[..3]);
    let Ok(entries) = std::fs::read_dir(&dir) else {
        return;
    };
    let prefix = format!("{id}.");
    for e in entries.flatten() {
        let name = e.file_name();
        let name = name.to_string_lossy();
        if (name == id || name.starts_with(&prefix))
            && let Err(err) = std::fs::remove_file(e.path())
            && err.kind() != std::io::ErrorKind::NotFound
        {
            tracing::warn!(job_id = %id, error = %err, "cannot delete file");
        }
    }
}

impl Notifier {
    /// Hands a callback whose receiver is at its cap back to the store, parked on the
    /// receiver until one of its slots is freed (see [`fair`]). Not an attempt.
    async fn defer(&self, c: &Claimed, dest: &str) {
        let delay = fair::park_delay(c.job.callback_defers);
        crate::metrics::metrics().callbacks_deferred.inc();
        self.stats.add("callbackDeferrals", 1);
        tracing::debug!(
            destination = dest,
            ?delay,
            "receiver at notifier.per_host_concurrency: callback parked"
        );
        let parked = persist("defer callback", || {
            self.store.defer_callback(&c.job.id, &c.token, dest, delay)
        })
        .await;
        // Its receiver's callbacks may have ended while it was being parked.
        if parked && self.dests.note_parked(dest) {
            self.wake_parked(dest).await;
        }
    }

    /// Puts the oldest callback parked on `dest` at the head of the queue.
    async fn wake_parked(&self, dest: &str) {
        match self.store.wake_callbacks(dest, 1).await {
            Ok(n) => self.dests.note_woken(dest, n),
            // It comes back at its fallback time.
            Err(e) => {
                tracing::warn!(destination = dest, error = %e, "cannot wake a parked callback")
            }
        }
    }
}

#[async_trait]
impl Handler for Notifier {
    async fn handle(&self, c: Claimed, cancel: CancellationToken) {
        let span = tracing::info_span!(
            "callback",
            job_id = %c.job.id,
            aggr_id = %c.job.spec.aggr_id,
            attempt = c.job.callback_attempts
        );
        async {
            let url = c.job.spec.callback.as_ref().map_or("", |cb| cb.dst.as_str());
            let dest = fair::destination(url);
            // A receiver at its cap: the callback waits parked in the store, holding no
            // slot here (not an attempt).
            let Some(slot) = self.dests.try_enter(&dest) else {
                self.defer(&c, &dest).await;
                return;
            };
            let _in_flight = crate::metrics::CallbackInFlight::enter();
            let started = std::time::Instant::now();
            let payload = c.job.callback_payload(&self.download_url);
            let r = tokio::select! {
                r = self.sender.deliver(&c.job, &payload) => r,
                _ = cancel.cancelled() => {
                    if let Err(e) = self.store.release(Queue::Callback, &c.job.id, &c.token).await {
                        tracing::warn!(error = %e, "cannot hand the callback back; its lease will expire");
                    }
                    // The slot is free again: a callback parked on this receiver may go.
                    if self.dests.leave(slot) {
                        self.wake_parked(&dest).await;
                    }
                    return;
                }
            };
            let m = crate::metrics::metrics();
            m.callback_seconds.observe(started.elapsed().as_secs_f64());
            let (id, token) = (c.job.id.as_str(), c.token.as_str());
            match r {
                Ok(()) => {
                    self.stats.add("successfulCallbacks", 1);
                    m.callbacks_delivered.inc();
                    tracing::info!("callback delivered");
                    persist("finish callback", || {
                        self.store.finish_callback(id, token, self.keep)
                    })
                    .await;
                }
                // A refused address (or an unusable destination) fails at once.
                Err(e) if !e.retryable() || c.job.callback_attempts >= self.attempts => {
                    let error = e.to_string();
                    self.stats.add("failedCallbacks", 1);
                    m.callbacks_failed.inc();
                    if e.retryable() {
                        tracing::warn!(error, "callback failed; no attempts left");
                    } else {
                        tracing::warn!(error, "callback failed; not retried");
                    }
                    persist("fail callback", || {
                        self.store.fail_callback(id, token, &error)
                    })
                    .await;
                }
                Err(e) => {
                    let error = e.to_string();
                    self.stats.add("callbackRetries", 1);
                    m.callback_retries.inc();
                    let delay = self.backoff * 2u32.saturating_pow(c.job.callback_attempts.saturating_sub(1).min(10));
                    tracing::info!(error, ?delay, "callback will be retried");
                    persist("retry callback", || {
                        self.store.retry_callback(id, token, &error, delay)
                    })
                    .await;
                }
            }
            if self.dests.leave(slot) {
                self.wake_parked(&dest).await;
            }
        }
        .instrument(span)
        .await
    }
}
