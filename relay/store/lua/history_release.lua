-- After the history writer's commit: remove its entries from the history stream; let the
-- payloads and dedupe markers of the events the database now holds go (admission finds them
-- there) within a short grace (their deliveries, claimed in the next seconds, still read them
-- here), and forget the states of deliveries that are final (the database has them; a
-- delivery still pending or in flight keeps its state). It only deletes and shortens expiries,
-- so Redis runs it at its memory limit too.
-- KEYS: history stream
-- ARGV: entry ids (JSON), event record and dedupe marker keys (JSON), [delivery state key,
--       destination] pairs of final deliveries (JSON), the grace in ms
for _, id in ipairs(cjson.decode(ARGV[1])) do redis.call('XDEL', KEYS[1], id) end
local grace = tonumber(ARGV[4])
for _, key in ipairs(cjson.decode(ARGV[2])) do
  local ttl = redis.call('PTTL', key)  -- -1: no expiry, -2: gone
  if grace <= 0 then
    redis.call('DEL', key)
  elseif ttl == -1 or ttl > grace then
    redis.call('PEXPIRE', key, grace)
  end
end
local final = {delivered = true, skipped = true, dead = true}
for _, item in ipairs(cjson.decode(ARGV[3])) do
  local raw = redis.call('HGET', item[1], item[2])
  if raw then
    local ok, state = pcall(cjson.decode, raw)
    if ok and final[state.status] then redis.call('HDEL', item[1], item[2]) end
  end
end
return 1
