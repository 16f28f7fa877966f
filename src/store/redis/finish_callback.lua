local id, token, st, err, delay = ARGV[1], ARGV[2], ARGV[3], ARGV[4], tonumber(ARGV[5])
local k = P..K.JOB..id
if redis.call('HGET', k, F.CB_LEASE) ~= token then return 0 end
local now = now_ms()
redis.call('ZREM', P..K.CB_LEASES, id)
-- An attempt ended: no longer parked (an entry left in `cbwait:` is skipped).
redis.call('HDEL', k, F.CB_LEASE, F.CB_WAIT, F.CB_DEFERS)
redis.call('HSET', k, F.CB_STATE, st, F.CB_ERROR, err)
if st == S.SUCCESS then
  redis.call('HSET', k, F.CB_AT, n2s(now))
  redis.call('ZADD', P..K.DELETIONS, n2s(now + delay), id)
elseif st == S.PENDING then
  redis.call('HSET', k, F.NEXT_AT, n2s(now + delay))
  redis.call('ZADD', P..K.CB_DELAYED, n2s(now + delay), id)
  wake('cb')
else
  redis.call('HSET', k, F.CB_AT, n2s(now))
  redis.call('ZADD', P..K.CB_FAILED, n2s(now), id)
end
return 1
