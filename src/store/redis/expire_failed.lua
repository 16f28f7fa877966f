local now = now_ms()
local ids = redis.call('ZRANGEBYSCORE', P..K.CB_FAILED, '-inf', now - tonumber(ARGV[1]), 'LIMIT', 0, tonumber(ARGV[2]))
for _, id in ipairs(ids) do
  redis.call('ZREM', P..K.CB_FAILED, id)
  redis.call('ZADD', P..K.DELETIONS, n2s(now), id)
end
return #ids
