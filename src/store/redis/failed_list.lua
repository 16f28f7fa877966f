local cat, cid, limit, scan, mode, pat = tonumber(ARGV[1]), ARGV[2], tonumber(ARGV[3]), tonumber(ARGV[4]), ARGV[5], ARGV[6]
local out, scanned, offset = {}, 0, 0
local last_at, last_id, stopped = '', '', false
while not stopped do
  local batch = redis.call('ZRANGEBYSCORE', P..K.CB_FAILED, cat, '+inf', 'WITHSCORES', 'LIMIT', offset, C.FAILED_BATCH)
  if #batch == 0 then break end
  offset = offset + #batch / 2
  for i = 1, #batch, 2 do
    local id, at = batch[i], tonumber(batch[i + 1])
    if at > cat or id > cid then
      scanned = scanned + 1
      last_at, last_id = n2s(at), id
      local f = redis.call('HMGET', P..K.JOB..id, F.AGGR, F.CB_ERROR, F.CB_ATTEMPTS)
      local a = f[1] or ''
      if mode == 'all' or (mode == 'is' and a == pat) or (mode == 'prefix' and string.sub(a, 1, #pat) == pat) then
        out[#out + 1] = {id, a, n2s(at), f[2] or '', f[3] or '0'}
      end
      if #out >= limit or scanned >= scan then stopped = true break end
    end
  end
end
if not stopped then last_at, last_id = '', '' end
return {last_at, last_id, out}
