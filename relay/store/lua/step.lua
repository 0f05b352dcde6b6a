-- One drainer's round trip: record the outcomes of the deliveries that finished, then claim
-- the next ones, within the destination's concurrency (the sum of what its drainers hold in
-- flight stays <= the limit). Either part may be empty: the confirm of a batch acknowledges its
-- lane entries and gives back their slots, all of it or nothing; the claim reads the lane and
-- takes each delivery with a lease (a second claimant is told busy or done).
-- KEYS: lane stream, in-flight hash, drainers zset, stats hash, recent delivered / retrying /
--       dead zsets, dead letters hash, dead letters index, scheduled zset
-- ARGV: group, consumer, holder, destination, now, lease until, retention s, log cap,
--       recent cap, want, limit, reclaim idle ms (0: new entries only), outcomes: a JSON array
--       of [entry, event id, state json, attempt json, outcome, time, error, listed status,
--       dead letter json ('' if none), retry due time ('' if none)], then the key prefixes:
--       event record, delivery hash, attempts log
-- Answers {confirmed, in flight before the claim, {claimed: entry, event id, attempts,
--          crashes, event json}..., done count, busy count, gone count}
local group, consumer, holder, dest = ARGV[1], ARGV[2], ARGV[3], ARGV[4]
local now, lease_until, retention = tonumber(ARGV[5]), tonumber(ARGV[6]), ARGV[7]
local log_cap, recent_cap = tonumber(ARGV[8]), tonumber(ARGV[9])
local event_prefix, delivery_prefix, log_prefix = ARGV[14], ARGV[15], ARGV[16]
local statuses = {'delivered', 'retrying', 'dead'}

-- the outcomes
local confirmed = 0
for _, item in ipairs(cjson.decode(ARGV[13])) do
  local entry, id, state, attempt, outcome, at, err, listed, letter, retry_at = unpack(item)
  local delivery, log = delivery_prefix .. id, log_prefix .. id
  local raw = redis.call('HGET', delivery, dest)
  if not (raw and cjson.decode(raw).status == 'delivered') then
    redis.call('HSET', delivery, dest, state)   -- never downgrade a confirmed delivery
    redis.call('EXPIRE', delivery, retention)
  end
  redis.call('RPUSH', log, attempt)
  redis.call('LTRIM', log, -log_cap, -1)
  redis.call('EXPIRE', log, retention)
  if outcome == 'delivered' or outcome == 'skipped' then
    redis.call('HINCRBY', KEYS[4], 'delivered', 1)
    redis.call('HSET', KEYS[4], 'consecutive_failures', 0, 'last_success_at', at)
  else
    redis.call('HINCRBY', KEYS[4], 'failed', 1)
    redis.call('HINCRBY', KEYS[4], 'consecutive_failures', 1)
    redis.call('HSET', KEYS[4], 'last_error', err, 'last_error_at', at)
  end
  if retry_at ~= '' then
    redis.call('ZADD', KEYS[10], retry_at, id .. '|' .. dest)
  end
  if outcome == 'dead' then
    redis.call('HINCRBY', KEYS[4], 'dead', 1)
    redis.call('HSET', KEYS[8], id .. '|' .. dest, letter)
    redis.call('ZADD', KEYS[9], at, id .. '|' .. dest)
  end
  for s = 1, 3 do
    local recent = KEYS[4 + s]
    if statuses[s] == listed then
      redis.call('ZADD', recent, at, id)
      redis.call('ZREMRANGEBYRANK', recent, 0, -recent_cap - 1)
      redis.call('EXPIRE', recent, retention)
    else
      redis.call('ZREM', recent, id)
    end
  end
  if entry ~= '' then
    redis.call('XACK', KEYS[1], group, entry)
    redis.call('XDEL', KEYS[1], entry)
    confirmed = confirmed + 1
  end
end
if confirmed > 0 and redis.call('HINCRBY', KEYS[2], holder, -confirmed) < 0 then
  redis.call('HSET', KEYS[2], holder, 0)
end

-- the claim
local expired = redis.call('ZRANGEBYSCORE', KEYS[3], '-inf', now)
if #expired > 0 then  -- drainers whose worker died: their slots are free again
  redis.call('ZREM', KEYS[3], unpack(expired))
  redis.call('HDEL', KEYS[2], unpack(expired))
end
if tonumber(ARGV[10]) > 0 then
  redis.call('ZADD', KEYS[3], lease_until, holder)
else  -- recording only: extend a drainer's lease, never bring back one that has left
  redis.call('ZADD', KEYS[3], 'XX', lease_until, holder)
end
redis.call('EXPIRE', KEYS[3], 3600)
redis.call('EXPIRE', KEYS[2], 3600)
local used = 0
for _, n in ipairs(redis.call('HVALS', KEYS[2])) do used = used + tonumber(n) end
local want = math.min(tonumber(ARGV[10]), tonumber(ARGV[11]) - used)
local claimed, done, busy, gone = {}, 0, 0, 0
if want <= 0 then return {confirmed, used, claimed, done, busy, gone} end
local entries = {}
local reply = redis.call('XREADGROUP', 'GROUP', group, consumer, 'COUNT', want,
                         'STREAMS', KEYS[1], '>')
if reply then
  -- {{stream, entries}} from Redis; fakeredis (the unit layer) answers {stream, entries}
  if type(reply[1]) == 'table' then entries = reply[1][2] else entries = reply[2] end
  entries = entries or {}
end
if #entries < want and tonumber(ARGV[12]) > 0 then
  local stale = redis.call('XAUTOCLAIM', KEYS[1], group, consumer, ARGV[12], '0-0',
                           'COUNT', want - #entries)
  for _, item in ipairs(stale[2] or {}) do table.insert(entries, item) end
end
local function finish(entry)
  redis.call('XACK', KEYS[1], group, entry)
  redis.call('XDEL', KEYS[1], entry)
end
for _, item in ipairs(entries) do
  local entry, fields = item[1], item[2]
  local id = fields and fields[2]
  local event = id and redis.call('HGET', event_prefix .. id, 'event')
  if not event then
    finish(entry)  -- erased, expired, or an entry deleted while pending
    gone = gone + 1
  else
    local key = delivery_prefix .. id
    local raw = redis.call('HGET', key, dest)
    local st = {status = 'pending', attempts = 0}
    if raw then st = cjson.decode(raw) end
    if st.status == 'delivered' or st.status == 'dead' then
      finish(entry)
      done = done + 1
    elseif st.status == 'inflight' and tonumber(st.lease_until) > now then
      -- another drainer is sending it (or died doing so): look again after its lease
      redis.call('ZADD', KEYS[10], tonumber(st.lease_until) + 1, id .. '|' .. dest)
      finish(entry)
      busy = busy + 1
    else
      -- An expired lease on an inflight delivery: the attempt that took it never confirmed
      -- (its worker died, or gave up at the time limit). Counted, so that a delivery that
      -- kills its worker every time becomes a dead letter.
      if st.status == 'inflight' then st.crashes = (st.crashes or 0) + 1 end
      st.attempts = st.attempts + 1
      st.status = 'inflight'
      st.lease_until = lease_until
      st.updated_at = now
      redis.call('HSET', key, dest, cjson.encode(st))
      redis.call('EXPIRE', key, retention)
      table.insert(claimed, {entry, id, st.attempts, st.crashes or 0, event})
    end
  end
end
if #claimed > 0 then redis.call('HINCRBY', KEYS[2], holder, #claimed) end
return {confirmed, used, claimed, done, busy, gone}
