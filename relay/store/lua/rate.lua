-- A budget's counters, shared by all workers: its fixed rate-limit window and its day (each
-- optional), and whether the vendor said the budget is spent.
-- KEYS: the spent zset, then each counter
-- ARGV: budget, now, wanted, then per counter: its limit, its ttl ms
-- Answers {granted, spent until ('' when not spent), then per counter the room it had}.
-- What fits in every counter is granted and counted in each; what was refused is not counted.
local spent = redis.call('ZSCORE', KEYS[1], ARGV[1])
if spent and tonumber(spent) > tonumber(ARGV[2]) then return {0, spent} end
local granted = tonumber(ARGV[3])
local rooms = {}
for i = 2, #KEYS do
  local room = tonumber(ARGV[2 * i]) - tonumber(redis.call('GET', KEYS[i]) or '0')
  rooms[i - 1] = room
  if room < granted then granted = room end
end
if granted < 0 then granted = 0 end
if granted > 0 then
  for i = 2, #KEYS do
    if redis.call('INCRBY', KEYS[i], granted) == granted then
      redis.call('PEXPIRE', KEYS[i], ARGV[2 * i + 1])
    end
  end
end
return {granted, '', unpack(rooms)}
