local k = P..'job:'..ARGV[1]
if redis.call('EXISTS', k) == 0 then return 'notfound' end
local st = redis.call('HGET', k, 'cb_state') or ''
if st ~= 'Failed' then return 'state:' .. st end
-- Past notifier.failed_retention: its deletion is under way.
if redis.call('ZSCORE', P..'deletions', ARGV[1]) then return 'state:Expired' end
redis.call('ZREM', P..'cb:failed', ARGV[1])
redis.call('HSET', k, 'cb_state', 'Pending', 'cb_attempts', 0, 'cb_lost', 0)
redis.call('HDEL', k, 'cb_wait', 'cb_defers')
redis.call('RPUSH', P..'cb:queue', ARGV[1])
wake('cb')
return 'ok'
