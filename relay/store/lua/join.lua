-- Who may drain a lane: become one of its drainers, unless it has enough already.
-- KEYS: drainers zset, in-flight hash
-- ARGV: holder, now, lease until, max drainers
-- Expired drainers (their worker died) are forgotten with their in-flight counts. Answers 1
-- when the holder joined, else 0.
local now = tonumber(ARGV[2])
local expired = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', now)
if #expired > 0 then
  redis.call('ZREM', KEYS[1], unpack(expired))
  redis.call('HDEL', KEYS[2], unpack(expired))
end
if redis.call('ZCARD', KEYS[1]) >= tonumber(ARGV[4]) then return 0 end
redis.call('ZADD', KEYS[1], ARGV[3], ARGV[1])
return 1
