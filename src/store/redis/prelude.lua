local P = KEYS[1]
-- The store's clock (the last argument, RedisStore::run): empty for the server's TIME.
local CLOCK = tonumber(table.remove(ARGV))
-- Keys carry their meaning in their values (until when a pause holds, a rate's state);
-- their expiry only frees memory. Under a test's clock, which runs ahead of the
-- server's, they are kept a while longer so that none goes before its value says.
local EXPIRY_SLACK = CLOCK and C.EXPIRY_SLACK_MS or 0
local function now_ms()
  if CLOCK then return CLOCK end
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end
local function n2s(x) return string.format('%d', x) end
-- Ms left of a pause an origin asked for `h` (`hostpause:<h>` holds its end), or 0.
local function pause_left(h, now)
  return math.max(0, (tonumber(redis.call('GET', P..K.HOST_PAUSE..h) or '0') or 0) - now)
end
local function wake(q)
  redis.call('LPUSH', P..K.WAKE..q, '1')
  redis.call('LTRIM', P..K.WAKE..q, 0, C.WAKE_TOKENS - 1)
end
-- Invariant: an aggregation is in `ready` iff it has pending jobs, fewer downloads
-- in flight than its limit, and is not waiting for its rate (in `ratewait`); it is
-- in `pending_n` (with its count) iff it has pending jobs.
local function refresh(a)
  local ak = P..K.AGGR..a
  local f = redis.call('HMGET', ak, A.LIMIT, A.INFLIGHT)
  local limit, inflight = tonumber(f[1] or '1'), tonumber(f[2] or '0')
  local len = redis.call('LLEN', P..K.PENDING..a)
  -- `pending_n` (aggregation -> pending count) and `pending_total` (their sum) keep
  -- the dashboard and /metrics cheap however many aggregations there are.
  local old = tonumber(redis.call('ZSCORE', P..K.PENDING_N, a) or '0')
  if len ~= old then
    if len > 0 then redis.call('ZADD', P..K.PENDING_N, len, a) else redis.call('ZREM', P..K.PENDING_N, a) end
    redis.call('INCRBY', P..K.PENDING_TOTAL, len - old)
  end
  if len > 0 and inflight < limit and not redis.call('ZSCORE', P..K.RATEWAIT, a) then
    redis.call('ZADD', P..K.READY, 0, a)
    return true
  end
  redis.call('ZREM', P..K.READY, a)
  return false
end
local function free_slot(a)
  local ak = P..K.AGGR..a
  if redis.call('HINCRBY', ak, A.INFLIGHT, -1) < 0 then redis.call('HSET', ak, A.INFLIGHT, 0) end
  if refresh(a) then wake('dl') end
end
-- A job of `a` left its download phase for good (succeeded or failed). An
-- aggregation with no job left goes: its rate state is `rate:<a>`, which expires
-- by itself, so nothing of it is lost.
local function end_job(a)
  local ak = P..K.AGGR..a
  if redis.call('HINCRBY', ak, A.JOBS, -1) > 0 then return end
  if tonumber(redis.call('HGET', ak, A.INFLIGHT) or '0') <= 0
      and redis.call('LLEN', P..K.PENDING..a) == 0 then
    redis.call('DEL', ak)
    redis.call('ZREM', P..K.RATEWAIT, a)
    redis.call('ZREM', P..K.READY, a)
  else
    redis.call('HSET', ak, A.JOBS, 0)
  end
end
-- A job going back to `pending:<a>` whose aggregation was removed (its jobs were
-- not counted: submitted before the count existed) brings its settings back.
local function revive(a, k)
  local ak = P..K.AGGR..a
  if redis.call('EXISTS', ak) == 1 then return end
  local ok, sp = pcall(cjson.decode, redis.call('HGET', k, F.SPEC) or '')
  if not ok or type(sp) ~= 'table' then return end
  local function opt(v, d) if v == nil or v == cjson.null then return d end return v end
  redis.call('HSET', ak, A.LIMIT, opt(sp.aggr_limit, 1), A.PROXY, opt(sp.aggr_proxy, ''),
    A.RATE, opt(sp.aggr_rate, 0), A.BURST, opt(sp.aggr_burst, 1), A.JOBS, 1)
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
  local tolerance = t * (burst - 1) + math.min(t * C.GCRA_SLACK, C.GCRA_SLACK_MAX_MS)
  local at = tat - tolerance
  if at > now and not reserve then return false, at end
  local new = tat + t
  redis.call('SET', key, string.format('%.3f', new), 'PX', n2s(math.ceil(new - now) + EXPIRY_SLACK))
  if at > now then return false, at end
  return true, new - tolerance
end
-- Frees the per-host slot a download holds, if any.
-- Wakes one download parked for `h`'s concurrency (see REQUEUE_DOWNLOAD): it is
-- due now instead of at its fallback time. Entries of jobs no longer parked are
-- dropped on the way.
local function unpark(h)
  local wl = P..K.HOST_WAIT..h
  for _ = 1, C.UNPARK_TRIES do
    local w = redis.call('LPOP', wl)
    if not w then return end
    if redis.call('HGET', P..K.JOB..w, F.WAIT) == W.HOST_CONCURRENCY
        and redis.call('ZSCORE', P..K.DL_DELAYED, w) then
      local t = n2s(now_ms())
      redis.call('ZADD', P..K.DL_DELAYED, t, w)
      redis.call('HSET', P..K.JOB..w, F.NEXT_AT, t)
      wake('dl')
      return
    end
  end
end
-- Frees the per-host slot a download holds, if any, and wakes a download waiting
-- for it.
local function free_host(k, id)
  local h = redis.call('HGET', k, F.HOST)
  if h then
    redis.call('ZREM', P..K.HOST_SLOTS..h, id)
    redis.call('HDEL', k, F.HOST)
    unpark(h)
  end
end
local function enqueue_callback(id, now, keep)
  local k = P..K.JOB..id
  if redis.call('HGET', k, F.HAS_CB) == '1' then
    redis.call('HSET', k, F.CB_STATE, S.PENDING, F.CB_ATTEMPTS, 0)
    redis.call('RPUSH', P..K.CB_QUEUE, id)
    wake('cb')
  else
    redis.call('ZADD', P..K.DELETIONS, n2s(now + keep), id)
  end
end
