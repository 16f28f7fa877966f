//! A job as the store keeps it: [`JobRecord`], the spec plus the state of its
//! download and callback, built from the store's field map; the state names, and the
//! thumbnails made for it.

use serde::{Deserialize, Serialize};

use super::JobSpec;

/// A thumbnail made for a job, as recorded and reported in the callback.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct ThumbnailInfo {
    pub name: String,
    /// Path relative to the storage root (`<id[0:3]>/<id>.<name>.<ext>`); the
    /// callback carries it as a URL under `download_url`.
    #[serde(rename = "url")]
    pub path: String,
    pub width: u32,
    pub height: u32,
    pub format: String,
    pub bytes: u64,
}

/// State of a download or a callback, with the reference's names.
pub mod state {
    pub const PENDING: &str = "Pending";
    pub const IN_PROGRESS: &str = "InProgress";
    pub const SUCCESS: &str = "Success";
    pub const FAILED: &str = "Failed";
}

/// Why a pending download is waiting: its `waiting_for` (shown by `GET /jobs/{id}`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WaitReason {
    /// Its aggregation's `aggr_rate`.
    AggrRate,
    /// The host asked for a pause (429/503 with Retry-After).
    HostPaused,
    /// `processor.per_host_rate`.
    HostRate,
    /// `processor.per_host_concurrency`.
    HostConcurrency,
}

impl WaitReason {
    pub const fn as_str(self) -> &'static str {
        match self {
            WaitReason::AggrRate => "aggr_rate",
            WaitReason::HostPaused => "host_paused",
            WaitReason::HostRate => "host_rate",
            WaitReason::HostConcurrency => "host_concurrency",
        }
    }

    pub fn parse(s: &str) -> Option<WaitReason> {
        [
            WaitReason::AggrRate,
            WaitReason::HostPaused,
            WaitReason::HostRate,
            WaitReason::HostConcurrency,
        ]
        .into_iter()
        .find(|r| r.as_str() == s)
    }
}

/// `waiting_for` of a callback parked until its receiver has a free slot.
pub const CALLBACK_DESTINATION_WAIT: &str = "callback_destination";

fn is_zero(n: &u32) -> bool {
    *n == 0
}

/// A job as the store keeps it: the spec plus its mutable state.
#[derive(Debug, Clone, Serialize)]
pub struct JobRecord {
    pub id: String,
    #[serde(flatten)]
    pub spec: JobSpec,
    pub download_state: String,
    pub download_attempts: u32,
    /// Times the origin paused the job's host (429/503 with Retry-After); these
    /// retries spend no attempt.
    pub download_pauses: u32,
    pub download_error: String,
    pub response_code: u16,
    pub image_size: String,
    pub callback_state: String,
    pub callback_attempts: u32,
    /// Times the callback was handed back unattempted since its last attempt ended,
    /// because its receiver had `notifier.per_host_concurrency` callbacks in flight.
    #[serde(skip_serializing_if = "is_zero")]
    pub callback_defers: u32,
    pub callback_error: String,
    /// Milliseconds since the Unix epoch; 0 when it has not happened.
    pub created_at: u64,
    pub started_at: u64,
    pub finished_at: u64,
    pub callback_at: u64,
    pub next_attempt_at: u64,
    /// Why a pending download is not running yet (`aggr_rate`, `host_paused`,
    /// `host_rate`, `host_concurrency`), or a pending callback (`callback_destination`:
    /// parked until its receiver has a free slot); `next_attempt_at` says until when
    /// at the latest.
    #[serde(skip_serializing_if = "String::is_empty")]
    pub waiting_for: String,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub thumbnails_made: Vec<ThumbnailInfo>,
}

impl JobRecord {
    /// Pending in its aggregation's queue (not delayed, not running).
    pub fn queued(&self) -> bool {
        self.download_state == state::PENDING && self.next_attempt_at == 0
    }

    /// Notes that the job's aggregation waits for its rate until `until` (ms).
    pub fn note_aggr_rate_wait(&mut self, until: Option<u64>) {
        if let Some(until) = until {
            self.waiting_for = WaitReason::AggrRate.as_str().to_string();
            self.next_attempt_at = until;
        }
    }
}
