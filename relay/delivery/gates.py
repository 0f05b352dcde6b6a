"""Gates decide, before a drainer reads more of a lane, how many deliveries may go now:
pause / resume, the circuit breaker and the per-destination rate limit. All their state is in
Redis, so every worker process agrees, and each check is one Lua script (one round trip,
atomic across workers).

A gate never takes a delivery out of its lane: it *holds the lane* (the drainer stops reading
it and the sweep leaves it alone until the hold's time), so held deliveries keep their order
and come back by themselves, a resumed or closed destination's oldest first.

Their keys (``relay:paused``, ``relay:circuit:<destination>`` and its ``:probe`` lease,
``relay:rate:<destination>:<window>``) are listed in :mod:`relay.store.keys`, their scripts are
``circuit.lua`` and ``rate.lua`` in ``relay/store/lua/``.

The breaker judges a destination by what its attempts say about *it* (:func:`health`), not
about one payload: the drainer tells each gate every answer (:meth:`Gate.attempted`), the
breaker tallies them in the process and adds them to the destination's totals in Redis with its
next check (one round trip it makes anyway).
"""

from __future__ import annotations

import json
import logging
import math
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import redis

from relay.core.errors import DeliveryError, RetryableDeliveryError, UnsafeURLError
from relay.core.models import LEASE_MARGIN, DeliveryResult, Destination
from relay.observability.metrics import metrics_for
from relay.store.keys import (
    PAUSED_KEY,
    circuit_key,
    hold_key,
    lane_key,
    probe_key,
    rate_key,
)
from relay.store.scripts import register

log = logging.getLogger("relay.gates")

Clock = Callable[[], float]


class Gate(Protocol):
    """Decides how many of a lane's deliveries may be attempted now."""

    name: str

    def allow(self, destination: Destination, want: int) -> tuple[int, float | None]:
        """How many of ``want`` deliveries may go now and, when fewer, the epoch time until
        which the lane is held (None: ask again at the next read)."""
        ...

    def attempted(self, destination: Destination, answer: object) -> None:
        """Told what each attempt this process made got back: the driver's
        :class:`~relay.core.models.DeliveryResult` or the error it raised."""
        ...

    def reads_outcomes(self, destination: Destination) -> bool:
        """Whether the next :meth:`allow` would read what recorded outcomes change: then the
        drainer records its outcomes before it asks, instead of with its next claim."""
        ...


def _held(client: redis.Redis, gate: str, destination: str, refused: int) -> None:
    if refused > 0:
        metrics_for(client).inc("deliveries_held", {"destination": destination, "gate": gate},
                                refused)


class PauseGate:
    """Holds a paused destination's lane until it is resumed.

    The hold lasts ``recheck`` seconds (ten): :meth:`resume` lifts it at once, and a drainer
    that saw the pause just before the resume (its hold is written as it leaves) holds the lane
    ten seconds at most, not until somebody looks. A paused lane costs a drain task that finds
    it paused every ``recheck`` seconds. The snapshot of paused names is only trusted to say
    "not paused": a pause it shows is read again before the lane is held."""

    name = "pause"

    def __init__(self, client: redis.Redis, recheck: float = 10.0,
                 clock: Clock = time.time, snapshot_ttl: float = 0.0) -> None:
        self.redis = client
        self.recheck = recheck
        self.clock = clock
        # Workers pass ``snapshot_ttl``: the set of paused names is read at most that often,
        # so a read of an unpaused lane costs no round trip; a pause then takes effect within
        # ``snapshot_ttl`` seconds.
        self.snapshot_ttl = snapshot_ttl
        self._snapshot: tuple[float, frozenset[bytes]] = (float("-inf"), frozenset())

    def _paused_now(self, destination: str) -> bool:
        if self.snapshot_ttl <= 0:
            return bool(self.redis.hexists(PAUSED_KEY, destination))
        now = time.monotonic()
        taken, paused = self._snapshot
        if now - taken >= self.snapshot_ttl:
            paused = frozenset(self.redis.hkeys(PAUSED_KEY))
            self._snapshot = (now, paused)
        return destination.encode() in paused

    def attempted(self, destination: Destination, answer: object) -> None:
        pass

    def reads_outcomes(self, destination: Destination) -> bool:
        return False

    def allow(self, destination: Destination, want: int) -> tuple[int, float | None]:
        if not self._paused_now(destination.name):
            return want, None
        if self.snapshot_ttl > 0 and not self.redis.hexists(PAUSED_KEY, destination.name):
            self._snapshot = (float("-inf"), frozenset())  # resumed since the snapshot
            return want, None
        _held(self.redis, self.name, destination.name, want)
        return 0, self.clock() + self.recheck

    def pause(self, destination: str, reason: str = "") -> None:
        self.redis.hset(PAUSED_KEY, destination,
                        json.dumps({"paused_at": self.clock(), "reason": reason}))
        log.warning("destination paused", extra={"destination": destination, "reason": reason})

    def paused(self) -> dict[str, dict[str, object]]:
        return {k.decode(): json.loads(v) for k, v in self.redis.hgetall(PAUSED_KEY).items()}

    def resume(self, destination: str) -> int:
        """Unpause and lift the lane's hold: its deliveries go out again, oldest first, as
        soon as a worker's sweep sees it (within a second). A delivery waiting out a retry
        delay keeps its due time. Returns how many deliveries the lane holds."""
        pipe = self.redis.pipeline(transaction=True)
        pipe.hdel(PAUSED_KEY, destination)
        pipe.delete(hold_key(destination))
        pipe.xlen(lane_key(destination))
        waiting = int(pipe.execute()[2])
        if waiting:
            log.warning("destination resumed", extra={"destination": destination,
                                                      "released": waiting})
        return waiting


#: Answers that say the destination itself is unwell (beside any 5xx): its endpoint refuses
#: us or is not there, or it timed out the request.
UNHEALTHY_STATUSES = frozenset({401, 403, 404, 408, 410})
#: Answers the breaker does not count: a 429 is the rate limit's business (``rate_limit``,
#: ``Retry-After``), not a sign of ill health.
UNCOUNTED_STATUSES = frozenset({429})


def health(answer: object) -> bool | None:
    """What one attempt says about the destination's health: False for a *health failure* (a
    timeout, a connection error, an address the SSRF guard refuses, a 5xx, a 401, 403, 404,
    408 or 410), True for any other answer (a 2xx, and a 400 or 422 about one payload: the
    destination is up and answering), None when it says nothing (a 429; a delivery skipped
    or refused before it was sent; a driver's own error)."""
    if isinstance(answer, bool):  # a plain outcome: success or failure
        return answer
    if isinstance(answer, DeliveryResult):
        return None if answer.skipped else True
    if not isinstance(answer, DeliveryError):
        return None
    status = answer.status_code
    if status is not None:
        if status in UNCOUNTED_STATUSES:
            return None
        return not (status >= 500 or status in UNHEALTHY_STATUSES)
    if isinstance(answer, RetryableDeliveryError | UnsafeURLError):
        return False  # no answer at all, or an address we will not connect to
    return None  # refused before sending: about the payload (or the driver's configuration)


@dataclass(frozen=True)
class CircuitPolicy:
    threshold: int = 10  # health failures in a row that open the circuit ...
    open_after: float = 30.0  # ... when the first of them is this old (nothing healthy since)
    cooldown: float = 60.0  # open this long before one probe is let through
    probe_wait: float = 5.0  # how long others wait for the probe's answer before looking again
    step: float = 1.0  # slowed: the budget is a number of deliveries per step
    close_at: int = 64  # slowed: a budget this large closes the circuit

    def failing_for(self, destination: Destination) -> float:
        """How long a run of health failures must last to open the circuit: ``open_after``,
        and at least twice the destination's first retry delay, so that the retries of the
        first failures have had their chance to succeed."""
        schedule = destination.retry.schedule
        return max(self.open_after, 2 * schedule[0] if schedule else 0.0)


@dataclass
class _Tally:
    """The health outcomes a process saw since it last told Redis."""

    ok: int = 0
    failed: int = 0
    tail: int = 0  # failures since this process's last success
    tail_since: float | None = None  # when the first of them came

    def add(self, healthy: bool, now: float) -> None:
        if healthy:
            self.ok += 1
            self.tail, self.tail_since = 0, None
        else:
            self.failed += 1
            if self.tail == 0:
                self.tail_since = now
            self.tail += 1


class CircuitBreaker:
    """Closed → open → half-open → slowed → closed, on health outcomes only (:func:`health`).

    - **Open** when the destination has had ``threshold`` health failures in a row and the
      first of them is :meth:`CircuitPolicy.failing_for` old: nothing healthy for 30 s (or
      twice its first retry delay). A destination that fails each event's first attempt and
      accepts the retry, or answers 400 to some payloads, keeps succeeding and stays closed.
    - **Half-open** after ``cooldown``: one worker wins the probe lease and sends one delivery;
      a health failure opens the circuit for another cool-down, a health success slows it.
    - **Slowed**: ``step`` by ``step`` (a second), up to a budget of deliveries go (two at
      first). A step with more health failures than successes halves the budget (to one at
      least); otherwise a step whose budget held nothing back closes the circuit, and one
      that used it up doubles it, up to ``close_at``, which closes it. A run of failures as
      above opens it again.

    While open, the lane is held; while slowed, it is held for the rest of each step once the
    step's budget is spent."""

    name = "circuit"

    def __init__(self, client: redis.Redis, policy: CircuitPolicy | None = None,
                 clock: Clock = time.time, snapshot_ttl: float = 0.0,
                 lease_margin: float = LEASE_MARGIN) -> None:
        self.redis = client
        self.policy = policy or CircuitPolicy()
        self.lease_margin = lease_margin  # the probe is held as long as a delivery
        self.clock = clock
        self._script = register(client, "circuit")
        # Workers pass ``snapshot_ttl``: after the script said "go", this process lets a
        # destination's deliveries through without asking again for that long, as long as
        # none of its own attempts is a health failure. A failure here, or the time running
        # out, sends the next read through the script, so a circuit that other workers opened
        # stops this one after at most ``snapshot_ttl`` seconds or one failure.
        self.snapshot_ttl = snapshot_ttl
        self._healthy: dict[str, float] = {}  # destination -> monotonic time of the last "go"
        self._tallies: dict[str, _Tally] = {}
        self._lock = threading.Lock()

    def attempted(self, destination: Destination, answer: object) -> None:
        healthy = health(answer)
        if healthy is None:
            return
        with self._lock:
            self._tallies.setdefault(destination.name, _Tally()).add(healthy, self.clock())
        if not healthy:
            self._healthy.pop(destination.name, None)

    def _snapshot_healthy(self, name: str) -> bool:
        return (self.snapshot_ttl > 0
                and time.monotonic() - self._healthy.get(name, -math.inf) < self.snapshot_ttl)

    def reads_outcomes(self, destination: Destination) -> bool:
        return False  # it reads what attempted() was told, not what the drainer records

    def allow(self, destination: Destination, want: int) -> tuple[int, float | None]:
        p = self.policy
        name = destination.name
        now = time.monotonic()
        if self._snapshot_healthy(name):
            return want, None
        with self._lock:
            tally = self._tallies.pop(name, None) or _Tally()
        try:
            action, until, granted = self._script(
                keys=[circuit_key(name), probe_key(name)],
                args=[self.clock(), tally.ok, tally.failed, tally.tail,
                      "" if tally.tail_since is None else repr(tally.tail_since),
                      p.threshold, p.failing_for(destination), p.cooldown,
                      destination.lease_with(self.lease_margin), p.probe_wait, want, p.step,
                      p.close_at],
            )
        except BaseException:
            with self._lock:  # told next time
                self._merge_back(name, tally)
            raise
        action = action.decode()
        granted = int(granted)
        if action == "opened":
            log.error("circuit opened", extra={"destination": name})
        elif action == "closed":
            log.warning("circuit closed", extra={"destination": name})
        elif action == "probe":
            log.info("circuit half-open: probing", extra={"destination": name})
        if action in ("go", "closed"):
            if self.snapshot_ttl > 0:
                self._healthy[name] = now
            return want, None
        _held(self.redis, self.name, name, want - granted)
        if granted >= want or action == "probe":
            return granted, None
        return granted, float(until)

    def _merge_back(self, name: str, tally: _Tally) -> None:
        """Put back a tally Redis did not take, before what was tallied since."""
        later = self._tallies.get(name) or _Tally()
        merged = _Tally(tally.ok + later.ok, tally.failed + later.failed, later.tail,
                        later.tail_since)
        if later.ok == 0 and tally.tail:  # the run goes on from the earlier tally
            merged.tail, merged.tail_since = tally.tail + later.tail, tally.tail_since
        self._tallies[name] = merged

    def state(self, destination: str) -> str:
        """``closed``, ``open``, ``half-open`` (open, cool-down over, waiting for a probe) or
        ``slowed``."""
        state, reopen_at = self.redis.hmget(circuit_key(destination), "state", "reopen_at")
        if state == b"slowed":
            return "slowed"
        if state != b"open":
            return "closed"
        return "open" if self.clock() < float(reopen_at or 0) else "half-open"

    def reset(self, destination: str) -> None:
        self.redis.delete(circuit_key(destination), probe_key(destination))


class RateLimitGate:
    """``rate_limit: 20/s``: a fixed-window counter per destination shared by all workers; when
    a window is used up, the lane is held until the next one. It counts what it is asked
    for: deliveries, or requests for a destination with a batch."""

    name = "rate"
    #: The most windows a 429 uses up (a minute of a per-second limit).
    slow_down_windows = 60

    def __init__(self, client: redis.Redis, clock: Clock = time.time) -> None:
        self.redis = client
        self.clock = clock
        self._script = register(client, "rate")
        self._windows: dict[str, int] = {}  # destination -> the window of its last grant

    def attempted(self, destination: Destination, answer: object) -> None:
        pass

    def reads_outcomes(self, destination: Destination) -> bool:
        return False

    def allow(self, destination: Destination, want: int) -> tuple[int, float | None]:
        limit = destination.rate_limit
        if limit is None or want <= 0:
            return want, None
        per = limit.per_seconds
        window = math.floor(self.clock() / per)
        granted = int(self._script(keys=[rate_key(destination.name, window)],
                                   args=[want, limit.count, int(per * 2000) + 1000]))
        self._windows[destination.name] = window
        if granted >= want:
            return want, None
        _held(self.redis, self.name, destination.name, want - granted)
        return granted, (window + 1) * per

    # A destination with a batch counts requests (the engine asks for requests), and these
    # keep the count true to the requests made: what was granted and not used is given back,
    # the extra requests of a split batch are charged, and a 429 uses up the windows it asks
    # to wait, so every worker holds the destination.

    def give_back(self, destination: Destination, requests: int) -> None:
        """``requests`` of the last grant were not made (the lane had less than asked for):
        they count no more against its window, if that window is still the current one."""
        limit = destination.rate_limit
        if limit is None or requests <= 0:
            return
        window = math.floor(self.clock() / limit.per_seconds)
        if self._windows.get(destination.name) == window:
            self.redis.decrby(rate_key(destination.name, window), requests)

    def charge(self, destination: Destination, requests: int) -> None:
        """Count ``requests`` made without asking (a split batch's extra requests)."""
        limit = destination.rate_limit
        if limit is None or requests <= 0:
            return
        key = rate_key(destination.name, math.floor(self.clock() / limit.per_seconds))
        pipe = self.redis.pipeline(transaction=False)
        pipe.incrby(key, requests)
        pipe.pexpire(key, int(limit.per_seconds * 2000) + 1000)
        pipe.execute()

    def slow_down(self, destination: Destination, until: float) -> None:
        """The destination answered 429 and asked for a wait until ``until``: every window up
        to then (at most :attr:`slow_down_windows`) is used up, so no worker sends to it
        before. A longer wait is held that long and found again by the next request."""
        limit = destination.rate_limit
        if limit is None:
            return
        per = limit.per_seconds
        now = self.clock()
        first = math.floor(now / per)
        last = min(math.ceil(until / per) - 1, first + self.slow_down_windows - 1)
        pipe = self.redis.pipeline(transaction=False)
        for window in range(first, last + 1):
            ttl = int(((window + 1) * per - now) * 1000) + int(per * 2000) + 1000
            pipe.set(rate_key(destination.name, window), limit.count, px=ttl)
        pipe.execute()


def default_gates(client: redis.Redis, snapshot_ttl: float = 0.0,
                  lease_margin: float = LEASE_MARGIN) -> tuple[Gate, ...]:
    """The gates every worker runs, in order: a paused destination is not even counted
    against its circuit or its rate. With ``snapshot_ttl``, the pause and circuit gates skip
    their round trip for a destination that was neither paused nor failing that recently."""
    return (PauseGate(client, snapshot_ttl=snapshot_ttl),
            CircuitBreaker(client, snapshot_ttl=snapshot_ttl, lease_margin=lease_margin),
            RateLimitGate(client))


def destination_state(client: redis.Redis, destination: str, clock: Clock = time.time) -> str:
    """``paused``, ``open``, ``half-open``, ``slowed`` or ``active``."""
    if client.hexists(PAUSED_KEY, destination):
        return "paused"
    state = CircuitBreaker(client, clock=clock).state(destination)
    return "active" if state == "closed" else state
