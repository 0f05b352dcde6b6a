-- Admits a batch of intake entries: dedupe, store, and fan out into the lanes, in one script.
-- KEYS: intake stream, the subscriptions' version key, lanes set
-- ARGV: group, expected version, now, retention s, then the key prefixes: seen marker,
--       event record, delivery hash, lane stream; then per entry: entry id, event id,
--       dedupe window ms, event json, lane count, lanes...
-- Answers {'stale', version} without writing anything when the subscriptions moved (the
-- caller routes again), else {'ok', outcome per entry}: new, duplicate, or done (another
-- worker admitted it: its XACK came first).
local version = redis.call('GET', KEYS[2]) or ''
if version ~= ARGV[2] then return {'stale', version} end
local now, retention = ARGV[3], ARGV[4]
local seen_prefix, event_prefix, delivery_prefix, lane_prefix = ARGV[5], ARGV[6], ARGV[7],
                                                                 ARGV[8]
local outcomes = {}
local i = 9
while i <= #ARGV do
  local entry, id, window, event = ARGV[i], ARGV[i + 1], ARGV[i + 2], ARGV[i + 3]
  local lanes = tonumber(ARGV[i + 4])
  local first = i + 5
  i = first + lanes
  if redis.call('XACK', KEYS[1], ARGV[1], entry) == 0 then
    table.insert(outcomes, 'done')
  else
    redis.call('XDEL', KEYS[1], entry)
    local seen = seen_prefix .. id
    local record = event_prefix .. id
    local prev = redis.call('GET', seen)
    if prev and prev ~= entry then
      -- Counted on the record even when the first one received is admitted later.
      redis.call('HINCRBY', record, 'duplicates', 1)
      if redis.call('TTL', record) < 0 then redis.call('EXPIRE', record, retention) end
      table.insert(outcomes, 'duplicate')
    else
      if not prev then redis.call('SET', seen, entry, 'PX', window) end
      local counted = 0
      if redis.call('HEXISTS', record, 'event') == 0 then
        counted = redis.call('HGET', record, 'duplicates') or 0
      end
      redis.call('DEL', record, delivery_prefix .. id)
      redis.call('HSET', record, 'event', event, 'entry', entry, 'admitted_at', now,
                 'duplicates', counted)
      redis.call('EXPIRE', record, retention)
      for j = first, first + lanes - 1 do
        redis.call('XADD', lane_prefix .. ARGV[j], '*', 'e', id)
        redis.call('SADD', KEYS[3], ARGV[j])
      end
      table.insert(outcomes, 'new')
    end
  end
end
return {'ok', outcomes}
