local id, token, st, err, code, size, keep, thumbs = ARGV[1], ARGV[2], ARGV[3], ARGV[4], ARGV[5], ARGV[6], tonumber(ARGV[7]), ARGV[8]
local k = P..K.JOB..id
if redis.call('HGET', k, F.DL_LEASE) ~= token then return 0 end
local now = now_ms()
redis.call('ZREM', P..K.DL_LEASES, id)
redis.call('HDEL', k, F.DL_LEASE)
free_host(k, id)
redis.call('HSET', k, F.DL_STATE, st, F.DL_ERROR, err, F.RESPONSE_CODE, code, F.IMAGE_SIZE, size,
  F.THUMBS, thumbs, F.FINISHED_AT, n2s(now))
local a = redis.call('HGET', k, F.AGGR)
free_slot(a)
end_job(a)
enqueue_callback(id, now, keep)
return 1
