"""Everything the relay keeps in Redis about events and deliveries (keys: :mod:`.keys`).

Delivery state moves ``pending → inflight → delivered | retrying | dead`` with
claim-then-confirm, per (event, destination), whatever the batch it travels in. A drainer's
round trip is one script (:meth:`DeliveryStore.step`): it records the outcomes of the
deliveries that finished (never turning a ``delivered`` back into anything else, and
acknowledging their lane entries only then), then reads the next batch of the lane's entries
and claims each delivery with a lease (a second claimant is told ``busy`` or ``done``).
"""

from __future__ import annotations

import collections
import json
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import redis

from relay.core.models import LazyPayload, LeadEvent
from relay.store.keys import (
    DEAD_INDEX,
    DEAD_KEY,
    DRAINERS_PREFIX,
    GROUP,
    INFLIGHT_PREFIX,
    LANES,
    PREFIX,
    SCHEDULED,
    dead_id,
    delivery_key,
    event_key,
    lane_key,
    log_key,
    recent_key,
    stats_key,
)

LOG_CAP = 100
RECENT_CAP = 10_000  # per destination and status: what the admin API lists
RECENT_STATUSES = ("delivered", "retrying", "dead")
ERROR_TEXT_LIMIT = 500

# One drainer's round trip: record the outcomes of the deliveries that finished, then claim
# the next ones, within the destination's concurrency (the sum of what its drainers hold in
# flight stays <= the limit). Either part may be empty: the confirm of a batch acknowledges its
# lane entries and gives back their slots, all of it or nothing; the claim reads the lane and
# takes each delivery with a lease (a second claimant is told busy or done).
# KEYS: lane stream, in-flight hash, drainers zset, stats hash, recent delivered / retrying /
#       dead zsets, dead letters hash, dead letters index, scheduled zset
# ARGV: group, consumer, holder, destination, now, lease until, retention s, log cap,
#       recent cap, want, limit, reclaim idle ms (0: new entries only), outcomes: a JSON array
#       of [entry, event id, state json, attempt json, outcome, time, error, listed status,
#       dead letter json ('' if none), retry due time ('' if none)]
# Answers {confirmed, in flight before the claim, {claimed: entry, event id, attempts,
#          crashes, event json}..., done count, busy count, gone count}
_STEP = """
local group, consumer, holder, dest = ARGV[1], ARGV[2], ARGV[3], ARGV[4]
local now, lease_until, retention = tonumber(ARGV[5]), tonumber(ARGV[6]), ARGV[7]
local log_cap, recent_cap = tonumber(ARGV[8]), tonumber(ARGV[9])
local statuses = {'delivered', 'retrying', 'dead'}

-- the outcomes
local confirmed = 0
for _, item in ipairs(cjson.decode(ARGV[13])) do
  local entry, id, state, attempt, outcome, at, err, listed, letter, retry_at = unpack(item)
  local delivery, log = 'relay:delivery:' .. id, 'relay:log:' .. id
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
  local event = id and redis.call('HGET', 'relay:event:' .. id, 'event')
  if not event then
    finish(entry)  -- erased, expired, or an entry deleted while pending
    gone = gone + 1
  else
    local key = 'relay:delivery:' .. id
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
"""

Outcome = Literal["delivered", "retrying", "dead", "skipped"]


@dataclass(frozen=True)
class Claim:
    """One delivery a drainer took from its lane and holds the lease of."""

    entry_id: str
    event: LeadEvent
    attempt: int
    crashes: int = 0  # earlier attempts that never confirmed (their worker died)


@dataclass(frozen=True)
class Taken:
    """What :meth:`DeliveryStore.take` did: the claims, and the entries it settled itself."""

    claims: list[Claim]
    done: int = 0  # already delivered or dead: acknowledged
    busy: int = 0  # another drainer holds the lease: parked until it ends
    gone: int = 0  # the event was erased or expired: acknowledged


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


@dataclass(frozen=True)
class Confirmation:
    """An attempt's outcome, ready for :meth:`DeliveryStore.confirm`."""

    event: LeadEvent
    attempt: Attempt
    entry_id: str = ""  # the lane entry to acknowledge ('' for none)
    dead_reason: str | None = None
    retry_at: float | None = None
    extra: dict[str, Any] = field(default_factory=dict)


_PAYLOAD_KEY = b',"payload":{'


def parse_event(raw: bytes, data: Mapping[str, Any] | None = None) -> LeadEvent:
    """The event stored as ``raw`` (``data``: ``raw`` already parsed), with its payload's
    compact JSON cut out of ``raw`` when the ingress stored it: compact, payload last (so
    ``raw`` ends with the payload's closing brace and the record's). Inside a JSON string a
    quote is escaped, so the first ``,"payload":{`` is the record's own key; a record written
    otherwise (spaces after the separators, the payload elsewhere) gets none and its payload
    is encoded again when sent. Not yet parsed (``data`` None), a cut payload stays JSON
    until a driver reads it (:class:`relay.core.models.LazyPayload`)."""
    at = raw.find(_PAYLOAD_KEY) if raw.endswith(b"}}") else -1
    if at <= 0:
        return LeadEvent.from_json(json.loads(raw) if data is None else data)
    payload_json = raw[at + len(_PAYLOAD_KEY) - 1:-1]
    if data is None:
        data = {**json.loads(raw[:at] + b"}"), "payload": LazyPayload(payload_json)}
    return LeadEvent.from_json(data, payload_json)


class ParsedEvents:
    """Events parsed from their stored JSON, kept by that JSON's bytes: an event routed to
    several lanes is claimed once per lane, and admission parsed it already. Keyed by content,
    an entry can never be stale; bounded, so it holds only the last few hundred events."""

    def __init__(self, size: int = 512) -> None:
        self.size = size
        self._parsed: collections.OrderedDict[bytes, LeadEvent] = collections.OrderedDict()
        self._lock = threading.Lock()

    def add(self, raw: bytes, event: LeadEvent) -> None:
        with self._lock:
            self._parsed[raw] = event
            if len(self._parsed) > self.size:
                self._parsed.popitem(last=False)

    def get(self, raw: bytes) -> LeadEvent:
        event = self._parsed.get(raw)
        if event is None:
            event = parse_event(raw)
            self.add(raw, event)
        return event


class DeliveryStore:
    def __init__(self, client: redis.Redis, retention: float = 7 * 86400) -> None:
        self.redis = client
        self.retention = int(retention)
        self._step = client.register_script(_STEP)
        self.parsed = ParsedEvents()

    # -- events ---------------------------------------------------------------------------

    def load_event(self, event_id: str) -> LeadEvent | None:
        raw = self.redis.hget(event_key(event_id), "event")
        return LeadEvent.from_json(json.loads(raw)) if raw else None

    def event_record(self, event_id: str) -> dict[str, Any] | None:
        raw = self.redis.hgetall(event_key(event_id))
        if not raw:
            return None
        record = {k.decode(): v.decode() for k, v in raw.items()}
        if "event" not in record:
            return None  # only duplicates counted so far: the first one is not admitted yet
        return {
            "event": json.loads(record["event"]),
            "duplicates": int(record.get("duplicates", 0)),
            "admitted_at": float(record.get("admitted_at", 0)),
        }

    # -- deliveries -----------------------------------------------------------------------

    def step(self, lane: str, consumer: str, holder: str, lease: float,
             confirmations: Sequence[Confirmation] = (), want: int = 0, limit: int = 0,
             reclaim_idle: float = 0.0) -> Taken:
        """A drainer's round trip: record a batch of the destination's outcomes (each
        delivery state, never downgrading a confirmed delivery; log line, counter,
        per-destination list, retry or dead letter; then acknowledge their lane entries and
        free their slots), then read up to ``want`` of the lane's entries (with
        ``reclaim_idle``, also entries a dead worker left pending that long) and claim each
        delivery for ``lease`` seconds, keeping the destination's in-flight total within
        ``limit``. One script, one round trip."""
        now = time.time()
        outcomes = json.dumps([_confirm_args(c) for c in confirmations])
        _confirmed, _used, claimed, done, busy, gone = self._step(
            keys=[lane_key(lane), INFLIGHT_PREFIX + lane, DRAINERS_PREFIX + lane,
                  stats_key(lane), *(recent_key(lane, s) for s in RECENT_STATUSES),
                  DEAD_KEY, DEAD_INDEX, SCHEDULED],
            args=[GROUP, consumer, holder, lane, now, now + lease, self.retention, LOG_CAP,
                  RECENT_CAP, want, limit, int(reclaim_idle * 1000), outcomes])
        claims = [Claim(entry.decode(), self.parsed.get(event), int(attempts), int(crashes))
                  for entry, _id, attempts, crashes, event in claimed]
        return Taken(claims, int(done), int(busy), int(gone))

    def take(self, lane: str, consumer: str, holder: str, want: int, limit: int,
             lease: float, reclaim_idle: float = 0.0) -> Taken:
        """Claim only (:meth:`step` with no outcomes)."""
        return self.step(lane, consumer, holder, lease, (), want, limit, reclaim_idle)

    def confirm(self, lane: str, holder: str, lease: float,
                confirmations: Sequence[Confirmation]) -> None:
        """Record outcomes only (:meth:`step` claiming nothing)."""
        if confirmations:
            self.step(lane, "", holder, lease, confirmations)

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

    def replay(self, event_id: str, destination: str) -> LeadEvent | None:
        """Take a dead letter out and put a fresh delivery into its lane, atomically (two
        replays of one dead letter queue it once): the delivery becomes pending again and
        the event record is restored (it may have expired). None when there is no such dead
        letter."""
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
        if not results[0]:
            return None  # another replay took it between our read and the transaction
        pipe = self.redis.pipeline(transaction=True)
        pipe.xadd(lane_key(destination), {"e": event_id})
        pipe.sadd(LANES, destination)
        pipe.execute()
        return event


def _confirm_args(c: Confirmation) -> list[Any]:
    attempt = c.attempt
    state: dict[str, Any] = {"status": attempt.outcome, "attempts": attempt.attempt,
                             "updated_at": attempt.at, **c.extra}
    if attempt.status_code is not None:
        state["last_status"] = attempt.status_code
    if attempt.error:
        state["last_error"] = attempt.error
    if attempt.next_attempt_at:
        state["next_attempt_at"] = attempt.next_attempt_at
    event_id = c.event.event_id
    letter = ""
    if attempt.outcome == "dead":
        letter = json.dumps({
            "event_id": event_id, "destination": attempt.destination,
            "reason": c.dead_reason or "", "attempts": attempt.attempt,
            "status_code": attempt.status_code, "dead_at": attempt.at,
            "event": c.event.to_json(),
        })
    # Each delivery is listed under its current status only (skipped counts as delivered).
    listed = "delivered" if attempt.outcome == "skipped" else attempt.outcome
    return [c.entry_id, event_id, json.dumps(state), json.dumps(attempt.to_json()),
            attempt.outcome, repr(attempt.at), attempt.error or "", listed, letter,
            "" if c.retry_at is None else repr(c.retry_at)]


def dead_letter_counts(client: redis.Redis) -> collections.Counter[str]:
    """destination -> how many of its dead letters wait for replay (ZSCAN: never blocks).
    The one count of dead letters: the metrics, the console, the CLI and the API read it."""
    counts: collections.Counter[str] = collections.Counter()
    for member, _ in client.zscan_iter(DEAD_INDEX, count=1000):
        counts[member.decode().rsplit("|", 1)[-1]] += 1
    return counts


__all__ = ["DEAD_INDEX", "DEAD_KEY", "PREFIX", "Attempt", "Claim", "Confirmation",
           "DeliveryStore", "Outcome", "Taken", "dead_id", "delivery_key", "event_key",
           "log_key", "recent_key", "stats_key"]
