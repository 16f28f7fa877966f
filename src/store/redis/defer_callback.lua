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
