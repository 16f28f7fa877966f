local lease, token, max = tonumber(ARGV[1]), ARGV[2], tonumber(ARGV[3])
local now = now_ms()
for _, id in ipairs(redis.call('ZRANGEBYSCORE', P..K.CB_DELAYED, '-inf', now, 'LIMIT', 0, C.BATCH)) do
  redis.call('ZREM', P..K.CB_DELAYED, id)
  if redis.call('EXISTS', P..K.JOB..id) == 1 then
    redis.call('HSET', P..K.JOB..id, F.NEXT_AT, 0)
    redis.call('RPUSH', P..K.CB_QUEUE, id)
  end
end
for _, id in ipairs(redis.call('ZRANGEBYSCORE', P..K.CB_LEASES, '-inf', now, 'LIMIT', 0, C.BATCH)) do
  redis.call('ZREM', P..K.CB_LEASES, id)
  local k = P..K.JOB..id
  if redis.call('EXISTS', k) == 1 then
    redis.call('HDEL', k, F.CB_LEASE)
    redis.call('HINCRBY', k, F.CB_ATTEMPTS, -1)
    local lost = redis.call('HINCRBY', k, F.CB_LOST, 1)
    if lost > C.MAX_LOST_LEASES then
      redis.call('HSET', k, F.CB_STATE, S.FAILED, F.CB_AT, n2s(now),
        F.CB_ERROR, 'callback abandoned: the worker running it was lost ' .. lost .. ' times')
      redis.call('ZADD', P..K.CB_FAILED, n2s(now), id)
    else
      redis.call('HSET', k, F.CB_STATE, S.PENDING)
      redis.call('LPUSH', P..K.CB_QUEUE, id)
    end
  end
end
local out = {}
while #out < max do
  local id = redis.call('LPOP', P..K.CB_QUEUE)
  if not id then break end
  local k = P..K.JOB..id
  if redis.call('EXISTS', k) == 1 then
    redis.call('ZADD', P..K.CB_LEASES, n2s(now + lease), id)
    redis.call('HSET', k, F.CB_STATE, S.IN_PROGRESS, F.CB_LEASE, token)
    redis.call('HINCRBY', k, F.CB_ATTEMPTS, 1)
    out[#out + 1] = {id, redis.call('HGETALL', k), ''}
  end
end
if #out > 0 then return {A.JOBS, out} end
local nxt = redis.call('ZRANGE', P..K.CB_DELAYED, 0, 0, 'WITHSCORES')
if nxt[2] then return {'empty', n2s(math.max(0, tonumber(nxt[2]) - now))} end
return {'empty', '-1'}
