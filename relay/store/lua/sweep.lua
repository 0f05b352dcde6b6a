-- The sweep: which lanes need a kick.
-- KEYS: lanes set, intake stream, intake kick
-- ARGV: now, kick ttl ms, max drainers, group, then the key prefixes: lane stream, hold,
--       kick, drainers zset
-- A lane needs one when it has entries nobody has read (or a dead drainer's entries to take
-- over), no queued kick, no hold, and room for another drainer. Answers the lanes whose kick
-- keys it set ('' for the intake).
local now = tonumber(ARGV[1])
local group = ARGV[4]
local lane_prefix, hold_prefix, kick_prefix, drainers_prefix = ARGV[5], ARGV[6], ARGV[7],
                                                               ARGV[8]
local kicks = {}
local function needs(stream, kick, drainers)
  local length = redis.call('XLEN', stream)
  if length == 0 then return false end
  if redis.call('EXISTS', kick) == 1 then return false end
  local active = 0
  if drainers then
    active = redis.call('ZCOUNT', drainers, '(' .. ARGV[1], '+inf')  -- live ones only
    if active >= tonumber(ARGV[3]) then return false end
  end
  if active > 0 then
    local pending = redis.call('XPENDING', stream, group)[1]
    if length <= pending then return false end
  end
  redis.call('SET', kick, '1', 'PX', ARGV[2])
  return true
end
if needs(KEYS[2], KEYS[3], nil) then table.insert(kicks, '') end
for _, lane in ipairs(redis.call('SMEMBERS', KEYS[1])) do
  local stream = lane_prefix .. lane
  if redis.call('EXISTS', stream) == 0 then
    redis.call('SREM', KEYS[1], lane)
  elseif redis.call('EXISTS', hold_prefix .. lane) == 0
      and needs(stream, kick_prefix .. lane, drainers_prefix .. lane) then
    table.insert(kicks, lane)
  end
end
return kicks
