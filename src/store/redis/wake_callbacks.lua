local dest, max = ARGV[1], tonumber(ARGV[2])
local wl = P..'cbwait:'..dest
local woken, looked = {}, 0
while #woken < max and looked < 16 * max do
  local w = redis.call('LPOP', wl)
  if not w then break end
  looked = looked + 1
  local k = P..'job:'..w
  if redis.call('HGET', k, 'cb_wait') == dest then
    redis.call('HDEL', k, 'cb_wait')
    if redis.call('HGET', k, 'cb_state') == 'Pending' and redis.call('ZSCORE', P..'cb:delayed', w) then
      redis.call('ZREM', P..'cb:delayed', w)
      redis.call('HSET', k, 'next_at', 0)
      redis.call('HDEL', k, 'cb_defers')
      woken[#woken + 1] = w
    end
  end
end
for i = #woken, 1, -1 do redis.call('LPUSH', P..'cb:queue', woken[i]) end
if #woken > 0 then wake('cb') end
return #woken
