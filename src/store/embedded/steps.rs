//! The state machine's larger steps, one function per Redis script they mirror
//! (CLAIM_DOWNLOAD, CLAIM_CALLBACK, REQUEUE_DOWNLOAD, FINISH_CALLBACK).

use super::tables::*;
use super::write::W;
use super::*;

pub(super) fn claimed(id: &str, f: &Fields, token: &str, proxy: String) -> R<Claimed> {
    let job = super::super::schema::record(id, f).map_err(corrupt)?;
    Ok(Claimed {
        job,
        token: token.to_string(),
        proxy: (!proxy.is_empty()).then_some(proxy),
    })
}

/// CLAIM_DOWNLOAD: up to `max` jobs (at least one attempt); with none, when the
/// earliest delayed download is due.
pub(super) fn claim_downloads(
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
pub(super) fn claim_callbacks(
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
pub(super) fn requeue_download(
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
pub(super) fn end_callback(
    w: &mut W<'_>,
    id: &str,
    token: &str,
    st: &str,
    err: &str,
    delay: u64,
) -> R<bool> {
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
