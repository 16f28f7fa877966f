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
    retries: u32,
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
            retries: cfg.notifier.callback_retries,
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
            let _in_flight = crate::metrics::CallbackInFlight::enter();
            let started = std::time::Instant::now();
            let payload = c.job.callback_payload(&self.download_url);
            let r = tokio::select! {
                r = self.sender.deliver(&c.job, &payload) => r,
                _ = cancel.cancelled() => {
                    if let Err(e) = self.store.release(Queue::Callback, &c.job.id, &c.token).await {
                        tracing::warn!(error = %e, "cannot hand the callback back; its lease will expire");
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
                Err(e) if !e.retryable() || c.job.callback_attempts > self.retries => {
                    let error = e.to_string();
                    self.stats.add("failedCallbacks", 1);
                    m.callbacks_failed.inc();
                    if e.retryable() {
                        tracing::warn!(error, "callback failed; no retries left");
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
        }
        .instrument(span)
        .await
    }
}
