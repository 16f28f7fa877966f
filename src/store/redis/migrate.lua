-- Brings keys written by an older version to today's types: `ready` was a set (its
-- members taken at random) and is a sorted set by name now (taken round robin).
local moved = 0
if redis.call('TYPE', P..K.READY).ok == 'set' then
  local members = redis.call('SMEMBERS', P..K.READY)
  redis.call('DEL', P..K.READY)
  for _, a in ipairs(members) do redis.call('ZADD', P..K.READY, 0, a) end
  moved = #members
end
return moved
