//! The shared store: job records, aggregations, queues, leases and stats.
//!
//! Every component talks to the store only through [`Store`], so that an embedded
//! single-machine backend can offer the same semantics as Redis. Each method is one
//! atomic step; the invariants they keep are listed in ARCHITECTURE.md.

use std::time::Duration;

use async_trait::async_trait;

use crate::job::{JobRecord, JobSpec};

pub mod clock;
// Defined below the store, beside their other users: the config's keys, the job record.
pub use crate::config::{AggrSettings, HostLimits};
pub use crate::job::WaitReason;

pub mod embedded;
pub mod redis;
pub mod schema;

pub use clock::Clock;

pub type Result<T> = std::result::Result<T, StoreError>;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("store: {0}")]
    Backend(String),
    #[error("store: corrupt data: {0}")]
    Corrupt(String),
}

/// A job handed to one worker. Only the holder of `token` may finish it; the lease
/// must be renewed before it expires or another worker takes the job over.
#[derive(Debug, Clone)]
pub struct Claimed {
    pub job: JobRecord,
    pub token: String,
    /// The aggregation's proxy at claim time (a later job may have changed it).
    pub proxy: Option<String>,
}

/// What a claim attempt found.
#[derive(Debug)]
pub enum Claim {
    Job(Box<Claimed>),
    /// Nothing claimable now; a delayed entry becomes due after this long, if any.
    Empty {
        next_due: Option<Duration>,
    },
}

/// How a download ended, as recorded in the job.
#[derive(Debug, Clone, Default)]
pub struct DownloadResult {
    pub success: bool,
    pub error: String,
    pub response_code: u16,
    pub image_size: String,
    /// JSON array of the thumbnails made (`[]` or empty when none).
    pub thumbnails: String,
}

/// A download refused for its host's concurrency is parked until a download frees one
/// of the host's slots; it asks again after this long at the latest (a lost wake-up,
/// or limits changed by a restart).
pub const HOST_PARK_FALLBACK: Duration = Duration::from_secs(2);

/// Most parked callbacks one [`Store::wake_callbacks`] call moves.
pub const MAX_CALLBACK_WAKE: usize = 1000;

/// Whether a claimed download may go to its host now.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HostPermit {
    Granted,
    /// Not yet: defer the job by `delay` (see [`Store::defer_download`]).
    Wait {
        delay: Duration,
        reason: WaitReason,
    },
    /// The lease is gone.
    Lost,
}

/// What one claim may take at most, for the processor's fair shares of its download
/// slots: at most `room` more jobs of each listed aggregation (store key), and of each
/// listed tenant's aggregations together. Aggregations and tenants not listed are not
/// limited by it (their `aggr_limit` still holds). A claim skips what has no room
/// left, leaving it where it is, pending for another claimer.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ClaimShares {
    pub aggregations: Vec<(String, u32)>,
    pub tenants: Vec<(String, u32)>,
}

impl ClaimShares {
    pub fn is_empty(&self) -> bool {
        self.aggregations.is_empty() && self.tenants.is_empty()
    }

    /// The room left, to count down during one claim.
    pub fn rooms(&self) -> Rooms<'_> {
        Rooms {
            aggregations: self
                .aggregations
                .iter()
                .map(|(a, n)| (a.as_str(), *n))
                .collect(),
            tenants: self.tenants.iter().map(|(t, n)| (t.as_str(), *n)).collect(),
        }
    }
}

/// Why a claim skips an aggregation ([`Rooms::full`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Full<'a> {
    Aggregation,
    /// The tenant (all its aggregations are full).
    Tenant(&'a str),
}

/// [`ClaimShares`] being counted down by one claim.
#[derive(Debug, Clone)]
pub struct Rooms<'a> {
    aggregations: std::collections::HashMap<&'a str, u32>,
    tenants: std::collections::HashMap<&'a str, u32>,
}

impl<'a> Rooms<'a> {
    /// Whether a claim may take no more jobs of aggregation `a`, and why.
    pub fn full<'b>(&self, a: &'b str) -> Option<Full<'b>> {
        if self.aggregations.get(a) == Some(&0) {
            return Some(Full::Aggregation);
        }
        let t = JobSpec::tenant_of(a)?;
        (self.tenants.get(t) == Some(&0)).then_some(Full::Tenant(t))
    }

    /// Counts a job of `a` taken.
    pub fn took(&mut self, a: &str) {
        if let Some(n) = self.aggregations.get_mut(a) {
            *n = n.saturating_sub(1);
        }
        if let Some(t) = JobSpec::tenant_of(a)
            && let Some(n) = self.tenants.get_mut(t)
        {
            *n = n.saturating_sub(1);
        }
    }
}

/// An aggregation with pending downloads (the dashboard's list).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AggrSummary {
    pub name: String,
    pub pending: u64,
    /// When it may start its next download, if it is waiting for its rate (ms since
    /// the Unix epoch).
    pub rate_wait_until: Option<u64>,
}

/// Which aggregations a listing covers (store names, tenant marks included).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AggrFilter {
    All,
    /// Exactly this aggregation.
    Is(String),
    /// Those whose name starts with this (one tenant's: `@<tenant>/`).
    Prefix(String),
}

impl AggrFilter {
    pub fn matches(&self, aggr: &str) -> bool {
        match self {
            AggrFilter::All => true,
            AggrFilter::Is(a) => aggr == a,
            AggrFilter::Prefix(p) => aggr.starts_with(p.as_str()),
        }
    }
}

/// A callback that failed for good (a dead letter), kept until
/// `notifier.failed_retention` has passed or it is retried.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FailedCallback {
    pub id: String,
    /// The store's aggregation name.
    pub aggr: String,
    /// When it failed (ms since the Unix epoch).
    pub failed_at: u64,
    pub error: String,
    pub attempts: u32,
}

/// Where a listing of failed callbacks goes on: after this (failed_at, id).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FailedCursor {
    pub failed_at: u64,
    pub id: String,
}

impl FailedCursor {
    /// `<failed_at>-<id>`: opaque to clients, but printable and URL-safe.
    pub fn encode(&self) -> String {
        format!("{}-{}", self.failed_at, self.id)
    }

    pub fn decode(s: &str) -> Option<FailedCursor> {
        let (at, id) = s.split_once('-')?;
        Some(FailedCursor {
            failed_at: at.parse().ok()?,
            id: id.to_string(),
        })
        .filter(|c| crate::job::is_valid_id(&c.id))
    }
}

/// One page of failed callbacks, oldest first. `next` is set while more may follow
/// (a page can be short, or empty, when a filter skipped what was looked at).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct FailedPage {
    pub items: Vec<FailedCallback>,
    pub next: Option<FailedCursor>,
}

/// Failed callbacks a listing looks at, at most, per requested item: a filter that
/// matches little cannot make one call scan the whole index.
pub const FAILED_SCAN_FACTOR: usize = 10;

/// Most aggregations one dashboard page lists.
pub const MAX_AGGR_PAGE: usize = 10_000;

/// Store-wide pending downloads (`/metrics`).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PendingSummary {
    pub jobs: u64,
    pub aggregations: u64,
    /// The busiest aggregations and their pending counts, busiest first.
    pub top: Vec<(String, u64)>,
}

/// Result of `POST /retry/{id}`.
#[derive(Debug, PartialEq, Eq)]
pub enum RetryCallback {
    Requeued,
    NotFound,
    /// The callback is not in the failed state; carries the current state.
    NotFailed(String),
}

/// The two queues a job passes through.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Queue {
    Download,
    Callback,
}

impl Queue {
    pub fn name(self) -> &'static str {
        match self {
            Queue::Download => "dl",
            Queue::Callback => "cb",
        }
    }
}

#[async_trait]
pub trait Store: Send + Sync + 'static {
    /// Creates or updates the aggregation (as `settings` says), stores the job and
    /// queues its download, in one atomic step. Wakes a waiting processor. The
    /// aggregation is the spec's [`JobSpec::aggr_key`] (namespaced by tenant).
    async fn submit_with(&self, id: &str, spec: &JobSpec, settings: AggrSettings) -> Result<()>;

    /// `submit_with` where the last job's settings win.
    async fn submit(&self, id: &str, spec: &JobSpec) -> Result<()> {
        self.submit_with(id, spec, AggrSettings::Last).await
    }

    /// Claims up to `max` jobs of `queue` in one atomic step, each holding a lease of
    /// `lease`: downloads only from aggregations under their limit. Also promotes due
    /// delayed retries and recovers expired leases. With nothing to claim, says when
    /// the earliest delayed entry is due.
    async fn claim_many(
        &self,
        queue: Queue,
        lease: Duration,
        max: usize,
    ) -> Result<(Vec<Claimed>, Option<Duration>)> {
        self.claim_shared(queue, lease, max, &ClaimShares::default())
            .await
    }

    /// `claim_many` within `shares` (downloads; callbacks ignore it). When aggregations
    /// were skipped for their share and more of them are left to look at, `next_due`
    /// is zero: claim again at once.
    async fn claim_shared(
        &self,
        queue: Queue,
        lease: Duration,
        max: usize,
        shares: &ClaimShares,
    ) -> Result<(Vec<Claimed>, Option<Duration>)>;

    /// Claims one job (see `claim_many`).
    async fn claim(&self, queue: Queue, lease: Duration) -> Result<Claim> {
        let (mut jobs, next_due) = self.claim_many(queue, lease, 1).await?;
        Ok(match jobs.pop() {
            Some(c) => Claim::Job(Box::new(c)),
            None => Claim::Empty { next_due },
        })
    }

    /// Waits until something may be claimable in `queue`, or `timeout` passes.
    async fn wait(&self, queue: Queue, timeout: Duration) -> Result<()>;

    /// Extends the leases held; returns, in order, whether each is still held.
    async fn renew(
        &self,
        queue: Queue,
        held: &[(String, String)],
        lease: Duration,
    ) -> Result<Vec<bool>>;

    /// Records a finished download, frees its aggregation slot, and queues the
    /// callback (or, for a job without one, schedules deletion after `keep`).
    /// `false` when the lease was lost (the result is then discarded).
    async fn finish_download(
        &self,
        id: &str,
        token: &str,
        result: &DownloadResult,
        keep: Duration,
    ) -> Result<bool>;

    /// Frees the slot and queues the download again after `delay`, keeping `result`
    /// as the job's last error.
    async fn retry_download(
        &self,
        id: &str,
        token: &str,
        result: &DownloadResult,
        delay: Duration,
    ) -> Result<bool>;

    /// Asks whether the claimed download `id` may go to `host` now: not while the host
    /// is paused, over `limits.concurrency` downloads, or over `limits.rate` (a refused
    /// job books the host's next free slot, so it comes back exactly then). A grant
    /// holds one of the host's slots until the job finishes, is retried, deferred or
    /// released, or its lease expires.
    async fn host_permit(
        &self,
        id: &str,
        token: &str,
        host: &str,
        limits: HostLimits,
        lease: Duration,
    ) -> Result<HostPermit>;

    /// Pauses downloads from `host` for `pause` (an origin's Retry-After); a longer
    /// pause already in force is kept.
    async fn pause_host(&self, host: &str, pause: Duration) -> Result<()>;

    /// Frees the slot and queues the download again after `delay` without counting an
    /// attempt (the origin was not asked, or asked us to wait); `reason` is shown, and
    /// `result` (the origin's answer, if it was asked) kept as the last error.
    /// Deferrals for `HostPaused` are counted in the job (`download_pauses`).
    async fn defer_download(
        &self,
        id: &str,
        token: &str,
        result: Option<&DownloadResult>,
        delay: Duration,
        reason: WaitReason,
    ) -> Result<bool>;

    /// Hands a claimed job back untouched (shutdown): its attempt is not counted.
    async fn release(&self, queue: Queue, id: &str, token: &str) -> Result<bool>;

    /// Marks a callback delivered and schedules the job's deletion after `keep`.
    async fn finish_callback(&self, id: &str, token: &str, keep: Duration) -> Result<bool>;

    /// Queues a failed callback again after `delay`.
    async fn retry_callback(
        &self,
        id: &str,
        token: &str,
        error: &str,
        delay: Duration,
    ) -> Result<bool>;

    /// Marks a callback failed for good and lists it among the failed ones; it stays
    /// until `POST /retry/{id}` or until [`Store::expire_failed`] lets it go.
    async fn fail_callback(&self, id: &str, token: &str, error: &str) -> Result<bool>;

    /// Hands a claimed callback back without counting an attempt: its destination
    /// `dest` (the receiver's `host:port`) has all the callbacks in flight the notifier
    /// allows it (`notifier.per_host_concurrency`). The callback is parked on `dest`:
    /// [`Store::wake_callbacks`] for `dest` puts it at the head of the queue, or it
    /// becomes due by itself after `delay` (a fallback, not a poll). A callback already
    /// parked on `dest` keeps its place among the parked ones. Counts the deferral in
    /// the job (`callback_defers`, reset when an attempt ends or it is woken). `false`
    /// when the lease was lost.
    async fn defer_callback(
        &self,
        id: &str,
        token: &str,
        dest: &str,
        delay: Duration,
    ) -> Result<bool>;

    /// Puts up to `max` callbacks parked on `dest` (oldest first) at the head of the
    /// callback queue, as they were, and wakes a notifier; returns how many. Entries of
    /// callbacks no longer parked are dropped on the way.
    async fn wake_callbacks(&self, dest: &str, max: usize) -> Result<usize>;

    /// Queues the callback of a job whose callback failed.
    async fn requeue_callback(&self, id: &str) -> Result<RetryCallback>;

    /// Failed callbacks after `cursor`, oldest first: at most `limit` that match
    /// `filter`, looking at no more than `limit * FAILED_SCAN_FACTOR` entries.
    async fn failed_callbacks(
        &self,
        cursor: Option<&FailedCursor>,
        limit: usize,
        filter: &AggrFilter,
    ) -> Result<FailedPage>;

    /// Schedules for deletion now (files and record, as for delivered jobs) at most
    /// `limit` failed callbacks that failed `retention` ago or earlier; they are then
    /// no longer listed nor retryable. Returns how many.
    async fn expire_failed(&self, retention: Duration, limit: usize) -> Result<usize>;

    /// Jobs whose deletion is due, at most `limit`.
    async fn due_deletions(&self, limit: usize) -> Result<Vec<String>>;

    /// Removes job records (after their files were deleted).
    async fn forget(&self, ids: &[String]) -> Result<()>;

    async fn get_job(&self, id: &str) -> Result<Option<JobRecord>>;

    /// Aggregations with pending downloads, busiest first (then by name): at most
    /// `limit` from `offset`, and how many there are in all. Costs O(log n + limit).
    async fn aggregations_page(
        &self,
        offset: usize,
        limit: usize,
    ) -> Result<(Vec<AggrSummary>, u64)>;

    /// The first [`MAX_AGGR_PAGE`] aggregations with pending downloads, by name.
    async fn aggregations(&self) -> Result<Vec<AggrSummary>> {
        let (mut list, _) = self.aggregations_page(0, MAX_AGGR_PAGE).await?;
        list.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(list)
    }

    /// Pending downloads over all aggregations, how many aggregations have some, and
    /// the `top` busiest, without looking at every aggregation.
    async fn pending_summary(&self, top: usize) -> Result<PendingSummary>;

    /// Stores a component's latest stats report, kept for `ttl`.
    async fn put_stats(&self, component: &str, json: &str, ttl: Duration) -> Result<()>;

    async fn get_stats(&self, component: &str) -> Result<Option<String>>;
}

/// GCRA (the generic cell rate algorithm), as the Redis scripts' `gcra`: `tat` is
/// the theoretical arrival time (ms; anything in the past means idle). Returns
/// whether a request is allowed at `now` (and then counts it), and from when the
/// next one (allowed) or this one (refused) will be. With `reserve`, a refused request books that earliest time
/// (it is counted, and the caller comes back then).
pub fn gcra(tat: &mut f64, rate: f64, burst: u32, now: u64, reserve: bool) -> (bool, f64) {
    let now = now as f64;
    let t = 1000.0 / rate;
    let start = tat.max(now);
    let tolerance = t * f64::from(burst.max(1) - 1) + (t * GCRA_SLACK).min(GCRA_SLACK_MAX_MS);
    let at = start - tolerance;
    if at > now && !reserve {
        return (false, at);
    }
    let new = start + t;
    // Kept as the Redis scripts keep it: a string with three decimals.
    *tat = format!("{new:.3}").parse().unwrap_or(new);
    if at > now {
        (false, at)
    } else {
        (true, new - tolerance)
    }
}

/// Part of an interval a request may come early, so that a claim that runs a few
/// milliseconds late (a busy machine) does not push every later slot back: the
/// long-run rate stays the configured one. The spacing of two requests is then at
/// least 1 - GCRA_SLACK intervals (burst 1), and never more than GCRA_SLACK_MAX_MS
/// early: a slow rate stays strict.
pub const GCRA_SLACK: f64 = 0.2;
pub const GCRA_SLACK_MAX_MS: f64 = 50.0;

/// Milliseconds, saturating, for the backends' arithmetic.
pub fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

#[cfg(test)]
mod tests {
    use super::gcra;

    #[test]
    fn gcra_spaces_requests_and_allows_a_burst() {
        // 10/s (one per 100 ms), burst 3: three at once, then one per 100 ms.
        let mut tat = 0.0;
        for _ in 0..3 {
            assert!(gcra(&mut tat, 10.0, 3, 1000, false).0);
        }
        assert_eq!(gcra(&mut tat, 10.0, 3, 1000, false), (false, 1080.0));
        assert!(gcra(&mut tat, 10.0, 3, 1100, false).0);
        assert_eq!(gcra(&mut tat, 10.0, 3, 1150, false), (false, 1180.0));
        // A claim 15 ms late keeps its slot: the next one is still due at 1280.
        assert!(gcra(&mut tat, 10.0, 3, 1195, false).0);
        assert_eq!(gcra(&mut tat, 10.0, 3, 1200, false), (false, 1280.0));
        // Idle for a second: the burst is back, no more.
        for _ in 0..3 {
            assert!(gcra(&mut tat, 10.0, 3, 2200, false).0);
        }
        assert!(!gcra(&mut tat, 10.0, 3, 2200, false).0);
    }

    #[test]
    fn gcra_reservations_book_consecutive_slots() {
        // 2/s, burst 1: refused requests book 500 ms apart.
        let mut tat = 0.0;
        assert!(gcra(&mut tat, 2.0, 1, 0, true).0);
        // The slack is capped at 50 ms for slow rates.
        assert_eq!(gcra(&mut tat, 2.0, 1, 0, true), (false, 450.0));
        assert_eq!(gcra(&mut tat, 2.0, 1, 10, true), (false, 950.0));
        assert_eq!(gcra(&mut tat, 2.0, 1, 20, true), (false, 1450.0));
    }
}
