local id, token, delay, reason, has_result, err, code = ARGV[1], ARGV[2], tonumber(ARGV[3]), ARGV[4], ARGV[5], ARGV[6], ARGV[7]
local k = P..K.JOB..id
if redis.call('HGET', k, F.DL_LEASE) ~= token then return 0 end
local at = n2s(now_ms() + delay)
redis.call('ZREM', P..K.DL_LEASES, id)
redis.call('HDEL', k, F.DL_LEASE)
free_host(k, id)
if reason ~= '' then
  redis.call('HINCRBY', k, F.DL_ATTEMPTS, -1)
  redis.call('HSET', k, F.WAIT, reason)
  if reason == W.HOST_PAUSED then redis.call('HINCRBY', k, F.DL_PAUSES, 1) end
end
-- Refused for its host's concurrency: parked until a slot of the host is freed
-- (`delay` is only the fallback).
local hw = redis.call('HGET', k, F.HOST_WAIT)
if hw then
  redis.call('HDEL', k, F.HOST_WAIT)
  if reason == W.HOST_CONCURRENCY then
    redis.call('RPUSH', P..K.HOST_WAIT..hw, id)
    redis.call('PEXPIRE', P..K.HOST_WAIT..hw, n2s(math.max(C.HOST_WAIT_TTL_MS, 10 * delay)))
  end
end
if has_result == '1' then redis.call('HSET', k, F.DL_ERROR, err, F.RESPONSE_CODE, code) end
redis.call('HSET', k, F.DL_STATE, S.PENDING, F.NEXT_AT, at)
redis.call('ZADD', P..K.DL_DELAYED, at, id)
free_slot(redis.call('HGET', k, F.AGGR))
-- A sleeping processor re-reads the earliest due time.
wake('dl')
return 1
