local q, id, token = ARGV[1], ARGV[2], ARGV[3]
local k = P..'job:'..id
if redis.call('HGET', k, q..'_lease') ~= token then return 0 end
redis.call('ZREM', P..q..':leases', id)
redis.call('HDEL', k, q..'_lease')
redis.call('HINCRBY', k, q..'_attempts', -1)
redis.call('HSET', k, q..'_state', 'Pending')
if q == 'dl' then
  free_host(k, id)
  local a = redis.call('HGET', k, 'aggr')
  redis.call('LPUSH', P..'pending:'..a, id)
  free_slot(a)
else
  redis.call('LPUSH', P..'cb:queue', id)
  wake('cb')
end
return 1
