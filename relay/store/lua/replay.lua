-- Queues a dead letter again, all or nothing: the delivery becomes pending, gets a fresh lane
-- entry, and the replay goes to the history stream. The dead letter itself is in the
-- database; Redis knows the delivery's state while it is in flight and for a while after, so
-- two replays of one dead letter queue it once (the second finds it pending), and a crash
-- leaves it either dead or queued, never neither.
-- KEYS: delivery hash, lane stream, lanes set, history stream
-- ARGV: destination, event id, pending state json, the history record, retention s
-- Answers 1, or 0 without writing anything when the delivery is not dead (queued, in flight or
-- delivered since).
local raw = redis.call('HGET', KEYS[1], ARGV[1])
if raw and cjson.decode(raw).status ~= 'dead' then return 0 end
redis.call('HSET', KEYS[1], ARGV[1], ARGV[3])
redis.call('EXPIRE', KEYS[1], ARGV[5])
redis.call('XADD', KEYS[2], '*', 'e', ARGV[2])
redis.call('SADD', KEYS[3], ARGV[1])
local clock = redis.call('TIME')
redis.call('XADD', KEYS[4], '*', 'v', clock[1] .. string.format('%06d', clock[2]),
           'r', '[' .. ARGV[4] .. ']')
return 1
