//! Embedded backend of [`Store`]: one redb file, used by one process.
//!
//! It keeps the Redis backend's semantics (both follow store/schema.rs, and
//! tests/store_differential.rs drives both through the same random steps and compares
//! every answer):
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
//! Rooms: `tables.rs` (tables, records, field helpers), `write.rs` (one transaction's
//! tables and the prelude's moves on them), `steps.rs` (the larger steps, one per
//! script), `writer.rs` (group commit); the [`Store`] methods are here.
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
//! - a queue's wake-ups are one stored permit per process (Redis: up to 16 tokens);
//! - read-only methods use one read transaction (a snapshot), outside the writer; a
//!   batch whose steps changed nothing is aborted rather than committed, saving the
//!   fsync;
//! - expired stats are not removed, only read as absent until overwritten;
//! - a host's limiter state is one record, removed once it is idle (Redis: keys
//!   that expire);
//! - a parked callback's `cb_wait` entry is removed as soon as it is no longer
//!   parked (Redis leaves it in the list, to be skipped, and lets the list expire).

use std::ops::Bound;
use std::panic::AssertUnwindSafe;
use std::path::Path;
use std::sync::{Arc, mpsc};
use std::thread;
use std::time::Duration;

use async_trait::async_trait;
use redb::{
    Database, DatabaseError, ReadableDatabase, ReadableTable, ReadableTableMetadata, Table,
    WriteTransaction,
};
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

mod steps;
mod tables;
mod write;
mod writer;

use steps::*;
use tables::*;
use write::W;
use writer::*;

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
            incr(&mut f, per_queue(q).attempts, -1);
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
