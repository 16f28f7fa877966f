local q, id, token = ARGV[1], ARGV[2], ARGV[3]
local k = P..K.JOB..id
local f = Q[q]
if redis.call('HGET', k, f.lease) ~= token then return 0 end
redis.call('ZREM', P..f.leases, id)
redis.call('HDEL', k, f.lease)
redis.call('HINCRBY', k, f.attempts, -1)
redis.call('HSET', k, f.state, S.PENDING)
if q == 'dl' then
  free_host(k, id)
  local a = redis.call('HGET', k, F.AGGR)
  redis.call('LPUSH', P..K.PENDING..a, id)
  free_slot(a)
else
  redis.call('LPUSH', P..K.CB_QUEUE, id)
  wake('cb')
end
return 1
