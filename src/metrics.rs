//! This process's metrics, served as OpenMetrics text (which Prometheus scrapes) at
//! `GET /metrics`: by `web` and `serve` on their port, by `processor` and `notifier` on
//! their admin listener. Counters live for the whole process; gauges of the store
//! (pending jobs) and of the process (tasks, connections, memory, fds) are read at
//! scrape time.
//!
//! Label cardinality is bounded: failure reasons come from a fixed list (a
//! [`FailureReason`], made where the download failed) and only the
//! [`TOP_AGGREGATIONS`] busiest aggregations get a series of their own; the totals
//! cover all of them.

use std::collections::HashMap;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, LazyLock, Mutex};
use std::time::Duration;

use prometheus_client::encoding::{DescriptorEncoder, EncodeLabelSet, EncodeMetric};
use prometheus_client::metrics::MetricType;
use prometheus_client::metrics::counter::{ConstCounter, Counter};
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::{ConstGauge, Gauge};
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::metrics::info::Info;
use prometheus_client::registry::{Registry, Unit};

use crate::job::FailureReason;
use crate::store::Store;
use crate::thumbnail::Thumbnailer;

/// Aggregations with a series of their own in the per-aggregation gauges.
pub const TOP_AGGREGATIONS: usize = 10;

/// How long a scrape waits for the store's pending counts.
const STORE_TIMEOUT: Duration = Duration::from_secs(2);

/// `Content-Type` of [`render`]'s output.
pub const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReasonLabel {
    pub reason: &'static str,
}

/// The process's counters and histograms.
pub struct Metrics {
    registry: Registry,
    pub jobs_submitted: Counter,
    pub jobs_started: Counter,
    pub jobs_succeeded: Counter,
    /// Jobs whose download failed for good, by reason.
    pub jobs_failed: Family<ReasonLabel, Counter>,
    /// Download attempts that failed and were scheduled again, by reason.
    pub download_retries: Family<ReasonLabel, Counter>,
    pub downloaded_bytes: Counter,
    /// Claimed downloads put back without an attempt (host limits, pauses), by reason.
    pub downloads_deferred: Family<ReasonLabel, Counter>,
    /// Pauses of a host asked by its origin (429/503 with Retry-After).
    pub host_pauses: Counter,
    pub download_seconds: Histogram,
    pub callbacks_delivered: Counter,
    pub callbacks_failed: Counter,
    pub callback_retries: Counter,
    /// Claimed callbacks parked unattempted: their receiver was at
    /// `notifier.per_host_concurrency`.
    pub callbacks_deferred: Counter,
    pub callback_seconds: Histogram,
    pub callbacks_in_flight: Gauge,
    pub claims_paused: Gauge,
    pub storage_used_percent: Gauge<f64, AtomicU64>,
    pub disk_checks: Counter,
    /// Connections and requests the HTTP servers refused or cut off, by reason
    /// ([`REFUSAL_REASONS`]).
    pub http_refused: Family<ReasonLabel, Counter>,
    /// Idle connections closed to make room for a new one at `api.max_connections`.
    pub http_idle_closed: Counter,
    scrape: Arc<Scrape>,
}

/// Values gathered at scrape time and encoded by [`Scrape`]'s `Collector` impl.
#[derive(Debug, Default)]
struct Snapshot {
    /// `None` when the store did not answer in time.
    pending: Option<crate::store::PendingSummary>,
    thumbnails: Option<crate::thumbnail::Stats>,
    process: Process,
}

#[derive(Debug, Default)]
struct Scrape {
    snapshot: Mutex<Snapshot>,
    /// Downloads running in this process, per aggregation.
    downloads_in_flight: Mutex<HashMap<String, i64>>,
}

static METRICS: LazyLock<Metrics> = LazyLock::new(Metrics::new);

/// The process's metrics.
pub fn metrics() -> &'static Metrics {
    &METRICS
}

impl Metrics {
    fn new() -> Metrics {
        let mut r = Registry::with_prefix("downloader");
        let m = Metrics {
            registry: Registry::default(),
            jobs_submitted: Counter::default(),
            jobs_started: Counter::default(),
            jobs_succeeded: Counter::default(),
            jobs_failed: Family::default(),
            download_retries: Family::default(),
            downloaded_bytes: Counter::default(),
            downloads_deferred: Family::default(),
            host_pauses: Counter::default(),
            download_seconds: Histogram::new(exponential_buckets(0.01, 2.5, 12)),
            callbacks_delivered: Counter::default(),
            callbacks_failed: Counter::default(),
            callback_retries: Counter::default(),
            callbacks_deferred: Counter::default(),
            callback_seconds: Histogram::new(exponential_buckets(0.005, 2.5, 12)),
            callbacks_in_flight: Gauge::default(),
            claims_paused: Gauge::default(),
            storage_used_percent: Gauge::default(),
            disk_checks: Counter::default(),
            http_refused: Family::default(),
            http_idle_closed: Counter::default(),
            scrape: Arc::new(Scrape::default()),
        };
        r.register(
            "build",
            "Version and commit of this binary",
            Info::new(vec![
                ("version", env!("CARGO_PKG_VERSION")),
                ("commit", env!("DOWNLOADER_COMMIT")),
            ]),
        );
        r.register(
            "jobs_submitted",
            "Jobs accepted by POST /download",
            m.jobs_submitted.clone(),
        );
        r.register(
            "jobs_started",
            "Download attempts started",
            m.jobs_started.clone(),
        );
        r.register(
            "jobs_succeeded",
            "Jobs downloaded (and thumbnailed) successfully",
            m.jobs_succeeded.clone(),
        );
        r.register(
            "jobs_failed",
            "Jobs whose download failed for good, by reason",
            m.jobs_failed.clone(),
        );
        r.register(
            "download_retries",
            "Download attempts that failed and were scheduled again, by reason",
            m.download_retries.clone(),
        );
        r.register_with_unit(
            "downloaded",
            "Bytes of successfully downloaded files",
            Unit::Bytes,
            m.downloaded_bytes.clone(),
        );
        r.register(
            "downloads_deferred",
            "Claimed downloads queued again without an attempt, by reason (host_paused, host_rate, host_concurrency)",
            m.downloads_deferred.clone(),
        );
        r.register(
            "host_pauses",
            "Hosts paused because their origin answered 429/503 with Retry-After",
            m.host_pauses.clone(),
        );
        r.register_with_unit(
            "download_duration",
            "Time of one download attempt (request to stored file)",
            Unit::Seconds,
            m.download_seconds.clone(),
        );
        r.register(
            "callbacks_delivered",
            "Callbacks answered with a 2xx",
            m.callbacks_delivered.clone(),
        );
        r.register(
            "callbacks_failed",
            "Callbacks that failed for good (no retries left)",
            m.callbacks_failed.clone(),
        );
        r.register(
            "callback_retries",
            "Callback attempts that failed and were scheduled again",
            m.callback_retries.clone(),
        );
        r.register(
            "callbacks_deferred",
            "Claimed callbacks parked unattempted: their receiver had notifier.per_host_concurrency in flight",
            m.callbacks_deferred.clone(),
        );
        r.register_with_unit(
            "callback_duration",
            "Time of one callback attempt",
            Unit::Seconds,
            m.callback_seconds.clone(),
        );
        r.register(
            "callbacks_in_flight",
            "Callbacks being delivered by this process",
            m.callbacks_in_flight.clone(),
        );
        r.register(
            "claims_paused",
            "1 while the processor claims no downloads because the storage filesystem is full",
            m.claims_paused.clone(),
        );
        r.register(
            "storage_used_percent",
            "Used space of the storage filesystem at its last check, in percent",
            m.storage_used_percent.clone(),
        );
        r.register(
            "disk_checks",
            "Looks at the storage filesystem's usage",
            m.disk_checks.clone(),
        );
        r.register(
            "http_refused",
            "Connections and requests the HTTP servers refused or cut off, by reason (connections, body_budget, body_deadline, write_deadline)",
            m.http_refused.clone(),
        );
        r.register(
            "http_idle_closed",
            "Idle connections closed to make room for a new one at api.max_connections",
            m.http_idle_closed.clone(),
        );
        for reason in REFUSAL_REASONS {
            m.http_refused
                .get_or_create(&ReasonLabel { reason })
                .inc_by(0);
        }
        // Every reason from the start, so that rates work before its first failure.
        for reason in FailureReason::ALL.map(FailureReason::as_str) {
            m.jobs_failed
                .get_or_create(&ReasonLabel { reason })
                .inc_by(0);
            m.download_retries
                .get_or_create(&ReasonLabel { reason })
                .inc_by(0);
        }
        for reason in [
            crate::store::WaitReason::HostPaused,
            crate::store::WaitReason::HostRate,
            crate::store::WaitReason::HostConcurrency,
        ] {
            m.downloads_deferred
                .get_or_create(&ReasonLabel {
                    reason: reason.as_str(),
                })
                .inc_by(0);
        }
        r.register_collector(Box::new(m.scrape.clone()));
        Metrics { registry: r, ..m }
    }

    /// A download of `aggr` started in this process.
    pub fn download_entered(&self, aggr: &str) {
        self.jobs_started.inc();
        *lock(&self.scrape.downloads_in_flight)
            .entry(aggr.to_string())
            .or_default() += 1;
    }

    /// A download of `aggr` ended in this process.
    pub fn download_left(&self, aggr: &str) {
        let mut m = lock(&self.scrape.downloads_in_flight);
        if let Some(n) = m.get_mut(aggr) {
            *n -= 1;
            if *n <= 0 {
                m.remove(aggr);
            }
        }
    }

    /// A download (and its thumbnails) succeeded.
    pub fn download_succeeded(&self) {
        self.jobs_succeeded.inc();
    }

    /// A download attempt failed for `reason`; `retried` when it is scheduled again.
    pub fn download_failed(&self, reason: FailureReason, retried: bool) {
        let label = ReasonLabel {
            reason: reason.as_str(),
        };
        if retried {
            self.download_retries.get_or_create(&label).inc();
        } else {
            self.jobs_failed.get_or_create(&label).inc();
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// Reasons of `downloader_http_refused_total` (counted by `web::bounds`): a fixed set.
pub const REFUSAL_REASONS: [&str; 4] = [
    "connections",
    "body_budget",
    "body_deadline",
    "write_deadline",
];

/// Open HTTP connections of this process's servers (kept by `web::server`), read at
/// scrape time.
pub static OPEN_CONNECTIONS: AtomicI64 = AtomicI64::new(0);

/// Counts a callback in flight while it lives.
pub struct CallbackInFlight;

impl CallbackInFlight {
    pub fn enter() -> CallbackInFlight {
        metrics().callbacks_in_flight.inc();
        CallbackInFlight
    }
}

impl Drop for CallbackInFlight {
    fn drop(&mut self) {
        metrics().callbacks_in_flight.dec();
    }
}

/// Where scrape-time values come from; `None` fields are left out of the output.
#[derive(Clone, Default)]
pub struct Sources {
    /// For pending jobs per aggregation.
    pub store: Option<Arc<dyn Store>>,
    /// For thumbnails made and refused.
    pub thumbnailer: Option<Arc<Thumbnailer>>,
}

/// The metrics as OpenMetrics text, with the scrape-time values read now.
pub async fn render(sources: &Sources) -> String {
    // One scrape at a time: each encodes the snapshot it gathered, not another's.
    static ONE_AT_A_TIME: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());
    let _turn = ONE_AT_A_TIME.lock().await;
    let pending = match &sources.store {
        Some(store) => {
            match tokio::time::timeout(STORE_TIMEOUT, store.pending_summary(TOP_AGGREGATIONS)).await
            {
                Ok(Ok(summary)) => Some(summary),
                Ok(Err(e)) => {
                    tracing::warn!(error = %e, "metrics: cannot read pending jobs from the store");
                    None
                }
                Err(_) => {
                    tracing::warn!("metrics: the store did not answer in time for pending jobs");
                    None
                }
            }
        }
        None => None,
    };
    // /proc reads (up to one entry per open fd) stay off the async threads.
    let process = tokio::task::spawn_blocking(process)
        .await
        .unwrap_or_default();
    let m = metrics();
    {
        let mut s = lock(&m.scrape.snapshot);
        s.pending = pending;
        s.thumbnails = sources.thumbnailer.as_ref().map(|t| t.stats());
        s.process = process;
    }
    let mut out = String::new();
    // Writing into a String cannot fail.
    let _ = prometheus_client::encoding::text::encode(&mut out, &m.registry);
    out
}

/// The `TOP_AGGREGATIONS` largest values, largest first (ties by name, so a series
/// does not flap between equal aggregations), and the sum of all.
fn top<I: IntoIterator<Item = (String, i64)>>(all: I) -> (Vec<(String, i64)>, i64) {
    let mut v: Vec<(String, i64)> = all.into_iter().collect();
    let total = v.iter().map(|(_, n)| n).sum();
    v.sort_by(|a, b| b.1.cmp(&a.1).then_with(|| a.0.cmp(&b.0)));
    v.truncate(TOP_AGGREGATIONS);
    (v, total)
}

fn gauge(
    encoder: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    unit: Option<&Unit>,
    value: i64,
) -> Result<(), std::fmt::Error> {
    let e = encoder.encode_descriptor(name, help, unit, MetricType::Gauge)?;
    ConstGauge::new(value).encode(e)
}

fn counter(
    encoder: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    value: u64,
) -> Result<(), std::fmt::Error> {
    let e = encoder.encode_descriptor(name, help, None, MetricType::Counter)?;
    ConstCounter::new(value).encode(e)
}

fn per_aggregation(
    encoder: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    top: &[(String, i64)],
) -> Result<(), std::fmt::Error> {
    let mut e = encoder.encode_descriptor(name, help, None, MetricType::Gauge)?;
    for (aggr, n) in top {
        let labels = [("aggregation", aggr.as_str())];
        ConstGauge::new(*n).encode(e.encode_family(&labels)?)?;
    }
    Ok(())
}

impl prometheus_client::collector::Collector for Scrape {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let snapshot = lock(&self.snapshot);
        let (in_flight, in_flight_total) = top(lock(&self.downloads_in_flight)
            .iter()
            .map(|(a, n)| (a.clone(), *n)));
        gauge(
            &mut encoder,
            "downloads_in_flight",
            "Downloads running in this process",
            None,
            in_flight_total,
        )?;
        per_aggregation(
            &mut encoder,
            "downloads_in_flight_by_aggregation",
            "Downloads running in this process, for the busiest aggregations only",
            &in_flight,
        )?;
        if let Some(pending) = &snapshot.pending {
            // The store keeps the counts and the busiest ones: no scan of every
            // aggregation per scrape.
            let aggregations = i64::try_from(pending.aggregations).unwrap_or(i64::MAX);
            let total = i64::try_from(pending.jobs).unwrap_or(i64::MAX);
            let (top, _) = top(pending
                .top
                .iter()
                .map(|(a, n)| (a.clone(), i64::try_from(*n).unwrap_or(i64::MAX))));
            gauge(
                &mut encoder,
                "jobs_pending",
                "Jobs waiting for a download slot, over all aggregations (store-wide)",
                None,
                total,
            )?;
            gauge(
                &mut encoder,
                "aggregations_pending",
                "Aggregations with jobs waiting (store-wide)",
                None,
                aggregations,
            )?;
            per_aggregation(
                &mut encoder,
                "jobs_pending_by_aggregation",
                "Jobs waiting, for the aggregations with the most waiting only (store-wide)",
                &top,
            )?;
        }
        if let Some(t) = &snapshot.thumbnails {
            counter(&mut encoder, "thumbnails_made", "Thumbnails made", t.made)?;
            counter(
                &mut encoder,
                "thumbnails_refused",
                "Thumbnails not made because their input was refused (too large, corrupt, unsupported); one per requested thumbnail",
                t.refused,
            )?;
        }
        if let Ok(rt) = tokio::runtime::Handle::try_current() {
            gauge(
                &mut encoder,
                "tasks_live",
                "Tasks alive in the async runtime",
                None,
                rt.metrics().num_alive_tasks() as i64,
            )?;
        }
        gauge(
            &mut encoder,
            "http_connections_open",
            "Open connections of this process's HTTP servers",
            None,
            OPEN_CONNECTIONS.load(Ordering::Relaxed),
        )?;
        let p = snapshot.process;
        if let Some(rss) = p.rss_bytes {
            gauge(
                &mut encoder,
                "process_resident_memory",
                "Resident set size",
                Some(&Unit::Bytes),
                rss as i64,
            )?;
        }
        if let Some(fds) = p.open_fds {
            gauge(
                &mut encoder,
                "process_open_fds",
                "Open file descriptors",
                None,
                fds as i64,
            )?;
        }
        Ok(())
    }
}

/// What /proc/self says about this process.
#[derive(Debug, Default, Clone, Copy)]
pub struct Process {
    pub rss_bytes: Option<u64>,
    pub open_fds: Option<u64>,
}

/// Reads RSS from `/proc/self/statm` and counts `/proc/self/fd`.
pub fn process() -> Process {
    let rss_bytes = std::fs::read_to_string("/proc/self/statm")
        .ok()
        .and_then(|s| s.split_whitespace().nth(1)?.parse::<u64>().ok())
        .map(|pages| pages * rustix::param::page_size() as u64);
    // The directory handle read_dir holds is itself one entry: not counted.
    let open_fds = std::fs::read_dir("/proc/self/fd")
        .ok()
        .map(|d| d.count().saturating_sub(1) as u64);
    Process {
        rss_bytes,
        open_fds,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn every_failure_reason_has_its_series_from_the_start() {
        let text = render(&Sources::default()).await;
        for reason in FailureReason::ALL.map(FailureReason::as_str) {
            for family in ["jobs_failed", "download_retries"] {
                let series = format!("downloader_{family}_total{{reason=\"{reason}\"}}");
                assert!(text.contains(&series), "{series} missing in\n{text}");
            }
        }
        metrics().download_failed(FailureReason::TooLarge, false);
        metrics().download_failed(FailureReason::Http5xx, true);
        let text = render(&Sources::default()).await;
        for series in [
            "downloader_jobs_failed_total{reason=\"too_large\"}",
            "downloader_download_retries_total{reason=\"http_5xx\"}",
        ] {
            let line = text.lines().find(|l| l.starts_with(series)).unwrap();
            let n: f64 = line.rsplit(' ').next().unwrap().parse().unwrap();
            assert!(n >= 1.0, "{line}");
        }
    }

    #[test]
    fn only_the_busiest_aggregations_get_a_series() {
        let all = (0..50).map(|i| (format!("a{i:02}"), i as i64));
        let (top, total) = top(all);
        assert_eq!(top.len(), TOP_AGGREGATIONS);
        assert_eq!(top[0], ("a49".to_string(), 49));
        assert_eq!(top[9], ("a40".to_string(), 40));
        assert_eq!(total, (0..50).sum::<i64>());
    }

    #[tokio::test]
    async fn render_has_the_process_gauges_and_counters() {
        metrics()
            .jobs_failed
            .get_or_create(&ReasonLabel { reason: "mime" })
            .inc();
        metrics().download_entered("render-test");
        let text = render(&Sources::default()).await;
        metrics().download_left("render-test");
        for line in [
            "downloader_jobs_failed_total{reason=\"mime\"}",
            "downloader_downloads_in_flight_by_aggregation{aggregation=\"render-test\"} 1",
            "# TYPE downloader_download_duration_seconds histogram",
            "downloader_process_open_fds ",
            "downloader_process_resident_memory_bytes ",
            "downloader_tasks_live ",
            "downloader_http_connections_open ",
            "downloader_build_info{version=",
        ] {
            assert!(text.contains(line), "{line} missing in\n{text}");
        }
        assert!(text.ends_with("# EOF\n"), "{text}");
        assert!(
            !text.contains("downloader_jobs_pending "),
            "no store, no pending"
        );
        let p = process();
        assert!(
            p.rss_bytes.unwrap() > 1 << 20 && p.open_fds.unwrap() >= 3,
            "{p:?}"
        );
    }
}
