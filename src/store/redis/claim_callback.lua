local lease, token, max_lost, max = tonumber(ARGV[1]), ARGV[2], tonumber(ARGV[3]), tonumber(ARGV[4])
local now = now_ms()
for _, id in ipairs(redis.call('ZRANGEBYSCORE', P..'cb:delayed', '-inf', now, 'LIMIT', 0, 100)) do
  redis.call('ZREM', P..'cb:delayed', id)
  if redis.call('EXISTS', P..'job:'..id) == 1 then
    redis.call('HSET', P..'job:'..id, 'next_at', 0)
    redis.call('RPUSH', P..'cb:queue', id)
  end
end
for _, id in ipairs(redis.call('ZRANGEBYSCORE', P..'cb:leases', '-inf', now, 'LIMIT', 0, 100)) do
  redis.call('ZREM', P..'cb:leases', id)
  local k = P..'job:'..id
  if redis.call('EXISTS', k) == 1 then
    redis.call('HDEL', k, 'cb_lease')
    redis.call('HINCRBY', k, 'cb_attempts', -1)
    local lost = redis.call('HINCRBY', k, 'cb_lost', 1)
    if lost > max_lost then
      redis.call('HSET', k, 'cb_state', 'Failed', 'cb_at', n2s(now),
        'cb_error', 'callback abandoned: the worker running it was lost ' .. lost .. ' times')
      redis.call('ZADD', P..'cb:failed', n2s(now), id)
    else
      redis.call('HSET', k, 'cb_state', 'Pending')
      redis.call('LPUSH', P..'cb:queue', id)
    end
  end
end
local out = {}
while #out < max do
  local id = redis.call('LPOP', P..'cb:queue')
  if not id then break end
  local k = P..'job:'..id
  if redis.call('EXISTS', k) == 1 then
    redis.call('ZADD', P..'cb:leases', n2s(now + lease), id)
    redis.call('HSET', k, 'cb_state', 'InProgress', 'cb_lease', token)
    redis.call('HINCRBY', k, 'cb_attempts', 1)
    out[#out + 1] = {id, redis.call('HGETALL', k), ''}
  end
end
if #out > 0 then return {'jobs', out} end
local nxt = redis.call('ZRANGE', P..'cb:delayed', 0, 0, 'WITHSCORES')
if nxt[2] then return {'empty', n2s(math.max(0, tonumber(nxt[2]) - now))} end
return {'empty', '-1'}
