-- `hostpause:<h>` and `hostpauses` (present while any host is paused: claims look up
-- jobs' hosts only then) hold until when (ms); a pause only ever grows.
local key, ms = P..K.HOST_PAUSE..ARGV[1], tonumber(ARGV[2])
local untl = now_ms() + ms
for _, k in ipairs({key, P..K.HOST_PAUSES}) do
  if (tonumber(redis.call('GET', k) or '0') or 0) < untl then
    redis.call('SET', k, n2s(untl), 'PX', n2s(ms + EXPIRY_SLACK))
  end
end
return 1
