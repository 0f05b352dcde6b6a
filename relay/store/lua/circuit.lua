-- The circuit breaker's check before a drainer reads more of a lane (relay.delivery.gates).
-- It first adds the health outcomes this process saw since its last check (a health failure:
-- no answer, 5xx, 401/403/404/408/410; a health success: any other answer), then decides.
-- KEYS: circuit hash, probe lease
-- ARGV: now, successes, failures, failures since this process's last success (its tail),
--       when the tail began ('' if none), threshold, open after s, cooldown s, probe ttl s,
--       probe wait s, want, step s, close at (a slowed budget that closes the circuit)
-- Answers {action, hold until ('' to go ahead), granted}: go, opened, open, probe, half-open,
-- slowed, closed.
local now = tonumber(ARGV[1])
local d_ok, d_failed, tail = tonumber(ARGV[2]), tonumber(ARGV[3]), tonumber(ARGV[4])
local threshold, open_after = tonumber(ARGV[6]), tonumber(ARGV[7])
local cooldown, want, step = tonumber(ARGV[8]), tonumber(ARGV[11]), tonumber(ARGV[12])
local c = redis.call('HMGET', KEYS[1], 'state', 'reopen_at', 'ok', 'failed', 'run', 'run_since',
                     'probe_ok', 'probe_failed', 'budget', 'step_at', 'step_granted', 'step_ok',
                     'step_failed')
local state = c[1] or 'closed'
local ok = tonumber(c[3] or '0') + d_ok
local failed = tonumber(c[4] or '0') + d_failed
-- The run: health failures since the last health success, and when the first of them came.
local run, run_since = tonumber(c[5] or '0'), c[6]
if d_ok > 0 then
  run = tail
  if tail > 0 then run_since = ARGV[5] else run_since = false end
elseif d_failed > 0 then
  run = run + d_failed
  if not run_since then run_since = ARGV[5] end
end
if d_ok > 0 or d_failed > 0 then
  redis.call('HSET', KEYS[1], 'ok', ok, 'failed', failed, 'run', run)
  if run_since then
    redis.call('HSET', KEYS[1], 'run_since', run_since)
  else
    redis.call('HDEL', KEYS[1], 'run_since')
  end
end

local SLOW = {'budget', 'step_at', 'step_granted', 'step_ok', 'step_failed'}

-- Nothing healthy for open_after seconds, and at least threshold failures in that time.
local function failing()
  return run >= threshold and run_since and now - tonumber(run_since) >= open_after
end

local function open(reason)
  local until_ = string.format('%.17g', now + cooldown)
  redis.call('HSET', KEYS[1], 'state', 'open', 'opened_at', ARGV[1], 'reason', reason,
             'reopen_at', until_)
  redis.call('HDEL', KEYS[1], 'probe_ok', 'probe_failed', unpack(SLOW))
  redis.call('DEL', KEYS[2])
  return {'opened', until_, 0}
end

local function slowed(budget, step_at, granted, step_ok, step_failed)
  if now >= step_at + step then
    -- The last step: more failures than successes halve the budget; otherwise a budget that
    -- held nothing back closes the circuit, one that was used up (with a success) doubles.
    local s_ok, s_failed = ok - step_ok, failed - step_failed
    local close = false
    if s_failed > s_ok then
      budget = math.max(1, math.floor(budget / 2))
    elseif granted < budget then
      close = true
    elseif s_ok > 0 then
      budget = budget * 2
      close = budget >= tonumber(ARGV[13])
    end
    if close then
      redis.call('HSET', KEYS[1], 'state', 'closed')
      redis.call('HDEL', KEYS[1], 'reopen_at', 'opened_at', 'reason', unpack(SLOW))
      return {'closed', '', want}
    end
    step_at, granted, step_ok, step_failed = now, 0, ok, failed
  end
  local grant = math.max(0, math.min(want, budget - granted))
  redis.call('HSET', KEYS[1], 'state', 'slowed', 'budget', budget, 'step_at',
             string.format('%.17g', step_at), 'step_granted', granted + grant, 'step_ok', step_ok,
             'step_failed', step_failed)
  if grant < want then
    return {'slowed', string.format('%.17g', step_at + step), grant}
  end
  return {'slowed', '', grant}
end

local function reason()
  return string.format('%d failures in a row over %ds', run, now - tonumber(run_since))
end

if state == 'closed' then
  if failing() then return open(reason()) end
  return {'go', '', want}
end

if state == 'slowed' then
  if failing() then return open(reason()) end
  return slowed(tonumber(c[9]), tonumber(c[10]), tonumber(c[11]), tonumber(c[12]),
                tonumber(c[13]))
end

-- open
if now < tonumber(c[2] or '0') then
  return {'open', c[2], 0}
end
-- Half-open: has the probe (or anything since the last probe began) answered?
if c[7] and ok > tonumber(c[7]) then
  redis.call('HDEL', KEYS[1], 'probe_ok', 'probe_failed')
  redis.call('DEL', KEYS[2])
  return slowed(2, now, 0, ok, failed)  -- the probe (one) succeeded: a step of two
end
if c[8] and failed > tonumber(c[8]) then
  return open('the probe failed')
end
if redis.call('SET', KEYS[2], ARGV[1], 'NX', 'PX', math.floor(tonumber(ARGV[9]) * 1000)) then
  redis.call('HSET', KEYS[1], 'probe_ok', ok, 'probe_failed', failed)
  return {'probe', '', math.min(want, 1)}
end
return {'half-open', string.format('%.17g', now + tonumber(ARGV[10])), 0}
