local id, token, h, rate, burst, conc, lease, recheck = ARGV[1], ARGV[2], ARGV[3], tonumber(ARGV[4]), tonumber(ARGV[5]), tonumber(ARGV[6]), tonumber(ARGV[7]), tonumber(ARGV[8])
local k = P..K.JOB..id
if redis.call('HGET', k, F.DL_LEASE) ~= token then return {'lost', '0'} end
local now = now_ms()
local paused = pause_left(h, now)
if paused > 0 then return {W.HOST_PAUSED, n2s(paused)} end
local slots = P..K.HOST_SLOTS..h
if conc > 0 then
  redis.call('ZREMRANGEBYSCORE', slots, '-inf', now)
  if not redis.call('ZSCORE', slots, id) and redis.call('ZCARD', slots) >= conc then
    -- Deferring it parks it on the host (REQUEUE_DOWNLOAD).
    redis.call('HSET', k, F.HOST_WAIT, h)
    return {W.HOST_CONCURRENCY, n2s(recheck)}
  end
end
if rate > 0 then
  -- A job refused earlier comes back at the slot it booked then.
  local booked = tonumber(redis.call('HGET', k, F.HOST_SLOT) or '0')
  if booked > now then return {W.HOST_RATE, n2s(booked - now)} end
  redis.call('HDEL', k, F.HOST_SLOT)
  -- A booking long past (the job waited for something else since) is stale: the
  -- rate is asked again rather than letting such jobs through together.
  if booked <= now - 1000 / rate then
    local allowed, at = gcra(P..K.HOST_RATE..h, rate, burst, now, true)
    if not allowed then
      local when = math.ceil(at)
      redis.call('HSET', k, F.HOST_SLOT, n2s(when))
      return {W.HOST_RATE, n2s(when - now)}
    end
  end
end
if conc > 0 then
  redis.call('ZADD', slots, n2s(now + lease), id)
  redis.call('PEXPIRE', slots, n2s(2 * lease + EXPIRY_SLACK))
  redis.call('HSET', k, F.HOST, h)
end
return {'ok', '0'}
