//! Embedded backend of [`Store`]: one redb file, used by one process.
//!
//! It keeps the Redis backend's semantics (its Lua scripts are the specification):
//! every trait method that changes anything is one atomic step, so a crash leaves
//! either all or none of a step. Wake-ups are in-process [`Notify`]s, notified after
//! the commit wherever the scripts call `wake`.
//!
//! Group commit. One writer thread owns every write transaction. A write method queues
//! its step (a closure over the transaction's tables and a reply channel) and waits.
//! The writer takes everything queued (at most 512 steps), applies the steps in order
//! in one write transaction, commits once (one fsync), and only then answers each
//! caller and fires the steps' wake-ups. So a step's writes are committed together
//! with its batch or not at all, and a commit error is every caller's error. A step
//! that fails before writing (e.g. a duplicate job id) fails alone; one that fails
//! after writing (storage error, corrupt record) is dropped from the batch with its
//! error and the other steps run again in a fresh transaction, so that no partial
//! step is committed. A step may thus run more than once, but is answered once.
//! Throughput then grows with the number of concurrent writers instead of being one
//! fsync per write; a lone write still waits for one commit (two if it arrives while
//! one is under way). `claim_many` is one step however many jobs it takes.
//!
//! Durability: every commit uses redb's default `Durability::Immediate`, so a write
//! is durable when its method returns. When the store is dropped (its last clone),
//! the writer commits what is still queued and is joined; then the file is closed.
//!
//! Data model (all times are wall-clock milliseconds since the Unix epoch):
//!
//! | table       | key                      | value                                  |
//! |-------------|--------------------------|----------------------------------------|
//! | `jobs`      | id                       | JSON map of the job's fields           |
//! | `aggrs`     | aggregation              | JSON `{limit, proxy, inflight, pending, rate, burst, tat, rate_wait, jobs}` |
//! | `pending`   | (aggregation, seq)       | id (FIFO per aggregation)              |
//! | `ready`     | aggregation              | — (pending jobs and a free slot)       |
//! | `active`    | aggregation              | — (pending jobs)                       |
//! | `leases`    | (queue, expiry, id)      | —                                      |
//! | `delayed`   | (queue, due, id)         | —                                      |
//! | `cb_queue`  | seq                      | id                                     |
//! | `deletions` | (due, id)                | —                                      |
//! | `cb_failed` | (failed_at, id)          | — (failed callbacks, `failed_at` in the job) |
//! | `pending_n` | (pending, aggregation)   | — (aggregations with pending jobs, by count) |
//! | `counters`  | name                     | `pending_total`: the sum of those counts |
//! | `idle_aggrs`| (rate due, aggregation)  | — (no job left, rate state not yet past) |
//! | `stats`     | component                | (expires_at, json)                     |
//! | `ratewait`  | (due, aggregation)       | — (waiting for its `aggr_rate`)        |
//! | `hosts`     | host                     | JSON `{tat, pause_until, slots}`       |
//! | `cb_wait`   | (destination, seq)       | id (callbacks parked on a busy receiver, FIFO) |
//!
//! The job map holds the same fields as the Redis hash (`dl_state`, `dl_lease`, ...)
//! plus the scores of the sorted-set entries it is in (`dl_lease_exp`,
//! `cb_lease_exp`, `dl_delayed_at`, `cb_delayed_at`, `del_at`, and `cb_wait_seq`
//! beside `cb_wait`), so that an entry can be moved or removed without a scan.
//!
//! Where it differs from Redis, without a difference the trait can show:
//! - a download claim takes the ready aggregations round robin (Redis: at random);
//! - a queue's wake-ups are one stored permit per process (Redis: up to 16 tokens);
//! - a queued id whose job was forgotten is skipped (Redis would hand out a record
//!   without a spec);
//! - read-only methods use one read transaction (a snapshot), outside the writer; a
//!   batch whose steps changed nothing is aborted rather than committed, saving the
//!   fsync;
//! - expired stats are not removed, only read as absent until overwritten;
//! - a host's limiter state is one record, removed once it is idle (Redis: keys
//!   that expire);
//! - a parked callback's `cb_wait` entry is removed as soon as it is no longer
//!   parked (Redis leaves it in the list, to be skipped, and lets the list expire).

use std::collections::BTreeMap;
use std::ops::Bound;
use std::panic::AssertUnwindSafe;
use std::path::Path;
use std::sync::{Arc, mpsc};
use std::thread;
use std::time::Duration;

use async_trait::async_trait;
use redb::{
    Database, DatabaseError, ReadableDatabase, ReadableTable, ReadableTableMetadata, Table,
    TableDefinition, WriteTransaction,
};
use serde::{Deserialize, Serialize};
use tokio::sync::{Notify, oneshot};

use super::clock::Clock;
use super::schema::limit::{
    ABANDONED_KEEP_MS, BATCH, MAX_LOST_LEASES, READY_TRIES, UNPARK_TRIES, WAKE_LOOK_FACTOR,
};
use super::schema::{field, per_queue};
use super::{
    AggrFilter, AggrSettings, AggrSummary, ClaimShares, Claimed, DownloadResult,
    FAILED_SCAN_FACTOR, FailedCallback, FailedCursor, FailedPage, Full, HOST_PARK_FALLBACK,
    HostLimits, HostPermit, MAX_AGGR_PAGE, PendingSummary, Queue, Result, RetryCallback, Store,
    StoreError, WaitReason, gcra, millis,
};
use crate::job::{JobRecord, JobSpec, state};

/// Host records looked at for idleness per download claim.
const HOST_SWEEP: usize = 4;
/// Most steps the writer applies in one transaction (one fsync).
const MAX_GROUP: usize = 512;

type Str = &'static str;
type Zset = (Str, u64, Str);

const JOBS: TableDefinition<Str, Str> = TableDefinition::new("jobs");
const AGGRS: TableDefinition<Str, Str> = TableDefinition::new("aggrs");
const PENDING: TableDefinition<(Str, i64), Str> = TableDefinition::new("pending");
const READY: TableDefinition<Str, ()> = TableDefinition::new("ready");
const ACTIVE: TableDefinition<Str, ()> = TableDefinition::new("active");
const LEASES: TableDefinition<Zset, ()> = TableDefinition::new("leases");
const DELAYED: TableDefinition<Zset, ()> = TableDefinition::new("delayed");
const CB_QUEUE: TableDefinition<i64, Str> = TableDefinition::new("cb_queue");
const DELETIONS: TableDefinition<(u64, Str), ()> = TableDefinition::new("deletions");
const FAILED: TableDefinition<(u64, Str), ()> = TableDefinition::new("cb_failed");
const PENDING_N: TableDefinition<(u64, Str), ()> = TableDefinition::new("pending_n");
const IDLE: TableDefinition<(u64, Str), ()> = TableDefinition::new("idle_aggrs");
const COUNTERS: TableDefinition<Str, u64> = TableDefinition::new("counters");
/// `COUNTERS` key of the pending downloads over all aggregations.
const PENDING_TOTAL: &str = "pending_total";
const STATS: TableDefinition<Str, (u64, Str)> = TableDefinition::new("stats");
const RATEWAIT: TableDefinition<(u64, Str), ()> = TableDefinition::new("ratewait");
const HOSTS: TableDefinition<Str, Str> = TableDefinition::new("hosts");
const CB_WAIT: TableDefinition<(Str, i64), Str> = TableDefinition::new(field::CB_WAIT);

type Fields = BTreeMap<String, String>;

#[derive(Debug, Serialize, Deserialize)]
struct Aggr {
    limit: i64,
    proxy: String,
    inflight: i64,
    /// Length of the aggregation's pending list.
    pending: u64,
    /// `aggr_rate` (0: none) and `aggr_burst`.
    #[serde(default)]
    rate: f64,
    #[serde(default = "one")]
    burst: u32,
    /// The rate's theoretical arrival time (ms).
    #[serde(default)]
    tat: f64,
    /// Its entry in `ratewait`, while it waits for its rate.
    #[serde(default)]
    rate_wait: Option<u64>,
    /// Its jobs still in their download phase (pending, delayed or in flight).
    #[serde(default)]
    jobs: i64,
    /// `pending` as last entered in `pending_n` and `pending_total`.
    #[serde(default)]
    counted: u64,
}

fn one() -> u32 {
    1
}

/// A host's politeness state: its rate's theoretical arrival time, a pause asked by
/// the origin, and the downloads holding its slots (id → lease expiry).
#[derive(Debug, Default, Serialize, Deserialize)]
struct Host {
    tat: f64,
    pause_until: u64,
    slots: BTreeMap<String, u64>,
    /// Downloads parked for a free slot, oldest first.
    #[serde(default)]
    waiting: std::collections::VecDeque<String>,
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
enum Fail {
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

type R<T> = std::result::Result<T, Fail>;

fn corrupt(e: impl std::fmt::Display) -> Fail {
    Fail::Store(StoreError::Corrupt(e.to_string()))
}

fn num(f: &Fields, k: &str) -> i64 {
    f.get(k).and_then(|v| v.parse().ok()).unwrap_or(0)
}

/// `HINCRBY`: returns the new value.
fn incr(f: &mut Fields, k: &str, by: i64) -> i64 {
    let v = num(f, k) + by;
    set(f, k, v);
    v
}

fn set(f: &mut Fields, k: &str, v: impl ToString) {
    f.insert(k.to_string(), v.to_string());
}

/// Whether the job holds a lease of `q` with exactly `token` (Redis: `HGET` == token).
fn holds(f: &Fields, q: Str, token: &str) -> bool {
    f.get(per_queue(q).lease).is_some_and(|t| t == token)
}

/// One write transaction's tables, the clock read at the start of the current step,
/// and the queues that step wakes once it is committed.
struct W<'t> {
    now: u64,
    clock: &'t Clock,
    jobs: Table<'t, Str, Str>,
    aggrs: Table<'t, Str, Str>,
    pending: Table<'t, (Str, i64), Str>,
    ready: Table<'t, Str, ()>,
    active: Table<'t, Str, ()>,
    leases: Table<'t, Zset, ()>,
    delayed: Table<'t, Zset, ()>,
    cb_queue: Table<'t, i64, Str>,
    deletions: Table<'t, (u64, Str), ()>,
    failed: Table<'t, (u64, Str), ()>,
    pending_n: Table<'t, (u64, Str), ()>,
    idle: Table<'t, (u64, Str), ()>,
    counters: Table<'t, Str, u64>,
    stats: Table<'t, Str, (u64, Str)>,
    ratewait: Table<'t, (u64, Str), ()>,
    hosts: Table<'t, Str, Str>,
    cb_wait: Table<'t, (Str, i64), Str>,
    wake: [bool; 2],
    /// The current step wrote something: commit (otherwise abort, saving an fsync).
    dirty: bool,
    /// The aggregation the last download claim took from (round robin over `ready`).
    cursor: String,
}

impl<'t> W<'t> {
    fn open(tx: &'t WriteTransaction, cursor: String, clock: &'t Clock) -> R<W<'t>> {
        Ok(W {
            now: clock.now_ms(),
            clock,
            jobs: tx.open_table(JOBS)?,
            aggrs: tx.open_table(AGGRS)?,
            pending: tx.open_table(PENDING)?,
            ready: tx.open_table(READY)?,
            active: tx.open_table(ACTIVE)?,
            leases: tx.open_table(LEASES)?,
            delayed: tx.open_table(DELAYED)?,
            cb_queue: tx.open_table(CB_QUEUE)?,
            deletions: tx.open_table(DELETIONS)?,
            failed: tx.open_table(FAILED)?,
            pending_n: tx.open_table(PENDING_N)?,
            idle: tx.open_table(IDLE)?,
            counters: tx.open_table(COUNTERS)?,
            stats: tx.open_table(STATS)?,
            ratewait: tx.open_table(RATEWAIT)?,
            hosts: tx.open_table(HOSTS)?,
            cb_wait: tx.open_table(CB_WAIT)?,
            wake: [false; 2],
            dirty: false,
            cursor,
        })
    }

    /// Starts the next step of the batch: reads the clock, clears its flags.
    fn begin_step(&mut self) {
        self.now = self.clock.now_ms();
        self.wake = [false; 2];
        self.dirty = false;
    }

    fn wake(&mut self, q: Queue) {
        self.wake[q as usize] = true;
    }

    fn job(&self, id: &str) -> R<Option<Fields>> {
        match self.jobs.get(id)? {
            None => Ok(None),
            Some(v) => serde_json::from_str(v.value()).map(Some).map_err(corrupt),
        }
    }

    fn put_job(&mut self, id: &str, f: &Fields) -> R<()> {
        let json = serde_json::to_string(f).map_err(corrupt)?;
        self.jobs.insert(id, json.as_str())?;
        self.dirty = true;
        Ok(())
    }

    fn aggr(&self, a: &str) -> R<Aggr> {
        match self.aggrs.get(a)? {
            None => Ok(Aggr::default()),
            Some(v) => serde_json::from_str(v.value()).map_err(corrupt),
        }
    }

    fn put_aggr(&mut self, a: &str, ag: &Aggr) -> R<()> {
        let json = serde_json::to_string(ag).map_err(corrupt)?;
        self.aggrs.insert(a, json.as_str())?;
        self.dirty = true;
        Ok(())
    }

    /// Adds or removes `a` in a set table, writing only on a change.
    fn set_member(&mut self, ready: bool, a: &str, member: bool) -> R<()> {
        let t = if ready {
            &mut self.ready
        } else {
            &mut self.active
        };
        let present = t.get(a)?.is_some();
        if member && !present {
            t.insert(a, ())?;
            self.dirty = true;
        } else if !member && present {
            t.remove(a)?;
            self.dirty = true;
        }
        Ok(())
    }

    /// The ready-set rule (PRELUDE `refresh`): `a` is in `ready` iff it has pending
    /// jobs, fewer downloads in flight than its limit and does not wait for its rate;
    /// in `active` iff it has pending jobs.
    fn refresh(&mut self, a: &str) -> R<bool> {
        let mut ag = self.aggr(a)?;
        if ag.counted != ag.pending {
            self.count_pending(a, &mut ag)?;
        }
        let has_pending = ag.pending > 0;
        self.set_member(false, a, has_pending)?;
        let ready = has_pending && ag.inflight < ag.limit && ag.rate_wait.is_none();
        self.set_member(true, a, ready)?;
        Ok(ready)
    }

    /// Moves `a` to its pending count in `pending_n` and adjusts `pending_total`
    /// (PRELUDE `refresh`), so that listings and totals cost O(log n).
    fn count_pending(&mut self, a: &str, ag: &mut Aggr) -> R<()> {
        if ag.counted > 0 {
            self.pending_n.remove((ag.counted, a))?;
        }
        if ag.pending > 0 {
            self.pending_n.insert((ag.pending, a), ())?;
        }
        let total = self.counters.get(PENDING_TOTAL)?.map_or(0, |v| v.value());
        let total = (total + ag.pending).saturating_sub(ag.counted);
        self.counters.insert(PENDING_TOTAL, total)?;
        ag.counted = ag.pending;
        self.put_aggr(a, ag)
    }

    /// PRELUDE `revive`: a job going back to `pending` whose aggregation record is
    /// gone (its jobs were not counted: stored before the count existed) brings its
    /// settings back.
    fn revive(&mut self, a: &str, f: &Fields) -> R<()> {
        if self.aggrs.get(a)?.is_some() {
            return Ok(());
        }
        let Some(spec) = f
            .get(field::SPEC)
            .and_then(|j| serde_json::from_str::<JobSpec>(j).ok())
        else {
            return Ok(());
        };
        let ag = Aggr {
            limit: i64::from(spec.aggr_limit),
            proxy: spec.aggr_proxy.unwrap_or_default(),
            rate: spec.aggr_rate.unwrap_or(0.0),
            burst: spec.aggr_burst.unwrap_or(1),
            jobs: 1,
            ..Aggr::default()
        };
        self.put_aggr(a, &ag)
    }

    /// Removes idle aggregation records whose rate state has run out (see `end_job`).
    fn sweep_idle(&mut self) -> R<()> {
        let mut due = Vec::new();
        for e in self
            .idle
            .range((0u64, "")..(self.now.saturating_add(1), ""))?
        {
            let e = e?;
            let (at, a) = e.0.value();
            due.push((at, a.to_string()));
            if due.len() >= BATCH {
                break;
            }
        }
        for (at, a) in due {
            self.idle.remove((at, a.as_str()))?;
            self.dirty = true;
            let ag = self.aggr(&a)?;
            if ag.jobs <= 0 && ag.inflight <= 0 && ag.pending == 0 {
                self.aggrs.remove(a.as_str())?;
            }
        }
        Ok(())
    }

    /// Puts `a` in `ratewait` until `at` (or, with `None`, takes it out); the caller
    /// then refreshes it.
    fn set_rate_wait(&mut self, a: &str, ag: &mut Aggr, at: Option<u64>) -> R<()> {
        if let Some(old) = ag.rate_wait.take() {
            self.ratewait.remove((old, a))?;
        }
        if let Some(at) = at {
            self.ratewait.insert((at, a), ())?;
            ag.rate_wait = Some(at);
        }
        self.put_aggr(a, ag)
    }

    fn host(&self, h: &str) -> R<Host> {
        match self.hosts.get(h)? {
            None => Ok(Host::default()),
            Some(v) => serde_json::from_str(v.value()).map_err(corrupt),
        }
    }

    /// Saves `h`'s state, or drops it once it holds nothing that matters any more
    /// (as the Redis keys expire).
    fn put_host(&mut self, h: &str, host: &Host) -> R<()> {
        let now = self.now;
        let idle = host.tat <= now as f64 && host.pause_until <= now && host.slots.is_empty();
        if idle && host.waiting.is_empty() {
            if self.hosts.remove(h)?.is_some() {
                self.dirty = true;
            }
            return Ok(());
        }
        let json = serde_json::to_string(host).map_err(corrupt)?;
        self.hosts.insert(h, json.as_str())?;
        self.dirty = true;
        Ok(())
    }

    /// Drops a few idle host records, looked up from a random place, so that hosts
    /// never seen again do not stay forever (Redis: their keys expire).
    fn sweep_hosts(&mut self) -> R<()> {
        let start = char::from(b'a' + rand::random_range(0..26u8)).to_string();
        let now = self.now;
        let mut quiet = Vec::new();
        for e in self.hosts.range::<&str>(start.as_str()..)?.take(HOST_SWEEP) {
            let (k, v) = e?;
            let host: Host = serde_json::from_str(v.value()).map_err(corrupt)?;
            let busy = host.slots.values().any(|exp| *exp > now);
            if host.tat <= now as f64 && host.pause_until <= now && !busy {
                quiet.push((k.value().to_string(), host));
            }
        }
        for (h, mut host) in quiet {
            host.slots.clear();
            // Entries of downloads no longer parked (they came back at their fallback
            // time) go; a host with a parked download stays.
            for _ in 0..UNPARK_TRIES {
                let Some(w) = host.waiting.front() else { break };
                let parked = self.job(w)?.is_some_and(|f| {
                    f.get(field::WAIT)
                        .is_some_and(|r| r == WaitReason::HostConcurrency.as_str())
                        && f.contains_key(field::DL_DELAYED_AT)
                });
                if parked {
                    break;
                }
                host.waiting.pop_front();
            }
            if host.waiting.is_empty() {
                self.put_host(&h, &host)?;
            }
        }
        Ok(())
    }

    /// PRELUDE `free_host`: frees the host slot the download holds, if any, and wakes
    /// a download waiting for it (PRELUDE `unpark`).
    fn free_host(&mut self, id: &str, f: &mut Fields) -> R<()> {
        if let Some(h) = f.remove(field::HOST) {
            let mut host = self.host(&h)?;
            host.slots.remove(id);
            self.unpark(&mut host)?;
            self.put_host(&h, &host)?;
        }
        Ok(())
    }

    /// Makes one download parked for `host`'s concurrency due now; entries of jobs no
    /// longer parked are dropped on the way.
    fn unpark(&mut self, host: &mut Host) -> R<()> {
        for _ in 0..UNPARK_TRIES {
            let Some(w) = host.waiting.pop_front() else {
                return Ok(());
            };
            let Some(mut f) = self.job(&w)? else { continue };
            let parked = f
                .get(field::WAIT)
                .is_some_and(|r| r == WaitReason::HostConcurrency.as_str());
            if parked && f.contains_key(field::DL_DELAYED_AT) {
                let now = self.now;
                self.zadd(false, "dl", &w, &mut f, now)?;
                set(&mut f, field::NEXT_AT, now);
                self.put_job(&w, &f)?;
                self.wake(Queue::Download);
                return Ok(());
            }
        }
        Ok(())
    }

    /// PRELUDE `end_job`: a job of `a` left its download phase for good. An
    /// aggregation with no job left goes, at once or, while its rate state still
    /// matters (the next download's earliest time is ahead), once that has passed.
    fn end_job(&mut self, a: &str) -> R<()> {
        let mut ag = self.aggr(a)?;
        ag.jobs = (ag.jobs - 1).max(0);
        if ag.jobs > 0 || ag.inflight > 0 || ag.pending > 0 {
            return self.put_aggr(a, &ag);
        }
        // As Redis, which deletes the aggregation but not its rate key: it no longer
        // waits for its rate; only the rate's state is kept while it matters.
        self.set_member(true, a, false)?;
        self.set_rate_wait(a, &mut ag, None)?;
        if ag.tat > self.now as f64 {
            self.idle.insert((ag.tat.ceil() as u64, a), ())?;
            return Ok(());
        }
        self.set_member(false, a, false)?;
        self.aggrs.remove(a)?;
        self.dirty = true;
        Ok(())
    }

    fn dec_inflight(&mut self, a: &str) -> R<()> {
        let mut ag = self.aggr(a)?;
        ag.inflight = (ag.inflight - 1).max(0);
        self.put_aggr(a, &ag)
    }

    /// PRELUDE `free_slot`.
    fn free_slot(&mut self, a: &str) -> R<()> {
        self.dec_inflight(a)?;
        if self.refresh(a)? {
            self.wake(Queue::Download);
        }
        Ok(())
    }

    /// The first (`back == false`) or last entry of `a`'s pending list.
    fn pending_end(&self, a: &str, back: bool) -> R<Option<(i64, String)>> {
        let mut r = self.pending.range((a, i64::MIN)..=(a, i64::MAX))?;
        let e = if back { r.next_back() } else { r.next() };
        match e {
            None => Ok(None),
            Some(e) => {
                let (k, v) = e?;
                Ok(Some((k.value().1, v.value().to_string())))
            }
        }
    }

    /// `RPUSH` (`front == false`) or `LPUSH` on `a`'s pending list.
    fn push_pending(&mut self, a: &str, id: &str, front: bool) -> R<()> {
        let seq = match self.pending_end(a, !front)? {
            None => 0,
            Some((s, _)) if front => s - 1,
            Some((s, _)) => s + 1,
        };
        self.pending.insert((a, seq), id)?;
        self.dirty = true;
        let mut ag = self.aggr(a)?;
        ag.pending += 1;
        self.put_aggr(a, &ag)
    }

    /// `LPOP` on `a`'s pending list.
    fn pop_pending(&mut self, a: &str) -> R<Option<String>> {
        let Some((seq, id)) = self.pending_end(a, false)? else {
            return Ok(None);
        };
        self.pending.remove((a, seq))?;
        self.dirty = true;
        let mut ag = self.aggr(a)?;
        ag.pending = ag.pending.saturating_sub(1);
        self.put_aggr(a, &ag)?;
        Ok(Some(id))
    }

    /// `RPUSH` (`front == false`) or `LPUSH` on the callback queue.
    fn push_callback(&mut self, id: &str, front: bool) -> R<()> {
        let seq = if front {
            self.cb_queue.first()?.map_or(0, |(k, _)| k.value() - 1)
        } else {
            self.cb_queue.last()?.map_or(0, |(k, _)| k.value() + 1)
        };
        self.cb_queue.insert(seq, id)?;
        self.dirty = true;
        Ok(())
    }

    /// `LPOP` on the callback queue.
    fn pop_callback(&mut self) -> R<Option<String>> {
        let id = self
            .cb_queue
            .pop_first()?
            .map(|(_, v)| v.value().to_string());
        if id.is_some() {
            self.dirty = true;
        }
        Ok(id)
    }

    /// `ZADD` of `id` with `score` to the sorted set whose score the job keeps in
    /// `field` (replacing its previous entry).
    fn zadd(&mut self, lease: bool, q: Str, id: &str, f: &mut Fields, score: u64) -> R<()> {
        self.zrem(lease, q, id, f)?;
        let t = if lease {
            &mut self.leases
        } else {
            &mut self.delayed
        };
        t.insert((q, score, id), ())?;
        let names = per_queue(q);
        set(
            f,
            if lease {
                names.lease_exp
            } else {
                names.delayed_at
            },
            score,
        );
        self.dirty = true;
        Ok(())
    }

    fn zrem(&mut self, lease: bool, q: Str, id: &str, f: &mut Fields) -> R<()> {
        let names = per_queue(q);
        if let Some(old) = f.remove(if lease {
            names.lease_exp
        } else {
            names.delayed_at
        }) {
            let old: u64 = old.parse().map_err(corrupt)?;
            let t = if lease {
                &mut self.leases
            } else {
                &mut self.delayed
            };
            t.remove((q, old, id))?;
            self.dirty = true;
        }
        Ok(())
    }

    /// Up to `BATCH` entries of `q` in a lease/delayed table with score <= now.
    fn due(&self, lease: bool, q: Str) -> R<Vec<(u64, String)>> {
        let t = if lease { &self.leases } else { &self.delayed };
        let mut out = Vec::new();
        for e in t.range((q, 0u64, "")..(q, self.now.saturating_add(1), ""))? {
            let (k, _) = e?;
            let (_, score, id) = k.value();
            out.push((score, id.to_string()));
            if out.len() >= BATCH {
                break;
            }
        }
        Ok(out)
    }

    /// Time until the earliest delayed entry of `q` (for downloads, or aggregation
    /// waiting for its rate).
    fn next_due(&self, q: Str) -> R<Option<Duration>> {
        let mut due = match self.delayed.range((q, 0u64, "")..)?.next() {
            None => None,
            Some(e) => {
                let (k, _) = e?;
                let (kq, at, _) = k.value();
                (kq == q).then_some(at)
            }
        };
        if q == "dl"
            && let Some((k, _)) = self.ratewait.first()?
        {
            let at = k.value().0;
            due = Some(due.map_or(at, |d: u64| d.min(at)));
        }
        Ok(due.map(|at| Duration::from_millis(at.saturating_sub(self.now))))
    }

    fn schedule_deletion(&mut self, id: &str, f: &mut Fields, at: u64) -> R<()> {
        if let Some(old) = f.remove(field::DEL_AT) {
            let old: u64 = old.parse().map_err(corrupt)?;
            self.deletions.remove((old, id))?;
        }
        self.deletions.insert((at, id), ())?;
        set(f, field::DEL_AT, at);
        self.dirty = true;
        Ok(())
    }

    /// Lists a job whose callback failed for good (the caller saves `f`).
    fn add_failed(&mut self, id: &str, f: &mut Fields) -> R<()> {
        self.remove_failed(id, f)?;
        self.failed.insert((self.now, id), ())?;
        set(f, field::FAILED_AT, self.now);
        self.dirty = true;
        Ok(())
    }

    fn remove_failed(&mut self, id: &str, f: &mut Fields) -> R<()> {
        if let Some(at) = f.remove(field::FAILED_AT) {
            let at: u64 = at.parse().map_err(corrupt)?;
            self.failed.remove((at, id))?;
            self.dirty = true;
        }
        Ok(())
    }

    /// Parks callback `id` on `dest` (`RPUSH cbwait:<dest>`), unless it is parked
    /// there already: it keeps its place (the caller saves `f`).
    fn park_callback(&mut self, id: &str, f: &mut Fields, dest: &str) -> R<()> {
        if f.get(field::CB_WAIT).is_some_and(|d| d == dest) {
            return Ok(());
        }
        self.unpark_entry(id, f)?;
        let last = self
            .cb_wait
            .range((dest, i64::MIN)..=(dest, i64::MAX))?
            .next_back()
            .transpose()?
            .map(|(k, _)| k.value().1);
        let seq = last.map_or(0, |s| s + 1);
        self.cb_wait.insert((dest, seq), id)?;
        set(f, field::CB_WAIT, dest);
        set(f, field::CB_WAIT_SEQ, seq);
        self.dirty = true;
        Ok(())
    }

    /// Removes the callback's `cb_wait` entry, if it has one (the caller saves `f`).
    fn unpark_entry(&mut self, id: &str, f: &mut Fields) -> R<()> {
        let Some(dest) = f.remove(field::CB_WAIT) else {
            return Ok(());
        };
        if let Some(seq) = f.remove(field::CB_WAIT_SEQ) {
            let seq: i64 = seq.parse().map_err(corrupt)?;
            if self
                .cb_wait
                .remove((dest.as_str(), seq))?
                .is_some_and(|v| v.value() != id)
            {
                return Err(corrupt(format!("cb_wait entry of {id} held another id")));
            }
            self.dirty = true;
        }
        Ok(())
    }

    /// PRELUDE `enqueue_callback` (the caller saves `f`).
    fn enqueue_callback(&mut self, id: &str, f: &mut Fields, keep: u64) -> R<()> {
        if f.get(field::HAS_CB).is_some_and(|v| v == "1") {
            set(f, field::CB_STATE, state::PENDING);
            set(f, field::CB_ATTEMPTS, 0);
            self.push_callback(id, false)?;
            self.wake(Queue::Callback);
        } else {
            self.schedule_deletion(id, f, self.now.saturating_add(keep))?;
        }
        Ok(())
    }

    /// The next aggregation of the ready set after `cursor`, round robin.
    fn next_ready(&self, cursor: &str) -> R<Option<String>> {
        let after = self
            .ready
            .range::<&str>((Bound::Excluded(cursor), Bound::Unbounded))?
            .next();
        let e = match after {
            Some(e) => Some(e),
            None => self.ready.first()?.map(Ok),
        };
        match e {
            None => Ok(None),
            Some(e) => Ok(Some(e?.0.value().to_string())),
        }
    }
}

/// One queued write step: a transaction body and where its answer goes.
trait Op: Send {
    /// Runs the body in the batch's transaction, keeping its output. May run again
    /// in a fresh transaction when another step of the batch failed.
    fn apply(&mut self, w: &mut W<'_>) -> R<()>;
    /// Sends the kept output, or `err`; called once the batch is committed (or
    /// failed).
    fn reply(self: Box<Self>, err: Option<StoreError>);
}

struct Step<T, F> {
    body: F,
    out: Option<T>,
    reply: oneshot::Sender<Result<T>>,
}

impl<T, F> Op for Step<T, F>
where
    T: Send,
    F: FnMut(&mut W<'_>) -> R<T> + Send,
{
    fn apply(&mut self, w: &mut W<'_>) -> R<()> {
        self.out = Some((self.body)(w)?);
        Ok(())
    }

    fn reply(self: Box<Self>, err: Option<StoreError>) {
        let r = match (err, self.out) {
            (Some(e), _) => Err(e),
            (None, Some(v)) => Ok(v),
            (None, None) => Err(StoreError::Backend(
                "embedded store: write step was not run".into(),
            )),
        };
        // The caller may have gone away (its future dropped): nothing to tell.
        let _ = self.reply.send(r);
    }
}

/// The same error again, for each caller of a failed batch.
fn dup(e: &StoreError) -> StoreError {
    match e {
        StoreError::Backend(m) => StoreError::Backend(m.clone()),
        StoreError::Corrupt(m) => StoreError::Corrupt(m.clone()),
    }
}

fn writer_stopped() -> StoreError {
    StoreError::Backend("embedded store: the writer thread stopped".into())
}

/// The thread that owns every write transaction (group commit).
struct Writer {
    db: Arc<Database>,
    notify: Arc<[Notify; 2]>,
    steps: mpsc::Receiver<Box<dyn Op>>,
    cursor: String,
    clock: Clock,
}

impl Writer {
    /// Until every sender is gone (the store was dropped) and the queue is drained:
    /// takes what is queued, up to `MAX_GROUP` steps, and commits it at once.
    fn run(mut self) {
        while let Ok(first) = self.steps.recv() {
            let mut batch = vec![first];
            while batch.len() < MAX_GROUP {
                match self.steps.try_recv() {
                    Ok(op) => batch.push(op),
                    Err(_) => break,
                }
            }
            // A panicking step drops the batch (its callers get an error) but not
            // the writer.
            let _ = std::panic::catch_unwind(AssertUnwindSafe(|| self.batch(batch)));
        }
    }

    /// Applies `ops` in order in one transaction, commits once, then answers each and
    /// fires their wake-ups. A step that fails after writing is dropped from the
    /// batch (answered with its error) and the others run again in a fresh
    /// transaction, so that no partial step is ever committed.
    fn batch(&mut self, mut ops: Vec<Box<dyn Op>>) {
        loop {
            let tx = match self.db.begin_write() {
                Ok(tx) => tx,
                Err(e) => return Self::fail_all(ops, Fail::from(e)),
            };
            let mut errs: Vec<Option<StoreError>> = Vec::with_capacity(ops.len());
            let mut wake = [0usize; 2];
            let mut dirty = false;
            let mut broken = None;
            {
                let mut w = match W::open(&tx, std::mem::take(&mut self.cursor), &self.clock) {
                    Ok(w) => w,
                    Err(e) => return Self::fail_all(ops, e),
                };
                for (i, op) in ops.iter_mut().enumerate() {
                    w.begin_step();
                    match op.apply(&mut w) {
                        Ok(()) => {
                            dirty |= w.dirty;
                            for (n, q) in wake.iter_mut().zip(w.wake) {
                                *n += usize::from(q);
                            }
                            errs.push(None);
                        }
                        // Failed before writing anything: only this step fails.
                        Err(Fail::Store(e)) if !w.dirty => errs.push(Some(e)),
                        Err(e) => {
                            broken = Some((i, e));
                            break;
                        }
                    }
                }
                self.cursor = std::mem::take(&mut w.cursor);
            }
            if let Some((i, e)) = broken {
                let _ = tx.abort();
                ops.remove(i).reply(Some(e.into()));
                if ops.is_empty() {
                    return;
                }
                continue;
            }
            let done = if dirty {
                tx.commit().map_err(Fail::from)
            } else {
                tx.abort().map_err(Fail::from)
            };
            if let Err(e) = done {
                return Self::fail_all(ops, e);
            }
            for (op, err) in ops.into_iter().zip(errs) {
                op.reply(err);
            }
            for (n, notify) in wake.iter().zip(self.notify.iter()) {
                for _ in 0..*n {
                    notify.notify_one();
                }
            }
            return;
        }
    }

    fn fail_all(ops: Vec<Box<dyn Op>>, e: Fail) {
        let e = StoreError::from(e);
        for op in ops {
            op.reply(Some(dup(&e)));
        }
    }
}

struct Inner {
    db: Arc<Database>,
    notify: Arc<[Notify; 2]>,
    /// To the writer thread; `None` once dropping.
    steps: Option<mpsc::Sender<Box<dyn Op>>>,
    writer: Option<thread::JoinHandle<()>>,
    worker: String,
    clock: Clock,
}

impl Drop for Inner {
    /// Closes the queue; the writer commits what is still queued, then exits.
    fn drop(&mut self) {
        self.steps.take();
        if let Some(h) = self.writer.take() {
            let _ = h.join();
        }
    }
}

impl Inner {
    fn read<T>(&self, f: impl FnOnce(&redb::ReadTransaction) -> R<T>) -> Result<T> {
        let tx = self.db.begin_read().map_err(Fail::from)?;
        Ok(f(&tx)?)
    }
}

fn claimed(id: &str, f: &Fields, token: &str, proxy: String) -> R<Claimed> {
    let job = super::schema::record(id, f).map_err(corrupt)?;
    Ok(Claimed {
        job,
        token: token.to_string(),
        proxy: (!proxy.is_empty()).then_some(proxy),
    })
}

/// CLAIM_DOWNLOAD: up to `max` jobs (at least one attempt); with none, when the
/// earliest delayed download is due.
fn claim_downloads(
    w: &mut W<'_>,
    lease: u64,
    token: &str,
    max: usize,
    shares: &ClaimShares,
) -> R<(Vec<Claimed>, Option<Duration>)> {
    let now = w.now;
    let mut waited = Vec::new();
    for e in w.ratewait.range((0u64, "")..(now.saturating_add(1), ""))? {
        waited.push(e?.0.value().1.to_string());
        if waited.len() >= BATCH {
            break;
        }
    }
    for a in waited {
        let mut ag = w.aggr(&a)?;
        w.set_rate_wait(&a, &mut ag, None)?;
        w.refresh(&a)?;
    }
    w.sweep_hosts()?;
    w.sweep_idle()?;
    for (at, id) in w.due(false, "dl")? {
        w.delayed.remove(("dl", at, id.as_str()))?;
        w.dirty = true;
        let Some(mut f) = w.job(&id)? else { continue };
        f.remove(field::DL_DELAYED_AT);
        let Some(a) = f.get(field::AGGR).cloned() else {
            w.put_job(&id, &f)?;
            continue;
        };
        set(&mut f, field::NEXT_AT, 0);
        w.put_job(&id, &f)?;
        w.revive(&a, &f)?;
        w.push_pending(&a, &id, false)?;
        w.refresh(&a)?;
    }
    for (exp, id) in w.due(true, "dl")? {
        w.leases.remove(("dl", exp, id.as_str()))?;
        w.dirty = true;
        let Some(mut f) = w.job(&id)? else { continue };
        f.remove(field::DL_LEASE_EXP);
        let Some(a) = f.get(field::AGGR).cloned() else {
            w.put_job(&id, &f)?;
            continue;
        };
        f.remove(field::DL_LEASE);
        w.free_host(&id, &mut f)?;
        incr(&mut f, field::DL_ATTEMPTS, -1);
        let lost = incr(&mut f, field::DL_LOST, 1);
        w.dec_inflight(&a)?;
        if lost > MAX_LOST_LEASES {
            set(&mut f, field::DL_STATE, state::FAILED);
            set(&mut f, field::FINISHED_AT, now);
            set(
                &mut f,
                field::DL_ERROR,
                format!("download abandoned: the worker running it was lost {lost} times"),
            );
            w.end_job(&a)?;
            w.enqueue_callback(&id, &mut f, ABANDONED_KEEP_MS)?;
        } else {
            set(&mut f, field::DL_STATE, state::PENDING);
            w.push_pending(&a, &id, true)?;
        }
        w.put_job(&id, &f)?;
        w.refresh(&a)?;
    }
    let max = max.max(1);
    let mut out = Vec::new();
    let mut tries = 0;
    let mut rooms = shares.rooms();
    // Each full aggregation and tenant may cost a try (a tenant's are passed in one).
    let budget = max + READY_TRIES + shares.aggregations.len() + shares.tenants.len();
    while out.len() < max && tries < budget {
        tries += 1;
        let Some(a) = w.next_ready(&w.cursor)? else {
            break;
        };
        match rooms.full(&a) {
            // Left pending for another claimer.
            Some(Full::Aggregation) => {
                w.cursor.clone_from(&a);
                continue;
            }
            // Past all of the tenant's aggregations (`@t/...` sort before `@t0`).
            Some(Full::Tenant(t)) => {
                w.cursor = format!("{}{t}0", crate::job::TENANT_MARK);
                continue;
            }
            None => {}
        }
        w.cursor.clone_from(&a);
        let mut ag = w.aggr(&a)?;
        if ag.inflight < ag.limit && ag.pending > 0 && ag.rate > 0.0 {
            let (allowed, at) = gcra(&mut ag.tat, ag.rate, ag.burst, now, false);
            if allowed {
                // The next one is not allowed yet: wait for it out of `ready` right away.
                let next = (at > now as f64).then(|| at.ceil() as u64);
                w.set_rate_wait(&a, &mut ag, next)?;
            } else {
                // Waits out of `ready`, holding no slot; claims come back then.
                w.set_rate_wait(&a, &mut ag, Some(at.ceil() as u64))?;
                w.refresh(&a)?;
                continue;
            }
        }
        if ag.inflight < ag.limit
            && let Some(id) = w.pop_pending(&a)?
        {
            // A job forgotten while queued (Redis would hand out a record without a
            // spec): drop the entry and look further.
            let Some(mut f) = w.job(&id)? else {
                w.refresh(&a)?;
                continue;
            };
            // A job whose host an origin paused waits out the pause in `delayed` (not
            // an attempt) instead of being handed out.
            let paused = match f.get(field::URL_HOST) {
                Some(h) => w.host(h)?.pause_until,
                None => 0,
            };
            if paused > now {
                set(&mut f, field::DL_STATE, state::PENDING);
                set(&mut f, field::WAIT, WaitReason::HostPaused.as_str());
                set(&mut f, field::NEXT_AT, paused);
                w.zadd(false, "dl", &id, &mut f, paused)?;
                w.put_job(&id, &f)?;
                w.refresh(&a)?;
                continue;
            }
            let mut ag = w.aggr(&a)?;
            ag.inflight += 1;
            w.put_aggr(&a, &ag)?;
            w.refresh(&a)?;
            w.zadd(true, "dl", &id, &mut f, now.saturating_add(lease))?;
            f.remove(field::WAIT);
            set(&mut f, field::DL_STATE, state::IN_PROGRESS);
            set(&mut f, field::DL_LEASE, token);
            set(&mut f, field::STARTED_AT, now);
            incr(&mut f, field::DL_ATTEMPTS, 1);
            w.put_job(&id, &f)?;
            out.push(claimed(&id, &f, token, ag.proxy)?);
            rooms.took(&a);
            continue;
        }
        w.refresh(&a)?;
    }
    let next_due = if out.is_empty() {
        w.next_due("dl")?
    } else {
        None
    };
    Ok((out, next_due))
}

/// CLAIM_CALLBACK: up to `max` jobs (at least one attempt); with none, when the
/// earliest delayed callback is due.
fn claim_callbacks(
    w: &mut W<'_>,
    lease: u64,
    token: &str,
    max: usize,
) -> R<(Vec<Claimed>, Option<Duration>)> {
    let now = w.now;
    for (at, id) in w.due(false, "cb")? {
        w.delayed.remove(("cb", at, id.as_str()))?;
        w.dirty = true;
        let Some(mut f) = w.job(&id)? else { continue };
        f.remove(field::CB_DELAYED_AT);
        set(&mut f, field::NEXT_AT, 0);
        w.put_job(&id, &f)?;
        w.push_callback(&id, false)?;
    }
    for (exp, id) in w.due(true, "cb")? {
        w.leases.remove(("cb", exp, id.as_str()))?;
        w.dirty = true;
        let Some(mut f) = w.job(&id)? else { continue };
        f.remove(field::CB_LEASE_EXP);
        f.remove(field::CB_LEASE);
        incr(&mut f, field::CB_ATTEMPTS, -1);
        let lost = incr(&mut f, field::CB_LOST, 1);
        if lost > MAX_LOST_LEASES {
            set(&mut f, field::CB_STATE, state::FAILED);
            set(&mut f, field::CB_AT, now);
            set(
                &mut f,
                field::CB_ERROR,
                format!("callback abandoned: the worker running it was lost {lost} times"),
            );
            w.add_failed(&id, &mut f)?;
        } else {
            set(&mut f, field::CB_STATE, state::PENDING);
            w.push_callback(&id, true)?;
        }
        w.put_job(&id, &f)?;
    }
    let max = max.max(1);
    let mut out = Vec::new();
    while out.len() < max {
        let Some(id) = w.pop_callback()? else { break };
        let Some(mut f) = w.job(&id)? else { continue };
        w.zadd(true, "cb", &id, &mut f, now.saturating_add(lease))?;
        set(&mut f, field::CB_STATE, state::IN_PROGRESS);
        set(&mut f, field::CB_LEASE, token);
        incr(&mut f, field::CB_ATTEMPTS, 1);
        w.put_job(&id, &f)?;
        out.push(claimed(&id, &f, token, String::new())?);
    }
    let next_due = if out.is_empty() {
        w.next_due("cb")?
    } else {
        None
    };
    Ok((out, next_due))
}

/// REQUEUE_DOWNLOAD: a retry (`reason` `None`: the attempt counts) or a deferral
/// (not an attempt), after `delay`; `r` is kept as the last error.
fn requeue_download(
    w: &mut W<'_>,
    id: &str,
    token: &str,
    r: Option<&DownloadResult>,
    delay: u64,
    reason: Option<WaitReason>,
) -> R<bool> {
    let Some(mut f) = w.job(id)? else {
        return Ok(false);
    };
    if !holds(&f, "dl", token) {
        return Ok(false);
    }
    let at = w.now.saturating_add(delay);
    w.zrem(true, "dl", id, &mut f)?;
    f.remove(field::DL_LEASE);
    w.free_host(id, &mut f)?;
    if let Some(reason) = reason {
        incr(&mut f, field::DL_ATTEMPTS, -1);
        set(&mut f, field::WAIT, reason.as_str());
        if reason == WaitReason::HostPaused {
            incr(&mut f, field::DL_PAUSES, 1);
        }
    }
    if let Some(r) = r {
        set(&mut f, field::DL_ERROR, &r.error);
        set(&mut f, field::RESPONSE_CODE, r.response_code);
    }
    // Refused for its host's concurrency: parked until a slot of the host is freed
    // (`delay` is only the fallback).
    if let Some(h) = f.remove(field::HOST_WAIT)
        && reason == Some(WaitReason::HostConcurrency)
    {
        let mut host = w.host(&h)?;
        host.waiting.push_back(id.to_string());
        w.put_host(&h, &host)?;
    }
    set(&mut f, field::DL_STATE, state::PENDING);
    set(&mut f, field::NEXT_AT, at);
    w.zadd(false, "dl", id, &mut f, at)?;
    let a = f.get(field::AGGR).cloned().unwrap_or_default();
    w.free_slot(&a)?;
    // A sleeping processor re-reads the earliest due time.
    w.wake(Queue::Download);
    w.put_job(id, &f)?;
    Ok(true)
}

/// FINISH_CALLBACK: `st` is Success, Pending (retry after `delay`) or Failed.
fn end_callback(w: &mut W<'_>, id: &str, token: &str, st: &str, err: &str, delay: u64) -> R<bool> {
    let Some(mut f) = w.job(id)? else {
        return Ok(false);
    };
    if !holds(&f, "cb", token) {
        return Ok(false);
    }
    let now = w.now;
    w.zrem(true, "cb", id, &mut f)?;
    f.remove(field::CB_LEASE);
    // An attempt ended: no longer parked.
    w.unpark_entry(id, &mut f)?;
    f.remove(field::CB_DEFERS);
    set(&mut f, field::CB_STATE, st);
    set(&mut f, field::CB_ERROR, err);
    if st == state::SUCCESS {
        set(&mut f, field::CB_AT, now);
        w.schedule_deletion(id, &mut f, now.saturating_add(delay))?;
    } else if st == state::PENDING {
        let at = now.saturating_add(delay);
        set(&mut f, field::NEXT_AT, at);
        w.zadd(false, "cb", id, &mut f, at)?;
        w.wake(Queue::Callback);
    } else {
        set(&mut f, field::CB_AT, now);
        w.add_failed(id, &mut f)?;
    }
    w.put_job(id, &f)?;
    Ok(true)
}

/// A [`Store`] in one local file, for a single process running every component.
/// Cheap to clone; clones share the file and the wake-ups.
#[derive(Clone)]
pub struct EmbeddedStore {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for EmbeddedStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EmbeddedStore").finish_non_exhaustive()
    }
}

impl EmbeddedStore {
    /// Opens the store file at `path`, creating it (and its parent directory) if
    /// needed. Fails with a clear message when another process has it open.
    pub fn open(path: &Path) -> Result<EmbeddedStore> {
        Self::open_with_clock(path, Clock::system())
    }

    /// [`EmbeddedStore::open`] with the time read from `clock` (tests that control it).
    pub fn open_with_clock(path: &Path, clock: Clock) -> Result<EmbeddedStore> {
        if let Some(dir) = path.parent()
            && !dir.as_os_str().is_empty()
        {
            std::fs::create_dir_all(dir).map_err(|e| {
                StoreError::Backend(format!("cannot create directory {}: {e}", dir.display()))
            })?;
        }
        let db = Database::create(path).map_err(|e| match e {
            DatabaseError::DatabaseAlreadyOpen => StoreError::Backend(format!(
                "store file {} is in use by another process: separate processes need Redis, \
                 or run `downloader serve`",
                path.display()
            )),
            e => StoreError::Backend(format!("cannot open store file {}: {e}", path.display())),
        })?;
        let tx = db.begin_write().map_err(Fail::from)?;
        {
            tx.open_table(JOBS).map_err(Fail::from)?;
            tx.open_table(AGGRS).map_err(Fail::from)?;
            tx.open_table(PENDING).map_err(Fail::from)?;
            tx.open_table(READY).map_err(Fail::from)?;
            tx.open_table(ACTIVE).map_err(Fail::from)?;
            tx.open_table(LEASES).map_err(Fail::from)?;
            tx.open_table(DELAYED).map_err(Fail::from)?;
            tx.open_table(CB_QUEUE).map_err(Fail::from)?;
            tx.open_table(DELETIONS).map_err(Fail::from)?;
            tx.open_table(FAILED).map_err(Fail::from)?;
            tx.open_table(PENDING_N).map_err(Fail::from)?;
            tx.open_table(IDLE).map_err(Fail::from)?;
            tx.open_table(COUNTERS).map_err(Fail::from)?;
            tx.open_table(STATS).map_err(Fail::from)?;
            tx.open_table(RATEWAIT).map_err(Fail::from)?;
            tx.open_table(HOSTS).map_err(Fail::from)?;
            tx.open_table(CB_WAIT).map_err(Fail::from)?;
        }
        tx.commit().map_err(Fail::from)?;
        let db = Arc::new(db);
        let notify = Arc::new([Notify::new(), Notify::new()]);
        let (steps, rx) = mpsc::channel();
        let writer = Writer {
            db: db.clone(),
            notify: notify.clone(),
            steps: rx,
            cursor: String::new(),
            clock: clock.clone(),
        };
        let writer = thread::Builder::new()
            .name("store-writer".into())
            .spawn(move || writer.run())
            .map_err(|e| StoreError::Backend(format!("cannot start the store writer: {e}")))?;
        Ok(EmbeddedStore {
            inner: Arc::new(Inner {
                db,
                notify,
                steps: Some(steps),
                writer: Some(writer),
                worker: crate::job::new_id(),
                clock,
            }),
        })
    }

    /// Queues `body` for the writer thread and waits until the batch holding it is
    /// committed (durable). `body` may run more than once (see [`Writer::batch`]).
    async fn write<T, F>(&self, body: F) -> Result<T>
    where
        T: Send + 'static,
        F: FnMut(&mut W<'_>) -> R<T> + Send + 'static,
    {
        let (reply, answer) = oneshot::channel();
        let step = Box::new(Step {
            body,
            out: None,
            reply,
        });
        self.inner
            .steps
            .as_ref()
            .ok_or_else(writer_stopped)?
            .send(step)
            .map_err(|_| writer_stopped())?;
        answer.await.map_err(|_| writer_stopped())?
    }

    /// Runs a blocking store step off the async runtime's worker threads.
    async fn run<T: Send + 'static>(
        &self,
        f: impl FnOnce(&Inner) -> Result<T> + Send + 'static,
    ) -> Result<T> {
        let inner = self.inner.clone();
        tokio::task::spawn_blocking(move || f(&inner))
            .await
            .map_err(|e| StoreError::Backend(format!("embedded store task failed: {e}")))?
    }

    fn token(&self) -> String {
        format!("{}:{}", self.inner.worker, crate::job::new_id())
    }
}

#[async_trait]
impl Store for EmbeddedStore {
    async fn submit_with(&self, id: &str, spec: &JobSpec, settings: AggrSettings) -> Result<()> {
        let json = serde_json::to_string(spec).map_err(|e| StoreError::Corrupt(e.to_string()))?;
        let (id, spec) = (id.to_string(), spec.clone());
        self.write(move |w| {
            if w.jobs.get(id.as_str())?.is_some() {
                return Err(StoreError::Backend(format!("job id {id} already exists")).into());
            }
            let key = spec.aggr_key();
            let a = key.as_str();
            let mut ag = w.aggr(a)?;
            let keep = settings == AggrSettings::First && ag.jobs > 0;
            ag.jobs += 1;
            if !keep {
                ag.limit = i64::from(spec.aggr_limit);
                ag.proxy = spec.aggr_proxy.clone().unwrap_or_default();
            }
            let (rate, burst) = if keep {
                (ag.rate, ag.burst)
            } else {
                (spec.aggr_rate.unwrap_or(0.0), spec.aggr_burst.unwrap_or(1))
            };
            if (ag.rate, ag.burst) != (rate, burst) {
                (ag.rate, ag.burst) = (rate, burst);
                // A new rate: the next claim looks again.
                w.set_rate_wait(a, &mut ag, None)?;
            } else {
                w.put_aggr(a, &ag)?;
            }
            let mut f = Fields::new();
            set(&mut f, field::SPEC, &json);
            set(&mut f, field::AGGR, a);
            set(
                &mut f,
                field::HAS_CB,
                if spec.callback.is_some() { 1 } else { 0 },
            );
            set(&mut f, field::DL_STATE, state::PENDING);
            set(&mut f, field::DL_ATTEMPTS, 0);
            set(&mut f, field::CREATED_AT, w.now);
            set(&mut f, field::URL_HOST, spec.host());
            w.put_job(&id, &f)?;
            w.push_pending(a, &id, false)?;
            if w.refresh(a)? {
                w.wake(Queue::Download);
            }
            Ok(())
        })
        .await
    }

    async fn claim_shared(
        &self,
        queue: Queue,
        lease: Duration,
        max: usize,
        shares: &ClaimShares,
    ) -> Result<(Vec<Claimed>, Option<Duration>)> {
        // One token for the batch, as in Redis: each lease is still checked per job.
        let token = self.token();
        let lease = millis(lease);
        match queue {
            Queue::Download => {
                let shares = shares.clone();
                self.write(move |w| claim_downloads(w, lease, &token, max, &shares))
                    .await
            }
            Queue::Callback => {
                self.write(move |w| claim_callbacks(w, lease, &token, max))
                    .await
            }
        }
    }

    async fn wait(&self, queue: Queue, timeout: Duration) -> Result<()> {
        let notified = self.inner.notify[queue as usize].notified();
        // Like BLPOP: Ok both when woken and when the timeout passes.
        let _ = tokio::time::timeout(timeout, notified).await;
        Ok(())
    }

    async fn renew(
        &self,
        queue: Queue,
        held: &[(String, String)],
        lease: Duration,
    ) -> Result<Vec<bool>> {
        if held.is_empty() {
            return Ok(Vec::new());
        }
        let held = held.to_vec();
        let lease = millis(lease);
        let q = queue.name();
        self.write(move |w| {
            let expiry = w.now.saturating_add(lease);
            let mut out = Vec::with_capacity(held.len());
            for (id, token) in &held {
                let Some(mut f) = w.job(id)? else {
                    out.push(false);
                    continue;
                };
                if !holds(&f, q, token) {
                    out.push(false);
                    continue;
                }
                // ZADD XX: only an existing lease entry is moved.
                if f.contains_key(per_queue(q).lease_exp) {
                    w.zadd(true, q, id, &mut f, expiry)?;
                    w.put_job(id, &f)?;
                }
                if q == "dl"
                    && let Some(h) = f.get(field::HOST)
                {
                    let mut host = w.host(h)?;
                    if let Some(exp) = host.slots.get_mut(id.as_str()) {
                        *exp = expiry;
                        w.put_host(h, &host)?;
                    }
                }
                out.push(true);
            }
            Ok(out)
        })
        .await
    }

    async fn finish_download(
        &self,
        id: &str,
        token: &str,
        r: &DownloadResult,
        keep: Duration,
    ) -> Result<bool> {
        let (id, token, r, keep) = (id.to_string(), token.to_string(), r.clone(), millis(keep));
        self.write(move |w| {
            let Some(mut f) = w.job(&id)? else {
                return Ok(false);
            };
            if !holds(&f, "dl", &token) {
                return Ok(false);
            }
            let now = w.now;
            w.zrem(true, "dl", &id, &mut f)?;
            f.remove(field::DL_LEASE);
            w.free_host(&id, &mut f)?;
            let st = if r.success {
                state::SUCCESS
            } else {
                state::FAILED
            };
            set(&mut f, field::DL_STATE, st);
            set(&mut f, field::DL_ERROR, &r.error);
            set(&mut f, field::RESPONSE_CODE, r.response_code);
            set(&mut f, field::IMAGE_SIZE, &r.image_size);
            set(&mut f, field::THUMBS, &r.thumbnails);
            set(&mut f, field::FINISHED_AT, now);
            let a = f.get(field::AGGR).cloned().unwrap_or_default();
            w.free_slot(&a)?;
            w.end_job(&a)?;
            w.enqueue_callback(&id, &mut f, keep)?;
            w.put_job(&id, &f)?;
            Ok(true)
        })
        .await
    }

    async fn retry_download(
        &self,
        id: &str,
        token: &str,
        r: &DownloadResult,
        delay: Duration,
    ) -> Result<bool> {
        let (id, token, r) = (id.to_string(), token.to_string(), r.clone());
        let delay = millis(delay);
        self.write(move |w| requeue_download(w, &id, &token, Some(&r), delay, None))
            .await
    }

    async fn host_permit(
        &self,
        id: &str,
        token: &str,
        host: &str,
        limits: HostLimits,
        lease: Duration,
    ) -> Result<HostPermit> {
        let (id, token, h, lease) = (
            id.to_string(),
            token.to_string(),
            host.to_string(),
            millis(lease),
        );
        self.write(move |w| {
            let wait = |delay: u64, reason| HostPermit::Wait {
                delay: Duration::from_millis(delay),
                reason,
            };
            let Some(mut f) = w.job(&id)? else {
                return Ok(HostPermit::Lost);
            };
            if !holds(&f, "dl", &token) {
                return Ok(HostPermit::Lost);
            }
            let now = w.now;
            let mut host = w.host(&h)?;
            if host.pause_until > now {
                return Ok(wait(host.pause_until - now, WaitReason::HostPaused));
            }
            if limits.concurrency > 0 {
                host.slots.retain(|_, exp| *exp > now);
                if !host.slots.contains_key(&id) && host.slots.len() >= limits.concurrency as usize
                {
                    w.put_host(&h, &host)?;
                    // Deferring it parks it on the host (requeue_download).
                    set(&mut f, field::HOST_WAIT, &h);
                    w.put_job(&id, &f)?;
                    return Ok(wait(
                        millis(HOST_PARK_FALLBACK),
                        WaitReason::HostConcurrency,
                    ));
                }
            }
            if limits.rate > 0.0 {
                // A job refused earlier comes back at the slot it booked then.
                let booked = num(&f, field::HOST_SLOT).max(0) as u64;
                if booked > now {
                    return Ok(wait(booked - now, WaitReason::HostRate));
                }
                f.remove(field::HOST_SLOT);
                // A booking long past (the job waited for something else since) is
                // stale: the rate is asked again rather than letting such jobs through
                // together.
                if (booked as f64) <= now as f64 - 1000.0 / limits.rate {
                    let (allowed, at) = gcra(&mut host.tat, limits.rate, limits.burst, now, true);
                    if !allowed {
                        let when = at.ceil() as u64;
                        set(&mut f, field::HOST_SLOT, when);
                        w.put_host(&h, &host)?;
                        w.put_job(&id, &f)?;
                        return Ok(wait(when - now, WaitReason::HostRate));
                    }
                }
            }
            if limits.concurrency > 0 {
                host.slots.insert(id.clone(), now.saturating_add(lease));
                set(&mut f, field::HOST, &h);
            }
            w.put_host(&h, &host)?;
            w.put_job(&id, &f)?;
            Ok(HostPermit::Granted)
        })
        .await
    }

    async fn pause_host(&self, host: &str, pause: Duration) -> Result<()> {
        let (h, pause) = (host.to_string(), millis(pause).max(1));
        self.write(move |w| {
            let mut host = w.host(&h)?;
            host.pause_until = host.pause_until.max(w.now.saturating_add(pause));
            w.put_host(&h, &host)
        })
        .await
    }

    async fn defer_download(
        &self,
        id: &str,
        token: &str,
        r: Option<&DownloadResult>,
        delay: Duration,
        reason: WaitReason,
    ) -> Result<bool> {
        let (id, token, r) = (id.to_string(), token.to_string(), r.cloned());
        let delay = millis(delay);
        self.write(move |w| requeue_download(w, &id, &token, r.as_ref(), delay, Some(reason)))
            .await
    }

    async fn release(&self, queue: Queue, id: &str, token: &str) -> Result<bool> {
        let (id, token) = (id.to_string(), token.to_string());
        let q = queue.name();
        self.write(move |w| {
            let Some(mut f) = w.job(&id)? else {
                return Ok(false);
            };
            if !holds(&f, q, &token) {
                return Ok(false);
            }
            w.zrem(true, q, &id, &mut f)?;
            f.remove(per_queue(q).lease);
            if queue == Queue::Download {
                w.free_host(&id, &mut f)?;
            }
            let attempts = per_queue(q).attempts;
            incr(&mut f, &attempts, -1);
            set(&mut f, per_queue(q).state, state::PENDING);
            w.put_job(&id, &f)?;
            match queue {
                Queue::Download => {
                    let a = f.get(field::AGGR).cloned().unwrap_or_default();
                    w.push_pending(&a, &id, true)?;
                    w.free_slot(&a)?;
                }
                Queue::Callback => {
                    w.push_callback(&id, true)?;
                    w.wake(Queue::Callback);
                }
            }
            Ok(true)
        })
        .await
    }

    async fn finish_callback(&self, id: &str, token: &str, keep: Duration) -> Result<bool> {
        let (id, token, keep) = (id.to_string(), token.to_string(), millis(keep));
        self.write(move |w| end_callback(w, &id, &token, state::SUCCESS, "", keep))
            .await
    }

    async fn retry_callback(
        &self,
        id: &str,
        token: &str,
        error: &str,
        delay: Duration,
    ) -> Result<bool> {
        let (id, token, error, delay) = (
            id.to_string(),
            token.to_string(),
            error.to_string(),
            millis(delay),
        );
        self.write(move |w| end_callback(w, &id, &token, state::PENDING, &error, delay))
            .await
    }

    async fn fail_callback(&self, id: &str, token: &str, error: &str) -> Result<bool> {
        let (id, token, error) = (id.to_string(), token.to_string(), error.to_string());
        self.write(move |w| end_callback(w, &id, &token, state::FAILED, &error, 0))
            .await
    }

    async fn defer_callback(
        &self,
        id: &str,
        token: &str,
        dest: &str,
        delay: Duration,
    ) -> Result<bool> {
        let (id, token, dest, delay) = (
            id.to_string(),
            token.to_string(),
            dest.to_string(),
            millis(delay),
        );
        self.write(move |w| {
            let Some(mut f) = w.job(&id)? else {
                return Ok(false);
            };
            if !holds(&f, "cb", &token) {
                return Ok(false);
            }
            let at = w.now.saturating_add(delay);
            w.zrem(true, "cb", &id, &mut f)?;
            f.remove(field::CB_LEASE);
            incr(&mut f, field::CB_ATTEMPTS, -1);
            incr(&mut f, field::CB_DEFERS, 1);
            w.park_callback(&id, &mut f, &dest)?;
            set(&mut f, field::CB_STATE, state::PENDING);
            set(&mut f, field::NEXT_AT, at);
            w.zadd(false, "cb", &id, &mut f, at)?;
            w.put_job(&id, &f)?;
            Ok(true)
        })
        .await
    }

    async fn wake_callbacks(&self, dest: &str, max: usize) -> Result<usize> {
        let max = max.min(super::MAX_CALLBACK_WAKE);
        if max == 0 {
            return Ok(0);
        }
        let dest = dest.to_string();
        self.write(move |w| {
            let mut woken = Vec::new();
            let mut looked = 0;
            while woken.len() < max && looked < WAKE_LOOK_FACTOR * max {
                let first = w
                    .cb_wait
                    .range((dest.as_str(), i64::MIN)..=(dest.as_str(), i64::MAX))?
                    .next()
                    .transpose()?
                    .map(|(k, v)| (k.value().1, v.value().to_string()));
                let Some((seq, id)) = first else { break };
                looked += 1;
                w.cb_wait.remove((dest.as_str(), seq))?;
                w.dirty = true;
                let Some(mut f) = w.job(&id)? else { continue };
                let mine = f.get(field::CB_WAIT).is_some_and(|d| *d == dest)
                    && f.get(field::CB_WAIT_SEQ)
                        .is_some_and(|s| *s == seq.to_string());
                if !mine {
                    continue;
                }
                f.remove(field::CB_WAIT);
                f.remove(field::CB_WAIT_SEQ);
                let parked = f.get(field::CB_STATE).is_some_and(|s| s == state::PENDING)
                    && f.contains_key(field::CB_DELAYED_AT);
                if parked {
                    w.zrem(false, "cb", &id, &mut f)?;
                    set(&mut f, field::NEXT_AT, 0);
                    f.remove(field::CB_DEFERS);
                    woken.push(id.clone());
                }
                w.put_job(&id, &f)?;
            }
            for id in woken.iter().rev() {
                w.push_callback(id, true)?;
            }
            if !woken.is_empty() {
                w.wake(Queue::Callback);
            }
            Ok(woken.len())
        })
        .await
    }

    async fn requeue_callback(&self, id: &str) -> Result<RetryCallback> {
        let id = id.to_string();
        self.write(move |w| {
            let Some(mut f) = w.job(&id)? else {
                return Ok(RetryCallback::NotFound);
            };
            let st = f.get(field::CB_STATE).cloned().unwrap_or_default();
            if st != state::FAILED {
                return Ok(RetryCallback::NotFailed(st));
            }
            // Past notifier.failed_retention: its deletion is under way.
            if f.contains_key(field::DEL_AT) {
                return Ok(RetryCallback::NotFailed("Expired".into()));
            }
            w.remove_failed(&id, &mut f)?;
            set(&mut f, field::CB_STATE, state::PENDING);
            set(&mut f, field::CB_ATTEMPTS, 0);
            set(&mut f, field::CB_LOST, 0);
            w.unpark_entry(&id, &mut f)?;
            f.remove(field::CB_DEFERS);
            w.put_job(&id, &f)?;
            w.push_callback(&id, false)?;
            w.wake(Queue::Callback);
            Ok(RetryCallback::Requeued)
        })
        .await
    }

    async fn due_deletions(&self, limit: usize) -> Result<Vec<String>> {
        self.run(move |s| {
            s.read(|tx| {
                let now = s.clock.now_ms();
                let t = tx.open_table(DELETIONS)?;
                let mut out = Vec::new();
                if limit == 0 {
                    return Ok(out);
                }
                for e in t.range((0u64, "")..(now.saturating_add(1), ""))? {
                    out.push(e?.0.value().1.to_string());
                    if out.len() >= limit {
                        break;
                    }
                }
                Ok(out)
            })
        })
        .await
    }

    async fn failed_callbacks(
        &self,
        cursor: Option<&FailedCursor>,
        limit: usize,
        filter: &AggrFilter,
    ) -> Result<FailedPage> {
        let (cursor, filter, limit) = (cursor.cloned(), filter.clone(), limit.max(1));
        let scan = limit.saturating_mul(FAILED_SCAN_FACTOR);
        self.run(move |s| {
            s.read(|tx| {
                let failed = tx.open_table(FAILED)?;
                let jobs = tx.open_table(JOBS)?;
                let mut page = FailedPage::default();
                let range = match &cursor {
                    Some(c) => failed.range((c.failed_at, c.id.as_str())..)?,
                    None => failed.range::<(u64, &str)>(..)?,
                };
                let mut scanned = 0;
                for e in range {
                    let e = e?;
                    let (at, id) = e.0.value();
                    if cursor
                        .as_ref()
                        .is_some_and(|c| (at, id) <= (c.failed_at, c.id.as_str()))
                    {
                        continue;
                    }
                    if scanned >= scan || page.items.len() >= limit {
                        // More remain: go on after the last one looked at.
                        return Ok(page);
                    }
                    scanned += 1;
                    page.next = Some(FailedCursor {
                        failed_at: at,
                        id: id.to_string(),
                    });
                    let Some(v) = jobs.get(id)? else { continue };
                    let f: Fields = serde_json::from_str(v.value()).map_err(corrupt)?;
                    let aggr = f.get(field::AGGR).cloned().unwrap_or_default();
                    if filter.matches(&aggr) {
                        page.items.push(FailedCallback {
                            id: id.to_string(),
                            aggr,
                            failed_at: at,
                            error: f.get(field::CB_ERROR).cloned().unwrap_or_default(),
                            attempts: f
                                .get(field::CB_ATTEMPTS)
                                .and_then(|a| a.parse().ok())
                                .unwrap_or(0),
                        });
                    }
                }
                page.next = None;
                Ok(page)
            })
        })
        .await
    }

    async fn expire_failed(&self, retention: Duration, limit: usize) -> Result<usize> {
        let (retention, limit) = (millis(retention), limit.max(1));
        self.write(move |w| {
            let cutoff = w.now.saturating_sub(retention);
            let mut due = Vec::new();
            for e in w.failed.range((0u64, "")..(cutoff.saturating_add(1), ""))? {
                let e = e?;
                let (at, id) = e.0.value();
                due.push((at, id.to_string()));
                if due.len() >= limit {
                    break;
                }
            }
            for (at, id) in &due {
                let Some(mut f) = w.job(id)? else {
                    w.failed.remove((*at, id.as_str()))?;
                    w.dirty = true;
                    continue;
                };
                w.remove_failed(id, &mut f)?;
                let now = w.now;
                w.schedule_deletion(id, &mut f, now)?;
                w.put_job(id, &f)?;
            }
            Ok(due.len())
        })
        .await
    }

    async fn forget(&self, ids: &[String]) -> Result<()> {
        if ids.is_empty() {
            return Ok(());
        }
        let ids = ids.to_vec();
        self.write(move |w| {
            for id in &ids {
                let Some(mut f) = w.job(id)? else { continue };
                if let Some(at) = f.remove(field::DEL_AT) {
                    let at: u64 = at.parse().map_err(corrupt)?;
                    w.deletions.remove((at, id.as_str()))?;
                }
                w.remove_failed(id, &mut f)?;
                w.unpark_entry(id, &mut f)?;
                w.jobs.remove(id.as_str())?;
                w.dirty = true;
            }
            Ok(())
        })
        .await
    }

    async fn get_job(&self, id: &str) -> Result<Option<JobRecord>> {
        let id = id.to_string();
        self.run(move |s| {
            s.read(|tx| {
                let t = tx.open_table(JOBS)?;
                let Some(v) = t.get(id.as_str())? else {
                    return Ok(None);
                };
                let f: Fields = serde_json::from_str(v.value()).map_err(corrupt)?;
                let mut rec = super::schema::record(&id, &f).map_err(corrupt)?;
                if rec.queued()
                    && let Some(v) = tx.open_table(AGGRS)?.get(rec.spec.aggr_key().as_str())?
                {
                    let ag: Aggr = serde_json::from_str(v.value()).map_err(corrupt)?;
                    rec.note_aggr_rate_wait(ag.rate_wait);
                }
                Ok(Some(rec))
            })
        })
        .await
    }

    async fn aggregations_page(
        &self,
        offset: usize,
        limit: usize,
    ) -> Result<(Vec<AggrSummary>, u64)> {
        let limit = limit.min(MAX_AGGR_PAGE);
        self.run(move |s| {
            s.read(|tx| {
                let index = tx.open_table(PENDING_N)?;
                let aggrs = tx.open_table(AGGRS)?;
                let total = index.len()?;
                let mut out = Vec::new();
                for e in index.iter()?.rev().skip(offset).take(limit) {
                    let e = e?;
                    let (pending, name) = e.0.value();
                    let rate_wait_until = match aggrs.get(name)? {
                        Some(v) => {
                            serde_json::from_str::<Aggr>(v.value())
                                .map_err(corrupt)?
                                .rate_wait
                        }
                        None => None,
                    };
                    out.push(AggrSummary {
                        name: name.to_string(),
                        pending,
                        rate_wait_until,
                    });
                }
                Ok((out, total))
            })
        })
        .await
    }

    async fn pending_summary(&self, top: usize) -> Result<PendingSummary> {
        self.run(move |s| {
            s.read(|tx| {
                let index = tx.open_table(PENDING_N)?;
                let counters = tx.open_table(COUNTERS)?;
                let mut list = Vec::new();
                for e in index.iter()?.rev().take(top) {
                    let e = e?;
                    let (pending, name) = e.0.value();
                    list.push((name.to_string(), pending));
                }
                Ok(PendingSummary {
                    jobs: counters.get(PENDING_TOTAL)?.map_or(0, |v| v.value()),
                    aggregations: index.len()?,
                    top: list,
                })
            })
        })
        .await
    }

    async fn put_stats(&self, component: &str, json: &str, ttl: Duration) -> Result<()> {
        let ttl = millis(ttl);
        if ttl == 0 {
            // As Redis' PSETEX answers.
            return Err(StoreError::Backend(
                "invalid expire time in 'psetex' command".into(),
            ));
        }
        let (component, json) = (component.to_string(), json.to_string());
        self.write(move |w| {
            let exp = w.now.saturating_add(ttl);
            w.stats.insert(component.as_str(), (exp, json.as_str()))?;
            w.dirty = true;
            Ok(())
        })
        .await
    }

    async fn get_stats(&self, component: &str) -> Result<Option<String>> {
        let component = component.to_string();
        self.run(move |s| {
            s.read(|tx| {
                let t = tx.open_table(STATS)?;
                let Some(v) = t.get(component.as_str())? else {
                    return Ok(None);
                };
                let (exp, json) = v.value();
                Ok((s.clock.now_ms() <= exp).then(|| json.to_string()))
            })
        })
        .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    type Answer<T> = oneshot::Receiver<Result<T>>;

    fn step<T, F>(body: F) -> (Box<dyn Op>, Answer<T>)
    where
        T: Send + 'static,
        F: FnMut(&mut W<'_>) -> R<T> + Send + 'static,
    {
        let (reply, answer) = oneshot::channel();
        let op = Box::new(Step {
            body,
            out: None,
            reply,
        });
        (op, answer)
    }

    fn put(w: &mut W<'_>, k: &'static str) -> R<()> {
        w.stats.insert(k, (u64::MAX, "x"))?;
        w.dirty = true;
        Ok(())
    }

    /// Host records of hosts not seen again are dropped once idle, as Redis lets
    /// their keys expire.
    #[tokio::test]
    async fn idle_host_records_are_swept() {
        let dir = tempfile::tempdir().unwrap();
        let store = EmbeddedStore::open(&dir.path().join("s.redb")).unwrap();
        store
            .pause_host("paused.example", Duration::from_millis(30))
            .await
            .unwrap();
        let count = |s: &EmbeddedStore| {
            s.inner
                .read(|tx| Ok(tx.open_table(HOSTS)?.iter()?.count()))
                .unwrap()
        };
        assert_eq!(count(&store), 1);
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while count(&store) > 0 {
            assert!(std::time::Instant::now() < deadline, "the idle host stayed");
            store
                .claim_many(Queue::Download, Duration::from_secs(5), 1)
                .await
                .unwrap();
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// A step that fails after writing is rolled back alone; one that fails before
    /// writing fails alone; the others of the batch are committed, in one commit.
    #[test]
    fn a_failed_step_leaves_no_partial_write_in_its_batch() {
        let dir = tempfile::tempdir().unwrap();
        let db = Arc::new(Database::create(dir.path().join("s.redb")).unwrap());
        let (_tx, rx) = mpsc::channel();
        let mut writer = Writer {
            db: db.clone(),
            notify: Arc::new([Notify::new(), Notify::new()]),
            steps: rx,
            cursor: String::new(),
            clock: Clock::system(),
        };
        let (s1, a1) = step(|w| put(w, "a").map(|()| 1));
        let (s2, a2) = step(|w| -> R<u32> {
            put(w, "b")?;
            Err(corrupt("boom"))
        });
        let (s3, a3) = step(|w| put(w, "c").map(|()| 3));
        let (s4, a4) = step(|_| -> R<u32> { Err(StoreError::Backend("refused".into()).into()) });
        writer.batch(vec![s1, s2, s3, s4]);
        assert_eq!(a1.blocking_recv().unwrap().unwrap(), 1);
        assert!(matches!(
            a2.blocking_recv().unwrap(),
            Err(StoreError::Corrupt(m)) if m == "boom"
        ));
        assert_eq!(a3.blocking_recv().unwrap().unwrap(), 3);
        assert!(matches!(
            a4.blocking_recv().unwrap(),
            Err(StoreError::Backend(m)) if m == "refused"
        ));
        let tx = db.begin_read().unwrap();
        let t = tx.open_table(STATS).unwrap();
        assert!(t.get("a").unwrap().is_some());
        assert!(
            t.get("b").unwrap().is_none(),
            "the failed step was rolled back"
        );
        assert!(t.get("c").unwrap().is_some());
    }

    /// Steps still queued when the store is dropped are committed before the file is
    /// closed.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn drop_commits_what_is_queued() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s.redb");
        let s = EmbeddedStore::open(&path).unwrap();
        let mut answers = Vec::new();
        for i in 0..200u64 {
            let (op, a) = step(move |w| {
                let k = format!("k{i}");
                w.stats.insert(k.as_str(), (u64::MAX, "x"))?;
                w.dirty = true;
                Ok(())
            });
            s.inner.steps.as_ref().unwrap().send(op).unwrap();
            answers.push(a);
        }
        drop(s);
        for a in answers {
            a.await.unwrap().unwrap();
        }
        let s = EmbeddedStore::open(&path).unwrap();
        for i in 0..200 {
            assert!(s.get_stats(&format!("k{i}")).await.unwrap().is_some());
        }
    }
}
