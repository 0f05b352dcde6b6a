"""Everything the relay keeps in Redis about events and deliveries.

Keys (all under ``relay:``), each with the lifetime that bounds memory:

========================  ======================================================  ===========
``event:<id>``            hash: the event JSON, the task that admitted it,         retention
                          duplicate count
``seen:<id>``             dedupe marker (value: the admitting task id)             dedupe_window
``delivery:<id>``         hash: destination -> delivery state JSON                 retention
``log:<id>``              list: one JSON record per attempt (capped)               retention
``dead``                  hash: ``<id>|<destination>`` -> dead letter JSON          until replayed
``dead:index``            zset: ``<id>|<destination>`` by time of death             until replayed
``stats:<destination>``   hash: delivered / failed / dead counters, last error     kept
``runs:<task id>``        times a task started (worker-lost cap), counted by       1 day
                          :meth:`DeliveryStore.admit` for the event's task
``recent:<dest>:<s>``     zset: event ids by time of the destination's latest      retention,
                          deliveries in status s (delivered | retrying | dead)     capped
========================  ======================================================  ===========

Delivery state moves ``pending → inflight → delivered | retrying | dead`` with
claim-then-confirm: :meth:`DeliveryStore.claim` takes a lease atomically (a second claimant is
told ``busy`` or ``done``), and the outcome is confirmed in one round trip that never turns a
``delivered`` back into anything else.
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

import redis

from relay.models import LeadEvent
from relay.taskqueue import NOT_STARTED_DUE_KEY, NOT_STARTED_KEY, SCHEDULED_KEY

PREFIX = "relay:"
DEAD_KEY = PREFIX + "dead"
DEAD_INDEX = PREFIX + "dead:index"
LOG_CAP = 100
RECENT_CAP = 10_000  # per destination and status: what the admin API lists
RECENT_STATUSES = ("delivered", "retrying", "dead")
ERROR_TEXT_LIMIT = 500

# One round trip for everything a task does before routing its event. KEYS: seen, event,
# delivery, not-started hash and due zset, run counter, a key whose value is returned as is
# (the subscriptions' version); ARGV: task id, window ms, event json, retention s, now
_ADMIT = """
redis.call('HDEL', KEYS[4], ARGV[1])  -- started: no longer at risk between queue and worker
redis.call('ZREM', KEYS[5], ARGV[1])
local runs = redis.call('INCR', KEYS[6])
redis.call('EXPIRE', KEYS[6], 86400)
local watched = redis.call('GET', KEYS[7]) or ''
local prev = redis.call('GET', KEYS[1])
if not prev then
  redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
  redis.call('DEL', KEYS[2], KEYS[3])
  redis.call('HSET', KEYS[2], 'event', ARGV[3], 'task', ARGV[1], 'admitted_at', ARGV[5],
             'duplicates', 0)
  redis.call('EXPIRE', KEYS[2], ARGV[4])
  return {'new', runs, watched}
elseif prev == ARGV[1] then
  return {'redelivered', runs, watched}
end
redis.call('HINCRBY', KEYS[2], 'duplicates', 1)
return {'duplicate', runs, watched}
"""

# Claims one event's deliveries, each on its own terms (one round trip for the fan-out).
# KEYS: delivery hash; ARGV: now, retention s, then destination and lease until per delivery
_CLAIM = """
local now = tonumber(ARGV[1])
local replies = {}
for i = 3, #ARGV, 2 do
  local dest = ARGV[i]
  local raw = redis.call('HGET', KEYS[1], dest)
  local st = {status = 'pending', attempts = 0}
  if raw then st = cjson.decode(raw) end
  if st.status == 'delivered' or st.status == 'dead' then
    table.insert(replies, {'done', st.status, st.attempts})
  elseif st.status == 'inflight' and tonumber(st.lease_until) > now then
    table.insert(replies, {'busy', tostring(st.lease_until), st.attempts})
  else
    -- An expired lease on an inflight delivery: the attempt that took it never confirmed (its
    -- worker died, or hit the hard time limit). Counted, so that a delivery that kills its
    -- worker every time becomes a dead letter even though each retry has a new task id.
    if st.status == 'inflight' then st.crashes = (st.crashes or 0) + 1 end
    st.attempts = st.attempts + 1
    st.status = 'inflight'
    st.lease_until = tonumber(ARGV[i + 1])
    st.updated_at = now
    redis.call('HSET', KEYS[1], dest, cjson.encode(st))
    redis.call('EXPIRE', KEYS[1], ARGV[2])
    table.insert(replies, {'claimed', tostring(st.crashes or 0), st.attempts})
  end
end
return replies
"""

# Everything one attempt's outcome changes, in one script (one round trip, one reply to parse):
# KEYS: delivery hash, log list, stats hash, recent delivered / retrying / dead zsets,
#       dead letters hash, dead letters index, scheduled zset
# ARGV: destination, state json, retention s, attempt json, log cap, outcome, time, error,
#       listed status, recent cap, event id, dead letter id, dead letter json ('' if none),
#       parked task message ('' if none), its due time
_CONFIRM = """
local dest, retention, outcome, at = ARGV[1], ARGV[3], ARGV[6], ARGV[7]
local raw = redis.call('HGET', KEYS[1], dest)
if not (raw and cjson.decode(raw).status == 'delivered') then
  redis.call('HSET', KEYS[1], dest, ARGV[2])   -- never downgrade a confirmed delivery
  redis.call('EXPIRE', KEYS[1], retention)
end
redis.call('RPUSH', KEYS[2], ARGV[4])
redis.call('LTRIM', KEYS[2], -tonumber(ARGV[5]), -1)
redis.call('EXPIRE', KEYS[2], retention)
if outcome == 'delivered' or outcome == 'skipped' then
  redis.call('HINCRBY', KEYS[3], 'delivered', 1)
  redis.call('HSET', KEYS[3], 'consecutive_failures', 0, 'last_success_at', at)
else
  redis.call('HINCRBY', KEYS[3], 'failed', 1)
  redis.call('HINCRBY', KEYS[3], 'consecutive_failures', 1)
  redis.call('HSET', KEYS[3], 'last_error', ARGV[8], 'last_error_at', at)
end
if ARGV[14] ~= '' then
  redis.call('ZADD', KEYS[9], ARGV[15], ARGV[14])
end
if outcome == 'dead' then
  redis.call('HINCRBY', KEYS[3], 'dead', 1)
  redis.call('HSET', KEYS[7], ARGV[12], ARGV[13])
  redis.call('ZADD', KEYS[8], at, ARGV[12])
end
local statuses = {'delivered', 'retrying', 'dead'}
for i = 1, 3 do
  local recent = KEYS[3 + i]
  if statuses[i] == ARGV[9] then
    redis.call('ZADD', recent, at, ARGV[11])
    redis.call('ZREMRANGEBYRANK', recent, 0, -tonumber(ARGV[10]) - 1)
    redis.call('EXPIRE', recent, retention)
  else
    redis.call('ZREM', recent, ARGV[11])
  end
end
return 1
"""

Outcome = Literal["delivered", "retrying", "dead", "skipped"]


@dataclass(frozen=True)
class Admission:
    outcome: Literal["new", "redelivered", "duplicate"]  # redelivered: the same task again
    runs: int  # times this task has started, this run included (the worker-lost cap)
    watched: bytes = b""  # the value of the ``watch`` key passed to admit, read atomically


@dataclass(frozen=True)
class Claim:
    status: Literal["claimed", "done", "busy"]
    attempt: int
    lease_until: float = 0.0
    final_status: str = ""
    crashes: int = 0  # earlier attempts that never confirmed (their worker died)


@dataclass(frozen=True)
class Attempt:
    """One attempt, as the delivery log records it."""

    destination: str
    attempt: int
    outcome: Outcome
    status_code: int | None = None
    latency_ms: float | None = None
    error: str | None = None
    next_attempt_at: float | None = None
    at: float = 0.0

    def to_json(self) -> dict[str, Any]:
        return {k: v for k, v in self.__dict__.items() if v is not None}


def event_key(event_id: str) -> str:
    return f"{PREFIX}event:{event_id}"


def delivery_key(event_id: str) -> str:
    return f"{PREFIX}delivery:{event_id}"


def log_key(event_id: str) -> str:
    return f"{PREFIX}log:{event_id}"


def stats_key(destination: str) -> str:
    return f"{PREFIX}stats:{destination}"


def recent_key(destination: str, status: str) -> str:
    return f"{PREFIX}recent:{destination}:{status}"


def _claim(status: bytes, extra: bytes, attempts: int) -> Claim:
    if status == b"busy":
        return Claim("busy", int(attempts), lease_until=float(extra))
    if status == b"done":
        return Claim("done", int(attempts), final_status=extra.decode())
    return Claim("claimed", int(attempts), crashes=int(extra or 0))


def _runs_key(task_id: str) -> str:
    return f"{PREFIX}runs:{task_id}"


def dead_id(event_id: str, destination: str) -> str:
    return f"{event_id}|{destination}"


class DeliveryStore:
    def __init__(self, client: redis.Redis, retention: float = 7 * 86400) -> None:
        self.redis = client
        self.retention = int(retention)
        self._admit = client.register_script(_ADMIT)
        self._claim = client.register_script(_CLAIM)
        self._confirm = client.register_script(_CONFIRM)
        from relay.metrics import metrics_for  # metrics reads this module's keys

        self.metrics = metrics_for(client)

    # -- events ---------------------------------------------------------------------------

    def admit(self, event: LeadEvent, task_id: str, dedupe_window: float,
              watch: str = "") -> Admission:
        """Mark the task started, count its run, and admit its event: ``new``, ``redelivered``
        (the same task again after a crash) or ``duplicate``; with the value of the ``watch``
        key read in the same round trip (the workers' subscription cache watches a version)."""
        outcome, runs, watched = self._admit(
            keys=[
                f"{PREFIX}seen:{event.event_id}",
                event_key(event.event_id),
                delivery_key(event.event_id),
                NOT_STARTED_KEY,
                NOT_STARTED_DUE_KEY,
                _runs_key(task_id),
                watch or f"{PREFIX}nothing",
            ],
            args=[
                task_id,
                max(1, int(dedupe_window * 1000)),
                json.dumps(event.to_json()),
                self.retention,
                time.time(),
            ],
        )
        admission = Admission(outcome.decode(), int(runs), watched)
        if admission.outcome == "duplicate":
            self.metrics.inc("events_duplicate")
        return admission

    def load_event(self, event_id: str) -> LeadEvent | None:
        raw = self.redis.hget(event_key(event_id), "event")
        return LeadEvent.from_json(json.loads(raw)) if raw else None

    def event_record(self, event_id: str) -> dict[str, Any] | None:
        raw = self.redis.hgetall(event_key(event_id))
        if not raw:
            return None
        record = {k.decode(): v.decode() for k, v in raw.items()}
        return {
            "event": json.loads(record["event"]) if "event" in record else None,
            "duplicates": int(record.get("duplicates", 0)),
            "admitted_at": float(record.get("admitted_at", 0)),
        }

    def count_task_run(self, task_id: str) -> int:
        """How many times this task has started (a task that kills its worker comes back)."""
        key = _runs_key(task_id)
        pipe = self.redis.pipeline()
        pipe.incr(key)
        pipe.expire(key, 86400)
        runs, _ = pipe.execute()
        return int(runs)

    # -- deliveries -----------------------------------------------------------------------

    def claim(self, event_id: str, destination: str, lease: float) -> Claim:
        return self.claim_many(event_id, [(destination, lease)])[0]

    def claim_many(self, event_id: str, leases: Sequence[tuple[str, float]]) -> list[Claim]:
        """Claim the event's delivery to each destination for its lease (seconds), in one
        round trip; each claim is decided on its own, in order."""
        now = time.time()
        args: list[object] = [now, self.retention]
        for destination, lease in leases:
            args += [destination, now + lease]
        replies = self._claim(keys=[delivery_key(event_id)], args=args)
        return [_claim(*reply) for reply in replies]

    def confirm(
        self,
        event: LeadEvent,
        attempt: Attempt,
        *,
        park: tuple[str, float] | None = None,
        dead_reason: str | None = None,
    ) -> None:
        """Record an attempt's outcome: the delivery state (never downgrading a confirmed
        delivery), the log line, the counters, the per-destination lists and — for a retry —
        the parked task message ``park = (message, due)``, or — for a dead letter — the dead
        letter. One script: one round trip, and all of it or nothing."""
        state = {"status": attempt.outcome, "attempts": attempt.attempt, "updated_at": attempt.at}
        if attempt.status_code is not None:
            state["last_status"] = attempt.status_code
        if attempt.error:
            state["last_error"] = attempt.error
        if attempt.next_attempt_at:
            state["next_attempt_at"] = attempt.next_attempt_at
        name, event_id = attempt.destination, event.event_id
        letter_id = dead_id(event_id, name)
        letter = ""
        if attempt.outcome == "dead":
            letter = json.dumps({
                "event_id": event_id, "destination": name, "reason": dead_reason or "",
                "attempts": attempt.attempt, "status_code": attempt.status_code,
                "dead_at": attempt.at, "event": event.to_json(),
            })
        # Each delivery is listed under its current status only (skipped counts as delivered).
        listed = "delivered" if attempt.outcome == "skipped" else attempt.outcome
        message, due = park if park is not None else ("", 0.0)
        self._confirm(
            keys=[delivery_key(event_id), log_key(event_id), stats_key(name),
                  *(recent_key(name, status) for status in RECENT_STATUSES),
                  DEAD_KEY, DEAD_INDEX, SCHEDULED_KEY],
            args=[name, json.dumps(state), self.retention, json.dumps(attempt.to_json()),
                  LOG_CAP, attempt.outcome, attempt.at, attempt.error or "", listed,
                  RECENT_CAP, event_id, letter_id, letter, message, due],
        )
        self.metrics.inc("deliveries", {"destination": name, "outcome": attempt.outcome})
        if attempt.latency_ms is not None:
            self.metrics.observe("attempt_latency_seconds", attempt.latency_ms / 1000,
                                 {"destination": name})

    def delivery_states(self, event_id: str) -> dict[str, dict[str, Any]]:
        raw = self.redis.hgetall(delivery_key(event_id))
        return {k.decode(): json.loads(v) for k, v in raw.items()}

    def attempts(self, event_id: str) -> list[dict[str, Any]]:
        return [json.loads(item) for item in self.redis.lrange(log_key(event_id), 0, -1)]

    def stats(self, destination: str) -> dict[str, str]:
        raw = self.redis.hgetall(stats_key(destination))
        return {k.decode(): v.decode() for k, v in raw.items()}

    # -- dead letters ---------------------------------------------------------------------

    def dead_letters(
        self, destination: str | None = None, limit: int = 100, offset: int = 0
    ) -> list[dict[str, Any]]:
        """Newest first."""
        ids = self.redis.zrevrange(DEAD_INDEX, 0, -1)
        keys = [k.decode() for k in ids]
        if destination:
            keys = [k for k in keys if k.rsplit("|", 1)[1] == destination]
        keys = keys[offset : offset + limit]
        if not keys:
            return []
        records = self.redis.hmget(DEAD_KEY, keys)
        return [json.loads(r) for r in records if r]

    def take_dead_letter(self, event_id: str, destination: str) -> LeadEvent | None:
        """Remove a dead letter for replay: the delivery becomes pending again and the event
        record is restored (it may have expired). None when there is no such dead letter."""
        key = dead_id(event_id, destination)
        raw = self.redis.hget(DEAD_KEY, key)
        if raw is None:
            return None
        record = json.loads(raw)
        event = LeadEvent.from_json(record["event"])
        pipe = self.redis.pipeline(transaction=True)
        pipe.hdel(DEAD_KEY, key)
        pipe.zrem(DEAD_INDEX, key)
        pipe.hset(event_key(event_id), "event", json.dumps(record["event"]))
        pipe.expire(event_key(event_id), self.retention)
        pipe.hset(
            delivery_key(event_id),
            destination,
            json.dumps({"status": "pending", "attempts": 0, "replayed_at": time.time()}),
        )
        pipe.expire(delivery_key(event_id), self.retention)
        pipe.hincrby(stats_key(destination), "dead", -1)
        pipe.zrem(recent_key(destination, "dead"), event_id)
        results = pipe.execute()
        return event if results[0] else None
