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
