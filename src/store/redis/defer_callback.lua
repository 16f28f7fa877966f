local id, token, dest, delay = ARGV[1], ARGV[2], ARGV[3], tonumber(ARGV[4])
local k = P..K.JOB..id
if redis.call('HGET', k, F.CB_LEASE) ~= token then return 0 end
local at = n2s(now_ms() + delay)
redis.call('ZREM', P..K.CB_LEASES, id)
redis.call('HDEL', k, F.CB_LEASE)
redis.call('HINCRBY', k, F.CB_ATTEMPTS, -1)
redis.call('HINCRBY', k, F.CB_DEFERS, 1)
-- Already parked there (it came back at its fallback time): it keeps its place.
local wl = P..K.CB_WAIT..dest
if redis.call('HGET', k, F.CB_WAIT) ~= dest or redis.call('EXISTS', wl) == 0 then
  redis.call('RPUSH', wl, id)
  redis.call('HSET', k, F.CB_WAIT, dest)
end
redis.call('PEXPIRE', wl, n2s(math.max(C.CB_WAIT_TTL_MS, 10 * delay)))
redis.call('HSET', k, F.CB_STATE, S.PENDING, F.NEXT_AT, at)
redis.call('ZADD', P..K.CB_DELAYED, at, id)
return 1
