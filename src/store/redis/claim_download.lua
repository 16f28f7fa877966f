local lease, token, max = tonumber(ARGV[1]), ARGV[2], tonumber(ARGV[3])
local now = now_ms()
for _, a in ipairs(redis.call('ZRANGEBYSCORE', P..K.RATEWAIT, '-inf', now, 'LIMIT', 0, C.BATCH)) do
  redis.call('ZREM', P..K.RATEWAIT, a)
  refresh(a)
end
for _, id in ipairs(redis.call('ZRANGEBYSCORE', P..K.DL_DELAYED, '-inf', now, 'LIMIT', 0, C.BATCH)) do
  redis.call('ZREM', P..K.DL_DELAYED, id)
  local a = redis.call('HGET', P..K.JOB..id, F.AGGR)
  if a then
    revive(a, P..K.JOB..id)
    redis.call('HSET', P..K.JOB..id, F.NEXT_AT, 0)
    redis.call('RPUSH', P..K.PENDING..a, id)
    refresh(a)
  end
end
for _, id in ipairs(redis.call('ZRANGEBYSCORE', P..K.DL_LEASES, '-inf', now, 'LIMIT', 0, C.BATCH)) do
  redis.call('ZREM', P..K.DL_LEASES, id)
  local k = P..K.JOB..id
  local a = redis.call('HGET', k, F.AGGR)
  if a then
    redis.call('HDEL', k, F.DL_LEASE)
    free_host(k, id)
    redis.call('HINCRBY', k, F.DL_ATTEMPTS, -1)
    local lost = redis.call('HINCRBY', k, F.DL_LOST, 1)
    local ak = P..K.AGGR..a
    if redis.call('HINCRBY', ak, A.INFLIGHT, -1) < 0 then redis.call('HSET', ak, A.INFLIGHT, 0) end
    if lost > C.MAX_LOST_LEASES then
      redis.call('HSET', k, F.DL_STATE, S.FAILED, F.FINISHED_AT, n2s(now),
        F.DL_ERROR, 'download abandoned: the worker running it was lost ' .. lost .. ' times')
      end_job(a)
      enqueue_callback(id, now, C.ABANDONED_KEEP_MS)
    else
      redis.call('HSET', k, F.DL_STATE, S.PENDING)
      redis.call('LPUSH', P..K.PENDING..a, id)
    end
    refresh(a)
  end
end
local any_pause = (tonumber(redis.call('GET', P..K.HOST_PAUSES) or '0') or 0) > now
local out = {}
-- Takes one job of aggregation `a` if it may give one now; true when it did.
local function claim_one(a)
  local ak = P..K.AGGR..a
  local limit = tonumber(redis.call('HGET', ak, A.LIMIT) or '1')
  local inflight = tonumber(redis.call('HGET', ak, A.INFLIGHT) or '0')
  local id = false
  if inflight < limit and redis.call('LLEN', P..K.PENDING..a) > 0 then
    local rate = tonumber(redis.call('HGET', ak, A.RATE) or '0') or 0
    local allowed, at = true, now
    if rate > 0 then
      allowed, at = gcra(P..K.RATE..a, rate, tonumber(redis.call('HGET', ak, A.BURST) or '1') or 1, now, false)
    end
    if allowed then
      id = redis.call('LPOP', P..K.PENDING..a)
      -- The next one is not allowed yet: wait for it out of `ready` right away.
      if at > now then redis.call('ZADD', P..K.RATEWAIT, n2s(math.ceil(at)), a) end
    else
      -- Waits out of `ready` (refresh below), holding no slot; claims come back then.
      redis.call('ZADD', P..K.RATEWAIT, n2s(math.ceil(at)), a)
    end
  end
  -- A job forgotten while queued: the entry is dropped, the claim looks further.
  if id and redis.call('EXISTS', P..K.JOB..id) == 0 then id = false end
  -- A job whose host an origin paused waits out the pause in `dl:delayed` (not an
  -- attempt) instead of being handed out. (Looked up only while some host is paused.)
  local paused = id and any_pause and pause_left(redis.call('HGET', P..K.JOB..id, F.URL_HOST) or '', now)
  if paused and paused > 0 then
    local at = n2s(now + paused)
    redis.call('HSET', P..K.JOB..id, F.DL_STATE, S.PENDING, F.WAIT, W.HOST_PAUSED, F.NEXT_AT, at)
    redis.call('ZADD', P..K.DL_DELAYED, at, id)
    id = false
  end
  if id then
    redis.call('HINCRBY', ak, A.INFLIGHT, 1)
    local k = P..K.JOB..id
    redis.call('ZADD', P..K.DL_LEASES, n2s(now + lease), id)
    redis.call('HDEL', k, F.WAIT)
    redis.call('HSET', k, F.DL_STATE, S.IN_PROGRESS, F.DL_LEASE, token, F.STARTED_AT, n2s(now))
    redis.call('HINCRBY', k, F.DL_ATTEMPTS, 1)
    out[#out + 1] = {id, redis.call('HGETALL', k), redis.call('HGET', ak, A.PROXY) or ''}
  end
  refresh(a)
  return id and true or false
end
-- The claimer's shares (ClaimShares): ARGV[4] aggregations, then (name, room) pairs,
-- then the number of tenants and their pairs; then where its last claim stopped.
local room_a, room_t = {}, {}
local i = 4
local n_a = tonumber(ARGV[i] or '0') or 0
i = i + 1
for _ = 1, n_a do room_a[ARGV[i]] = tonumber(ARGV[i + 1]); i = i + 2 end
local n_t = tonumber(ARGV[i] or '0') or 0
i = i + 1
for _ = 1, n_t do room_t[ARGV[i]] = tonumber(ARGV[i + 1]); i = i + 2 end
local cursor = ARGV[i] or ''
local function tenant(a)
  if n_t == 0 or string.byte(a, 1) ~= 64 then return nil end
  local s = string.find(a, '/', 2, true)
  if not s then return nil end
  return string.sub(a, 2, s - 1)
end
-- true when `a` has no room left, its tenant's name when the tenant has none, else false.
local function full(a)
  local r = room_a[a]
  if r and r <= 0 then return true end
  local t = tenant(a)
  if t then
    r = room_t[t]
    if r and r <= 0 then return t end
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
  for _, z in ipairs({K.DL_DELAYED, K.RATEWAIT}) do
    local nxt = redis.call('ZRANGE', P..z, 0, 0, 'WITHSCORES')
    if nxt[2] then
      local ms = math.max(0, tonumber(nxt[2]) - now)
      if due < 0 or ms < due then due = ms end
    end
  end
  return due
end
-- The ready aggregation after `after` by name, round robin (`ready` is a sorted set
-- whose scores are all 0).
local function next_ready(after)
  local r = redis.call('ZRANGEBYLEX', P..K.READY, '(' .. after, '+', 'LIMIT', 0, 1)
  if r[1] then return r[1] end
  return redis.call('ZRANGE', P..K.READY, 0, 0)[1]
end
-- Ready aggregations in turn, one job each time, from where this claimer's last claim
-- stopped; what has no room left in the shares is skipped (a full tenant's
-- aggregations all at once: `@t/...` sort before `@t0`), pending for another claimer.
local tries, budget = 0, max + C.READY_TRIES + n_a + n_t
while #out < max and tries < budget do
  tries = tries + 1
  local a = next_ready(cursor)
  if not a then break end
  local f = full(a)
  if f == true then
    cursor = a
  elseif f then
    cursor = '@' .. f .. '0'
  else
    cursor = a
    if claim_one(a) then took(a) end
  end
end
if #out > 0 then return {A.JOBS, out, cursor} end
return {'empty', n2s(next_due()), cursor}
