local dest, max = ARGV[1], tonumber(ARGV[2])
local wl = P..K.CB_WAIT..dest
local woken, looked = {}, 0
while #woken < max and looked < C.WAKE_LOOK_FACTOR * max do
  local w = redis.call('LPOP', wl)
  if not w then break end
  looked = looked + 1
  local k = P..K.JOB..w
  if redis.call('HGET', k, F.CB_WAIT) == dest then
    redis.call('HDEL', k, F.CB_WAIT)
    if redis.call('HGET', k, F.CB_STATE) == S.PENDING and redis.call('ZSCORE', P..K.CB_DELAYED, w) then
      redis.call('ZREM', P..K.CB_DELAYED, w)
      redis.call('HSET', k, F.NEXT_AT, 0)
      redis.call('HDEL', k, F.CB_DEFERS)
      woken[#woken + 1] = w
    end
  end
end
for i = #woken, 1, -1 do redis.call('LPUSH', P..K.CB_QUEUE, woken[i]) end
if #woken > 0 then wake('cb') end
return #woken
