-- After the history writer's commit: remove its entries from the history stream; forget the
-- payloads and dedupe markers of the events the database now holds (admission finds them
-- there), and the states of deliveries that are final (the database has them; a delivery
-- still pending or in flight keeps its state). It only deletes, so Redis runs it at its
-- memory limit too.
-- KEYS: history stream
-- ARGV: entry ids (JSON), event record and dedupe marker keys (JSON), [delivery state key,
--       destination] pairs of final deliveries (JSON)
for _, id in ipairs(cjson.decode(ARGV[1])) do redis.call('XDEL', KEYS[1], id) end
for _, key in ipairs(cjson.decode(ARGV[2])) do redis.call('DEL', key) end
local final = {delivered = true, skipped = true, dead = true}
for _, item in ipairs(cjson.decode(ARGV[3])) do
  local raw = redis.call('HGET', item[1], item[2])
  if raw then
    local ok, state = pcall(cjson.decode, raw)
    if ok and final[state.status] then redis.call('HDEL', item[1], item[2]) end
  end
end
return 1
