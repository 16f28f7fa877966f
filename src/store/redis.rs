//! Redis backend of [`Store`]. Every multi-key step is one Lua script, so each is
//! atomic across any number of processes sharing the server. Scripts read the clock
//! with `TIME`, so machines with skewed clocks still agree on lease expiry.
//!
//! Keys are listed in ARCHITECTURE.md. Scripts build key names at run time, so this
//! backend needs a standalone Redis (not Redis Cluster).

use std::collections::BTreeMap;
use std::sync::LazyLock;
use std::time::Duration;

use async_trait::async_trait;
use redis::aio::ConnectionManager;
use redis::{AsyncCommands, Script, Value};
use tokio::sync::Mutex;

use super::{
    AggrFilter, AggrSettings, AggrSummary, ClaimShares, Claimed, DownloadResult,
    FAILED_SCAN_FACTOR, FailedCallback, FailedCursor, FailedPage, HOST_PARK_FALLBACK, HostLimits,
    HostPermit, MAX_AGGR_PAGE, PendingSummary, Queue, Result, RetryCallback, Store, StoreError,
    WaitReason, millis,
};
use crate::config::RedisConfig;
use crate::job::{JobRecord, JobSpec};

/// Leases a job may lose to dead workers before it is failed instead of retried, so
/// that a file that crashes the processor cannot loop forever.
const MAX_LOST_LEASES: u32 = 5;

/// Shared by every script: key helpers, the clock, the ready-set rule and wake-ups.
const PRELUDE: &str = r#"
local P = KEYS[1]
local function now_ms()
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end
local function n2s(x) return string.format('%d', x) end
local function wake(q)
  redis.call('LPUSH', P..'wake:'..q, '1')
  redis.call('LTRIM', P..'wake:'..q, 0, 15)
end
-- Invariant: an aggregation is in `ready` iff it has pending jobs, fewer downloads
-- in flight than its limit, and is not waiting for its rate (in `ratewait`); it is
-- in `pending_n` (with its count) iff it has pending jobs.
local function refresh(a)
  local ak = P..'aggr:'..a
  local f = redis.call('HMGET', ak, 'limit', 'inflight')
  local limit, inflight = tonumber(f[1] or '1'), tonumber(f[2] or '0')
  local len = redis.call('LLEN', P..'pending:'..a)
  -- `pending_n` (aggregation -> pending count) and `pending_total` (their sum) keep
  -- the dashboard and /metrics cheap however many aggregations there are.
  local old = tonumber(redis.call('ZSCORE', P..'pending_n', a) or '0')
  if len ~= old then
    if len > 0 then redis.call('ZADD', P..'pending_n', len, a) else redis.call('ZREM', P..'pending_n', a) end
    redis.call('INCRBY', P..'pending_total', len - old)
  end
  if len > 0 and inflight < limit and not redis.call('ZSCORE', P..'ratewait', a) then
    redis.call('SADD', P..'ready', a)
    return true
  end
  redis.call('SREM', P..'ready', a)
  return false
end
local function free_slot(a)
  local ak = P..'aggr:'..a
  if redis.call('HINCRBY', ak, 'inflight', -1) < 0 then redis.call('HSET', ak, 'inflight', 0) end
  if refresh(a) then wake('dl') end
end
-- A job of `a` left its download phase for good (succeeded or failed). An
-- aggregation with no job left goes: its rate state is `rate:<a>`, which expires
-- by itself, so nothing of it is lost.
local function end_job(a)
  local ak = P..'aggr:'..a
  if redis.call('HINCRBY', ak, 'jobs', -1) > 0 then return end
  if tonumber(redis.call('HGET', ak, 'inflight') or '0') <= 0
      and redis.call('LLEN', P..'pending:'..a) == 0 then
    redis.call('DEL', ak)
    redis.call('ZREM', P..'ratewait', a)
    redis.call('SREM', P..'ready', a)
  else
    redis.call('HSET', ak, 'jobs', 0)
  end
end
-- A job going back to `pending:<a>` whose aggregation was removed (its jobs were
-- not counted: submitted before the count existed) brings its settings back.
local function revive(a, k)
  local ak = P..'aggr:'..a
  if redis.call('EXISTS', ak) == 1 then return end
  local ok, sp = pcall(cjson.decode, redis.call('HGET', k, 'spec') or '')
  if not ok or type(sp) ~= 'table' then return end
  local function opt(v, d) if v == nil or v == cjson.null then return d end return v end
  redis.call('HSET', ak, 'limit', opt(sp.aggr_limit, 1), 'proxy', opt(sp.aggr_proxy, ''),
    'rate', opt(sp.aggr_rate, 0), 'burst', opt(sp.aggr_burst, 1), 'jobs', 1)
end
-- GCRA (the generic cell rate algorithm) on the theoretical arrival time kept in
-- `key` (ms, expiring once it is in the past, so an idle limiter leaves no key).
-- Returns true when a request is allowed now (and counts it) and from when the next
-- one will be; else false and from when this one will be. With `reserve`, a refused request books the earliest slot instead (it is
-- counted then, and the caller comes back at that time).
local function gcra(key, rate, burst, now, reserve)
  local t = 1000 / rate
  local tat = tonumber(redis.call('GET', key) or '0')
  if tat < now then tat = now end
  local tolerance = t * (burst - 1) + math.min(t * SLACK, SLACK_MAX_MS)
  local at = tat - tolerance
  if at > now and not reserve then return false, at end
  local new = tat + t
  redis.call('SET', key, string.format('%.3f', new), 'PX', n2s(math.max(1, math.ceil(new - now))))
  if at > now then return false, at end
  return true, new - tolerance
end
-- Frees the per-host slot a download holds, if any.
-- Wakes one download parked for `h`'s concurrency (see REQUEUE_DOWNLOAD): it is
-- due now instead of at its fallback time. Entries of jobs no longer parked are
-- dropped on the way.
local function unpark(h)
  local wl = P..'hostwait:'..h
  for _ = 1, 16 do
    local w = redis.call('LPOP', wl)
    if not w then return end
    if redis.call('HGET', P..'job:'..w, 'wait') == 'host_concurrency'
        and redis.call('ZSCORE', P..'dl:delayed', w) then
      local t = n2s(now_ms())
      redis.call('ZADD', P..'dl:delayed', t, w)
      redis.call('HSET', P..'job:'..w, 'next_at', t)
      wake('dl')
      return
    end
  end
end
-- Frees the per-host slot a download holds, if any, and wakes a download waiting
-- for it.
local function free_host(k, id)
  local h = redis.call('HGET', k, 'host')
  if h then
    redis.call('ZREM', P..'hostslots:'..h, id)
    redis.call('HDEL', k, 'host')
    unpark(h)
  end
end
local function enqueue_callback(id, now, keep)
  local k = P..'job:'..id
  if redis.call('HGET', k, 'has_cb') == '1' then
    redis.call('HSET', k, 'cb_state', 'Pending', 'cb_attempts', 0)
    redis.call('RPUSH', P..'cb:queue', id)
    wake('cb')
  else
    redis.call('ZADD', P..'deletions', n2s(now + keep), id)
  end
end
"#;

fn script(body: &str) -> Script {
    let (slack, max) = (super::GCRA_SLACK, super::GCRA_SLACK_MAX_MS);
    // Before the prelude: its `gcra` reads them.
    Script::new(&format!(
        "local SLACK, SLACK_MAX_MS = {slack}, {max}\n{PRELUDE}\n{body}"
    ))
}

static SUBMIT: LazyLock<Script> = LazyLock::new(|| {
    script(
        r#"
local id, spec, a, limit, proxy, has_cb, rate, burst, host, first = ARGV[1], ARGV[2], ARGV[3], ARGV[4], ARGV[5], ARGV[6], ARGV[7], ARGV[8], ARGV[9], ARGV[10] == '1'
local k = P..'job:'..id
if redis.call('EXISTS', k) == 1 then return 0 end
local ak = P..'aggr:'..a
local old = redis.call('HMGET', ak, 'rate', 'burst', 'jobs')
-- api.aggregation_settings = first: an aggregation with jobs keeps its settings.
if not (first and tonumber(old[3] or '0') > 0) then
  redis.call('HSET', ak, 'limit', limit, 'proxy', proxy, 'rate', rate, 'burst', burst)
  -- A new rate: the next claim looks again.
  if tonumber(old[1] or '0') ~= tonumber(rate) or tonumber(old[2] or '1') ~= tonumber(burst) then
    redis.call('ZREM', P..'ratewait', a)
  end
end
redis.call('HINCRBY', ak, 'jobs', 1)
redis.call('HSET', k, 'spec', spec, 'aggr', a, 'has_cb', has_cb, 'dl_state', 'Pending',
  'dl_attempts', 0, 'created_at', n2s(now_ms()), 'url_host', host)
redis.call('RPUSH', P..'pending:'..a, id)
if refresh(a) then wake('dl') end
return 1
"#,
    )
});

static CLAIM_DOWNLOAD: LazyLock<Script> = LazyLock::new(|| {
    script(
        r#"
local lease, token, max_lost, keep, max = tonumber(ARGV[1]), ARGV[2], tonumber(ARGV[3]), tonumber(ARGV[4]), tonumber(ARGV[5])
local now = now_ms()
for _, a in ipairs(redis.call('ZRANGEBYSCORE', P..'ratewait', '-inf', now, 'LIMIT', 0, 100)) do
  redis.call('ZREM', P..'ratewait', a)
  refresh(a)
end
for _, id in ipairs(redis.call('ZRANGEBYSCORE', P..'dl:delayed', '-inf', now, 'LIMIT', 0, 100)) do
  redis.call('ZREM', P..'dl:delayed', id)
  local a = redis.call('HGET', P..'job:'..id, 'aggr')
  if a then
    revive(a, P..'job:'..id)
    redis.call('HSET', P..'job:'..id, 'next_at', 0)
    redis.call('RPUSH', P..'pending:'..a, id)
    refresh(a)
  end
end
for _, id in ipairs(redis.call('ZRANGEBYSCORE', P..'dl:leases', '-inf', now, 'LIMIT', 0, 100)) do
  redis.call('ZREM', P..'dl:leases', id)
  local k = P..'job:'..id
  local a = redis.call('HGET', k, 'aggr')
  if a then
    redis.call('HDEL', k, 'dl_lease')
    free_host(k, id)
    redis.call('HINCRBY', k, 'dl_attempts', -1)
    local lost = redis.call('HINCRBY', k, 'dl_lost', 1)
    local ak = P..'aggr:'..a
    if redis.call('HINCRBY', ak, 'inflight', -1) < 0 then redis.call('HSET', ak, 'inflight', 0) end
    if lost > max_lost then
      redis.call('HSET', k, 'dl_state', 'Failed', 'finished_at', n2s(now),
        'dl_error', 'download abandoned: the worker running it was lost ' .. lost .. ' times')
      end_job(a)
      enqueue_callback(id, now, keep)
    else
      redis.call('HSET', k, 'dl_state', 'Pending')
      redis.call('LPUSH', P..'pending:'..a, id)
    end
    refresh(a)
  end
end
local any_pause = redis.call('EXISTS', P..'hostpauses') == 1
local out = {}
-- Takes one job of aggregation `a` if it may give one now; true when it did.
local function claim_one(a)
  local ak = P..'aggr:'..a
  local limit = tonumber(redis.call('HGET', ak, 'limit') or '1')
  local inflight = tonumber(redis.call('HGET', ak, 'inflight') or '0')
  local id = false
  if inflight < limit and redis.call('LLEN', P..'pending:'..a) > 0 then
    local rate = tonumber(redis.call('HGET', ak, 'rate') or '0') or 0
    local allowed, at = true, now
    if rate > 0 then
      allowed, at = gcra(P..'rate:'..a, rate, tonumber(redis.call('HGET', ak, 'burst') or '1') or 1, now, false)
    end
    if allowed then
      id = redis.call('LPOP', P..'pending:'..a)
      -- The next one is not allowed yet: wait for it out of `ready` right away.
      if at > now then redis.call('ZADD', P..'ratewait', n2s(math.ceil(at)), a) end
    else
      -- Waits out of `ready` (refresh below), holding no slot; claims come back then.
      redis.call('ZADD', P..'ratewait', n2s(math.ceil(at)), a)
    end
  end
  -- A job whose host an origin paused waits out the pause in `dl:delayed` (not an
  -- attempt) instead of being handed out. (Looked up only while some host is paused.)
  local paused = id and any_pause and redis.call('PTTL', P..'hostpause:'..(redis.call('HGET', P..'job:'..id, 'url_host') or ''))
  if paused and paused > 0 then
    local at = n2s(now + paused)
    redis.call('HSET', P..'job:'..id, 'dl_state', 'Pending', 'wait', 'host_paused', 'next_at', at)
    redis.call('ZADD', P..'dl:delayed', at, id)
    id = false
  end
  if id then
    redis.call('HINCRBY', ak, 'inflight', 1)
    local k = P..'job:'..id
    redis.call('ZADD', P..'dl:leases', n2s(now + lease), id)
    redis.call('HDEL', k, 'wait')
    redis.call('HSET', k, 'dl_state', 'InProgress', 'dl_lease', token, 'started_at', n2s(now))
    redis.call('HINCRBY', k, 'dl_attempts', 1)
    out[#out + 1] = {id, redis.call('HGETALL', k), redis.call('HGET', ak, 'proxy') or ''}
  end
  refresh(a)
  return id and true or false
end
-- Ready aggregations one shared claim looks at, at most (see below).
local SCAN_WINDOW = 256
-- The claimer's shares (ClaimShares): ARGV[6] aggregations, then (name, room) pairs,
-- then the number of tenants and their pairs; ARGV[7 + ...] its SSCAN cursor.
local room_a, room_t = {}, {}
local i = 6
local n_a = tonumber(ARGV[i] or '0') or 0
i = i + 1
for _ = 1, n_a do room_a[ARGV[i]] = tonumber(ARGV[i + 1]); i = i + 2 end
local n_t = tonumber(ARGV[i] or '0') or 0
i = i + 1
for _ = 1, n_t do room_t[ARGV[i]] = tonumber(ARGV[i + 1]); i = i + 2 end
local cursor = ARGV[i] or '0'
local function tenant(a)
  if n_t == 0 or string.byte(a, 1) ~= 64 then return nil end
  local s = string.find(a, '/', 2, true)
  if not s then return nil end
  return string.sub(a, 2, s - 1)
end
local function full(a)
  local r = room_a[a]
  if r and r <= 0 then return true end
  local t = tenant(a)
  if t then
    r = room_t[t]
    if r and r <= 0 then return true end
  end
  return false
end
local function took(a)
  if room_a[a] then room_a[a] = room_a[a] - 1 end
  local t = tenant(a)
  if t and room_t[t] then room_t[t] = room_t[t] - 1 end
end
local function next_due()
  local due = -1
  for _, z in ipairs({'dl:delayed', 'ratewait'}) do
    local nxt = redis.call('ZRANGE', P..z, 0, 0, 'WITHSCORES')
    if nxt[2] then
      local ms = math.max(0, tonumber(nxt[2]) - now)
      if due < 0 or ms < due then due = ms end
    end
  end
  return due
end
if n_a + n_t == 0 then
  -- Random ready aggregations, one job each time (an aggregation may come up again).
  local tries = 0
  while #out < max and tries < max + 16 do
    tries = tries + 1
    local a = redis.call('SRANDMEMBER', P..'ready')
    if not a then break end
    claim_one(a)
  end
  if #out > 0 then return {'jobs', out} end
  return {'empty', n2s(next_due())}
end
-- With shares: random picks would keep finding the full ones (a tenant's thousands
-- of aggregations), so the ready set is scanned on from where this claimer's last
-- scan stopped, a window at a time, skipping what is full; then the window's
-- aggregations give one job each in turn.
local cands, seen = {}, 0
repeat
  local r = redis.call('SSCAN', P..'ready', cursor, 'COUNT', 64)
  cursor = r[1]
  for _, a in ipairs(r[2]) do
    seen = seen + 1
    if not full(a) then cands[#cands + 1] = a end
  end
until cursor == '0' or seen >= SCAN_WINDOW or #cands >= max
while #out < max and #cands > 0 do
  local live = {}
  for _, a in ipairs(cands) do
    if #out >= max then break end
    if not full(a) and claim_one(a) then
      took(a)
      live[#live + 1] = a
    end
  end
  cands = live
end
if #out > 0 then return {'jobs', out, cursor} end
-- Skipped some and more of the set is left: the claimer looks again at once.
if cursor ~= '0' then return {'empty', '0', cursor} end
return {'empty', n2s(next_due()), cursor}
"#,
    )
});

static CLAIM_CALLBACK: LazyLock<Script> = LazyLock::new(|| {
    script(
        r#"
local lease, token, max_lost, max = tonumber(ARGV[1]), ARGV[2], tonumber(ARGV[3]), tonumber(ARGV[4])
local now = now_ms()
for _, id in ipairs(redis.call('ZRANGEBYSCORE', P..'cb:delayed', '-inf', now, 'LIMIT', 0, 100)) do
  redis.call('ZREM', P..'cb:delayed', id)
  if redis.call('EXISTS', P..'job:'..id) == 1 then
    redis.call('HSET', P..'job:'..id, 'next_at', 0)
    redis.call('RPUSH', P..'cb:queue', id)
  end
end
for _, id in ipairs(redis.call('ZRANGEBYSCORE', P..'cb:leases', '-inf', now, 'LIMIT', 0, 100)) do
  redis.call('ZREM', P..'cb:leases', id)
  local k = P..'job:'..id
  if redis.call('EXISTS', k) == 1 then
    redis.call('HDEL', k, 'cb_lease')
    redis.call('HINCRBY', k, 'cb_attempts', -1)
    local lost = redis.call('HINCRBY', k, 'cb_lost', 1)
    if lost > max_lost then
      redis.call('HSET', k, 'cb_state', 'Failed', 'cb_at', n2s(now),
        'cb_error', 'callback abandoned: the worker running it was lost ' .. lost .. ' times')
      redis.call('ZADD', P..'cb:failed', n2s(now), id)
    else
      redis.call('HSET', k, 'cb_state', 'Pending')
      redis.call('LPUSH', P..'cb:queue', id)
    end
  end
end
local out = {}
while #out < max do
  local id = redis.call('LPOP', P..'cb:queue')
  if not id then break end
  local k = P..'job:'..id
  if redis.call('EXISTS', k) == 1 then
    redis.call('ZADD', P..'cb:leases', n2s(now + lease), id)
    redis.call('HSET', k, 'cb_state', 'InProgress', 'cb_lease', token)
    redis.call('HINCRBY', k, 'cb_attempts', 1)
    out[#out + 1] = {id, redis.call('HGETALL', k), ''}
  end
end
if #out > 0 then return {'jobs', out} end
local nxt = redis.call('ZRANGE', P..'cb:delayed', 0, 0, 'WITHSCORES')
if nxt[2] then return {'empty', n2s(math.max(0, tonumber(nxt[2]) - now))} end
return {'empty', '-1'}
"#,
    )
});

static RENEW: LazyLock<Script> = LazyLock::new(|| {
    script(
        r#"
local q, lease = ARGV[1], tonumber(ARGV[2])
local expiry = n2s(now_ms() + lease)
local out = {}
for i = 3, #ARGV, 2 do
  local id, token = ARGV[i], ARGV[i + 1]
  local k = P..'job:'..id
  if redis.call('HGET', k, q..'_lease') == token then
    redis.call('ZADD', P..q..':leases', 'XX', expiry, id)
    local h = q == 'dl' and redis.call('HGET', k, 'host')
    if h then
      redis.call('ZADD', P..'hostslots:'..h, 'XX', expiry, id)
      redis.call('PEXPIRE', P..'hostslots:'..h, n2s(2 * lease))
    end
    out[#out + 1] = 1
  else
    out[#out + 1] = 0
  end
end
return out
"#,
    )
});

static FINISH_DOWNLOAD: LazyLock<Script> = LazyLock::new(|| {
    script(
        r#"
local id, token, st, err, code, size, keep, thumbs = ARGV[1], ARGV[2], ARGV[3], ARGV[4], ARGV[5], ARGV[6], tonumber(ARGV[7]), ARGV[8]
local k = P..'job:'..id
if redis.call('HGET', k, 'dl_lease') ~= token then return 0 end
local now = now_ms()
redis.call('ZREM', P..'dl:leases', id)
redis.call('HDEL', k, 'dl_lease')
free_host(k, id)
redis.call('HSET', k, 'dl_state', st, 'dl_error', err, 'response_code', code, 'image_size', size,
  'thumbs', thumbs, 'finished_at', n2s(now))
local a = redis.call('HGET', k, 'aggr')
free_slot(a)
end_job(a)
enqueue_callback(id, now, keep)
return 1
"#,
    )
});

/// Queues a claimed download again after a delay: a retry (`reason` empty: the
/// attempt counts) or a deferral (`reason` says why; not an attempt). With
/// `has_result`, the attempt's error and status are kept as the job's last ones.
static REQUEUE_DOWNLOAD: LazyLock<Script> = LazyLock::new(|| {
    script(
        r#"
local id, token, delay, reason, has_result, err, code = ARGV[1], ARGV[2], tonumber(ARGV[3]), ARGV[4], ARGV[5], ARGV[6], ARGV[7]
local k = P..'job:'..id
if redis.call('HGET', k, 'dl_lease') ~= token then return 0 end
local at = n2s(now_ms() + delay)
redis.call('ZREM', P..'dl:leases', id)
redis.call('HDEL', k, 'dl_lease')
free_host(k, id)
if reason ~= '' then
  redis.call('HINCRBY', k, 'dl_attempts', -1)
  redis.call('HSET', k, 'wait', reason)
  if reason == 'host_paused' then redis.call('HINCRBY', k, 'dl_pauses', 1) end
end
-- Refused for its host's concurrency: parked until a slot of the host is freed
-- (`delay` is only the fallback).
local hw = redis.call('HGET', k, 'host_wait')
if hw then
  redis.call('HDEL', k, 'host_wait')
  if reason == 'host_concurrency' then
    redis.call('RPUSH', P..'hostwait:'..hw, id)
    redis.call('PEXPIRE', P..'hostwait:'..hw, n2s(math.max(60000, 10 * delay)))
  end
end
if has_result == '1' then redis.call('HSET', k, 'dl_error', err, 'response_code', code) end
redis.call('HSET', k, 'dl_state', 'Pending', 'next_at', at)
redis.call('ZADD', P..'dl:delayed', at, id)
free_slot(redis.call('HGET', k, 'aggr'))
-- A sleeping processor re-reads the earliest due time.
wake('dl')
return 1
"#,
    )
});

static RELEASE: LazyLock<Script> = LazyLock::new(|| {
    script(
        r#"
local q, id, token = ARGV[1], ARGV[2], ARGV[3]
local k = P..'job:'..id
if redis.call('HGET', k, q..'_lease') ~= token then return 0 end
redis.call('ZREM', P..q..':leases', id)
redis.call('HDEL', k, q..'_lease')
redis.call('HINCRBY', k, q..'_attempts', -1)
redis.call('HSET', k, q..'_state', 'Pending')
if q == 'dl' then
  free_host(k, id)
  local a = redis.call('HGET', k, 'aggr')
  redis.call('LPUSH', P..'pending:'..a, id)
  free_slot(a)
else
  redis.call('LPUSH', P..'cb:queue', id)
  wake('cb')
end
return 1
"#,
    )
});

static HOST_PERMIT: LazyLock<Script> = LazyLock::new(|| {
    script(
        r#"
local id, token, h, rate, burst, conc, lease, recheck = ARGV[1], ARGV[2], ARGV[3], tonumber(ARGV[4]), tonumber(ARGV[5]), tonumber(ARGV[6]), tonumber(ARGV[7]), tonumber(ARGV[8])
local k = P..'job:'..id
if redis.call('HGET', k, 'dl_lease') ~= token then return {'lost', '0'} end
local now = now_ms()
local paused = redis.call('PTTL', P..'hostpause:'..h)
if paused > 0 then return {'host_paused', n2s(paused)} end
local slots = P..'hostslots:'..h
if conc > 0 then
  redis.call('ZREMRANGEBYSCORE', slots, '-inf', now)
  if not redis.call('ZSCORE', slots, id) and redis.call('ZCARD', slots) >= conc then
    -- Deferring it parks it on the host (REQUEUE_DOWNLOAD).
    redis.call('HSET', k, 'host_wait', h)
    return {'host_concurrency', n2s(recheck)}
  end
end
if rate > 0 then
  -- A job refused earlier comes back at the slot it booked then.
  local booked = tonumber(redis.call('HGET', k, 'host_slot') or '0')
  if booked > now then return {'host_rate', n2s(booked - now)} end
  redis.call('HDEL', k, 'host_slot')
  -- A booking long past (the job waited for something else since) is stale: the
  -- rate is asked again rather than letting such jobs through together.
  if booked <= now - 1000 / rate then
    local allowed, at = gcra(P..'hostrate:'..h, rate, burst, now, true)
    if not allowed then
      local when = math.ceil(at)
      redis.call('HSET', k, 'host_slot', n2s(when))
      return {'host_rate', n2s(when - now)}
    end
  end
end
if conc > 0 then
  redis.call('ZADD', slots, n2s(now + lease), id)
  redis.call('PEXPIRE', slots, n2s(2 * lease))
  redis.call('HSET', k, 'host', h)
end
return {'ok', '0'}
"#,
    )
});

static PAUSE_HOST: LazyLock<Script> = LazyLock::new(|| {
    script(
        r#"
local key, ms = P..'hostpause:'..ARGV[1], tonumber(ARGV[2])
if redis.call('PTTL', key) < ms then redis.call('SET', key, '1', 'PX', ms) end
-- Present while any host is paused: claims look up jobs' hosts only then.
if redis.call('PTTL', P..'hostpauses') < ms then redis.call('SET', P..'hostpauses', '1', 'PX', ms) end
return 1
"#,
    )
});

static FINISH_CALLBACK: LazyLock<Script> = LazyLock::new(|| {
    script(
        r#"
local id, token, st, err, delay = ARGV[1], ARGV[2], ARGV[3], ARGV[4], tonumber(ARGV[5])
local k = P..'job:'..id
if redis.call('HGET', k, 'cb_lease') ~= token then return 0 end
local now = now_ms()
redis.call('ZREM', P..'cb:leases', id)
-- An attempt ended: no longer parked (an entry left in `cbwait:` is skipped).
redis.call('HDEL', k, 'cb_lease', 'cb_wait', 'cb_defers')
redis.call('HSET', k, 'cb_state', st, 'cb_error', err)
if st == 'Success' then
  redis.call('HSET', k, 'cb_at', n2s(now))
  redis.call('ZADD', P..'deletions', n2s(now + delay), id)
elseif st == 'Pending' then
  redis.call('HSET', k, 'next_at', n2s(now + delay))
  redis.call('ZADD', P..'cb:delayed', n2s(now + delay), id)
  wake('cb')
else
  redis.call('HSET', k, 'cb_at', n2s(now))
  redis.call('ZADD', P..'cb:failed', n2s(now), id)
end
return 1
"#,
    )
});

/// Parks a claimed callback on its destination (`cbwait:<dest>`, `cb_wait` in the job
/// marks its entry there) and delays it by the fallback; not an attempt.
static DEFER_CALLBACK: LazyLock<Script> = LazyLock::new(|| {
    script(
        r#"
local id, token, dest, delay = ARGV[1], ARGV[2], ARGV[3], tonumber(ARGV[4])
local k = P..'job:'..id
if redis.call('HGET', k, 'cb_lease') ~= token then return 0 end
local at = n2s(now_ms() + delay)
redis.call('ZREM', P..'cb:leases', id)
redis.call('HDEL', k, 'cb_lease')
redis.call('HINCRBY', k, 'cb_attempts', -1)
redis.call('HINCRBY', k, 'cb_defers', 1)
-- Already parked there (it came back at its fallback time): it keeps its place.
local wl = P..'cbwait:'..dest
if redis.call('HGET', k, 'cb_wait') ~= dest or redis.call('EXISTS', wl) == 0 then
  redis.call('RPUSH', wl, id)
  redis.call('HSET', k, 'cb_wait', dest)
end
redis.call('PEXPIRE', wl, n2s(math.max(600000, 10 * delay)))
redis.call('HSET', k, 'cb_state', 'Pending', 'next_at', at)
redis.call('ZADD', P..'cb:delayed', at, id)
return 1
"#,
    )
});

/// Moves up to `ARGV[2]` callbacks parked on `ARGV[1]` from `cb:delayed` to the head
/// of `cb:queue`, oldest first; entries of callbacks no longer parked are dropped.
static WAKE_CALLBACKS: LazyLock<Script> = LazyLock::new(|| {
    script(
        r#"
local dest, max = ARGV[1], tonumber(ARGV[2])
local wl = P..'cbwait:'..dest
local woken, looked = {}, 0
while #woken < max and looked < 16 * max do
  local w = redis.call('LPOP', wl)
  if not w then break end
  looked = looked + 1
  local k = P..'job:'..w
  if redis.call('HGET', k, 'cb_wait') == dest then
    redis.call('HDEL', k, 'cb_wait')
    if redis.call('HGET', k, 'cb_state') == 'Pending' and redis.call('ZSCORE', P..'cb:delayed', w) then
      redis.call('ZREM', P..'cb:delayed', w)
      redis.call('HSET', k, 'next_at', 0)
      redis.call('HDEL', k, 'cb_defers')
      woken[#woken + 1] = w
    end
  end
end
for i = #woken, 1, -1 do redis.call('LPUSH', P..'cb:queue', woken[i]) end
if #woken > 0 then wake('cb') end
return #woken
"#,
    )
});

static REQUEUE_CALLBACK: LazyLock<Script> = LazyLock::new(|| {
    script(
        r#"
local k = P..'job:'..ARGV[1]
if redis.call('EXISTS', k) == 0 then return 'notfound' end
local st = redis.call('HGET', k, 'cb_state') or ''
if st ~= 'Failed' then return 'state:' .. st end
-- Past notifier.failed_retention: its deletion is under way.
if redis.call('ZSCORE', P..'deletions', ARGV[1]) then return 'state:Expired' end
redis.call('ZREM', P..'cb:failed', ARGV[1])
redis.call('HSET', k, 'cb_state', 'Pending', 'cb_attempts', 0, 'cb_lost', 0)
redis.call('HDEL', k, 'cb_wait', 'cb_defers')
redis.call('RPUSH', P..'cb:queue', ARGV[1])
wake('cb')
return 'ok'
"#,
    )
});

/// A page of `cb:failed` after the cursor (`ARGV[1]` ms, `ARGV[2]` id; -1 and ''
/// for the start), filtered by aggregation (`ARGV[5]`: all, is, prefix; `ARGV[6]`).
/// Returns the next cursor (or two empty strings) and the items.
static FAILED_LIST: LazyLock<Script> = LazyLock::new(|| {
    script(
        r#"
local cat, cid, limit, scan, mode, pat = tonumber(ARGV[1]), ARGV[2], tonumber(ARGV[3]), tonumber(ARGV[4]), ARGV[5], ARGV[6]
local out, scanned, offset = {}, 0, 0
local last_at, last_id, stopped = '', '', false
while not stopped do
  local batch = redis.call('ZRANGEBYSCORE', P..'cb:failed', cat, '+inf', 'WITHSCORES', 'LIMIT', offset, 100)
  if #batch == 0 then break end
  offset = offset + #batch / 2
  for i = 1, #batch, 2 do
    local id, at = batch[i], tonumber(batch[i + 1])
    if at > cat or id > cid then
      scanned = scanned + 1
      last_at, last_id = n2s(at), id
      local f = redis.call('HMGET', P..'job:'..id, 'aggr', 'cb_error', 'cb_attempts')
      local a = f[1] or ''
      if mode == 'all' or (mode == 'is' and a == pat) or (mode == 'prefix' and string.sub(a, 1, #pat) == pat) then
        out[#out + 1] = {id, a, n2s(at), f[2] or '', f[3] or '0'}
      end
      if #out >= limit or scanned >= scan then stopped = true break end
    end
  end
end
if not stopped then last_at, last_id = '', '' end
return {last_at, last_id, out}
"#,
    )
});

/// Moves failed callbacks older than the retention (`ARGV[1]` ms) into `deletions`.
static EXPIRE_FAILED: LazyLock<Script> = LazyLock::new(|| {
    script(
        r#"
local now = now_ms()
local ids = redis.call('ZRANGEBYSCORE', P..'cb:failed', '-inf', now - tonumber(ARGV[1]), 'LIMIT', 0, tonumber(ARGV[2]))
for _, id in ipairs(ids) do
  redis.call('ZREM', P..'cb:failed', id)
  redis.call('ZADD', P..'deletions', n2s(now), id)
end
return #ids
"#,
    )
});

static DUE_DELETIONS: LazyLock<Script> = LazyLock::new(|| {
    script(
        r#"
return redis.call('ZRANGEBYSCORE', P..'deletions', '-inf', now_ms(), 'LIMIT', 0, tonumber(ARGV[1]))
"#,
    )
});

/// A Redis server shared by any number of components.
pub struct RedisStore {
    /// `<key_prefix>:`
    prefix: String,
    conn: ConnectionManager,
    /// One dedicated connection per queue for BLPOP, which would stall the
    /// multiplexed connection's other commands.
    waiters: [Mutex<Option<ConnectionManager>>; 2],
    client: redis::Client,
    timeout: Duration,
    worker: String,
    /// Where this claimer's last shared claim stopped scanning `ready` (SSCAN cursor).
    scan: std::sync::atomic::AtomicU64,
}

fn backend(e: redis::RedisError) -> StoreError {
    StoreError::Backend(e.to_string())
}

impl RedisStore {
    pub async fn connect(cfg: &RedisConfig) -> Result<RedisStore> {
        let addr = if cfg.addr.contains("://") {
            cfg.addr.clone()
        } else {
            format!("redis://{}/{}", cfg.addr, cfg.db)
        };
        let mut info: redis::ConnectionInfo =
            redis::IntoConnectionInfo::into_connection_info(addr.as_str())
                .map_err(|e| StoreError::Backend(format!("redis.addr {:?}: {e}", cfg.addr)))?;
        if let Some(pw) = &cfg.password {
            let settings = info.redis_settings().clone().set_password(pw.expose());
            info = info.set_redis_settings(settings);
        }
        let client = redis::Client::open(info).map_err(backend)?;
        let timeout = Duration::from_millis(cfg.timeout_ms);
        let conn = Self::manager(&client, timeout, timeout).await?;
        Ok(RedisStore {
            prefix: format!("{}:", cfg.key_prefix),
            conn,
            waiters: [Mutex::new(None), Mutex::new(None)],
            client,
            timeout,
            worker: crate::job::new_id(),
            scan: std::sync::atomic::AtomicU64::new(0),
        })
    }

    async fn manager(
        client: &redis::Client,
        connect: Duration,
        response: Duration,
    ) -> Result<ConnectionManager> {
        let cfg = redis::aio::ConnectionManagerConfig::new()
            .set_connection_timeout(Some(connect))
            .set_response_timeout(Some(response))
            .set_number_of_retries(2)
            .set_max_delay(Duration::from_secs(2));
        tokio::time::timeout(connect * 2, client.get_connection_manager_with_config(cfg))
            .await
            .map_err(|_| {
                StoreError::Backend(format!(
                    "cannot connect to Redis at {}: timed out",
                    client.get_connection_info().addr()
                ))
            })?
            .map_err(|e| {
                StoreError::Backend(format!(
                    "cannot connect to Redis at {}: {e}",
                    client.get_connection_info().addr()
                ))
            })
    }

    fn key(&self, suffix: &str) -> String {
        format!("{}{suffix}", self.prefix)
    }

    fn token(&self) -> String {
        format!("{}:{}", self.worker, crate::job::new_id())
    }

    async fn requeue(
        &self,
        id: &str,
        token: &str,
        r: Option<&DownloadResult>,
        delay: Duration,
        reason: Option<WaitReason>,
    ) -> Result<bool> {
        let ok: i64 = self
            .run(
                REQUEUE_DOWNLOAD
                    .key(&self.prefix)
                    .arg(id)
                    .arg(token)
                    .arg(millis(delay))
                    .arg(reason.map_or("", WaitReason::as_str))
                    .arg(if r.is_some() { "1" } else { "0" })
                    .arg(r.map_or("", |r| r.error.as_str()))
                    .arg(r.map_or(0, |r| r.response_code)),
            )
            .await?;
        Ok(ok == 1)
    }

    async fn run<T: redis::FromRedisValue>(
        &self,
        inv: &mut redis::ScriptInvocation<'_>,
    ) -> Result<T> {
        let mut conn = self.conn.clone();
        inv.invoke_async(&mut conn).await.map_err(backend)
    }
}

fn fields(v: Value) -> Result<BTreeMap<String, String>> {
    redis::from_redis_value(v).map_err(|e| StoreError::Corrupt(e.to_string()))
}

fn text(v: &Value) -> Result<String> {
    redis::from_redis_value_ref(v).map_err(|e| StoreError::Corrupt(e.to_string()))
}

/// What a claim script answered: the jobs, when to come back, and (shared claims) the
/// SSCAN cursor to go on from.
type ClaimReply = (Vec<Claimed>, Option<Duration>, Option<u64>);

/// Parses a claim script's reply: `{'jobs', {{id, fields, proxy}, ...}}` or
/// `{'empty', ms until the next delayed entry or -1}`, each with the scan cursor as a
/// third element after a shared claim.
fn parse_claims(v: Value, token: &str) -> Result<ClaimReply> {
    let bad = || StoreError::Corrupt("unexpected claim reply".into());
    let Value::Array(mut parts) = v else {
        return Err(bad());
    };
    let cursor = match parts.len() {
        2 => None,
        3 => Some(
            text(&parts.pop().ok_or_else(bad)?)?
                .parse()
                .map_err(|_| bad())?,
        ),
        _ => return Err(bad()),
    };
    let body = parts.pop().ok_or_else(bad)?;
    match text(&parts[0])?.as_str() {
        "empty" => {
            let ms: i64 = text(&body)?.parse().unwrap_or(-1);
            Ok((
                Vec::new(),
                (ms >= 0).then(|| Duration::from_millis(ms as u64)),
                cursor,
            ))
        }
        "jobs" => {
            let Value::Array(jobs) = body else {
                return Err(bad());
            };
            let mut out = Vec::with_capacity(jobs.len());
            for j in jobs {
                let Value::Array(mut f) = j else {
                    return Err(bad());
                };
                if f.len() != 3 {
                    return Err(bad());
                }
                let proxy = text(&f[2])?;
                let id = text(&f[0])?;
                let map = fields(f.swap_remove(1))?;
                let job = JobRecord::from_fields(&id, &map).map_err(StoreError::Corrupt)?;
                out.push(Claimed {
                    job,
                    token: token.to_string(),
                    proxy: (!proxy.is_empty()).then_some(proxy),
                });
            }
            Ok((out, None, cursor))
        }
        _ => Err(bad()),
    }
}

#[async_trait]
impl Store for RedisStore {
    async fn submit_with(&self, id: &str, spec: &JobSpec, settings: AggrSettings) -> Result<()> {
        let json = serde_json::to_string(spec).map_err(|e| StoreError::Corrupt(e.to_string()))?;
        let created: i64 = self
            .run(
                SUBMIT
                    .key(&self.prefix)
                    .arg(id)
                    .arg(json)
                    .arg(spec.aggr_key())
                    .arg(spec.aggr_limit)
                    .arg(spec.aggr_proxy.as_deref().unwrap_or(""))
                    .arg(if spec.callback.is_some() { "1" } else { "0" })
                    .arg(spec.aggr_rate.unwrap_or(0.0))
                    .arg(spec.aggr_burst.unwrap_or(1))
                    .arg(spec.host())
                    .arg(if settings == AggrSettings::First {
                        "1"
                    } else {
                        "0"
                    }),
            )
            .await?;
        if created == 1 {
            Ok(())
        } else {
            Err(StoreError::Backend(format!("job id {id} already exists")))
        }
    }

    async fn claim_shared(
        &self,
        queue: Queue,
        lease: Duration,
        max: usize,
        shares: &ClaimShares,
    ) -> Result<(Vec<Claimed>, Option<Duration>)> {
        use std::sync::atomic::Ordering;
        // One token for the batch: each lease is still checked per job.
        let token = self.token();
        let reply: Value = match queue {
            Queue::Download => {
                // A job without a callback whose worker was lost for good is deleted
                // after a day; every job has a callback today.
                let mut inv = CLAIM_DOWNLOAD.key(&self.prefix);
                inv.arg(millis(lease))
                    .arg(&token)
                    .arg(MAX_LOST_LEASES)
                    .arg(86_400_000u64)
                    .arg(max.max(1));
                if !shares.is_empty() {
                    for list in [&shares.aggregations, &shares.tenants] {
                        inv.arg(list.len());
                        for (name, room) in list {
                            inv.arg(name).arg(*room);
                        }
                    }
                    inv.arg(self.scan.load(Ordering::Relaxed).to_string());
                }
                self.run(&mut inv).await?
            }
            Queue::Callback => {
                self.run(
                    CLAIM_CALLBACK
                        .key(&self.prefix)
                        .arg(millis(lease))
                        .arg(&token)
                        .arg(MAX_LOST_LEASES)
                        .arg(max.max(1)),
                )
                .await?
            }
        };
        let (jobs, due, cursor) = parse_claims(reply, &token)?;
        if let Some(c) = cursor {
            self.scan.store(c, Ordering::Relaxed);
        }
        Ok((jobs, due))
    }

    async fn wait(&self, queue: Queue, timeout: Duration) -> Result<()> {
        let slot = &self.waiters[queue as usize];
        let mut guard = slot.lock().await;
        if guard.is_none() {
            // BLPOP holds the connection for up to `timeout`; the response timeout
            // must outlast it.
            *guard =
                Some(Self::manager(&self.client, self.timeout, Duration::from_secs(3600)).await?);
        }
        let conn = guard.as_mut().expect("set above");
        let secs = timeout.as_secs_f64().max(0.01);
        let key = self.key(&format!("wake:{}", queue.name()));
        let fut = conn.blpop::<_, Option<(String, String)>>(key, secs);
        match tokio::time::timeout(timeout + self.timeout, fut).await {
            Ok(Ok(_)) => Ok(()),
            Ok(Err(e)) => Err(backend(e)),
            Err(_) => {
                // The server did not answer in time: drop the connection so a stale
                // reply cannot be read by the next call.
                *guard = None;
                Err(StoreError::Backend("BLPOP timed out".into()))
            }
        }
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
        let mut inv = RENEW.key(&self.prefix);
        inv.arg(queue.name()).arg(millis(lease));
        for (id, token) in held {
            inv.arg(id).arg(token);
        }
        let out: Vec<i64> = self.run(&mut inv).await?;
        Ok(out.into_iter().map(|v| v == 1).collect())
    }

    async fn finish_download(
        &self,
        id: &str,
        token: &str,
        r: &DownloadResult,
        keep: Duration,
    ) -> Result<bool> {
        let st = if r.success {
            crate::job::state::SUCCESS
        } else {
            crate::job::state::FAILED
        };
        let ok: i64 = self
            .run(
                FINISH_DOWNLOAD
                    .key(&self.prefix)
                    .arg(id)
                    .arg(token)
                    .arg(st)
                    .arg(&r.error)
                    .arg(r.response_code)
                    .arg(&r.image_size)
                    .arg(millis(keep))
                    .arg(&r.thumbnails),
            )
            .await?;
        Ok(ok == 1)
    }

    async fn retry_download(
        &self,
        id: &str,
        token: &str,
        r: &DownloadResult,
        delay: Duration,
    ) -> Result<bool> {
        self.requeue(id, token, Some(r), delay, None).await
    }

    async fn host_permit(
        &self,
        id: &str,
        token: &str,
        host: &str,
        limits: HostLimits,
        lease: Duration,
    ) -> Result<HostPermit> {
        let (what, ms): (String, String) = self
            .run(
                HOST_PERMIT
                    .key(&self.prefix)
                    .arg(id)
                    .arg(token)
                    .arg(host)
                    .arg(limits.rate)
                    .arg(limits.burst.max(1))
                    .arg(limits.concurrency)
                    .arg(millis(lease))
                    .arg(millis(HOST_PARK_FALLBACK)),
            )
            .await?;
        let delay = Duration::from_millis(ms.parse().unwrap_or(0));
        Ok(match what.as_str() {
            "ok" => HostPermit::Granted,
            "lost" => HostPermit::Lost,
            r => HostPermit::Wait {
                delay,
                reason: WaitReason::parse(r)
                    .ok_or_else(|| StoreError::Corrupt(format!("host permit reply {r:?}")))?,
            },
        })
    }

    async fn pause_host(&self, host: &str, pause: Duration) -> Result<()> {
        let _: i64 = self
            .run(
                PAUSE_HOST
                    .key(&self.prefix)
                    .arg(host)
                    .arg(millis(pause).max(1)),
            )
            .await?;
        Ok(())
    }

    async fn defer_download(
        &self,
        id: &str,
        token: &str,
        r: Option<&DownloadResult>,
        delay: Duration,
        reason: WaitReason,
    ) -> Result<bool> {
        self.requeue(id, token, r, delay, Some(reason)).await
    }

    async fn release(&self, queue: Queue, id: &str, token: &str) -> Result<bool> {
        let ok: i64 = self
            .run(
                RELEASE
                    .key(&self.prefix)
                    .arg(queue.name())
                    .arg(id)
                    .arg(token),
            )
            .await?;
        Ok(ok == 1)
    }

    async fn finish_callback(&self, id: &str, token: &str, keep: Duration) -> Result<bool> {
        self.end_callback(id, token, crate::job::state::SUCCESS, "", keep)
            .await
    }

    async fn retry_callback(
        &self,
        id: &str,
        token: &str,
        error: &str,
        delay: Duration,
    ) -> Result<bool> {
        self.end_callback(id, token, crate::job::state::PENDING, error, delay)
            .await
    }

    async fn fail_callback(&self, id: &str, token: &str, error: &str) -> Result<bool> {
        self.end_callback(id, token, crate::job::state::FAILED, error, Duration::ZERO)
            .await
    }

    async fn defer_callback(
        &self,
        id: &str,
        token: &str,
        dest: &str,
        delay: Duration,
    ) -> Result<bool> {
        let ok: i64 = self
            .run(
                DEFER_CALLBACK
                    .key(&self.prefix)
                    .arg(id)
                    .arg(token)
                    .arg(dest)
                    .arg(millis(delay)),
            )
            .await?;
        Ok(ok == 1)
    }

    async fn wake_callbacks(&self, dest: &str, max: usize) -> Result<usize> {
        if max == 0 {
            return Ok(0);
        }
        self.run(
            WAKE_CALLBACKS
                .key(&self.prefix)
                .arg(dest)
                .arg(max.min(super::MAX_CALLBACK_WAKE)),
        )
        .await
    }

    async fn requeue_callback(&self, id: &str) -> Result<RetryCallback> {
        let r: String = self.run(REQUEUE_CALLBACK.key(&self.prefix).arg(id)).await?;
        Ok(match r.as_str() {
            "ok" => RetryCallback::Requeued,
            "notfound" => RetryCallback::NotFound,
            s => RetryCallback::NotFailed(s.trim_start_matches("state:").to_string()),
        })
    }

    async fn due_deletions(&self, limit: usize) -> Result<Vec<String>> {
        self.run(DUE_DELETIONS.key(&self.prefix).arg(limit)).await
    }

    async fn failed_callbacks(
        &self,
        cursor: Option<&FailedCursor>,
        limit: usize,
        filter: &AggrFilter,
    ) -> Result<FailedPage> {
        let limit = limit.max(1);
        let (mode, pattern) = match filter {
            AggrFilter::All => ("all", ""),
            AggrFilter::Is(a) => ("is", a.as_str()),
            AggrFilter::Prefix(p) => ("prefix", p.as_str()),
        };
        let (at, id) = match cursor {
            Some(c) => (c.failed_at as i64, c.id.as_str()),
            None => (-1, ""),
        };
        let (next_at, next_id, rows): (String, String, Vec<(String, String, u64, String, u32)>) =
            self.run(
                FAILED_LIST
                    .key(&self.prefix)
                    .arg(at)
                    .arg(id)
                    .arg(limit)
                    .arg(limit.saturating_mul(FAILED_SCAN_FACTOR))
                    .arg(mode)
                    .arg(pattern),
            )
            .await?;
        let next = match next_at.parse() {
            Ok(failed_at) => Some(FailedCursor {
                failed_at,
                id: next_id,
            }),
            Err(_) => None,
        };
        let items = rows
            .into_iter()
            .map(|(id, aggr, failed_at, error, attempts)| FailedCallback {
                id,
                aggr,
                failed_at,
                error,
                attempts,
            })
            .collect();
        Ok(FailedPage { items, next })
    }

    async fn expire_failed(&self, retention: Duration, limit: usize) -> Result<usize> {
        self.run(
            EXPIRE_FAILED
                .key(&self.prefix)
                .arg(millis(retention))
                .arg(limit.max(1)),
        )
        .await
    }

    async fn forget(&self, ids: &[String]) -> Result<()> {
        if ids.is_empty() {
            return Ok(());
        }
        let mut pipe = redis::pipe();
        pipe.atomic();
        for id in ids {
            pipe.del(self.key(&format!("job:{id}"))).ignore();
        }
        pipe.zrem(self.key("deletions"), ids).ignore();
        pipe.zrem(self.key("cb:failed"), ids).ignore();
        let mut conn = self.conn.clone();
        pipe.query_async::<()>(&mut conn).await.map_err(backend)
    }

    async fn get_job(&self, id: &str) -> Result<Option<JobRecord>> {
        let mut conn = self.conn.clone();
        let map: BTreeMap<String, String> = conn
            .hgetall(self.key(&format!("job:{id}")))
            .await
            .map_err(backend)?;
        if map.is_empty() {
            return Ok(None);
        }
        let mut rec = JobRecord::from_fields(id, &map).map_err(StoreError::Corrupt)?;
        if rec.queued() {
            let wait: Option<f64> = conn
                .zscore(self.key("ratewait"), rec.spec.aggr_key())
                .await
                .map_err(backend)?;
            rec.note_aggr_rate_wait(wait.map(|w| w as u64));
        }
        Ok(Some(rec))
    }

    async fn aggregations_page(
        &self,
        offset: usize,
        limit: usize,
    ) -> Result<(Vec<AggrSummary>, u64)> {
        let mut conn = self.conn.clone();
        let limit = limit.min(MAX_AGGR_PAGE);
        let key = self.key("pending_n");
        let (total, page): (u64, Vec<(String, u64)>) = if limit == 0 {
            (conn.zcard(&key).await.map_err(backend)?, Vec::new())
        } else {
            let stop = offset.saturating_add(limit - 1);
            redis::pipe()
                .zcard(&key)
                .zrevrange_withscores(
                    &key,
                    offset as isize,
                    stop.min(isize::MAX as usize) as isize,
                )
                .query_async(&mut conn)
                .await
                .map_err(backend)?
        };
        if page.is_empty() {
            return Ok((Vec::new(), total));
        }
        let mut pipe = redis::pipe();
        for (n, _) in &page {
            pipe.zscore(self.key("ratewait"), n);
        }
        let waits: Vec<Option<f64>> = pipe.query_async(&mut conn).await.map_err(backend)?;
        let out = page
            .into_iter()
            .zip(waits)
            .map(|((name, pending), wait)| AggrSummary {
                name,
                pending,
                rate_wait_until: wait.map(|w| w as u64),
            })
            .collect();
        Ok((out, total))
    }

    async fn pending_summary(&self, top: usize) -> Result<PendingSummary> {
        let mut conn = self.conn.clone();
        let key = self.key("pending_n");
        let mut pipe = redis::pipe();
        pipe.get(self.key("pending_total")).zcard(&key);
        if top > 0 {
            pipe.zrevrange_withscores(&key, 0, top as isize - 1);
        }
        let (jobs, aggregations, top): (Option<i64>, u64, Vec<(String, u64)>) = if top > 0 {
            pipe.query_async(&mut conn).await.map_err(backend)?
        } else {
            let (j, a): (Option<i64>, u64) = pipe.query_async(&mut conn).await.map_err(backend)?;
            (j, a, Vec::new())
        };
        Ok(PendingSummary {
            jobs: jobs.unwrap_or(0).max(0) as u64,
            aggregations,
            top,
        })
    }

    async fn put_stats(&self, component: &str, json: &str, ttl: Duration) -> Result<()> {
        let mut conn = self.conn.clone();
        conn.pset_ex::<_, _, ()>(self.key(&format!("stats:{component}")), json, millis(ttl))
            .await
            .map_err(backend)
    }

    async fn get_stats(&self, component: &str) -> Result<Option<String>> {
        let mut conn = self.conn.clone();
        conn.get(self.key(&format!("stats:{component}")))
            .await
            .map_err(backend)
    }
}

impl RedisStore {
    async fn end_callback(
        &self,
        id: &str,
        token: &str,
        state: &str,
        error: &str,
        delay: Duration,
    ) -> Result<bool> {
        let ok: i64 = self
            .run(
                FINISH_CALLBACK
                    .key(&self.prefix)
                    .arg(id)
                    .arg(token)
                    .arg(state)
                    .arg(error)
                    .arg(millis(delay)),
            )
            .await?;
        Ok(ok == 1)
    }
}
