local q, lease = ARGV[1], tonumber(ARGV[2])
local expiry = n2s(now_ms() + lease)
local out = {}
for i = 3, #ARGV, 2 do
  local id, token = ARGV[i], ARGV[i + 1]
  local k = P..'job:'..id
  if redis.call('HGET', k, q..'_lease') == token then
    redis.call('ZADD', P..q..':leases', 'XX', expiry, id)
    local h = q == 'dl' and redis.call('HGET', k, 'host')
    if h then
      redis.call('ZADD', P..'hostslots:'..h, 'XX', expiry, id)
      redis.call('PEXPIRE', P..'hostslots:'..h, n2s(2 * lease + EXPIRY_SLACK))
    end
    out[#out + 1] = 1
  else
    out[#out + 1] = 0
  end
end
return out
