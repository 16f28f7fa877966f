return redis.call('ZRANGEBYSCORE', P..'deletions', '-inf', now_ms(), 'LIMIT', 0, tonumber(ARGV[1]))
