"""The deliveries in flight, in Redis (keys: :mod:`.keys`).

Delivery state moves ``pending → inflight → delivered | skipped | retrying | dead`` with
claim-then-confirm, per (event, destination), whatever the batch it travels in. A drainer's
round trip is one script (:meth:`DeliveryStore.step`): it records the outcomes of the
deliveries that finished (never turning a success back into anything else, and acknowledging
their lane entries only then) and adds their history (the attempts, the states they left) to
the history stream; then it reads the next batch of the lane's entries and claims each delivery
with a lease (a second claimant is told ``busy`` or ``done``).

Redis holds an event's payload until the history writer has committed the event to the
database; a claim after that answers without it, and the engine reads it from the database
(one query per batch). The history of a delivery (attempts, dead letters) is read from the
database only (:mod:`relay.history.reader`).
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
    DELIVERY_PREFIX,
    EVENT_PREFIX,
    GROUP,
    HISTORY,
    LANES,
    ORDER_PREFIX,
    SCHEDULED,
    delivery_key,
    drainers_key,
    event_key,
    inflight_key,
    lane_key,
    stats_key,
)
from relay.store.scripts import register

#: How many events of one lead may wait behind its earliest at a destination with
#: ``ordering: per_lead``; past it (a hot key: a bot, a replay storm) the lead's next events
#: are sent at once, out of order, and counted (``Taken.unordered``).
MOST_WAITING_PER_LEAD = 1000

#: The statuses a destination's deliveries are listed by (a skipped one counts as delivered).
RECENT_STATUSES = ("delivered", "retrying", "dead")
ERROR_TEXT_LIMIT = 500

Outcome = Literal["delivered", "retrying", "dead", "skipped", "gone", "deferred"]


@dataclass(frozen=True)
class Claim:
    """One delivery a drainer took from its lane and holds the lease of."""

    entry_id: str
    event: LeadEvent
    attempt: int
    crashes: int = 0  # earlier attempts that never confirmed (their worker died)
    #: The attempt's id, minted at the claim (lane, entry, attempt number: unique, as a
    #: replay or a retry gets a new lane entry): the history's key for the attempt.
    attempt_id: str = ""
    #: The event's id, when the claim came without the payload (Redis let it go: ``event``
    #: is then a placeholder until the engine has read it from the database).
    event_id: str = ""
    #: Whether Redis knew the delivery's state: when not, it may be one that is final in the
    #: database (its state let go once written), and the database is asked before it is sent.
    state_known: bool = True


@dataclass(frozen=True)
class Taken:
    """What :meth:`DeliveryStore.take` did: the claims, and the entries it settled itself."""

    claims: list[Claim]
    done: int = 0  # already delivered or dead: acknowledged
    busy: int = 0  # another drainer holds the lease: parked until it ends
    gone: int = 0  # the event was erased or expired: acknowledged
    #: waiting behind an earlier event of their lead (``ordering: per_lead``): acknowledged,
    #: held in the lead's order list until their turn
    waiting: int = 0
    #: claimed out of order: their lead had too many waiting (:data:`MOST_WAITING_PER_LEAD`)
    unordered: int = 0


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
    attempt_id: str = ""  # the claim's (history key of the attempt)


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
    an entry can never be stale; bounded, so it holds only the last couple of thousand events.

    Also found by id (:meth:`recent`), for claims that come without the payload once Redis has
    let it go: a stored event never changes, so only an erased one could be stale, and a claim
    whose delivery state Redis still holds is not of an erased event (erasure drops the state
    with the payload)."""

    def __init__(self, size: int = 2048) -> None:
        self.size = size
        self._parsed: collections.OrderedDict[bytes, LeadEvent] = collections.OrderedDict()
        self._by_id: collections.OrderedDict[str, LeadEvent] = collections.OrderedDict()
        self._lock = threading.Lock()

    def add(self, raw: bytes, event: LeadEvent) -> None:
        with self._lock:
            self._parsed[raw] = event
            self._by_id[event.event_id] = event
            if len(self._parsed) > self.size:
                self._parsed.popitem(last=False)
            if len(self._by_id) > self.size:
                self._by_id.popitem(last=False)

    def get(self, raw: bytes) -> LeadEvent:
        event = self._parsed.get(raw)
        if event is None:
            event = parse_event(raw)
            self.add(raw, event)
        return event

    def recent(self, event_id: str) -> LeadEvent | None:
        """The event of this id, if it was parsed here lately."""
        return self._by_id.get(event_id)


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
             reclaim_idle: float = 0.0,
             most_waiting: int = MOST_WAITING_PER_LEAD) -> Taken:
        """A drainer's round trip: record a batch of the destination's outcomes (each
        delivery state, never downgrading a confirmed delivery; log line, counter,
        per-destination list, retry or dead letter; then acknowledge their lane entries and
        free their slots), then read up to ``want`` of the lane's entries (with
        ``reclaim_idle``, also entries a dead worker left pending that long) and claim each
        delivery for ``lease`` seconds, keeping the destination's in-flight total within
        ``limit``. One script, one round trip.

        With ``ordering: per_lead`` (entries that name their lead), only the earliest event of
        each lead not yet final is claimed; a later one waits in its lead's order list, and a
        final outcome lets the lead's next event into the lane (``lua/step.lua`` has the
        rules)."""
        now = time.time()
        outcomes = json.dumps([_confirm_args(c) for c in confirmations])
        records = [_history_record(c) for c in confirmations if c.attempt.outcome in _RECORDED]
        _confirmed, _used, claimed, done, busy, gone, waiting, unordered = self._step(
            keys=[lane_key(lane), inflight_key(lane), drainers_key(lane), stats_key(lane),
                  SCHEDULED, HISTORY, LANES],
            args=[GROUP, consumer, holder, lane, now, now + lease, self.retention, want, limit,
                  int(reclaim_idle * 1000), outcomes, json.dumps(records) if records else "",
                  EVENT_PREFIX, DELIVERY_PREFIX, ORDER_PREFIX, most_waiting])
        claims = []
        for entry, event_id, attempts, crashes, event, known in claimed:
            entry_id, event_id, known = entry.decode(), event_id.decode(), bool(int(known))
            if event:
                parsed: LeadEvent | None = self.parsed.get(event)
            else:  # Redis let the payload go: parsed here lately, or read from the database
                parsed = self.parsed.recent(event_id) if known else None
            claims.append(Claim(entry_id, parsed or _unread(event_id), int(attempts),
                                int(crashes), f"{lane}/{entry_id}/{int(attempts)}",
                                "" if parsed else event_id, known))
        return Taken(claims, int(done), int(busy), int(gone), int(waiting), int(unordered))

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

    def stats(self, destination: str) -> dict[str, str]:
        raw = self.redis.hgetall(stats_key(destination))
        return {k.decode(): v.decode() for k, v in raw.items()}

    # -- replay ---------------------------------------------------------------------------

    def replay(self, event_id: str, destination: str, received_at: float) -> bool:
        """Queue a dead letter (the database holds it) again, in one script
        (``lua/replay.lua``): the delivery becomes pending with a fresh lane entry, and the
        replay goes to the history. False, with nothing written, when Redis knows the delivery
        as queued, in flight or delivered (a second replay of the same dead letter)."""
        now = time.time()
        state = {"status": "pending", "attempts": 0, "replayed_at": now}
        record = {"k": "replay", "id": event_id, "destination": destination, "at": now,
                  "received_at": received_at}
        return bool(self._replay(
            keys=[delivery_key(event_id), lane_key(destination), LANES, HISTORY],
            args=[destination, event_id, json.dumps(state), json.dumps(record),
                  self.retention]))


_RECORDED = frozenset({"delivered", "skipped", "retrying", "dead"})


def _unread(event_id: str) -> LeadEvent:
    """A claim's event while its payload is still to be read from the database."""
    return LeadEvent(event_id=event_id, source="", name="", payload={})


def _confirm_args(c: Confirmation) -> list[Any]:
    attempt = c.attempt
    state: dict[str, Any] = {"status": attempt.outcome, "attempts": attempt.attempt,
                             "updated_at": attempt.at, **c.extra}
    if attempt.outcome == "deferred":
        state["status"] = "pending"
    if attempt.status_code is not None:
        state["last_status"] = attempt.status_code
    if attempt.error:
        state["last_error"] = attempt.error
    if attempt.next_attempt_at:
        state["next_attempt_at"] = attempt.next_attempt_at
    return [c.entry_id, c.event.event_id, json.dumps(state), attempt.outcome, repr(attempt.at),
            attempt.error or "", "" if c.retry_at is None else repr(c.retry_at)]


def _history_record(c: Confirmation) -> dict[str, Any]:
    """What the history keeps of an attempt: the attempt, and the state it left (a dead
    letter's reason is the attempt's error)."""
    attempt = c.attempt
    return {"k": "attempt", "attempt_id": c.attempt_id or f"{attempt.destination}/"
            f"{c.event.event_id}/{attempt.attempt}/{attempt.at!r}",
            "id": c.event.event_id, "destination": attempt.destination,
            "attempt": attempt.attempt, "outcome": attempt.outcome, "at": attempt.at,
            "received_at": c.event.received_at, "status_code": attempt.status_code,
            "latency_ms": attempt.latency_ms,
            "error": c.dead_reason if attempt.outcome == "dead" else attempt.error,
            "next_attempt_at": attempt.next_attempt_at, "status": attempt.outcome,
            "crashes": c.extra.get("crashes")}


__all__ = ["MOST_WAITING_PER_LEAD", "RECENT_STATUSES", "Attempt", "Claim", "Confirmation",
           "DeliveryStore", "Outcome", "Taken", "delivery_key", "event_key", "stats_key"]
