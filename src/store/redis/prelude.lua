local P = KEYS[1]
-- The store's clock (the last argument, RedisStore::run): empty for the server's TIME.
local CLOCK = tonumber(table.remove(ARGV))
local function now_ms()
  if CLOCK then return CLOCK end
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end
local function n2s(x) return string.format('%d', x) end
-- Added to every expiry: a key's value says until when it holds (compared with the
-- store's clock); the expiry only lets it go some time after, never before.
local EXPIRY_SLACK = 60000
-- Ready aggregations tried per download claim, beyond the jobs asked for.
local READY_TRIES = 16
-- Ms left of a pause an origin asked for `h` (`hostpause:<h>` holds its end), or 0.
local function pause_left(h, now)
  return math.max(0, (tonumber(redis.call('GET', P..'hostpause:'..h) or '0') or 0) - now)
end
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
    redis.call('ZADD', P..'ready', 0, a)
    return true
  end
  redis.call('ZREM', P..'ready', a)
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
    redis.call('ZREM', P..'ready', a)
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
  redis.call('SET', key, string.format('%.3f', new), 'PX', n2s(math.ceil(new - now) + EXPIRY_SLACK))
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
