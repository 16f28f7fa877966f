local id, spec, a, limit, proxy, has_cb, rate, burst, host, first = ARGV[1], ARGV[2], ARGV[3], ARGV[4], ARGV[5], ARGV[6], ARGV[7], ARGV[8], ARGV[9], ARGV[10] == '1'
local k = P..K.JOB..id
if redis.call('EXISTS', k) == 1 then return 0 end
local ak = P..K.AGGR..a
local old = redis.call('HMGET', ak, A.RATE, A.BURST, A.JOBS)
-- api.aggregation_settings = first: an aggregation with jobs keeps its settings.
if not (first and tonumber(old[3] or '0') > 0) then
  redis.call('HSET', ak, A.LIMIT, limit, A.PROXY, proxy, A.RATE, rate, A.BURST, burst)
  -- A new rate: the next claim looks again.
  if tonumber(old[1] or '0') ~= tonumber(rate) or tonumber(old[2] or '1') ~= tonumber(burst) then
    redis.call('ZREM', P..K.RATEWAIT, a)
  end
end
redis.call('HINCRBY', ak, A.JOBS, 1)
redis.call('HSET', k, F.SPEC, spec, F.AGGR, a, F.HAS_CB, has_cb, F.DL_STATE, S.PENDING,
  F.DL_ATTEMPTS, 0, F.CREATED_AT, n2s(now_ms()), F.URL_HOST, host)
redis.call('RPUSH', P..K.PENDING..a, id)
if refresh(a) then wake('dl') end
return 1
