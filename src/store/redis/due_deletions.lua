return redis.call('ZRANGEBYSCORE', P..K.DELETIONS, '-inf', now_ms(), 'LIMIT', 0, tonumber(ARGV[1]))
