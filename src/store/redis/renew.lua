local q, lease = ARGV[1], tonumber(ARGV[2])
local f = Q[q]
local expiry = n2s(now_ms() + lease)
local out = {}
for i = 3, #ARGV, 2 do
  local id, token = ARGV[i], ARGV[i + 1]
  local k = P..K.JOB..id
  if redis.call('HGET', k, f.lease) == token then
    redis.call('ZADD', P..f.leases, 'XX', expiry, id)
    local h = q == 'dl' and redis.call('HGET', k, F.HOST)
    if h then
      redis.call('ZADD', P..K.HOST_SLOTS..h, 'XX', expiry, id)
      redis.call('PEXPIRE', P..K.HOST_SLOTS..h, n2s(2 * lease + EXPIRY_SLACK))
    end
    out[#out + 1] = 1
  else
    out[#out + 1] = 0
  end
end
return out
