//! The processor: claims downloads within their aggregation's limit, fetches them,
//! and records the outcome (which queues the callback).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use rand::Rng;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

pub mod fetch;
pub mod share;

use crate::config::Config;
use crate::job::{DownloadError, FailureReason, JobRecord, ThumbnailInfo};
use crate::stats::Stats;
use crate::store::{Claimed, DownloadResult, HostLimits, HostPermit, Queue, Store, WaitReason};
use crate::thumbnail::{Class, Thumbnailer};
use crate::worker::{self, Handler, WorkerConfig, persist};
use fetch::{Fetcher, Outcome};

/// Pauses asked by an origin (429/503 with Retry-After) that a job may take without
/// spending a retry; further ones are ordinary retries.
const MAX_FREE_PAUSES: u32 = 10;

/// Shortest pause of a host, whatever its Retry-After says.
const MIN_HOST_PAUSE: Duration = Duration::from_secs(1);

pub struct Processor {
    store: Arc<dyn Store>,
    fetcher: Fetcher,
    thumbnailer: Arc<Thumbnailer>,
    stats: Arc<Stats>,
    backoff: Duration,
    /// How long a job without a callback is kept (its deletion interval).
    keep: Duration,
    /// Downloads in flight here, per aggregation (for the pool counters).
    pools: Mutex<HashMap<String, usize>>,
    host_limits: HostLimits,
    max_host_pause: Duration,
    lease: Duration,
    /// The fair shares of this processor's download slots.
    shares: Arc<share::Shares>,
}

impl Processor {
    pub fn new(
        cfg: &Config,
        store: Arc<dyn Store>,
        thumbnailer: Arc<Thumbnailer>,
    ) -> anyhow::Result<Processor> {
        let root = cfg.storage_root().map_err(anyhow::Error::msg)?;
        std::fs::create_dir_all(&root)
            .map_err(|e| anyhow::anyhow!("cannot create storage dir {}: {e}", root.display()))?;
        let proxies = cfg.proxy_policy().map_err(anyhow::Error::msg)?;
        let fetcher = Fetcher::new(
            proxies,
            &cfg.default_headers(),
            cfg.processor.max_download_bytes,
            fetch::Timeouts {
                default: Duration::from_secs(cfg.processor.download_timeout),
                max: cfg.max_download_timeout(),
                idle: cfg.read_idle_timeout(),
            },
            root,
        )?;
        let slots = cfg.processor.max_concurrent_downloads;
        let shares = Arc::new(share::Shares::new(
            cfg.processor.max_slots_per_aggregation.of(slots),
            cfg.processor.max_slots_per_tenant.of(slots),
            slots,
        ));
        Ok(Processor {
            store,
            fetcher,
            thumbnailer,
            stats: Arc::new(Stats::default()),
            backoff: cfg.processor_backoff(),
            keep: cfg.deletion_delay(),
            pools: Mutex::new(HashMap::new()),
            host_limits: cfg.host_limits(),
            max_host_pause: Duration::from_secs_f64(cfg.processor.max_host_pause_secs),
            lease: Duration::from_secs(cfg.processor.lease_secs),
            shares,
        })
    }

    /// Runs until `shutdown`, then drains within the grace period.
    pub async fn run(self: Arc<Self>, cfg: &Config, shutdown: CancellationToken) {
        let stop_stats = CancellationToken::new();
        let reporter = tokio::spawn(self.stats.clone().report(
            self.store.clone(),
            "processor",
            Duration::from_millis(cfg.processor.stats_interval),
            stop_stats.clone(),
        ));
        let (may_claim, mut gate) = tokio::sync::watch::channel(true);
        let disk = crate::disk::DiskWatch::from_config(cfg, self.fetcher.root().to_path_buf());
        let watcher = tokio::spawn(disk.run(may_claim, stop_stats.clone()).in_current_span());
        // A processor (re)started on a full disk must not claim before the first check.
        let first_check = crate::disk::CHECK_TIMEOUT + Duration::from_secs(1);
        let _ = tokio::time::timeout(first_check, gate.changed()).await;
        let wc = WorkerConfig {
            queue: Queue::Download,
            lease: self.lease,
            max_in_flight: cfg.processor.max_concurrent_downloads,
            grace: Duration::from_secs(cfg.processor.shutdown_grace_secs),
            may_claim: Some(gate),
        };
        self.stats.add("maxWorkers", 0);
        worker::run(self.store.clone(), wc, self.clone(), shutdown).await;
        stop_stats.cancel();
        let _ = reporter.await;
        let _ = watcher.await;
    }

    /// Counts a download of `aggr` as running until the guard is dropped (also when
    /// its task panics or is aborted).
    fn enter<'a>(&'a self, aggr: &'a str) -> impl Drop + 'a {
        struct Running<'a>(&'a Processor, &'a str);
        impl Drop for Running<'_> {
            fn drop(&mut self) {
                self.0.leave(self.1);
            }
        }
        self.count_entered(aggr);
        Running(self, aggr)
    }

    fn count_entered(&self, aggr: &str) {
        let mut pools = self.pools.lock().unwrap_or_else(|p| p.into_inner());
        crate::metrics::metrics().download_entered(aggr);
        let n = pools.entry(aggr.to_string()).or_default();
        *n += 1;
        if *n == 1 {
            self.stats.add("spawnedWorkerPools", 1);
        }
        let workers: usize = pools.values().sum();
        self.stats.add("spawnedWorkers", 1);
        self.stats.gauge("workers", workers as i64, "maxWorkers");
        self.stats
            .gauge("workerPools", pools.len() as i64, "maxWorkerPools");
    }

    fn leave(&self, aggr: &str) {
        crate::metrics::metrics().download_left(aggr);
        let mut pools = self.pools.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(n) = pools.get_mut(aggr) {
            *n -= 1;
            if *n == 0 {
                pools.remove(aggr);
            }
        }
        let workers: usize = pools.values().sum();
        self.stats.gauge("workers", workers as i64, "maxWorkers");
        self.stats
            .gauge("workerPools", pools.len() as i64, "maxWorkerPools");
    }

    /// Backoff before retry `attempt` (1-based): doubles each time, ±20 % jitter.
    fn retry_delay(&self, attempt: u32, retry_after: Option<Duration>) -> Duration {
        let base = self.backoff * 2u32.saturating_pow(attempt.saturating_sub(1).min(10));
        let jitter = rand::rng().random_range(0.8..1.2);
        base.mul_f64(jitter).max(retry_after.unwrap_or_default())
    }

    /// Makes the job's thumbnails from its downloaded file (or its body, when that was
    /// held in memory), all from one decode, and stores each at
    /// `<root>/<id[0:3]>/<id>.<name>.<ext>`. `Err` says which one failed and why.
    async fn make_thumbnails(
        &self,
        job: &JobRecord,
        body: Option<bytes::Bytes>,
    ) -> Result<Vec<ThumbnailInfo>, String> {
        let specs = job.spec.thumbnail_specs()?;
        let data = match body {
            Some(b) => b,
            None => self.read_for_thumbnails(&job.id).await?,
        };
        let names: Vec<String> = specs.iter().map(|s| s.name.clone()).collect();
        let mut made = Vec::with_capacity(names.len());
        // One at a time: the worker makes the next thumbnail only once this one is
        // written, so the job holds one decoded image and one output at a time.
        let deadline = std::time::Instant::now() + crate::thumbnail::JOB_MEMORY_WAIT;
        let mut results = self
            .thumbnailer
            .start(data, specs, Class::Job, deadline)
            .await
            .map_err(|e| format!("thumbnails: {e}"))?;
        while let Some((i, t)) = results.next().await {
            let name = &names[i];
            let t = t.map_err(|e| format!("thumbnail {name}: {e}"))?;
            let rel = format!(
                "{}.{name}.{}",
                crate::job::relative_path(&job.id),
                t.format.extension()
            );
            let bytes = t.bytes.len() as u64;
            fetch::write_atomic(self.fetcher.root().join(&rel), t.bytes)
                .await
                .map_err(|e| format!("thumbnail {name}: cannot store it: {e}"))?;
            made.push(ThumbnailInfo {
                name: name.clone(),
                path: rel,
                width: t.width,
                height: t.height,
                format: format_name(t.format),
                bytes,
            });
        }
        if made.len() != names.len() {
            return Err(format!(
                "thumbnails: {} of {} made (the thumbnail worker stopped)",
                made.len(),
                names.len()
            ));
        }
        Ok(made)
    }

    /// The downloaded file, if it is within `thumbnail.max_input_bytes`.
    async fn read_for_thumbnails(&self, id: &str) -> Result<bytes::Bytes, String> {
        let path = self.fetcher.final_path(id);
        let max = self.thumbnailer.config().max_input_bytes;
        let len = tokio::fs::metadata(&path)
            .await
            .map_err(|e| format!("thumbnails: cannot read the downloaded file: {e}"))?
            .len();
        if len > max {
            return Err(format!(
                "thumbnails: the file is {len} bytes, over thumbnail.max_input_bytes ({max})"
            ));
        }
        Ok(bytes::Bytes::from(tokio::fs::read(&path).await.map_err(
            |e| format!("thumbnails: cannot read the downloaded file: {e}"),
        )?))
    }

    /// The download and, when it succeeded, the job's thumbnails.
    async fn run_job(&self, c: &Claimed) -> (Outcome, Vec<ThumbnailInfo>) {
        let started = std::time::Instant::now();
        let mut outcome = self.fetcher.fetch(&c.job, c.proxy.as_deref()).await;
        crate::metrics::metrics()
            .download_seconds
            .observe(started.elapsed().as_secs_f64());
        let (code, body) = match &mut outcome {
            Outcome::Success { code, body, .. } if !c.job.spec.thumbnails.is_empty() => {
                (*code, body.take())
            }
            _ => return (outcome, Vec::new()),
        };
        let result = self.make_thumbnails(&c.job, body).await;
        let t = self.thumbnailer.stats();
        self.stats.set("thumbnailsMade", t.made as i64);
        self.stats.set("thumbnailsRefused", t.refused as i64);
        // Decoder panics caught by the thumbnailer's last line of defence.
        self.stats.set("thumbnailPanics", t.panics as i64);
        match result {
            Ok(made) => (outcome, made),
            // Thumbnailing the same bytes again would fail the same way: not retried.
            Err(error) => {
                let error = DownloadError::new(FailureReason::Thumbnail, error).answered(code);
                (Outcome::Fail(error), Vec::new())
            }
        }
    }

    async fn record(&self, c: &Claimed, outcome: Outcome, thumbnails: Vec<ThumbnailInfo>) {
        let job = &c.job;
        let (result, failure, retry) = match outcome {
            Outcome::Success {
                code,
                image_size,
                bytes,
                ..
            } => {
                self.stats.add(&format!("download.response.{code}"), 1);
                crate::metrics::metrics().downloaded_bytes.inc_by(bytes);
                tracing::info!(bytes, code, image_size, "download succeeded");
                (
                    DownloadResult {
                        success: true,
                        error: String::new(),
                        response_code: code,
                        image_size,
                        thumbnails: if thumbnails.is_empty() {
                            String::new()
                        } else {
                            serde_json::to_string(&thumbnails).unwrap_or_default()
                        },
                    },
                    None,
                    None,
                )
            }
            Outcome::Fail(e) => {
                self.count_failure(e.code);
                tracing::warn!(error = e.message.as_str(), code = e.code, "download failed");
                (failed(&e), Some(e.reason), None)
            }
            Outcome::Retry {
                error: e, after, ..
            } => {
                self.count_failure(e.code);
                let (error, code) = (e.message.as_str(), e.code);
                let attempts = job.download_attempts;
                if attempts > job.spec.max_retries {
                    tracing::warn!(error, code, attempts, "download failed; no retries left");
                    (failed(&e), Some(e.reason), None)
                } else {
                    let delay = self.retry_delay(attempts, after);
                    tracing::info!(error, code, attempts, ?delay, "download will be retried");
                    (failed(&e), Some(e.reason), Some(delay))
                }
            }
        };
        let metrics = crate::metrics::metrics();
        match failure {
            None => metrics.download_succeeded(),
            Some(reason) => metrics.download_failed(reason, retry.is_some()),
        }
        let (id, token) = (job.id.as_str(), c.token.as_str());
        match retry {
            Some(delay) => {
                persist("retry download", || {
                    self.store.retry_download(id, token, &result, delay)
                })
                .await
            }
            None => {
                persist("finish download", || {
                    self.store.finish_download(id, token, &result, self.keep)
                })
                .await
            }
        };
    }

    /// The origin answered 429/503 with Retry-After: pause its host (for every
    /// processor) as long as it asks, within `max_host_pause_secs`, and run the job
    /// again after it without spending an attempt.
    async fn pause_host(&self, c: &Claimed, host: &str, answer: DownloadError, after: Duration) {
        let (code, error) = (answer.code, answer.message.as_str());
        // `Retry-After: 0` (or a date past) must not make a loop that spends nothing.
        let pause = after.clamp(MIN_HOST_PAUSE, self.max_host_pause.max(MIN_HOST_PAUSE));
        self.stats.add("hostPauses", 1);
        crate::metrics::metrics().host_pauses.inc();
        self.stats.add(&format!("download.response.{code}"), 1);
        tracing::warn!(
            host,
            code,
            error,
            pause_ms = pause.as_millis() as u64,
            "origin asked us to slow down: pausing its host"
        );
        if let Err(e) = self.store.pause_host(host, pause).await {
            tracing::warn!(error = %e, "cannot record the host's pause");
        }
        let answer = failed(&answer);
        self.defer(c, host, Some(&answer), pause, WaitReason::HostPaused)
            .await;
    }

    /// Asks the store whether the job may go to its host now. `false` when it may not
    /// (it was deferred, or its lease is gone).
    async fn host_allows(&self, c: &Claimed, host: &str) -> bool {
        let (id, token) = (c.job.id.as_str(), c.token.as_str());
        let permit = self
            .store
            .host_permit(id, token, host, self.host_limits, self.lease)
            .await;
        let (delay, reason) = match permit {
            Ok(HostPermit::Granted) => return true,
            Ok(HostPermit::Lost) => return false,
            Ok(HostPermit::Wait { delay, reason }) => (delay, reason),
            Err(e) => {
                // Going ahead could break a host's limits. Ask again after the park
                // fallback (a release would be claimed again at once and could spin on
                // a lasting error); the job shows it waits for its host.
                tracing::warn!(error = %e, "cannot check the host's limits; deferring");
                (
                    crate::store::HOST_PARK_FALLBACK,
                    WaitReason::HostConcurrency,
                )
            }
        };
        self.defer(c, host, None, delay, reason).await;
        false
    }

    /// Queues the job again after `delay` without spending an attempt.
    async fn defer(
        &self,
        c: &Claimed,
        host: &str,
        answer: Option<&DownloadResult>,
        delay: Duration,
        reason: WaitReason,
    ) {
        self.stats.add(&format!("deferred.{}", reason.as_str()), 1);
        crate::metrics::metrics()
            .downloads_deferred
            .get_or_create(&crate::metrics::ReasonLabel {
                reason: reason.as_str(),
            })
            .inc();
        tracing::info!(
            host,
            reason = reason.as_str(),
            delay_ms = delay.as_millis() as u64,
            "download deferred"
        );
        let (id, token) = (c.job.id.as_str(), c.token.as_str());
        persist("defer download", || {
            self.store.defer_download(id, token, answer, delay, reason)
        })
        .await;
    }

    fn count_failure(&self, code: u16) {
        self.stats.add("failures", 1);
        if code != 0 {
            self.stats.add(&format!("download.response.{code}"), 1);
        }
    }
}

/// What the store records of a failed attempt; its reason goes to the metrics only.
fn failed(error: &DownloadError) -> DownloadResult {
    DownloadResult {
        success: false,
        error: error.message.clone(),
        response_code: error.code,
        image_size: String::new(),
        thumbnails: String::new(),
    }
}

fn format_name(f: crate::thumbnail::Format) -> String {
    serde_json::to_value(f)
        .ok()
        .and_then(|v| v.as_str().map(str::to_string))
        .unwrap_or_else(|| f.extension().to_string())
}

#[async_trait]
impl Handler for Processor {
    fn claim_shares(&self, max: usize) -> crate::store::ClaimShares {
        self.shares.claim_shares(max)
    }

    fn claimed(&self, c: &Claimed) -> Box<dyn Send> {
        Box::new(self.shares.hold(&c.job.spec))
    }

    async fn handle(&self, c: Claimed, cancel: CancellationToken) {
        let span = tracing::info_span!(
            "download",
            job_id = %c.job.id,
            aggr_id = %c.job.spec.aggr_id,
            attempt = c.job.download_attempts
        );
        async {
            let host = c.job.spec.host();
            // Pauses are checked by the claim itself; the rest only when configured.
            if self.host_limits != HostLimits::OFF && !self.host_allows(&c, &host).await {
                return;
            }
            let _running = self.enter(&c.job.spec.aggr_id);
            tracing::debug!(url = %c.job.spec.url, "download started");
            let outcome = tokio::select! {
                o = self.run_job(&c) => Some(o),
                _ = cancel.cancelled() => None,
            };
            match outcome {
                // The host's pauses are free (no attempt spent), up to a bound: an origin
                // that never stops asking gets ordinary retries, which run out. The host
                // that answered is paused: after a redirect, that is the redirect's
                // target (a CDN, say), not the job's own host.
                Some((Outcome::Retry { error, after: Some(after), host: answered }, _))
                    if matches!(error.code, 429 | 503) && c.job.download_pauses < MAX_FREE_PAUSES =>
                {
                    let paused = answered.unwrap_or(host);
                    self.pause_host(&c, &paused, error, after).await
                }
                Some((o, thumbnails)) => self.record(&c, o, thumbnails).await,
                None => {
                    tracing::info!("download interrupted; handing the job back");
                    if let Err(e) = self.store.release(Queue::Download, &c.job.id, &c.token).await {
                        tracing::warn!(error = %e, "cannot hand the job back; its lease will expire");
                    }
                }
            }
        }
        .instrument(span)
        .await
    }
}
