-- The circuit breaker's check before a drainer reads more of a lane.
-- KEYS: circuit hash, probe lease, stats hash
-- ARGV: now, threshold, cooldown, probe ttl, probe wait, window, failure rate, min volume
-- Answers {action, hold until ('' to go ahead)}: go, opened, open, probe, closed, half-open.
local now = tonumber(ARGV[1])
local c = redis.call('HMGET', KEYS[1], 'state', 'reopen_at', 'probe_ok', 'probe_failed',
                     'win_start', 'win_ok', 'win_failed')
local s = redis.call('HMGET', KEYS[3], 'consecutive_failures', 'delivered', 'failed')
local cf = tonumber(s[1] or '0')
local ok = tonumber(s[2] or '0')
local failed = tonumber(s[3] or '0')
local cooldown = tonumber(ARGV[3])

local function open(reason)
  local until_ = string.format('%.6f', now + cooldown)
  redis.call('HSET', KEYS[1], 'state', 'open', 'opened_at', ARGV[1], 'reason', reason,
             'reopen_at', until_)
  redis.call('DEL', KEYS[2])
  return {'opened', until_}
end

if c[1] ~= 'open' then
  if cf >= tonumber(ARGV[2]) then
    return open(cf .. ' consecutive failures')
  end
  local ws = tonumber(c[5] or '0')
  if now - ws >= tonumber(ARGV[6]) then
    redis.call('HSET', KEYS[1], 'state', 'closed', 'win_start', ARGV[1], 'win_ok', ok,
               'win_failed', failed)
  else
    local d_ok = ok - tonumber(c[6] or '0')
    local d_failed = failed - tonumber(c[7] or '0')
    local total = d_ok + d_failed
    if total >= tonumber(ARGV[8]) and d_failed / total >= tonumber(ARGV[7]) then
      return open(string.format('failure rate %d/%d', d_failed, total))
    end
  end
  return {'go', ''}
end

local reopen_at = tonumber(c[2] or '0')
if now < reopen_at then
  return {'open', c[2]}
end
-- Half-open: has the probe (or anything since the last probe began) answered?
if c[3] and ok > tonumber(c[3]) then
  redis.call('HSET', KEYS[1], 'state', 'closed', 'win_start', ARGV[1], 'win_ok', ok,
             'win_failed', failed)
  redis.call('HDEL', KEYS[1], 'reopen_at', 'probe_ok', 'probe_failed', 'opened_at', 'reason')
  redis.call('DEL', KEYS[2])
  return {'closed', ''}
end
if c[4] and failed > tonumber(c[4]) then
  redis.call('HDEL', KEYS[1], 'probe_ok', 'probe_failed')
  return open('the probe failed')
end
if redis.call('SET', KEYS[2], ARGV[1], 'NX', 'PX', math.floor(tonumber(ARGV[4]) * 1000)) then
  redis.call('HSET', KEYS[1], 'probe_ok', ok, 'probe_failed', failed)
  return {'probe', ''}
end
return {'half-open', string.format('%.6f', now + tonumber(ARGV[5]))}
