"""The delivery step: one event to one destination, exactly as SPEC §4 says.

claim → (gates: pause, circuit, rate limit) → driver.send → confirm. The driver only says what
happened (a result, a retryable or a permanent error); this module decides: schedule the next
attempt in Redis, or make a dead letter. Nothing waits in worker memory.
"""

from __future__ import annotations

import itertools
import logging
import random
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Protocol

from relay.drivers import Driver, driver_class
from relay.errors import DeliveryError, PermanentDeliveryError, RetryableDeliveryError
from relay.http import HttpClient
from relay.models import Destination, LeadEvent
from relay.retry import next_delay
from relay.store import Attempt, Claim, DeliveryStore, Outcome
from relay.taskqueue import DELIVER, TaskQueue, task_message

log = logging.getLogger("relay.delivery")

ERROR_TEXT_LIMIT = 500


class Gate(Protocol):
    """Decides whether a delivery may be attempted now (pause, circuit breaker, rate limit)."""

    def hold_until(self, destination: Destination) -> float | None:
        """None to go ahead; else the epoch time to park the delivery until."""
        ...

    def attempted(self, destination: Destination, succeeded: bool) -> None:
        """Told the outcome of each attempt this process made (a gate may cache state)."""
        ...


@dataclass
class DriverCache:
    """One driver per destination per process (drivers hold pools). Untrusted (API-registered)
    destinations get the SSRF-guarded HTTP client."""

    guarded_http: Callable[[], HttpClient] | None = None
    _drivers: dict[str, tuple[Destination, Driver]] = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def get(self, destination: Destination) -> Driver:
        cached = self._drivers.get(destination.name)
        if cached is not None and cached[0] == destination:
            return cached[1]
        with self._lock:
            http = None
            if destination.untrusted:
                if self.guarded_http is None:
                    raise PermanentDeliveryError("no SSRF guard configured for API subscriptions")
                http = self.guarded_http()
            driver = driver_class(destination.type)(destination, http=http)
            old = self._drivers.get(destination.name)
            self._drivers[destination.name] = (destination, driver)
        if old is not None:
            old[1].close()
        return driver

    def close(self) -> None:
        for _, driver in self._drivers.values():
            driver.close()
        self._drivers.clear()


class Deliverer:
    def __init__(
        self,
        store: DeliveryStore,
        queue: TaskQueue,
        drivers: DriverCache | None = None,
        gates: tuple[Gate, ...] = (),
        on_gone: Callable[[Destination], None] | None = None,
        rng: random.Random | None = None,
        max_crashes: int | None = None,
    ) -> None:
        self.store = store
        self.queue = queue
        self.drivers = drivers or DriverCache()
        self.gates = gates
        self.on_gone = on_gone
        self.rng = rng or random.Random()
        self.max_crashes = max_crashes

    def lease(self, destination: Destination) -> float:
        # Long enough for connect + read timeouts; an expired lease lets another worker retry.
        return destination.timeout * 2 + 10

    def park(self, event: LeadEvent, destination: Destination, due: float) -> None:
        self.queue.park(DELIVER, [event.event_id, destination.name],
                        _argsrepr(event, destination), due)

    def deliver(self, event: LeadEvent, destination: Destination) -> Outcome | str:
        """Attempt one delivery now (or park it). Returns what happened, for logs and tests."""
        return self.deliver_all(event, [destination])[destination.name]

    def deliver_all(self, event: LeadEvent, destinations: Sequence[Destination]
                    ) -> dict[str, Outcome | str]:
        """Attempt each of an event's deliveries now, or park it: the gates first, then one
        claim for every delivery they let through (one round trip for the fan-out; each lease
        also covers the attempts before it), then each send and its own confirm."""
        outcomes: dict[str, Outcome | str] = {}
        ready: list[Destination] = []
        for destination in destinations:
            until = self._held_until(destination)
            if until is None:
                ready.append(destination)
            else:
                self.park(event, destination, until)
                outcomes[destination.name] = "held"
        if not ready:
            return outcomes
        leases = list(zip((d.name for d in ready),
                          itertools.accumulate(self.lease(d) for d in ready), strict=True))
        claims = self.store.claim_many(event.event_id, leases)
        for destination, claim in zip(ready, claims, strict=True):
            outcomes[destination.name] = self._attempt(event, destination, claim)
        return outcomes

    def _held_until(self, destination: Destination) -> float | None:
        for gate in self.gates:  # the first gate that holds decides
            until = gate.hold_until(destination)
            if until is not None:
                return until
        return None

    def _attempt(self, event: LeadEvent, destination: Destination, claim: Claim
                 ) -> Outcome | str:
        if claim.status == "done":
            return "already-" + claim.final_status
        if claim.status == "busy":
            # Someone else is sending it right now (or crashed doing so): look again after the
            # lease, when it has either confirmed or lost its claim.
            self.park(event, destination, claim.lease_until + 1)
            return "busy"
        if self.max_crashes and claim.crashes >= self.max_crashes:
            self._bury_claimed(event, destination, claim.attempt,
                               f"the delivery crashed its worker {claim.crashes} times")
            return "dead"
        driver_started = time.perf_counter()
        try:
            result = self.drivers.get(destination).send(event)
        except Exception as exc:
            for gate in self.gates:
                gate.attempted(destination, False)
            if isinstance(exc, PermanentDeliveryError):
                return self._dead(event, destination, claim.attempt, exc, driver_started)
            if not isinstance(exc, RetryableDeliveryError):
                # A driver bug: retry on schedule rather than lose the event.
                log.exception("driver %s crashed delivering %s", destination.type,
                              event.event_id)
                exc = RetryableDeliveryError(f"internal error: {type(exc).__name__}: {exc}")
            return self._failed(event, destination, claim.attempt, exc, driver_started)
        for gate in self.gates:
            gate.attempted(destination, True)
        status_code = result.status_code
        outcome: Outcome = "skipped" if result.skipped else "delivered"
        attempt = Attempt(destination.name, claim.attempt, "delivered", status_code,
                          _ms(driver_started), result.detail or None, at=time.time())
        self.store.confirm(event, attempt)
        log.info("delivered", extra={"event_id": event.event_id,
                                     "destination": destination.name,
                                     "attempt": claim.attempt, "status": status_code,
                                     "outcome": outcome})
        return outcome

    def _failed(self, event: LeadEvent, destination: Destination, attempt_no: int,
                exc: RetryableDeliveryError, started: float) -> Outcome:
        delay = next_delay(destination.retry, attempt_no, exc.retry_after, self.rng)
        if delay is None:
            reason = f"gave up after {attempt_no} attempts: {exc.message}"
            return self._dead(event, destination, attempt_no,
                              PermanentDeliveryError(reason, exc.status_code), started)
        due = time.time() + delay
        attempt = Attempt(destination.name, attempt_no, "retrying", exc.status_code,
                          _ms(started), _cut(exc.message), next_attempt_at=due, at=time.time())
        message, _ = task_message(DELIVER, [event.event_id, destination.name],
                                  _argsrepr(event, destination), queue=self.queue.queue)
        self.store.confirm(event, attempt, park=(message, due))
        log.warning("attempt failed, retrying", extra={
            "event_id": event.event_id, "destination": destination.name,
            "attempt": attempt_no, "status": exc.status_code, "retry_in": round(delay, 1),
            "error": _cut(exc.message)})
        return "retrying"

    def _dead(self, event: LeadEvent, destination: Destination, attempt_no: int,
              exc: DeliveryError, started: float) -> Outcome:
        attempt = Attempt(destination.name, attempt_no, "dead", exc.status_code,
                          _ms(started), _cut(exc.message), at=time.time())
        self.store.confirm(event, attempt, dead_reason=_cut(exc.message))
        log.error("dead letter", extra={
            "event_id": event.event_id, "destination": destination.name,
            "attempt": attempt_no, "status": exc.status_code, "error": _cut(exc.message)})
        if isinstance(exc, PermanentDeliveryError) and exc.gone and self.on_gone is not None:
            self.on_gone(destination)
        return "dead"

    def bury(self, event: LeadEvent, destination: Destination, reason: str) -> None:
        """Make a dead letter without an attempt (e.g. the task kept killing its worker)."""
        claim = self.store.claim(event.event_id, destination.name, self.lease(destination))
        if claim.status == "done":
            return
        if claim.status == "busy":  # another worker is sending it: let that attempt decide
            self.park(event, destination, claim.lease_until + 1)
            return
        self._bury_claimed(event, destination, claim.attempt, reason)

    def _bury_claimed(self, event: LeadEvent, destination: Destination, attempt_no: int,
                      reason: str) -> None:
        self.store.confirm(event, Attempt(destination.name, attempt_no, "dead", None, None,
                                          reason, at=time.time()), dead_reason=reason)
        log.error("dead letter", extra={"event_id": event.event_id,
                                        "destination": destination.name,
                                        "attempt": attempt_no, "error": reason})


def _argsrepr(event: LeadEvent, destination: Destination) -> str:
    return f"('{event.event_id}', '{destination.name}')"  # what Flower shows


def _ms(started: float) -> float:
    return round((time.perf_counter() - started) * 1000, 1)


def _cut(text: str) -> str:
    return text if len(text) <= ERROR_TEXT_LIMIT else text[:ERROR_TEXT_LIMIT] + "…"
