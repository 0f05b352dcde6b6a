-- Admits a batch of intake entries: dedupe, store, and fan out into the lanes, in one script,
-- with the batch's history (new events, duplicates) as one entry of the history stream.
-- KEYS: intake stream, the subscriptions' version key, lanes set, history stream
-- ARGV: group, expected version, now, retention s, then the key prefixes: seen marker,
--       event record, delivery hash, lane stream; then the batch's lowest entry id and the
--       order guard's idle ms (0: no guard; see below); then per entry: entry id, event id,
--       seen marker ttl ms, 1 when the database already has the event inside the dedupe
--       window (else 0), event json, its history record if new, its history record if a
--       duplicate, lane count, then per lane: its name and the lead's digest ('' when the
--       destination keeps no order; else the lane entry carries it as 'l')
-- Answers {'stale', version} without writing anything when the subscriptions moved (the
-- caller routes again); {'wait', ''} without writing anything when the order guard finds an
-- earlier intake entry that another admission holds (read, not yet admitted, idle for less
-- than the guard's ms: its admission is under way), so that a lead's events reach an ordered
-- destination's lane in the order the ingress received them (the caller tries again soon);
-- else {'ok', outcome per entry}: new, duplicate, or done (another worker admitted it: its
-- XACK came first).
local version = redis.call('GET', KEYS[2]) or ''
if version ~= ARGV[2] then return {'stale', version} end
local now, retention = ARGV[3], ARGV[4]
local seen_prefix, event_prefix, delivery_prefix, lane_prefix = ARGV[5], ARGV[6], ARGV[7],
                                                                 ARGV[8]
if tonumber(ARGV[10]) > 0 then
  -- Past a dead worker's whole batch of stale entries (200, the engine's ADMIT_BATCH): they
  -- do not hide a live admission behind them.
  local earlier = redis.call('XPENDING', KEYS[1], ARGV[1], '-', '(' .. ARGV[9], 201)
  for _, item in ipairs(earlier) do
    if tonumber(item[3]) < tonumber(ARGV[10]) then return {'wait', ''} end
  end
end
local outcomes, history = {}, {}
local i = 11
while i <= #ARGV do
  local entry, id, mark_ttl, known, event = ARGV[i], ARGV[i + 1], ARGV[i + 2], ARGV[i + 3],
                                            ARGV[i + 4]
  local as_new, as_duplicate = ARGV[i + 5], ARGV[i + 6]
  local lanes = tonumber(ARGV[i + 7])
  local first = i + 8
  i = first + 2 * lanes
  if redis.call('XACK', KEYS[1], ARGV[1], entry) == 0 then
    table.insert(outcomes, 'done')
  else
    redis.call('XDEL', KEYS[1], entry)
    local seen = seen_prefix .. id
    local prev = redis.call('GET', seen)
    if known == '1' or (prev and prev ~= entry) then
      table.insert(history, as_duplicate)
      table.insert(outcomes, 'duplicate')
    else
      if not prev then redis.call('SET', seen, entry, 'PX', mark_ttl) end
      local record = event_prefix .. id
      redis.call('DEL', record, delivery_prefix .. id)
      -- The payload stays here until the history writer has committed the event's row.
      redis.call('HSET', record, 'event', event, 'entry', entry, 'admitted_at', now)
      redis.call('EXPIRE', record, retention)
      for j = first, first + 2 * lanes - 1, 2 do
        if ARGV[j + 1] == '' then
          redis.call('XADD', lane_prefix .. ARGV[j], '*', 'e', id)
        else
          redis.call('XADD', lane_prefix .. ARGV[j], '*', 'e', id, 'l', ARGV[j + 1])
        end
        redis.call('SADD', KEYS[3], ARGV[j])
      end
      table.insert(history, as_new)
      table.insert(outcomes, 'new')
    end
  end
end
if #history > 0 then
  local clock = redis.call('TIME')
  redis.call('XADD', KEYS[4], '*', 'v', clock[1] .. string.format('%06d', clock[2]),
             'r', '[' .. table.concat(history, ',') .. ']')
end
return {'ok', outcomes}
