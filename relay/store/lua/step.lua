-- One drainer's round trip: record the outcomes of the deliveries that finished, then claim
-- the next ones, within the destination's concurrency (the sum of what its drainers hold in
-- flight stays <= the limit). Either part may be empty: the confirm of a batch acknowledges its
-- lane entries and gives back their slots, all of it or nothing; the claim reads the lane and
-- takes each delivery with a lease (a second claimant is told busy or done).
-- The outcomes' history (attempts, delivery states) goes to the history stream as one entry,
-- versioned by Redis's clock; the database has it once the history writer has run.
-- KEYS: lane stream, in-flight hash, drainers zset, stats hash, scheduled zset, history stream,
--       lanes set
-- ARGV: group, consumer, holder, destination, now, lease until, retention s, want, limit,
--       reclaim idle ms (0: new entries only), outcomes: a JSON array of [entry, event id,
--       state json, outcome, time, error, retry due time ('' if none)], the outcomes' history
--       records (a JSON array, '' for none), then the key prefixes: event record, delivery
--       hash, order list; then the most events that may wait behind one lead
-- An outcome is delivered, skipped, retrying or dead; or 'gone' (the event is erased or past
-- the retention: the delivery is forgotten) or 'deferred' (its payload could not be read: it
-- is parked until the retry time with the state given, no attempt counted).
--
-- Per-lead order (a destination with ordering: per_lead). A lane entry that carries 'l' (the
-- lead's digest, written at admission), or a delivery whose state carries 'order' (written at
-- its first claim: retries, parked and replaced entries come without 'l'), belongs to the
-- order list of its lead at this destination (<order prefix><dest>:<lead>): the lead's event
-- ids in the order their entries were read, which is the order received. Its head is the one
-- event of the lead that may be claimed; the others wait in the list alone, their lane entries
-- acknowledged and deleted (Redis keeps an id per waiting event, nothing more), counted in the
-- stats hash's 'waiting'. When the head's outcome is final (delivered, skipped, dead, gone),
-- it leaves the list and the next event is promoted: its state becomes pending (with 'order')
-- and it gets a lane entry. A head whose state is final or gone (erased, let go) without that
-- (it never happens but by an erasure) is dropped when its lead's next event is read. Past the
-- most that may wait behind one lead (a hot key), an event is claimed at once, unordered.
-- Answers {confirmed, in flight before the claim, {claimed: entry, event id, attempts,
--          crashes, event json or '' when Redis no longer holds it, 1 when Redis knew the
--          delivery's state (else 0: new, or final and let go once written)}..., done count,
--          busy count, gone count, count of those now waiting behind their lead, count of
--          those claimed unordered (their lead had too many waiting)}
local group, consumer, holder, dest = ARGV[1], ARGV[2], ARGV[3], ARGV[4]
local now, lease_until, retention = tonumber(ARGV[5]), tonumber(ARGV[6]), ARGV[7]
local event_prefix, delivery_prefix, order_prefix = ARGV[13], ARGV[14], ARGV[15]
local most_waiting = tonumber(ARGV[16])
local success = {delivered = true, skipped = true}
local final = {delivered = true, skipped = true, dead = true, gone = true}

-- per-lead order (see above)
local function order_list(lead) return order_prefix .. dest .. ':' .. lead end

-- The list's next event becomes its head: a pending state that names its lead (so it is
-- never taken for a stale head), and a lane entry; one already final is dropped on the way.
-- Nothing to do when it is `claiming` (the caller is claiming it now).
local function promote(list, lead, claiming)
  while true do
    local id = redis.call('LINDEX', list, 0)
    if not id then return end
    redis.call('HINCRBY', KEYS[4], 'waiting', -1)
    if id == claiming then return end
    local key = delivery_prefix .. id
    local raw = redis.call('HGET', key, dest)
    local st = {status = 'pending', attempts = 0}
    if raw then st = cjson.decode(raw) end
    if not final[st.status] then
      st.order = lead
      redis.call('HSET', key, dest, cjson.encode(st))
      redis.call('EXPIRE', key, retention)
      redis.call('XADD', KEYS[1], '*', 'e', id, 'l', lead)
      redis.call('SADD', KEYS[7], dest)
      return
    end
    redis.call('LPOP', list)
  end
end

-- A delivery of the lead is final: if it is the head, the next one goes.
local function release(lead, id)
  local list = order_list(lead)
  if redis.call('LINDEX', list, 0) == id then
    redis.call('LPOP', list)
    promote(list, lead, nil)
  end
end

-- Whether a head is stale: its delivery final, or its state gone (erased, let go).
local function is_stale(id)
  local raw = redis.call('HGET', delivery_prefix .. id, dest)
  return not raw or final[cjson.decode(raw).status]
end

-- Whether `id` may be claimed now: 'go' (it is its lead's head, or the lead had none),
-- 'wait' (an earlier event of the lead goes first: `id` is in the list now), or 'over' (the
-- lead has too many waiting: `id` goes unordered).
local function turn(lead, id)
  local list = order_list(lead)
  local head = redis.call('LINDEX', list, 0)
  if head and head ~= id and is_stale(head) then
    redis.call('LPOP', list)
    promote(list, lead, id)
    head = redis.call('LINDEX', list, 0)
  end
  if not head then
    redis.call('RPUSH', list, id)
    return 'go'
  end
  if head == id then return 'go' end
  if redis.call('LPOS', list, id) then return 'wait' end  -- a second entry of a waiting one
  if redis.call('LLEN', list) > most_waiting then return 'over' end
  redis.call('RPUSH', list, id)
  redis.call('HINCRBY', KEYS[4], 'waiting', 1)
  return 'wait'
end

-- the outcomes
local confirmed = 0
for _, item in ipairs(cjson.decode(ARGV[11])) do
  local entry, id, state, outcome, at, err, retry_at = unpack(item)
  if entry ~= '' then  -- first what frees memory: Redis runs it at its limit too
    redis.call('XACK', KEYS[1], group, entry)
    redis.call('XDEL', KEYS[1], entry)
    confirmed = confirmed + 1
  end
  local delivery = delivery_prefix .. id
  local raw = redis.call('HGET', delivery, dest)
  local before = raw and cjson.decode(raw)
  local lead = before and before.order
  if outcome == 'gone' then
    redis.call('HDEL', delivery, dest)
  else
    if not (before and success[before.status]) then
      -- The state keeps naming its lead while the delivery waits for a retry.
      if lead then state = '{"order":"' .. lead .. '",' .. string.sub(state, 2) end
      redis.call('HSET', delivery, dest, state)   -- never downgrade a successful delivery
      redis.call('EXPIRE', delivery, retention)
    end
    if success[outcome] then
      redis.call('HINCRBY', KEYS[4], 'delivered', 1)
      redis.call('HSET', KEYS[4], 'consecutive_failures', 0, 'last_success_at', at)
    elseif outcome ~= 'deferred' then
      redis.call('HINCRBY', KEYS[4], 'failed', 1)
      redis.call('HINCRBY', KEYS[4], 'consecutive_failures', 1)
      redis.call('HSET', KEYS[4], 'last_error', err, 'last_error_at', at)
    end
    if outcome == 'dead' then redis.call('HINCRBY', KEYS[4], 'dead', 1) end
    if retry_at ~= '' then redis.call('ZADD', KEYS[5], retry_at, id .. '|' .. dest) end
  end
  if lead and final[outcome] then release(lead, id) end
end
if confirmed > 0 and redis.call('HINCRBY', KEYS[2], holder, -confirmed) < 0 then
  redis.call('HSET', KEYS[2], holder, 0)
end
if ARGV[12] ~= '' then
  local clock = redis.call('TIME')
  redis.call('XADD', KEYS[6], '*', 'v', clock[1] .. string.format('%06d', clock[2]),
             'r', ARGV[12])
end

-- the claim
local expired = redis.call('ZRANGEBYSCORE', KEYS[3], '-inf', now)
if #expired > 0 then  -- drainers whose worker died: their slots are free again
  redis.call('ZREM', KEYS[3], unpack(expired))
  redis.call('HDEL', KEYS[2], unpack(expired))
end
if tonumber(ARGV[8]) > 0 then
  redis.call('ZADD', KEYS[3], lease_until, holder)
else  -- recording only: extend a drainer's lease, never bring back one that has left
  redis.call('ZADD', KEYS[3], 'XX', lease_until, holder)
end
redis.call('EXPIRE', KEYS[3], 3600)
redis.call('EXPIRE', KEYS[2], 3600)
local used = 0
for _, n in ipairs(redis.call('HVALS', KEYS[2])) do used = used + tonumber(n) end
local want = math.min(tonumber(ARGV[8]), tonumber(ARGV[9]) - used)
local claimed, done, busy, gone, waiting, unordered = {}, 0, 0, 0, 0, 0
if want <= 0 then return {confirmed, used, claimed, done, busy, gone, waiting, unordered} end
local entries = {}
local reply = redis.call('XREADGROUP', 'GROUP', group, consumer, 'COUNT', want,
                         'STREAMS', KEYS[1], '>')
if reply then
  -- {{stream, entries}} from Redis; fakeredis (the unit layer) answers {stream, entries}
  if type(reply[1]) == 'table' then entries = reply[1][2] else entries = reply[2] end
  entries = entries or {}
end
if #entries < want and tonumber(ARGV[10]) > 0 then
  local reclaimed = redis.call('XAUTOCLAIM', KEYS[1], group, consumer, ARGV[10], '0-0',
                               'COUNT', want - #entries)
  for _, item in ipairs(reclaimed[2] or {}) do table.insert(entries, item) end
end
local function finish(entry)
  redis.call('XACK', KEYS[1], group, entry)
  redis.call('XDEL', KEYS[1], entry)
end
for _, item in ipairs(entries) do
  local entry, fields = item[1], item[2]
  local id = fields and fields[2]
  local lead = fields and fields[3] == 'l' and fields[4] or nil
  if not id then
    finish(entry)  -- an entry deleted while pending
    gone = gone + 1
  else
    local key = delivery_prefix .. id
    local raw = redis.call('HGET', key, dest)
    local st = {status = 'pending', attempts = 0}
    if raw then st = cjson.decode(raw) end
    lead = lead or st.order
    local go = 'go'
    if success[st.status] or st.status == 'dead' then
      finish(entry)
      done = done + 1
    elseif st.status == 'inflight' and tonumber(st.lease_until) > now then
      -- another drainer is sending it (or died doing so): look again after its lease
      redis.call('ZADD', KEYS[5], tonumber(st.lease_until) + 1, id .. '|' .. dest)
      finish(entry)
      busy = busy + 1
    else
      if lead then go = turn(lead, id) end
      if go == 'wait' then
        finish(entry)  -- its lead's list holds it until its turn
        waiting = waiting + 1
      else
        st.order = nil
        if go == 'over' then unordered = unordered + 1 else st.order = lead end
        -- An expired lease on an inflight delivery: the attempt that took it never
        -- confirmed (its worker died, or gave up at the time limit). Counted, so that a
        -- delivery that kills its worker every time becomes a dead letter.
        if st.status == 'inflight' then st.crashes = (st.crashes or 0) + 1 end
        st.attempts = st.attempts + 1
        st.status = 'inflight'
        st.lease_until = lease_until
        st.updated_at = now
        redis.call('HSET', key, dest, cjson.encode(st))
        redis.call('EXPIRE', key, retention)
        local known = 0
        if raw then known = 1 end
        -- The payload, while Redis holds it; once its event is in the database, the caller
        -- reads it from there.
        local event = redis.call('HGET', event_prefix .. id, 'event') or ''
        table.insert(claimed, {entry, id, st.attempts, st.crashes or 0, event, known})
      end
    end
  end
end
if #claimed > 0 then redis.call('HINCRBY', KEYS[2], holder, #claimed) end
return {confirmed, used, claimed, done, busy, gone, waiting, unordered}
