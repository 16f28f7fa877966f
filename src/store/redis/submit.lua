local id, spec, a, limit, proxy, has_cb, rate, burst, host, first = ARGV[1], ARGV[2], ARGV[3], ARGV[4], ARGV[5], ARGV[6], ARGV[7], ARGV[8], ARGV[9], ARGV[10] == '1'
local k = P..'job:'..id
if redis.call('EXISTS', k) == 1 then return 0 end
local ak = P..'aggr:'..a
local old = redis.call('HMGET', ak, 'rate', 'burst', 'jobs')
-- api.aggregation_settings = first: an aggregation with jobs keeps its settings.
if not (first and tonumber(old[3] or '0') > 0) then
  redis.call('HSET', ak, 'limit', limit, 'proxy', proxy, 'rate', rate, 'burst', burst)
  -- A new rate: the next claim looks again.
  if tonumber(old[1] or '0') ~= tonumber(rate) or tonumber(old[2] or '1') ~= tonumber(burst) then
    redis.call('ZREM', P..'ratewait', a)
  end
end
redis.call('HINCRBY', ak, 'jobs', 1)
redis.call('HSET', k, 'spec', spec, 'aggr', a, 'has_cb', has_cb, 'dl_state', 'Pending',
  'dl_attempts', 0, 'created_at', n2s(now_ms()), 'url_host', host)
redis.call('RPUSH', P..'pending:'..a, id)
if refresh(a) then wake('dl') end
return 1
