local id, token, st, err, code, size, keep, thumbs = ARGV[1], ARGV[2], ARGV[3], ARGV[4], ARGV[5], ARGV[6], tonumber(ARGV[7]), ARGV[8]
local k = P..'job:'..id
if redis.call('HGET', k, 'dl_lease') ~= token then return 0 end
local now = now_ms()
redis.call('ZREM', P..'dl:leases', id)
redis.call('HDEL', k, 'dl_lease')
free_host(k, id)
redis.call('HSET', k, 'dl_state', st, 'dl_error', err, 'response_code', code, 'image_size', size,
  'thumbs', thumbs, 'finished_at', n2s(now))
local a = redis.call('HGET', k, 'aggr')
free_slot(a)
end_job(a)
enqueue_callback(id, now, keep)
return 1
