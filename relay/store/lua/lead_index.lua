-- Adds a batch of events to their leads' zsets and the latest events, trims both and sets
-- their expiry: one round trip for an admitted batch. The scores stay the strings Python sent
-- (a Lua number would be rounded to 14 digits).
-- KEYS: the latest-events zset
-- ARGV: ttl s, per-lead cap, all cap, lead:of key prefix, then per event: event id, time,
--       trim-before time, the lead:of JSON ('' when the event names no lead), key count, keys
local ttl, per_lead, all, of_prefix = ARGV[1], tonumber(ARGV[2]), tonumber(ARGV[3]), ARGV[4]
local i = 5
while i <= #ARGV do
  local id, at, before, of, n = ARGV[i], ARGV[i + 1], ARGV[i + 2], ARGV[i + 3],
                                tonumber(ARGV[i + 4])
  for k = i + 5, i + 4 + n do
    local key = ARGV[k]
    redis.call('ZADD', key, at, id)
    redis.call('ZREMRANGEBYSCORE', key, '-inf', '(' .. before)
    redis.call('ZREMRANGEBYRANK', key, 0, -per_lead - 1)
    redis.call('EXPIRE', key, ttl)
  end
  redis.call('ZADD', KEYS[1], at, id)
  if of ~= '' then
    redis.call('SET', of_prefix .. id, of, 'EX', ttl)
  end
  i = i + 5 + n
end
redis.call('ZREMRANGEBYRANK', KEYS[1], 0, -all - 1)
redis.call('EXPIRE', KEYS[1], ttl)
return 1
