"""Intake and lanes: the Redis streams between the ingress, admission and delivery.

::

    ingress ──XADD──▶ relay:intake ──admit (dedupe, route)──▶ relay:lane:<destination> ──▶ drain
                      (one stream)    one script per batch     (one stream per destination)

Both are Redis streams read through the consumer group :data:`~relay.store.keys.GROUP`: an
entry a worker has read stays in the group's pending list until the script that records its
outcome acknowledges (and deletes) it, so a ``kill -9`` anywhere between the read and that
script leaves it pending, and :meth:`relay.store.deliveries.DeliveryStore.take` reclaims it
(``XAUTOCLAIM``) once it has been idle for the destination's lease. Nothing is copied "just in
case": the stream is the only copy.

Work is started by *kicks*: a Celery task per lane (``relay.drain``) or for the intake
(``relay.admit``), queued when the lane gets work and no kick is already queued (``SET NX`` on
the kick key, which the task deletes when it starts). A task drains its lane until it is empty
or its time budget is spent, so Celery's cost is paid per batch, not per delivery. A kick that
is lost (a killed worker's prefetched message) costs nothing but time: every worker's
scheduler sweeps the lanes once a second and kicks any lane that has work and no drainer.

Redis being unreachable is the caller's problem: these methods let ``redis.RedisError`` through
(the ingress turns it into a 503, the worker tasks retry on the next kick).
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import redis

from relay.store.keys import (
    DELIVERY_PREFIX,
    DRAINERS_PREFIX,
    EVENT_PREFIX,
    GROUP,
    HISTORY,
    HOLD_PREFIX,
    INTAKE,
    INTAKE_KICK,
    KICK_PREFIX,
    LANE_PREFIX,
    LANES,
    SCHEDULED,
    SEEN_PREFIX,
    drainers_key,
    hold_key,
    inflight_key,
    kick_key,
    lane_key,
    parked_member,
    seen_key,
)
from relay.store.scripts import register

#: How long a dedupe marker stays in Redis, at most: long enough for the event's row to reach
#: the database (where admission looks for the rest of the source's ``dedupe_window``), short
#: enough that the markers cost memory by the rate of events, not by the window's length.
SEEN_MARK_TTL = 600.0


def seen_mark_ms(dedupe_window: float) -> int:
    return max(1, int(min(dedupe_window, SEEN_MARK_TTL) * 1000))


@dataclass(frozen=True)
class Admission:
    """One intake entry as admission hands it to the admit script."""

    entry_id: str
    event_id: str
    dedupe_window: float
    event_json: str
    lanes: Sequence[str]
    as_new: str  # its history record (JSON) if it is admitted
    as_duplicate: str  # ... if it is a duplicate
    known: bool = False  # the database has it inside the dedupe window
    #: Per lane, the lead's digest where the destination keeps each lead's events in order
    #: (``ordering: per_lead``), else ''; empty: no lane is ordered.
    orders: Sequence[str] = ()

    @property
    def ordered(self) -> bool:
        return any(self.orders)


#: How long a queued kick keeps others from queueing another (a lost one is replaced after it).
KICK_TTL_MS = 10_000
#: Intake entries a dead worker had read are taken over after this long (admission is fast).
INTAKE_RECLAIM_IDLE_MS = 5_000


@dataclass(frozen=True)
class IntakeEntry:
    entry_id: str
    event: dict[str, Any] | None  # None: an entry that is not valid JSON (never written so)
    raw: bytes = b""


class Lanes:
    """The intake and lane streams of one Redis."""

    def __init__(self, client: redis.Redis, consumer: str = "relay") -> None:
        self.redis = client
        self.consumer = consumer
        # lua/<name>.lua: each file says what it is given (KEYS, ARGV) and what it answers
        self._publish = register(client, "publish")
        self._admit = register(client, "admit")
        self._join = register(client, "join")
        self._sweep = register(client, "sweep")
        self._release = register(client, "release")
        self._groups: set[str] = set()

    # -- the ingress ---------------------------------------------------------------------

    def publish(self, event: str, event_id: str, dedupe_window: float) -> tuple[str, bool]:
        """Store an accepted event (its JSON) in the intake and mark its id as received, in
        one round trip: the entry id, and whether the caller is to queue an admit task (none
        is queued; the kick key is now set for it). The mark lives :data:`SEEN_MARK_TTL` at
        most: the database holds the rest of the dedupe window."""
        entry, kick = self._publish(
            keys=[INTAKE, seen_key(event_id), INTAKE_KICK],
            args=[event, seen_mark_ms(dedupe_window), KICK_TTL_MS])
        return (entry.decode() if isinstance(entry, bytes) else str(entry)), bool(kick)

    # -- admission -----------------------------------------------------------------------

    def ensure_group(self, stream: str) -> None:
        if stream in self._groups:
            return
        try:
            self.redis.xgroup_create(stream, GROUP, id="0", mkstream=True)
        except redis.ResponseError as exc:
            if "BUSYGROUP" not in str(exc):
                raise
        self._groups.add(stream)

    def read_intake(self, count: int, reclaim: bool = False) -> list[IntakeEntry]:
        """Up to ``count`` intake entries: a dead worker's first (with ``reclaim``), then new
        ones."""
        self.ensure_group(INTAKE)
        entries: list[tuple[bytes, dict[bytes, bytes] | None]] = []
        if reclaim:
            reply = self.redis.xautoclaim(INTAKE, GROUP, self.consumer,
                                          INTAKE_RECLAIM_IDLE_MS, "0-0", count=count)
            entries.extend(reply[1])
        if len(entries) < count:
            for _, items in self.redis.xreadgroup(GROUP, self.consumer, {INTAKE: ">"},
                                                  count=count - len(entries)) or ():
                entries.extend(items)
        return [_intake_entry(entry_id, fields) for entry_id, fields in entries]

    def admit(self, version_key: str, version: bytes, now: float, retention: float,
              batch: Sequence[Admission]) -> list[str] | bytes | None:
        """Admit a batch: the outcome of each item (new, duplicate or done), or the
        subscriptions' current version when ``version`` is stale. None, with nothing written,
        when the batch has deliveries to an ordered destination and an earlier intake entry is
        still being admitted elsewhere: the caller tries again in a moment (so that each lead's
        events reach the lanes in the order received; the wait ends when the earlier batch is
        admitted, or after :data:`INTAKE_RECLAIM_IDLE_MS` if its worker died)."""
        guard = INTAKE_RECLAIM_IDLE_MS if any(item.ordered for item in batch) else 0
        lowest = min((item.entry_id for item in batch), key=_entry_order, default="0-0")
        args: list[Any] = [GROUP, version, now, int(retention),
                           SEEN_PREFIX, EVENT_PREFIX, DELIVERY_PREFIX, LANE_PREFIX,
                           lowest, guard]
        for item in batch:
            orders = item.orders or [""] * len(item.lanes)
            args += [item.entry_id, item.event_id, seen_mark_ms(item.dedupe_window),
                     1 if item.known else 0, item.event_json, item.as_new, item.as_duplicate,
                     len(item.lanes)]
            for lane, lead in zip(item.lanes, orders, strict=True):
                args += [lane, lead]
        for lane in {lane for item in batch for lane in item.lanes}:
            self.ensure_group(lane_key(lane))
        status, value = self._admit(keys=[INTAKE, version_key, LANES, HISTORY], args=args)
        if status == b"stale":
            return bytes(value)
        if status == b"wait":
            return None
        return [v.decode() for v in value]

    def drop(self, stream: str, entry_ids: Iterable[str]) -> None:
        """Acknowledge and delete entries that cannot be processed (logged by the caller)."""
        ids = list(entry_ids)
        if ids:
            pipe = self.redis.pipeline(transaction=True)
            pipe.xack(stream, GROUP, *ids)
            pipe.xdel(stream, *ids)
            pipe.execute()

    # -- draining --------------------------------------------------------------------------

    def join(self, lane: str, holder: str, lease: float, max_drainers: int) -> bool:
        """Become one of the lane's drainers (at most ``max_drainers`` at once)."""
        self.ensure_group(lane_key(lane))
        now = time.time()
        return bool(self._join(keys=[drainers_key(lane), inflight_key(lane)],
                               args=[holder, now, now + lease, max_drainers]))

    def leave(self, lane: str, holder: str) -> None:
        pipe = self.redis.pipeline(transaction=True)
        pipe.zrem(drainers_key(lane), holder)
        pipe.hdel(inflight_key(lane), holder)
        pipe.execute()

    def hold(self, lane: str, until: float) -> None:
        """Keep the sweep from kicking the lane until ``until`` (pause, open circuit, rate)."""
        ttl = max(1, int((until - time.time()) * 1000))
        self.redis.set(hold_key(lane), f"{until:.6f}", px=ttl)

    def unhold(self, lane: str) -> None:
        self.redis.delete(hold_key(lane))

    def sweep(self, max_drainers: int) -> list[str]:
        """Lanes (and ``""`` for the intake) that need a kick now; their kick keys are set."""
        kicks = self._sweep(keys=[LANES, INTAKE, INTAKE_KICK],
                            args=[time.time(), KICK_TTL_MS, max_drainers, GROUP, LANE_PREFIX,
                                  HOLD_PREFIX, KICK_PREFIX, DRAINERS_PREFIX])
        return [k.decode() for k in kicks]

    def claim_kicks(self, lanes: Iterable[str]) -> list[str]:
        """Set the kick key of each lane (``""``: the intake) that has none queued; the lanes
        to kick."""
        names = sorted(set(lanes))
        if not names:
            return []
        pipe = self.redis.pipeline(transaction=False)
        for lane in names:
            pipe.set(_kick(lane), "1", nx=True, px=KICK_TTL_MS)
        return [lane for lane, ok in zip(names, pipe.execute(), strict=True) if ok]

    def kicked(self, lane: str) -> None:
        """A kicked task has started (``""``: an admit task): later work needs a kick of its
        own."""
        self.redis.delete(_kick(lane))

    def drop_lane(self, lane: str, limit: int = 1000) -> int:
        """Acknowledge and delete up to ``limit`` entries of a lane whose destination is gone."""
        entries = self.redis.xrange(lane_key(lane), count=limit)
        self.drop(lane_key(lane), [entry.decode() for entry, _ in entries])
        return len(entries)

    # -- parked deliveries ---------------------------------------------------------------

    def park(self, event_id: str, destination: str, due: float) -> None:
        self.redis.zadd(SCHEDULED, {parked_member(event_id, destination): due})

    def release_due(self, now: float | None = None, limit: int = 500) -> tuple[int, list[str]]:
        """Move due parked deliveries into their lanes: (how many, the lanes touched)."""
        moved, lanes = self._release(keys=[SCHEDULED, LANES],
                                     args=[now if now is not None else time.time(), limit,
                                           LANE_PREFIX])
        return int(moved), [lane.decode() for lane in lanes]

    # -- reading -----------------------------------------------------------------------

    def depth(self) -> int:
        """Events accepted and not yet admitted."""
        return int(self.redis.xlen(INTAKE))

    def lane_depths(self) -> dict[str, int]:
        """Deliveries waiting or in flight, per lane."""
        names = sorted(m.decode() for m in self.redis.smembers(LANES))
        pipe = self.redis.pipeline(transaction=False)
        for name in names:
            pipe.xlen(lane_key(name))
        return dict(zip(names, (int(n) for n in pipe.execute()), strict=True))

    def scheduled(self) -> int:
        return int(self.redis.zcard(SCHEDULED))

    def lane_entries(self, lane: str, limit: int = 100_000) -> list[tuple[str, str]]:
        """(entry id, event id) of a lane, oldest first."""
        return [(entry.decode(), fields.get(b"e", b"").decode())
                for entry, fields in self.redis.xrange(lane_key(lane), count=limit)]


def parked(client: redis.Redis) -> Iterable[tuple[str, str, float]]:
    """(event id, destination, due) of every parked delivery (ZSCAN: never blocks Redis)."""
    for member, score in client.zscan_iter(SCHEDULED, count=1000):
        event_id, _, destination = member.decode().rpartition("|")
        yield event_id, destination, float(score)


def intake_events(client: redis.Redis, limit: int = 100_000,
                  ) -> Iterable[tuple[str, dict[str, Any]]]:
    """(entry id, event) of the events accepted and not yet admitted, oldest first."""
    start = "-"
    while limit > 0:
        chunk = client.xrange(INTAKE, min=start, count=min(1000, limit))
        for entry_id, fields in chunk:
            parsed = _intake_entry(entry_id, fields)
            if parsed.event is not None:
                yield parsed.entry_id, parsed.event
        if len(chunk) < 1000:
            return
        limit -= len(chunk)
        start = "(" + chunk[-1][0].decode()


def _entry_order(entry_id: str) -> tuple[int, int]:
    """A stream entry id (``<ms>-<seq>``) as what it sorts by."""
    ms, _, seq = entry_id.partition("-")
    return int(ms), int(seq or 0)


def _kick(lane: str) -> str:
    return INTAKE_KICK if lane == "" else kick_key(lane)


def _intake_entry(entry_id: bytes, fields: dict[bytes, bytes] | None) -> IntakeEntry:
    try:
        event = json.loads(fields[b"e"]) if fields else None
    except (KeyError, ValueError):
        event = None
    return IntakeEntry(entry_id.decode(), event if isinstance(event, dict) else None,
                       fields.get(b"e", b"") if fields else b"")


__all__ = ["IntakeEntry", "Lanes", "intake_events", "parked"]
