//! The write path: one write transaction's tables and the steps' shared moves on them
//! (the Lua prelude's functions: `refresh`, `end_job`, `free_host`, ...).

use super::tables::*;
use super::*;

/// One write transaction's tables, the clock read at the start of the current step,
/// and the queues that step wakes once it is committed.
pub(super) struct W<'t> {
    pub(super) now: u64,
    pub(super) clock: &'t Clock,
    pub(super) jobs: Table<'t, Str, Str>,
    pub(super) aggrs: Table<'t, Str, Str>,
    pub(super) pending: Table<'t, (Str, i64), Str>,
    pub(super) ready: Table<'t, Str, ()>,
    pub(super) active: Table<'t, Str, ()>,
    pub(super) leases: Table<'t, Zset, ()>,
    pub(super) delayed: Table<'t, Zset, ()>,
    pub(super) cb_queue: Table<'t, i64, Str>,
    pub(super) deletions: Table<'t, (u64, Str), ()>,
    pub(super) failed: Table<'t, (u64, Str), ()>,
    pub(super) pending_n: Table<'t, (u64, Str), ()>,
    pub(super) idle: Table<'t, (u64, Str), ()>,
    pub(super) counters: Table<'t, Str, u64>,
    pub(super) stats: Table<'t, Str, (u64, Str)>,
    pub(super) ratewait: Table<'t, (u64, Str), ()>,
    pub(super) hosts: Table<'t, Str, Str>,
    pub(super) cb_wait: Table<'t, (Str, i64), Str>,
    pub(super) wake: [bool; 2],
    /// The current step wrote something: commit (otherwise abort, saving an fsync).
    pub(super) dirty: bool,
    /// The aggregation the last download claim took from (round robin over `ready`).
    pub(super) cursor: String,
}

impl<'t> W<'t> {
    pub(super) fn open(tx: &'t WriteTransaction, cursor: String, clock: &'t Clock) -> R<W<'t>> {
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
    pub(super) fn begin_step(&mut self) {
        self.now = self.clock.now_ms();
        self.wake = [false; 2];
        self.dirty = false;
    }

    pub(super) fn wake(&mut self, q: Queue) {
        self.wake[q as usize] = true;
    }

    pub(super) fn job(&self, id: &str) -> R<Option<Fields>> {
        match self.jobs.get(id)? {
            None => Ok(None),
            Some(v) => serde_json::from_str(v.value()).map(Some).map_err(corrupt),
        }
    }

    pub(super) fn put_job(&mut self, id: &str, f: &Fields) -> R<()> {
        let json = serde_json::to_string(f).map_err(corrupt)?;
        self.jobs.insert(id, json.as_str())?;
        self.dirty = true;
        Ok(())
    }

    pub(super) fn aggr(&self, a: &str) -> R<Aggr> {
        match self.aggrs.get(a)? {
            None => Ok(Aggr::default()),
            Some(v) => serde_json::from_str(v.value()).map_err(corrupt),
        }
    }

    pub(super) fn put_aggr(&mut self, a: &str, ag: &Aggr) -> R<()> {
        let json = serde_json::to_string(ag).map_err(corrupt)?;
        self.aggrs.insert(a, json.as_str())?;
        self.dirty = true;
        Ok(())
    }

    /// Adds or removes `a` in a set table, writing only on a change.
    pub(super) fn set_member(&mut self, ready: bool, a: &str, member: bool) -> R<()> {
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
    pub(super) fn refresh(&mut self, a: &str) -> R<bool> {
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
    pub(super) fn count_pending(&mut self, a: &str, ag: &mut Aggr) -> R<()> {
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
    pub(super) fn revive(&mut self, a: &str, f: &Fields) -> R<()> {
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
    pub(super) fn sweep_idle(&mut self) -> R<()> {
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
    pub(super) fn set_rate_wait(&mut self, a: &str, ag: &mut Aggr, at: Option<u64>) -> R<()> {
        if let Some(old) = ag.rate_wait.take() {
            self.ratewait.remove((old, a))?;
        }
        if let Some(at) = at {
            self.ratewait.insert((at, a), ())?;
            ag.rate_wait = Some(at);
        }
        self.put_aggr(a, ag)
    }

    pub(super) fn host(&self, h: &str) -> R<Host> {
        match self.hosts.get(h)? {
            None => Ok(Host::default()),
            Some(v) => serde_json::from_str(v.value()).map_err(corrupt),
        }
    }

    /// Saves `h`'s state, or drops it once it holds nothing that matters any more
    /// (as the Redis keys expire).
    pub(super) fn put_host(&mut self, h: &str, host: &Host) -> R<()> {
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
    pub(super) fn sweep_hosts(&mut self) -> R<()> {
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
    pub(super) fn free_host(&mut self, id: &str, f: &mut Fields) -> R<()> {
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
    pub(super) fn unpark(&mut self, host: &mut Host) -> R<()> {
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
    pub(super) fn end_job(&mut self, a: &str) -> R<()> {
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

    pub(super) fn dec_inflight(&mut self, a: &str) -> R<()> {
        let mut ag = self.aggr(a)?;
        ag.inflight = (ag.inflight - 1).max(0);
        self.put_aggr(a, &ag)
    }

    /// PRELUDE `free_slot`.
    pub(super) fn free_slot(&mut self, a: &str) -> R<()> {
        self.dec_inflight(a)?;
        if self.refresh(a)? {
            self.wake(Queue::Download);
        }
        Ok(())
    }

    /// The first (`back == false`) or last entry of `a`'s pending list.
    pub(super) fn pending_end(&self, a: &str, back: bool) -> R<Option<(i64, String)>> {
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
    pub(super) fn push_pending(&mut self, a: &str, id: &str, front: bool) -> R<()> {
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
    pub(super) fn pop_pending(&mut self, a: &str) -> R<Option<String>> {
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
    pub(super) fn push_callback(&mut self, id: &str, front: bool) -> R<()> {
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
    pub(super) fn pop_callback(&mut self) -> R<Option<String>> {
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
    pub(super) fn zadd(
        &mut self,
        lease: bool,
        q: Str,
        id: &str,
        f: &mut Fields,
        score: u64,
    ) -> R<()> {
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

    pub(super) fn zrem(&mut self, lease: bool, q: Str, id: &str, f: &mut Fields) -> R<()> {
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
    pub(super) fn due(&self, lease: bool, q: Str) -> R<Vec<(u64, String)>> {
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
    pub(super) fn next_due(&self, q: Str) -> R<Option<Duration>> {
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

    pub(super) fn schedule_deletion(&mut self, id: &str, f: &mut Fields, at: u64) -> R<()> {
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
    pub(super) fn add_failed(&mut self, id: &str, f: &mut Fields) -> R<()> {
        self.remove_failed(id, f)?;
        self.failed.insert((self.now, id), ())?;
        set(f, field::FAILED_AT, self.now);
        self.dirty = true;
        Ok(())
    }

    pub(super) fn remove_failed(&mut self, id: &str, f: &mut Fields) -> R<()> {
        if let Some(at) = f.remove(field::FAILED_AT) {
            let at: u64 = at.parse().map_err(corrupt)?;
            self.failed.remove((at, id))?;
            self.dirty = true;
        }
        Ok(())
    }

    /// Parks callback `id` on `dest` (`RPUSH cbwait:<dest>`), unless it is parked
    /// there already: it keeps its place (the caller saves `f`).
    pub(super) fn park_callback(&mut self, id: &str, f: &mut Fields, dest: &str) -> R<()> {
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
    pub(super) fn unpark_entry(&mut self, id: &str, f: &mut Fields) -> R<()> {
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
    pub(super) fn enqueue_callback(&mut self, id: &str, f: &mut Fields, keep: u64) -> R<()> {
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
    pub(super) fn next_ready(&self, cursor: &str) -> R<Option<String>> {
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
