"""Gates run before each delivery attempt (see :class:`relay.delivery.Gate`): pause / resume, the
circuit breaker and the per-destination rate limit. All their state is in Redis, so every worker
process agrees, and each check is one Lua script (one round trip, atomic across workers).

A held delivery is parked in the scheduler's due-time set like a retry. The scheduler releases
by due time, so a gate gives the deliveries it holds *strictly increasing* due times in arrival
order (a per-destination, per-gate "last due" register bumped by a millisecond): when they come
back they come back in the order they arrived.

Keys (all under ``relay:``):

=============================  ===========================================================
``paused``                     hash: destination -> JSON {paused_at, reason}
``circuit:<destination>``      hash: state (closed | open), reopen_at, reason, the success
                               and failure totals seen at the last probe, the failure-rate
                               window's start and totals
``circuit:<destination>:probe``  the half-open probe lease (``SET NX PX``): one worker probes
``rate:<destination>:<n>``     deliveries in fixed window ``n`` (expires after two windows)
``gate:<gate>:<destination>``  the last due time handed out (ordering register)
=============================  ===========================================================

The breaker reads the counters :class:`relay.store.DeliveryStore` already keeps in
``stats:<destination>`` (``consecutive_failures``, ``delivered``, ``failed``), so closing it on
success and counting failures needs nothing from the delivery code.
"""

from __future__ import annotations

import base64
import json
import logging
import math
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import redis

from relay.delivery import Gate
from relay.metrics import metrics_for
from relay.models import Destination
from relay.store import PREFIX, delivery_key, stats_key
from relay.taskqueue import DELIVER, QUEUE, SCHEDULED_KEY

log = logging.getLogger("relay.gates")

PAUSED_KEY = PREFIX + "paused"
ORDER_STEP = 0.001  # seconds between consecutive held deliveries of one destination

Clock = Callable[[], float]

# Shared by the scripts below: the next due time for a held delivery, never earlier than the
# last one handed out for this destination (KEYS[order]), so arrival order survives the wait.
_ORDERED = """
local function ordered(key, due, now)
  local last = tonumber(redis.call('GET', key) or '0')
  if due < last + STEP then due = last + STEP end
  local ttl = math.floor((due - now + 3600) * 1000)
  local text = string.format('%.6f', due)
  redis.call('SET', key, text, 'PX', ttl)
  return text
end
""".replace("STEP", repr(ORDER_STEP))

# KEYS: paused hash, order key; ARGV: destination, now, recheck seconds
_PAUSE = _ORDERED + """
if redis.call('HEXISTS', KEYS[1], ARGV[1]) == 0 then return false end
local now = tonumber(ARGV[2])
return ordered(KEYS[2], now + tonumber(ARGV[3]), now)
"""

# KEYS: circuit hash, probe lease, stats hash, order key
# ARGV: now, threshold, cooldown, probe ttl, probe wait, window, failure rate, min volume
_CIRCUIT = _ORDERED + """
local now = tonumber(ARGV[1])
local c = redis.call('HMGET', KEYS[1], 'state', 'reopen_at', 'probe_ok', 'probe_failed',
                     'win_start', 'win_ok', 'win_failed')
local s = redis.call('HMGET', KEYS[3], 'consecutive_failures', 'delivered', 'failed')
local cf = tonumber(s[1] or '0')
local ok = tonumber(s[2] or '0')
local failed = tonumber(s[3] or '0')
local cooldown = tonumber(ARGV[3])

local function open(reason)
  redis.call('HSET', KEYS[1], 'state', 'open', 'opened_at', ARGV[1], 'reason', reason,
             'reopen_at', string.format('%.6f', now + cooldown))
  redis.call('DEL', KEYS[2])
  return {'opened', ordered(KEYS[4], now + cooldown, now)}
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
  return {'open', ordered(KEYS[4], reopen_at, now)}
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
return {'half-open', ordered(KEYS[4], now + tonumber(ARGV[5]), now)}
"""

# KEYS: window counter; ARGV: limit, window end, per seconds, ttl ms
_RATE = """
local n = redis.call('INCR', KEYS[1])
if n == 1 then redis.call('PEXPIRE', KEYS[1], ARGV[4]) end
local limit = tonumber(ARGV[1])
if n <= limit then return false end
-- The k-th delivery over the limit waits for the slot it would get if later windows were
-- empty: spread at the allowed rate instead of all retrying at the next window's start.
local due = tonumber(ARGV[2]) + (n - limit - 1) * tonumber(ARGV[3]) / limit
return string.format('%.6f', due)
"""


def _order_key(gate: str, destination: str) -> str:
    return f"{PREFIX}gate:{gate}:{destination}"


def circuit_key(destination: str) -> str:
    return f"{PREFIX}circuit:{destination}"


def _held(client: redis.Redis, gate: str, destination: str,
          due: bytes | str | None) -> float | None:
    """The due time a script answered (None: go ahead), counted in the metrics when held."""
    if not due:
        return None
    metrics_for(client).inc("deliveries_held", {"destination": destination, "gate": gate})
    return float(due.decode() if isinstance(due, bytes) else due)


class PauseGate:
    """Holds every delivery of a paused destination until it is resumed.

    Held deliveries are parked ``recheck`` seconds ahead (one hour): :meth:`resume` brings them
    forward at once; a delivery parked in the instant between a resume and its own check comes
    back after at most ``recheck`` instead of never."""

    name = "pause"

    def __init__(self, client: redis.Redis, recheck: float = 3600.0,
                 clock: Clock = time.time, snapshot_ttl: float = 0.0) -> None:
        self.redis = client
        self.recheck = recheck
        self.clock = clock
        self._script = client.register_script(_PAUSE)
        # Workers pass ``snapshot_ttl``: the set of paused names is read at most that often,
        # so a delivery to an unpaused destination costs no round trip; a pause then takes
        # effect within ``snapshot_ttl`` seconds.
        self.snapshot_ttl = snapshot_ttl
        self._snapshot: tuple[float, frozenset[bytes]] = (float("-inf"), frozenset())

    def _maybe_paused(self, destination: str) -> bool:
        if self.snapshot_ttl <= 0:
            return True
        now = time.monotonic()
        taken, paused = self._snapshot
        if now - taken >= self.snapshot_ttl:
            paused = frozenset(self.redis.hkeys(PAUSED_KEY))
            self._snapshot = (now, paused)
        return destination.encode() in paused

    def attempted(self, destination: Destination, succeeded: bool) -> None:
        pass

    def hold_until(self, destination: Destination) -> float | None:
        if not self._maybe_paused(destination.name):
            return None
        due = self._script(keys=[PAUSED_KEY, _order_key(self.name, destination.name)],
                           args=[destination.name, self.clock(), self.recheck])
        return _held(self.redis, self.name, destination.name, due)

    def pause(self, destination: str, reason: str = "") -> None:
        self.redis.hset(PAUSED_KEY, destination,
                        json.dumps({"paused_at": self.clock(), "reason": reason}))
        log.warning("destination paused", extra={"destination": destination, "reason": reason})

    def paused(self) -> dict[str, dict[str, object]]:
        return {k.decode(): json.loads(v) for k, v in self.redis.hgetall(PAUSED_KEY).items()}

    def resume(self, destination: str) -> int:
        """Unpause and release the destination's held deliveries now, oldest first. A delivery
        waiting out a retry delay keeps its due time. Returns how many were released."""
        self.redis.hdel(PAUSED_KEY, destination)
        self.redis.delete(_order_key(self.name, destination))
        now = self.clock()
        held = [p for p in parked_deliveries(self.redis) if p.destination == destination]
        if not held:
            return 0
        pipe = self.redis.pipeline(transaction=False)
        for p in held:
            pipe.hget(delivery_key(p.event_id), destination)
        states = pipe.execute()
        due: list[ParkedDelivery] = []
        for parked, raw in zip(held, states, strict=True):
            state = json.loads(raw) if raw else {}
            waiting = state.get("status") == "retrying" and state.get("next_attempt_at")
            if not waiting or float(waiting) <= now:
                due.append(parked)
        due.sort(key=lambda p: p.due)
        # Scores just below now, in the original order; XX so a message the scheduler has
        # already moved to the queue is not added back (it would be delivered twice).
        scores = {p.message: now - (len(due) - i) * ORDER_STEP for i, p in enumerate(due)}
        if scores:
            self.redis.zadd(SCHEDULED_KEY, scores, xx=True)
        log.warning("destination resumed", extra={"destination": destination,
                                                  "released": len(scores)})
        return len(scores)


@dataclass(frozen=True)
class CircuitPolicy:
    threshold: int = 10  # consecutive failures that open the circuit
    cooldown: float = 60.0  # open this long before one probe is let through
    probe_wait: float = 5.0  # how long others wait for the probe's answer before looking again
    window: float = 60.0  # failure-rate window
    failure_rate: float = 0.5  # open when this share of the window's attempts failed ...
    min_volume: int = 20  # ... and the window has at least this many attempts


class CircuitBreaker:
    """Closed → open (after ``threshold`` consecutive failures or a failure rate over the
    window) → after ``cooldown`` half-open: one worker wins the probe lease and sends; a success
    since the probe began closes the circuit, a failure opens it for another cool-down."""

    name = "circuit"

    def __init__(self, client: redis.Redis, policy: CircuitPolicy | None = None,
                 clock: Clock = time.time, snapshot_ttl: float = 0.0) -> None:
        self.redis = client
        self.policy = policy or CircuitPolicy()
        self.clock = clock
        self._script = client.register_script(_CIRCUIT)
        # Workers pass ``snapshot_ttl``: after the script said "go", this process lets a
        # destination's deliveries through without asking again for that long, as long as
        # each of its own attempts succeeds. A failure here, or the time running out, sends
        # the next delivery through the script, so a circuit that other workers opened stops
        # this one after at most ``snapshot_ttl`` seconds of successes or one failure.
        self.snapshot_ttl = snapshot_ttl
        self._healthy: dict[str, float] = {}  # destination -> monotonic time of the last "go"

    def attempted(self, destination: Destination, succeeded: bool) -> None:
        if not succeeded:
            self._healthy.pop(destination.name, None)

    def hold_until(self, destination: Destination) -> float | None:
        p = self.policy
        name = destination.name
        if self.snapshot_ttl > 0:
            now = time.monotonic()
            if now - self._healthy.get(name, -math.inf) < self.snapshot_ttl:
                return None
        action, due = self._script(
            keys=[circuit_key(name), circuit_key(name) + ":probe", stats_key(name),
                  _order_key(self.name, name)],
            args=[self.clock(), p.threshold, p.cooldown, destination.timeout * 2 + 10,
                  p.probe_wait, p.window, p.failure_rate, p.min_volume],
        )
        action = action.decode()
        if action == "opened":
            log.error("circuit opened", extra={"destination": name})
        elif action == "closed":
            log.warning("circuit closed", extra={"destination": name})
        elif action == "probe":
            log.info("circuit half-open: probing", extra={"destination": name})
        if action == "go" and self.snapshot_ttl > 0:
            self._healthy[name] = now
        return _held(self.redis, self.name, name, due)

    def state(self, destination: str) -> str:
        """``closed``, ``open`` or ``half-open`` (open, cool-down over, waiting for a probe)."""
        state, reopen_at = self.redis.hmget(circuit_key(destination), "state", "reopen_at")
        if state != b"open":
            return "closed"
        return "open" if self.clock() < float(reopen_at or 0) else "half-open"

    def reset(self, destination: str) -> None:
        self.redis.delete(circuit_key(destination), circuit_key(destination) + ":probe")


class RateLimitGate:
    """``rate_limit: 20/s``: a fixed-window counter per destination shared by all workers;
    deliveries over the limit are parked until their slot in a later window."""

    name = "rate"

    def __init__(self, client: redis.Redis, clock: Clock = time.time) -> None:
        self.redis = client
        self.clock = clock
        self._script = client.register_script(_RATE)

    def attempted(self, destination: Destination, succeeded: bool) -> None:
        pass

    def hold_until(self, destination: Destination) -> float | None:
        limit = destination.rate_limit
        if limit is None:
            return None
        per = limit.per_seconds
        window = math.floor(self.clock() / per)
        due = self._script(
            keys=[f"{PREFIX}rate:{destination.name}:{window}"],
            args=[limit.count, (window + 1) * per, per, int(per * 2000) + 1000],
        )
        return _held(self.redis, self.name, destination.name, due)


def default_gates(client: redis.Redis, snapshot_ttl: float = 0.0) -> tuple[Gate, ...]:
    """The gates every worker runs, in order: a paused destination is not even counted
    against its circuit or its rate. With ``snapshot_ttl``, the pause and circuit gates skip
    their round trip for a destination that was neither paused nor failing that recently."""
    return (PauseGate(client, snapshot_ttl=snapshot_ttl),
            CircuitBreaker(client, snapshot_ttl=snapshot_ttl), RateLimitGate(client))


def destination_state(client: redis.Redis, destination: str, clock: Clock = time.time) -> str:
    """``paused``, ``open``, ``half-open`` or ``active``."""
    if client.hexists(PAUSED_KEY, destination):
        return "paused"
    state = CircuitBreaker(client, clock=clock).state(destination)
    return "active" if state == "closed" else state


# -- reading parked and queued task messages ---------------------------------------------------


@dataclass(frozen=True)
class ParkedDelivery:
    message: bytes
    due: float
    event_id: str
    destination: str


def decode_task(message: bytes | str) -> tuple[str, list[object]] | None:
    """(task name, args) of a kombu message as :mod:`relay.taskqueue` writes it; None for
    anything else."""
    try:
        envelope = json.loads(message)
        args = json.loads(base64.b64decode(envelope["body"]))[0]
        return str(envelope["headers"]["task"]), list(args)
    except (ValueError, KeyError, TypeError, IndexError):
        return None


def parked_deliveries(client: redis.Redis) -> Iterator[ParkedDelivery]:
    """Every ``relay.deliver`` task in the scheduler's set (ZSCAN: never blocks Redis)."""
    for message, score in client.zscan_iter(SCHEDULED_KEY, count=1000):
        task = decode_task(message)
        if task is not None and task[0] == DELIVER and len(task[1]) >= 2:
            yield ParkedDelivery(message, float(score), str(task[1][0]), str(task[1][1]))


def queued_tasks(client: redis.Redis, queue: str = QUEUE, limit: int = 100_000,
                 ) -> Iterator[tuple[bytes, str, list[object]]]:
    """(message, task name, args) of the tasks waiting in the queue, up to ``limit``."""
    for start in range(0, limit, 1000):
        chunk = client.lrange(queue, start, start + 999)
        for message in chunk:
            task = decode_task(message)
            if task is not None:
                yield message, task[0], task[1]
        if len(chunk) < 1000:
            return
