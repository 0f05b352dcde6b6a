-- Parked deliveries (retries, a claim another worker holds) back into their lanes when due.
-- KEYS: scheduled zset, lanes set
-- ARGV: now, limit, lane stream key prefix
-- Members are '<event id>|<lane>'. Answers {how many moved, the lanes that got entries}.
local due = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', ARGV[1], 'LIMIT', 0, tonumber(ARGV[2]))
local lane_prefix = ARGV[3]
local touched = {}
for _, member in ipairs(due) do
  local cut = string.find(member, '|', 1, true)
  local id, lane = string.sub(member, 1, cut - 1), string.sub(member, cut + 1)
  redis.call('XADD', lane_prefix .. lane, '*', 'e', id)
  redis.call('SADD', KEYS[2], lane)
  touched[lane] = true
end
if #due > 0 then redis.call('ZREM', KEYS[1], unpack(due)) end
local lanes = {}
for lane in pairs(touched) do table.insert(lanes, lane) end
return {#due, lanes}
