local now = now_ms()
local ids = redis.call('ZRANGEBYSCORE', P..'cb:failed', '-inf', now - tonumber(ARGV[1]), 'LIMIT', 0, tonumber(ARGV[2]))
for _, id in ipairs(ids) do
  redis.call('ZREM', P..'cb:failed', id)
  redis.call('ZADD', P..'deletions', n2s(now), id)
end
return #ids
