"""The delivery engine: what a worker does, Celery-free, so it can be tested on fakeredis and
called by the thin tasks in ``workers``.

- :meth:`Engine.admit` drains the intake: each batch of accepted events is deduped, stored and
  routed into the destinations' lanes by one script (:mod:`relay.store.lanes`).
- :meth:`Engine.drain` drains one destination's lane: it keeps up to the destination's
  ``concurrency`` deliveries in flight (shared by every worker through Redis, and within this
  process's ``max_in_flight``), each claimed before it is sent and confirmed after, in batches:
  one round trip records whatever has finished and claims what the free slots allow.

Sends run on a thread pool of ``max_in_flight`` threads: a slow destination fills its own share
of it and waits there, while every other lane is drained by its own task.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import json
import logging
import math
import queue
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Protocol

import redis
from sqlalchemy import Engine as Database
from sqlalchemy.exc import SQLAlchemyError

from relay.config.relay_yaml import RelayConfig, Source
from relay.config.settings import Settings
from relay.core.errors import RetryableDeliveryError
from relay.core.models import SUCCESSES, Destination, LeadEvent
from relay.core.routing import route
from relay.delivery.attempt import Decider, DriverCache, Request, Sent, send
from relay.delivery.gates import Gate, RateLimitGate
from relay.history import reader
from relay.history.database import reading
from relay.history.leads import lead_keys
from relay.observability.metrics import metrics_for
from relay.store.deliveries import (
    MOST_WAITING_PER_LEAD,
    Attempt,
    Claim,
    Confirmation,
    DeliveryStore,
    parse_event,
)
from relay.store.keys import INTAKE, NOTHING, lane_key, order_lead
from relay.store.lanes import Admission, IntakeEntry, Lanes

log = logging.getLogger("relay.engine")

#: Drain tasks that may work one lane at once, across all workers.
MAX_DRAINERS = 4
#: A lane keeps about ``latency x LANE_RATE`` deliveries in flight (Little's law): enough for
#: the most one worker process can send, and no more, so a fast destination does not fill the
#: pool with threads that only contend for the CPU (and a crash has few sends unconfirmed).
#: The latency is the shortest of the last two seconds' attempts: a mean would count the time
#: sends spent waiting for this process's CPU, and widen the window that caused the wait.
LANE_RATE = 600.0
MIN_WINDOW = 4
LATENCY_SAMPLES = 64
LATENCY_HORIZON = 2.0
#: How often a drainer also looks for deliveries a dead worker left pending.
RECLAIM_EVERY = 2.0
ADMIT_BATCH = 200
#: A key nothing writes: the subscriptions' version when there are no API subscriptions.
NO_VERSION = NOTHING
#: How long a delivery whose payload could not be read from the database waits to be tried.
DEFERRED_DELAY = 5.0
#: How long a 429 without a ``Retry-After`` holds its destination.
SLOW_DOWN = 1.0


FINAL = frozenset({*SUCCESSES, "dead"})


@dataclass(frozen=True)
class Payloads:
    """What :meth:`Engine.payloads` read: claims ready to send, claims of deliveries the
    database has as final, of events gone (erased, past the retention), and claims it could
    not read for (the database away)."""

    found: list[Claim]
    done: list[Claim]
    gone: list[Claim]
    unreadable: list[Claim]


class SubscriptionSource(Protocol):
    """Destinations registered at run time (the subscription API).

    ``version_key`` names a Redis key whose value changes with every change of the
    subscriptions: the admit script checks it in its round trip, and ``for_event`` reuses what
    it read for the same version instead of asking Redis again."""

    version_key: str

    def for_event(self, event: LeadEvent, version: bytes | None = None) -> list[Destination]: ...

    def get(self, name: str) -> Destination | None: ...

    def remove_destination(self, destination: Destination, reason: str) -> None: ...


@dataclass
class Report:
    """What one admit or drain task did (its Celery return value, and what tests look at)."""

    counts: Counter[str] = field(default_factory=Counter)

    def add(self, outcome: str, n: int = 1) -> None:
        if n:
            self.counts[outcome] += n

    def as_dict(self) -> dict[str, int]:
        return dict(self.counts)


class Slots:
    """The process's in-flight budget (``max_in_flight``), shared by its drainers."""

    def __init__(self, size: int) -> None:
        self.size = size
        self._free = size
        self._lock = threading.Lock()

    def take(self, n: int) -> int:
        with self._lock:
            granted = max(0, min(n, self._free))
            self._free -= granted
            return granted

    def give(self, n: int) -> None:
        with self._lock:
            self._free = min(self.size, self._free + n)


class Engine:
    """The worker-side core, built once per worker process."""

    def __init__(
        self,
        settings: Settings,
        config: RelayConfig,
        client: redis.Redis,
        subscriptions: SubscriptionSource | None = None,
        drivers: DriverCache | None = None,
        gates: tuple[Gate, ...] = (),
        kick: Callable[[str, int], None] | None = None,
        max_in_flight: int = 100,
        consumer: str = "relay",
        time_limit: float | None = None,
        database: Database | None = None,
    ) -> None:
        self.settings = settings
        self.config = config
        self.redis = client
        self.consumer = consumer
        self.store = DeliveryStore(client, settings.retention)
        self.lanes = Lanes(client, consumer)
        #: The history database: the long dedupe window, and the payloads Redis let go.
        self.database = database
        self.subscriptions = subscriptions
        self.drivers = drivers or DriverCache()
        self.gates = gates
        self.decider = Decider(on_gone=self._gone)
        self.metrics = metrics_for(client)
        #: Queues a task for a lane (``""``: an admit task); None: nothing to queue (tests
        #: call admit and drain themselves).
        self.send_kick = kick
        self.slots = Slots(max_in_flight)
        self.time_limit = time_limit if time_limit is not None else settings.task_time_limit
        self.stopping = threading.Event()
        self._executor: ThreadPoolExecutor | None = None
        self._executor_lock = threading.Lock()
        self._version: bytes | None = None
        self._draining: dict[str, int] = {}  # lanes this process drains now
        self._wanted: set[str] = set()  # ... and kicked again meanwhile
        self._latency: dict[str, collections.deque[tuple[float, float]]] = {}
        self._draining_lock = threading.Lock()

    # -- routing ---------------------------------------------------------------------------

    def source(self, name: str) -> Source:
        return self.config.sources.get(name) or Source(name)

    def destination(self, name: str) -> Destination | None:
        found = self.config.destination(name)
        if found is None and self.subscriptions is not None:
            found = self.subscriptions.get(name)
        return found

    def destinations_for(self, event: LeadEvent, version: bytes | None = None
                         ) -> list[Destination]:
        targets = route(event, self.config.destinations)
        if self.subscriptions is not None:
            targets += route(event, self.subscriptions.for_event(event, version))
        return targets

    # -- kicks -----------------------------------------------------------------------------

    def kick(self, lanes: Iterable[str]) -> list[str]:
        """Queue a task for each lane (``""``: the intake) that has none queued."""
        if self.send_kick is None:
            return []
        kicked = self.lanes.claim_kicks(lanes)
        for lane in kicked:
            destination = self.destination(lane) if lane else None
            self.send_kick(lane, destination.concurrency if destination else 0)
        return kicked

    # -- admission -------------------------------------------------------------------------

    def admit(self, budget: float = 5.0, batch: int = ADMIT_BATCH) -> Report:
        """Admit accepted events until the intake is empty or ``budget`` seconds are spent."""
        self.lanes.kicked("")
        report = Report()
        deadline = time.monotonic() + budget
        reclaim = True  # once per task: a dead worker's entries, idle long enough
        while not self.stopping.is_set():
            entries = self.lanes.read_intake(batch, reclaim=reclaim)
            reclaim = False
            if not entries:
                break
            self._admit_batch(entries, report)
            if time.monotonic() > deadline:
                self.kick([""])
                break
        return report

    def _admit_batch(self, entries: Sequence[IntakeEntry], report: Report) -> None:
        events: list[tuple[IntakeEntry, LeadEvent]] = []
        bad: list[str] = []
        for entry in entries:
            try:
                if entry.event is None:
                    raise TypeError("not a JSON object")
                if entry.raw:  # what the lanes' claims will read: parsed once, here
                    event = parse_event(entry.raw, entry.event)
                    self.store.parsed.add(entry.raw, event)
                else:
                    event = LeadEvent.from_json(entry.event)
                events.append((entry, event))
            except (KeyError, TypeError):
                bad.append(entry.entry_id)
        if bad:  # never written so by the ingress: nothing could deliver them
            log.error("dropped %d unreadable intake entries: %s", len(bad), ", ".join(bad))
            self.lanes.drop(INTAKE, bad)
        if not events:
            return
        version_key = self.subscriptions.version_key if self.subscriptions else NO_VERSION
        if self._version is None:
            self._version = self.redis.get(version_key) or b""
        now = time.time()
        known = self.received_before([event for _, event in events], now)
        for _ in range(10):  # a subscription change between routing and admitting: route again
            items = [self._admission(entry, event, event.event_id in known, now)
                     for entry, event in events]
            outcomes = self._admit_in_turn(version_key, now, items)
            if isinstance(outcomes, list):
                break
            self._version = outcomes
        else:
            raise RuntimeError("the subscriptions kept changing while admitting a batch")
        touched: set[str] = set()
        for (_, event), item, outcome in zip(events, items, outcomes, strict=True):
            report.add(outcome)
            if outcome == "duplicate":
                log.info("duplicate dropped", extra={"event_id": event.event_id})
            elif outcome == "new":
                touched.update(item.lanes)
                if not item.lanes:
                    log.info("no destination subscribed", extra={"event_id": event.event_id,
                                                                 "event": event.name})
        duplicates = outcomes.count("duplicate")
        if duplicates:
            self.metrics.inc("events_duplicate", amount=duplicates)
        self.kick(touched)

    def _admit_in_turn(self, version_key: str, now: float, items: Sequence[Admission]
                       ) -> list[str] | bytes:
        """Admit a batch (:meth:`Lanes.admit`); a batch with deliveries to an ordered
        destination waits while an earlier one is still being admitted elsewhere."""
        pause = 0.002
        while True:
            outcomes = self.lanes.admit(version_key, self._version, now,
                                        self.settings.retention, items)
            if outcomes is not None:
                return outcomes
            time.sleep(pause)  # bounded: the earlier batch's own wait ends within seconds
            pause = min(0.05, pause * 2)

    def _admission(self, entry: IntakeEntry, event: LeadEvent, known: bool,
                   now: float) -> Admission:
        stored = entry.raw.decode() or json.dumps(event.to_json())
        targets = self.destinations_for(event, self._version)
        lanes = [d.name for d in targets]
        leads = lead_keys(event.payload)
        orders: list[str] = []
        if leads and any(d.ordered for d in targets):
            # The lead it is ordered by: its first key (email, social_id, phone, id); an
            # event that names none is sent unordered.
            lead = order_lead(*leads[0])
            orders = [lead if d.ordered else "" for d in targets]
        as_new = {"k": "event", "id": event.event_id, "name": event.name,
                  "source": event.source, "campaign_id": event.campaign_id,
                  "received_at": event.received_at, "admitted_at": now,
                  "leads": leads, "destinations": lanes}
        as_duplicate = {"k": "duplicate", "entry": entry.entry_id, "id": event.event_id,
                        "at": now, "received_at": event.received_at}
        return Admission(entry.entry_id, event.event_id,
                         self.source(event.source).dedupe_window, stored, lanes,
                         json.dumps(as_new), json.dumps(as_duplicate), known, orders)

    def received_before(self, events: Sequence[LeadEvent], now: float) -> set[str]:
        """The events the database already holds inside their source's dedupe window (one
        indexed lookup per batch). Without the database, the Redis markers alone dedupe (for
        :data:`relay.store.lanes.SEEN_MARK_TTL`)."""
        if self.database is None or not events:
            return set()
        longest = max(self.source(e.source).dedupe_window for e in events)
        try:
            with reading(self.database) as connection:
                found = reader.received_at(connection, [e.event_id for e in events],
                                           now - longest)
        except SQLAlchemyError as exc:
            log.warning("cannot look up earlier events (deduping by Redis markers only): %s",
                        exc)
            return set()
        return {e.event_id for e in events if e.event_id in found
                and found[e.event_id] >= now - self.source(e.source).dedupe_window}

    def payloads(self, destination: str, claims: Sequence[Claim]) -> Payloads:
        """Read from the database, in one query, what claims need that Redis no longer had:
        their events, and whether the delivery is final there already (a stray lane entry of a
        delivery Redis has let go)."""
        ids = [c.event_id for c in claims]
        try:
            if self.database is None:
                raise SQLAlchemyError("no history database")
            with reading(self.database) as connection:
                rows = reader.claimed_events(connection, ids, destination)
        except SQLAlchemyError as exc:
            log.warning("cannot read %d payloads from the database: %s", len(ids), exc)
            return Payloads([], [], [], list(claims))
        done, found, gone = [], [], []
        for claim in claims:
            row = rows.get(claim.event_id)
            if row is None:
                gone.append(claim)
            elif not claim.state_known and row[1] in FINAL:
                done.append(claim)
            else:
                found.append(dataclasses.replace(claim,
                                                 event=self.store.parsed.get(row[0].encode())))
        return Payloads(found, done, gone, [])

    # -- draining --------------------------------------------------------------------------

    def drain(self, lane: str, budget: float = 10.0, batch: int | None = None) -> Report:
        """Deliver a lane's deliveries until it is empty, ``budget`` seconds are spent, or the
        worker is stopping; at most ``self.time_limit`` seconds in all, and at most ``batch``
        in flight at once (default: the destination's concurrency)."""
        self.lanes.kicked(lane)
        report = Report()
        destination = self.destination(lane)
        if destination is None:
            dropped = self.lanes.drop_lane(lane)
            log.warning("dropped %d deliveries: destination no longer configured", dropped,
                        extra={"destination": lane})
            report.add("gone", dropped)
            return report
        with self._draining_lock:
            # One drainer per lane in a process: it keeps the lane's whole window in flight;
            # a second would only double the window (more threads, more unconfirmed sends).
            # A kick that finds one here asks it to look at the lane again before it leaves.
            if lane in self._draining:
                self._wanted.add(lane)
                report.add("crowded")
                return report
            self._draining[lane] = 1
        holder = f"{self.consumer}:{uuid.uuid4().hex[:8]}"
        started = time.monotonic()
        try:
            if not self.lanes.join(lane, holder, self.lease(destination), MAX_DRAINERS):
                report.add("crowded")
                return report
            while True:
                _Drain(self, destination, holder, report, batch).run(
                    budget - (time.monotonic() - started))
                with self._draining_lock:
                    again = lane in self._wanted
                    self._wanted.discard(lane)
                if not again or self.stopping.is_set() or time.monotonic() - started > budget:
                    break
        finally:
            with self._draining_lock:
                self._draining.pop(lane, None)
                late = lane in self._wanted  # kicked between our last look and now
                self._wanted.discard(lane)
            with contextlib.suppress(redis.RedisError):  # else its lease runs out by itself
                self.lanes.leave(lane, holder)
                if late and not self.stopping.is_set():
                    self.kick([lane])
        return report

    def lease(self, destination: Destination) -> float:
        """How long this worker holds a claimed delivery: the destination's timeout (which
        bounds a whole answer) plus ``RELAY_LEASE_MARGIN`` to record the outcome. A dead
        worker's deliveries are taken over once it has passed."""
        return destination.lease_with(self.settings.lease_margin)

    def count_outcomes(self, lane: str, outcomes: Sequence[Confirmation]) -> None:
        """The metrics of recorded outcomes: one per delivery, and its attempt's latency."""
        for c in outcomes:
            self.metrics.inc("deliveries", {"destination": lane, "outcome": c.attempt.outcome})
            if c.attempt.latency_ms is not None:
                self.metrics.observe("attempt_latency_seconds", c.attempt.latency_ms / 1000,
                                     {"destination": lane})

    def lane_share(self, destination: Destination) -> int:
        """How many of this process's slots one lane may use: its ``concurrency``, and no
        more than an equal share when several lanes are being drained here."""
        lanes = max(1, len(self._draining))
        return max(1, min(destination.concurrency, math.ceil(self.slots.size / lanes)))

    def observed(self, lane: str, latency_ms: float) -> None:
        samples = self._latency.setdefault(lane, collections.deque(maxlen=LATENCY_SAMPLES))
        samples.append((time.monotonic(), latency_ms / 1000))

    def latency(self, lane: str) -> float | None:
        """The lane's recent *shortest* attempt latency: what the destination needs, without
        the time a send spent waiting for this process's CPU (which the mean would count,
        and a bigger window would only make worse)."""
        samples = self._latency.get(lane)
        if not samples:
            return None
        recent = [latency for at, latency in samples if at >= samples[-1][0] - LATENCY_HORIZON]
        return min(recent)

    def executor(self) -> ThreadPoolExecutor:
        if self._executor is None:
            with self._executor_lock:
                if self._executor is None:
                    self._executor = ThreadPoolExecutor(self.slots.size,
                                                        thread_name_prefix="relay-send")
        return self._executor

    def close(self) -> None:
        self.stopping.set()
        if self._executor is not None:
            self._executor.shutdown(wait=False, cancel_futures=True)
        self.drivers.close()

    def _gone(self, destination: Destination) -> None:
        if destination.untrusted and self.subscriptions is not None:
            self.subscriptions.remove_destination(destination, "the URL answered 410 Gone")


#: Gates whose hold means the destination must not be sent to now (not merely "no more now").
STOPPING_GATES = frozenset({"pause", "circuit"})


class _Drain:
    """One drain task's loop over its lane.

    The lane's unit is the request: ``concurrency``, this process's slots and the gates count
    requests. A request carries one delivery, or up to ``batch.max`` of them for a destination
    with a batch; a batch that is not full waits in :attr:`buffer`, claimed, until it fills up
    or its ``batch.wait`` is over, whichever comes first."""

    def __init__(self, engine: Engine, destination: Destination, holder: str,
                 report: Report, batch: int | None = None) -> None:
        self.engine = engine
        self.destination = destination
        self.lane = destination.name
        self.holder = holder
        self.report = report
        self.finished: queue.SimpleQueue[tuple[Future[Request], list[Claim]]] = (
            queue.SimpleQueue())
        self.batch = batch or destination.concurrency  # requests in flight, at most
        self.per = destination.per_request
        self.wait = destination.batch.wait if destination.batch is not None else 0.0
        self.in_flight = 0  # deliveries sent, not yet decided
        self.requests = 0  # requests out
        self.buffer: list[Claim] = []  # claimed, waiting for company: never a full request
        self.buffer_due = 0.0  # (monotonic) when the buffer goes, full or not
        self.held_until: float | None = None
        self.held_by: str | None = None  # the gate that held the lane
        self.backing_off = False  # held because the destination answered 429
        #: The last refill took entries from the lane (claimed, or settled without a send:
        #: waiting behind their lead, done, busy, gone): with nothing in flight, read on.
        self.took = False
        self.rate = next((g for g in engine.gates if isinstance(g, RateLimitGate)), None)

    def _may_read(self, deadline: float, reading: bool) -> bool:
        return (reading and self.held_until is None and time.monotonic() < deadline
                and not self.engine.stopping.is_set())

    def run(self, budget: float) -> None:
        engine = self.engine
        started = time.monotonic()
        deadline = started + budget
        hard_deadline = started + engine.time_limit
        last_reclaim = -math.inf
        lane_empty = False
        reading = True  # False once Redis failed a read: this task takes nothing more
        outcomes: list[Confirmation] = []  # decided, not yet recorded
        while True:
            now = time.monotonic()
            due = bool(self.buffer) and now >= self.buffer_due
            if self._may_read(deadline, reading) and (not lane_empty or due):
                reclaim = now - last_reclaim >= RECLAIM_EVERY
                if reclaim:
                    last_reclaim = now
                try:
                    # The outcomes ride with the next claim: one round trip for both.
                    lane_empty = not self._refill(reclaim, outcomes)
                except redis.RedisError:
                    if outcomes:
                        self._record(outcomes)
                    if self.in_flight == 0 and not self.buffer:
                        raise
                    # Redis went away: take nothing more, but record what is already out.
                    log.warning("cannot read the lane (Redis unreachable); finishing the %d "
                                "deliveries in flight", self.in_flight + len(self.buffer),
                                extra={"destination": self.lane})
                    reading = False
                outcomes = []
            elif outcomes:
                self._record(outcomes)
                outcomes = []
            if self.buffer and (time.monotonic() >= self.buffer_due
                                or not self._may_read(deadline, reading)):
                self._let_go()  # its wait is over, or nothing more will come to fill it
            if self.in_flight == 0 and not self.buffer:
                if self.took and not outcomes and self._may_read(deadline, reading):
                    continue  # the lane gave entries that needed no send: more may follow
                break
            remaining = hard_deadline - time.monotonic()
            if remaining <= 0:
                self._abandon()
                return
            timeout = min(remaining, 1.0)
            if self.buffer:
                timeout = min(timeout, max(0.0, self.buffer_due - time.monotonic()))
            try:
                first = self.finished.get(timeout=timeout)
            except queue.Empty:
                continue
            done = [first]
            while True:
                try:
                    done.append(self.finished.get_nowait())
                except queue.Empty:
                    break
            outcomes = self._decide(done)
            if outcomes and (any(o.attempt.outcome not in SUCCESSES for o in outcomes)
                             or any(g.reads_outcomes(self.destination) for g in engine.gates)):
                # The circuit counts failures (and a probe's success), and the gates look
                # before the next claim: record first, so that they see these outcomes.
                self._record(outcomes)
                outcomes = []
            lane_empty = False  # look again: entries may have come while these were out
        if self.held_until is not None:
            engine.lanes.hold(self.lane, self.held_until)
        elif (time.monotonic() >= deadline and not engine.stopping.is_set()
              and engine.redis.xlen(lane_key(self.lane))):
            engine.kick([self.lane])  # budget spent, work left: hand over to a new task

    def _refill(self, reclaim: bool, outcomes: list[Confirmation]) -> bool:
        """Record ``outcomes``, and claim and send as many deliveries as the free requests
        allow (and what fills the buffer), in one round trip. False when the lane had nothing
        to read (or the destination's shared concurrency is used up). A Redis error leaves
        ``outcomes`` unrecorded (the caller records them)."""
        engine, destination, per = self.engine, self.destination, self.per
        self.took = False
        cap = min(engine.lane_share(destination), self.batch)
        if per == 1:  # a batch's latency says nothing about how many to keep in flight
            cap = min(cap, self._window())
        requests = cap - self.requests - (1 if self.buffer else 0)
        counted = 0  # what the rate limit granted: given back below if it is not used
        for gate in engine.gates:
            if requests <= 0:
                break
            granted, until = gate.allow(destination, requests)
            if gate is self.rate:
                counted = granted
            if granted < requests:
                requests = granted
                self.held_until = until
                self.held_by = gate.name
        slots = engine.slots.take(requests) if requests > 0 else 0
        want = slots * per + (per - len(self.buffer) if self.buffer else 0)
        if want <= 0 and not outcomes:
            self._unused(counted)
            return True
        try:
            lease = engine.lease(destination)
            taken = engine.store.step(self.lane, engine.consumer, self.holder, lease,
                                      outcomes, want, destination.concurrency * per,
                                      lease if reclaim else 0.0)
        except BaseException:
            engine.slots.give(slots)
            self._unused(counted)
            raise
        engine.count_outcomes(self.lane, outcomes)
        self.took = bool(taken.claims or taken.done or taken.busy or taken.gone
                         or taken.waiting)
        if want <= 0:
            self._unused(counted)
            return True
        self.report.add("already-done", taken.done)
        self.report.add("busy", taken.busy)
        self.report.add("gone", taken.gone)
        self.report.add("waiting", taken.waiting)
        if taken.unordered:
            self._unordered(taken.unordered)
        claims: list[Claim] = []
        buried: list[Confirmation] = []
        max_crashes = engine.settings.max_task_runs
        ready = [c for c in taken.claims if not c.event_id]
        unread = [c for c in taken.claims if c.event_id]
        if unread:
            ready += self._read_payloads(unread)
        for claim in ready:
            if max_crashes and claim.crashes >= max_crashes:
                buried.append(engine.decider.bury(
                    destination, claim,
                    f"the delivery crashed its worker {claim.crashes} times"))
            else:
                claims.append(claim)
        if buried:
            engine.store.confirm(self.lane, self.holder, engine.lease(destination), buried)
            engine.count_outcomes(self.lane, buried)
            self.report.add("dead", len(buried))
        had_buffer = bool(self.buffer)
        sent = self._dispatch(claims)
        used = sent + bool(self.buffer) - had_buffer  # requests of this refill's grant
        engine.slots.give(slots - used)
        self._unused(counted - used)
        return bool(taken.claims or taken.done or taken.busy or taken.gone or taken.waiting)

    def _unordered(self, n: int) -> None:
        """Deliveries sent out of order: their lead had too many waiting (a hot key)."""
        self.report.add("unordered", n)
        self.engine.metrics.inc("deliveries_unordered", {"destination": self.lane}, amount=n)
        log.warning("%d deliveries sent out of order: their lead had %d events waiting "
                    "already", n, MOST_WAITING_PER_LEAD, extra={"destination": self.lane})

    def _dispatch(self, claims: list[Claim]) -> int:
        """Send the buffer and ``claims`` in full requests; what does not fill one is the
        new buffer (the old one keeps its due time if nothing went). How many went."""
        pool = self.buffer + claims
        kept = bool(self.buffer)
        self.buffer = []
        sent = 0
        while len(pool) >= self.per:
            self._submit(pool[:self.per])
            pool = pool[self.per:]
            sent += 1
        if pool:
            self.buffer = pool
            if not (kept and sent == 0):
                self.buffer_due = time.monotonic() + self.wait
        return sent

    def _submit(self, group: list[Claim]) -> None:
        driver = self.engine.drivers.get(self.destination)
        future = self.engine.executor().submit(send, driver, group)
        self.in_flight += len(group)
        self.requests += 1
        future.add_done_callback(self._finished_callback(group))

    def _let_go(self) -> None:
        """Send the buffer as it is, unless the destination asked to be left alone (a 429),
        was paused or had its circuit opened while the buffer waited, or the worker is
        stopping: then its deliveries wait, without an attempt counted, until the hold ends
        (or the scheduler's next look). A rate limit's hold does not stop it: its request
        was granted when its first delivery was claimed."""
        group, self.buffer = self.buffer, []
        stopped = self.held_by in STOPPING_GATES
        if self.backing_off or stopped or self.engine.stopping.is_set():
            self.engine.slots.give(1)
            self._defer(group, self.held_until if self.backing_off or stopped else None)
        else:
            self._submit(group)

    def _defer(self, claims: list[Claim], until: float | None) -> None:
        now = time.time()
        deferred = [Confirmation(c.event, Attempt(self.lane, c.attempt - 1, "deferred", at=now),
                                 c.entry_id, retry_at=max(now, until or now),
                                 extra={"crashes": c.crashes} if c.crashes else {})
                    for c in claims]
        self.engine.store.confirm(self.lane, self.holder, self.engine.lease(self.destination),
                                  deferred)
        self.report.add("deferred", len(deferred))

    def _unused(self, requests: int) -> None:
        """Requests the rate limit granted that this drainer did not make: given back."""
        if requests > 0 and self.rate is not None:
            self.rate.give_back(self.destination, requests)

    def _read_payloads(self, unread: list[Claim]) -> list[Claim]:
        """The claims whose payloads the database gave; the others are settled at once: a
        delivery already final there, or of an event that is gone, is forgotten (its entry
        acknowledged), and when the database cannot be read, the deliveries wait
        :data:`DEFERRED_DELAY` without an attempt counted."""
        engine, destination = self.engine, self.destination
        read = engine.payloads(destination.name, unread)
        now = time.time()
        settled = [Confirmation(claim.event, Attempt(destination.name, claim.attempt, "gone",
                                                     at=now), claim.entry_id)
                   for claim in [*read.done, *read.gone]]
        settled += [Confirmation(claim.event, Attempt(destination.name, claim.attempt - 1,
                                                      "deferred", at=now),
                                 claim.entry_id, retry_at=now + DEFERRED_DELAY)
                    for claim in read.unreadable]
        if settled:
            engine.store.confirm(self.lane, self.holder, engine.lease(destination), settled)
            self.report.add("already-done", len(read.done))
            self.report.add("gone", len(read.gone))
            self.report.add("deferred", len(read.unreadable))
        return read.found

    def _window(self) -> int:
        latency = self.engine.latency(self.lane) or 0.0
        return max(MIN_WINDOW, math.ceil(latency * LANE_RATE))

    def _finished_callback(self, group: list[Claim]) -> Callable[[Future[Request]], None]:
        def finished(future: Future[Request]) -> None:
            self.engine.slots.give(1)
            self.finished.put((future, group))
        return finished

    def _decide(self, done: list[tuple[Future[Request], list[Claim]]]
                ) -> list[Confirmation]:
        engine, destination = self.engine, self.destination
        confirmations: list[Confirmation] = []
        slow_until = 0.0
        for future, group in done:
            self.in_flight -= len(group)
            self.requests -= 1
            try:
                request = future.result()
            except BaseException as exc:  # cancelled at shutdown: never sent
                request = Request([Sent(claim, exc, 0.0) for claim in group])
            if request.requests > 1 and self.rate is not None:
                # A batch the vendor refused whole was split: the extra requests count too.
                self.rate.charge(destination, request.requests - 1)
            for item in request.sent:
                engine.observed(self.lane, item.latency_ms)
                confirmation = engine.decider.decide(destination, item)
                for gate in engine.gates:
                    gate.attempted(destination, item.answer)
                confirmations.append(confirmation)
                self.report.add(confirmation.attempt.outcome)
                answer = item.answer
                if isinstance(answer, RetryableDeliveryError) and answer.status_code == 429:
                    wait = answer.retry_after if answer.retry_after is not None else SLOW_DOWN
                    slow_until = max(slow_until, time.time() + wait)
        if slow_until:
            self._slow_down(slow_until)
        return confirmations

    def _slow_down(self, until: float) -> None:
        """A 429 holds the whole destination, not only the delivery that met it: this drainer
        reads no more, its lane is held, and (with a ``rate_limit``) every worker's rate
        gate refuses it, until the destination's wait is over."""
        self.backing_off = True
        self.held_until = max(self.held_until or 0.0, until)
        if self.rate is not None:
            self.rate.slow_down(self.destination, until)
        log.warning("the destination answered 429: holding it for %.1f s",
                    until - time.time(), extra={"destination": self.lane})

    def _record(self, confirmations: list[Confirmation]) -> None:
        """Confirm, waiting out a Redis that is briefly away (a restart, a failover): the
        outcomes are known, and recording them beats having the deliveries taken over and
        sent again once their lease runs out. Half the lease is the most it waits."""
        destination = self.destination
        lease = self.engine.lease(destination)
        give_up = time.monotonic() + lease / 2
        pause = 0.2
        while True:
            try:
                self.engine.store.confirm(self.lane, self.holder, lease, confirmations)
                self.engine.count_outcomes(self.lane, confirmations)
                return
            except redis.RedisError as exc:
                if time.monotonic() + pause > give_up or self.engine.stopping.is_set():
                    raise
                if pause == 0.2:
                    log.warning("cannot record %d outcomes yet (%s); retrying",
                                len(confirmations), exc, extra={"destination": self.lane})
                time.sleep(pause)
                pause = min(2.0, pause * 2)

    def _abandon(self) -> None:
        """Past the time limit: leave what is still in flight unconfirmed. Its lease runs
        out, another drainer takes it over and counts it as a crash."""
        log.error("gave up waiting for %d deliveries after the %g s time limit", self.in_flight,
                  self.engine.time_limit, extra={"destination": self.lane})
        self.report.add("abandoned", self.in_flight)
        if self.buffer:  # never sent: back to the lane without an attempt counted
            self.engine.slots.give(1)
            self._defer(self.buffer, None)
            self.buffer = []
