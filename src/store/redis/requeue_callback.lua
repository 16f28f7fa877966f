local k = P..K.JOB..ARGV[1]
if redis.call('EXISTS', k) == 0 then return 'notfound' end
local st = redis.call('HGET', k, F.CB_STATE) or ''
if st ~= S.FAILED then return 'state:' .. st end
-- Past notifier.failed_retention: its deletion is under way.
if redis.call('ZSCORE', P..K.DELETIONS, ARGV[1]) then return 'state:Expired' end
redis.call('ZREM', P..K.CB_FAILED, ARGV[1])
redis.call('HSET', k, F.CB_STATE, S.PENDING, F.CB_ATTEMPTS, 0, F.CB_LOST, 0)
redis.call('HDEL', k, F.CB_WAIT, F.CB_DEFERS)
redis.call('RPUSH', P..K.CB_QUEUE, ARGV[1])
wake('cb')
return 'ok'
