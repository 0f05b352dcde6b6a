-- Takes a dead letter out and puts a fresh delivery of it into its lane, all or nothing: two
-- replays of one dead letter queue it once, and a crash leaves it either dead or queued.
-- KEYS: dead letters hash, dead letters index, event record, delivery hash, stats hash,
--       recent dead zset, lane stream, lanes set
-- ARGV: dead letter id, the dead letter as the caller read it, event json, delivery state
--       json, retention s, event id, destination
-- The caller encodes the event and the state (as Python's json does, so they are stored byte
-- for byte as before); the letter it read is compared, so nothing is written from a letter
-- that another replay has taken meanwhile. Answers 1, or 0 without writing anything when the
-- dead letter is gone or is not the one read.
if redis.call('HGET', KEYS[1], ARGV[1]) ~= ARGV[2] then return 0 end
redis.call('HDEL', KEYS[1], ARGV[1])
redis.call('ZREM', KEYS[2], ARGV[1])
redis.call('HSET', KEYS[3], 'event', ARGV[3])       -- restored: it may have expired
redis.call('EXPIRE', KEYS[3], ARGV[5])
redis.call('HSET', KEYS[4], ARGV[7], ARGV[4])
redis.call('EXPIRE', KEYS[4], ARGV[5])
redis.call('HINCRBY', KEYS[5], 'dead', -1)
redis.call('ZREM', KEYS[6], ARGV[6])
redis.call('XADD', KEYS[7], '*', 'e', ARGV[6])
redis.call('SADD', KEYS[8], ARGV[7])
return 1
