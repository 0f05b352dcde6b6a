-- Drops order lists (an erased lead's, at each destination with ordering: per_lead) and takes
-- the events that waited in them off their destination's 'waiting' count. An event being sent
-- meanwhile (a list's head) finds no list when its outcome is recorded: nothing to release.
-- KEYS: pairs of (order list, its destination's stats hash)
-- Answers how many lists there were.
local dropped = 0
for i = 1, #KEYS, 2 do
  local n = redis.call('LLEN', KEYS[i])
  if n > 0 then
    redis.call('DEL', KEYS[i])
    if n > 1 then redis.call('HINCRBY', KEYS[i + 1], 'waiting', 1 - n) end
    dropped = dropped + 1
  end
end
return dropped
