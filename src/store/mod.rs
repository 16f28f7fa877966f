//! The shared store: job records, aggregations, queues, leases and stats.
//!
//! Every component talks to the store only through [`Store`], so that an embedded
//! single-machine backend can offer the same semantics as Redis. Each method is one
//! atomic step; the invariants they keep are listed in ARCHITECTURE.md.

use std::time::Duration;

use async_trait::async_trait;

use crate::job::{JobRecord, JobSpec};

pub mod embedded;
pub mod redis;

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
    /// Creates or updates the aggregation, stores the job and queues its download,
    /// in one atomic step. Wakes a waiting processor.
    async fn submit(&self, id: &str, spec: &JobSpec) -> Result<()>;

    /// Claims up to `max` jobs of `queue` in one atomic step, each holding a lease of
    /// `lease`: downloads only from aggregations under their limit. Also promotes due
    /// delayed retries and recovers expired leases. With nothing to claim, says when
    /// the earliest delayed entry is due.
    async fn claim_many(
        &self,
        queue: Queue,
        lease: Duration,
        max: usize,
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

    /// Marks a callback failed for good; it stays until `POST /retry/{id}`.
    async fn fail_callback(&self, id: &str, token: &str, error: &str) -> Result<bool>;

    /// Queues the callback of a job whose callback failed.
    async fn requeue_callback(&self, id: &str) -> Result<RetryCallback>;

    /// Jobs whose deletion is due, at most `limit`.
    async fn due_deletions(&self, limit: usize) -> Result<Vec<String>>;

    /// Removes job records (after their files were deleted).
    async fn forget(&self, ids: &[String]) -> Result<()>;

    async fn get_job(&self, id: &str) -> Result<Option<JobRecord>>;

    /// Aggregations with pending downloads and how many each has.
    async fn aggregations(&self) -> Result<Vec<(String, u64)>>;

    /// Stores a component's latest stats report, kept for `ttl`.
    async fn put_stats(&self, component: &str, json: &str, ttl: Duration) -> Result<()>;

    async fn get_stats(&self, component: &str) -> Result<Option<String>>;
}

/// Milliseconds, saturating, for the backends' arithmetic.
pub fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}
