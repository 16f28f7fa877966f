//! The embedded store's tables (the data model in the module docs), its records of
//! aggregations and hosts, its errors, and helpers over a job's field map.

use std::collections::BTreeMap;

use redb::TableDefinition;
use serde::{Deserialize, Serialize};

use super::super::StoreError;
use super::super::schema::per_queue;

/// Host records looked at for idleness per download claim.
pub(super) const HOST_SWEEP: usize = 4;
/// Most steps the writer applies in one transaction (one fsync).
pub(super) const MAX_GROUP: usize = 512;

pub(super) type Str = &'static str;
pub(super) type Zset = (Str, u64, Str);

pub(super) const JOBS: TableDefinition<Str, Str> = TableDefinition::new("jobs");
pub(super) const AGGRS: TableDefinition<Str, Str> = TableDefinition::new("aggrs");
pub(super) const PENDING: TableDefinition<(Str, i64), Str> = TableDefinition::new("pending");
pub(super) const READY: TableDefinition<Str, ()> = TableDefinition::new("ready");
pub(super) const ACTIVE: TableDefinition<Str, ()> = TableDefinition::new("active");
pub(super) const LEASES: TableDefinition<Zset, ()> = TableDefinition::new("leases");
pub(super) const DELAYED: TableDefinition<Zset, ()> = TableDefinition::new("delayed");
pub(super) const CB_QUEUE: TableDefinition<i64, Str> = TableDefinition::new("cb_queue");
pub(super) const DELETIONS: TableDefinition<(u64, Str), ()> = TableDefinition::new("deletions");
pub(super) const FAILED: TableDefinition<(u64, Str), ()> = TableDefinition::new("cb_failed");
pub(super) const PENDING_N: TableDefinition<(u64, Str), ()> = TableDefinition::new("pending_n");
pub(super) const IDLE: TableDefinition<(u64, Str), ()> = TableDefinition::new("idle_aggrs");
pub(super) const COUNTERS: TableDefinition<Str, u64> = TableDefinition::new("counters");
/// `COUNTERS` key of the pending downloads over all aggregations.
pub(super) const PENDING_TOTAL: &str = "pending_total";
pub(super) const STATS: TableDefinition<Str, (u64, Str)> = TableDefinition::new("stats");
pub(super) const RATEWAIT: TableDefinition<(u64, Str), ()> = TableDefinition::new("ratewait");
pub(super) const HOSTS: TableDefinition<Str, Str> = TableDefinition::new("hosts");
pub(super) const CB_WAIT: TableDefinition<(Str, i64), Str> = TableDefinition::new("cb_wait");

pub(super) type Fields = BTreeMap<String, String>;

#[derive(Debug, Serialize, Deserialize)]
pub(super) struct Aggr {
    pub(super) limit: i64,
    pub(super) proxy: String,
    pub(super) inflight: i64,
    /// Length of the aggregation's pending list.
    pub(super) pending: u64,
    /// `aggr_rate` (0: none) and `aggr_burst`.
    #[serde(default)]
    pub(super) rate: f64,
    #[serde(default = "one")]
    pub(super) burst: u32,
    /// The rate's theoretical arrival time (ms).
    #[serde(default)]
    pub(super) tat: f64,
    /// Its entry in `ratewait`, while it waits for its rate.
    #[serde(default)]
    pub(super) rate_wait: Option<u64>,
    /// Its jobs still in their download phase (pending, delayed or in flight).
    #[serde(default)]
    pub(super) jobs: i64,
    /// `pending` as last entered in `pending_n` and `pending_total`.
    #[serde(default)]
    pub(super) counted: u64,
}

pub(super) fn one() -> u32 {
    1
}

/// A host's politeness state: its rate's theoretical arrival time, a pause asked by
/// the origin, and the downloads holding its slots (id → lease expiry).
#[derive(Debug, Default, Serialize, Deserialize)]
pub(super) struct Host {
    pub(super) tat: f64,
    pub(super) pause_until: u64,
    pub(super) slots: BTreeMap<String, u64>,
    /// Downloads parked for a free slot, oldest first.
    #[serde(default)]
    pub(super) waiting: std::collections::VecDeque<String>,
}

impl Default for Aggr {
    fn default() -> Self {
        // Redis reads a missing limit as 1 and a missing inflight as 0.
        Aggr {
            limit: 1,
            proxy: String::new(),
            inflight: 0,
            pending: 0,
            rate: 0.0,
            burst: 1,
            tat: 0.0,
            rate_wait: None,
            jobs: 0,
            counted: 0,
        }
    }
}

/// Why a transaction body stopped; it is then aborted.
pub(super) enum Fail {
    Db(redb::Error),
    Store(StoreError),
}

macro_rules! from_redb {
    ($($t:ty),*) => {$(
        impl From<$t> for Fail {
            fn from(e: $t) -> Self {
                Fail::Db(e.into())
            }
        }
    )*};
}
from_redb!(
    redb::Error,
    redb::TransactionError,
    redb::TableError,
    redb::StorageError,
    redb::CommitError
);

impl From<StoreError> for Fail {
    fn from(e: StoreError) -> Self {
        Fail::Store(e)
    }
}

impl From<Fail> for StoreError {
    fn from(f: Fail) -> Self {
        match f {
            Fail::Db(e) => StoreError::Backend(format!("embedded store: {e}")),
            Fail::Store(e) => e,
        }
    }
}

pub(super) type R<T> = std::result::Result<T, Fail>;

pub(super) fn corrupt(e: impl std::fmt::Display) -> Fail {
    Fail::Store(StoreError::Corrupt(e.to_string()))
}

pub(super) fn num(f: &Fields, k: &str) -> i64 {
    f.get(k).and_then(|v| v.parse().ok()).unwrap_or(0)
}

/// `HINCRBY`: returns the new value.
pub(super) fn incr(f: &mut Fields, k: &str, by: i64) -> i64 {
    let v = num(f, k) + by;
    set(f, k, v);
    v
}

pub(super) fn set(f: &mut Fields, k: &str, v: impl ToString) {
    f.insert(k.to_string(), v.to_string());
}

/// Whether the job holds a lease of `q` with exactly `token` (Redis: `HGET` == token).
pub(super) fn holds(f: &Fields, q: Str, token: &str) -> bool {
    f.get(per_queue(q).lease).is_some_and(|t| t == token)
}
