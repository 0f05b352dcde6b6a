-- The history writer's lease: one writer at a time.
-- KEYS: lease key; ARGV: holder, ttl ms (0: give the lease up if held)
local current = redis.call('GET', KEYS[1])
if tonumber(ARGV[2]) == 0 then
  if current == ARGV[1] then redis.call('DEL', KEYS[1]) end
  return 0
end
if not current or current == ARGV[1] then
  redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
  return 1
end
return 0
