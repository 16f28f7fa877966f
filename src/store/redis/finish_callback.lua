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
