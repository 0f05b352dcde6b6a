-- Stores an accepted event in the intake and marks its id as received, in one round trip.
-- KEYS: intake stream, the event id's seen marker, intake kick
-- ARGV: event json, dedupe window ms, kick ttl ms
-- The first event received under an id marks it (NX): when two events share a sender's
-- Idempotency-Key, the one received first is the one admitted. Answers {entry id, 1 when the
-- caller is to queue an admit task (none was queued)}: the task message is built only then,
-- off the hot path.
local entry = redis.call('XADD', KEYS[1], '*', 'e', ARGV[1])
redis.call('SET', KEYS[2], entry, 'NX', 'PX', ARGV[2])
local kick = 0
if redis.call('SET', KEYS[3], '1', 'NX', 'PX', ARGV[3]) then kick = 1 end
return {entry, kick}
