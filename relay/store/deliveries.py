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
    DELIVERY_PREFIX,
    EVENT_PREFIX,
    GROUP,
    LANES,
    LOG_PREFIX,
    PREFIX,
    SCHEDULED,
    dead_id,
    delivery_key,
    drainers_key,
    event_key,
    inflight_key,
    lane_key,
    log_key,
    recent_key,
    stats_key,
)
from relay.store.scripts import register

LOG_CAP = 100
RECENT_CAP = 10_000  # per destination and status: what the admin API lists
RECENT_STATUSES = ("delivered", "retrying", "dead")
ERROR_TEXT_LIMIT = 500

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
        self._step = register(client, "step")
        self._replay = register(client, "replay")
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
            keys=[lane_key(lane), inflight_key(lane), drainers_key(lane),
                  stats_key(lane), *(recent_key(lane, s) for s in RECENT_STATUSES),
                  DEAD_KEY, DEAD_INDEX, SCHEDULED],
            args=[GROUP, consumer, holder, lane, now, now + lease, self.retention, LOG_CAP,
                  RECENT_CAP, want, limit, int(reclaim_idle * 1000), outcomes,
                  EVENT_PREFIX, DELIVERY_PREFIX, LOG_PREFIX])
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
        """Take a dead letter out and put a fresh delivery into its lane, in one script
        (``lua/replay.lua``): two replays of one dead letter queue it once, and a crash leaves
        it either dead or queued, never neither. The delivery becomes pending again, the event
        record is restored (it may have expired) and the destination's dead count goes down by
        one. None when there is no such dead letter (or another replay took it)."""
        key = dead_id(event_id, destination)
        keys = [DEAD_KEY, DEAD_INDEX, event_key(event_id), delivery_key(event_id),
                stats_key(destination), recent_key(destination, "dead"), lane_key(destination),
                LANES]
        # Read first: the event and the state are encoded here, as they always were (Lua's
        # cjson would write other bytes), and the script writes only if the letter is still
        # the one read. One that changed in between (replayed, dead again) is read again.
        while (raw := self.redis.hget(DEAD_KEY, key)) is not None:
            record = json.loads(raw)
            state = {"status": "pending", "attempts": 0, "replayed_at": time.time()}
            if self._replay(keys=keys, args=[key, raw, json.dumps(record["event"]),
                                             json.dumps(state), self.retention, event_id,
                                             destination]):
                return LeadEvent.from_json(record["event"])
        return None


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
