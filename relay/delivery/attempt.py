"""One attempt of a delivery: send it with the destination's driver, then decide what the
answer means (SPEC §4). The driver only says what happened (a result, a retryable or a
permanent error); this module turns it into a :class:`~relay.store.deliveries.Confirmation`:
delivered, a retry at its due time, or a dead letter. Nothing waits in worker memory.
"""

from __future__ import annotations

import logging
import random
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from relay.core.errors import (
    BudgetSpentError,
    DeliveryError,
    PermanentDeliveryError,
    RetryableDeliveryError,
)
from relay.core.models import DeliveryResult, Destination
from relay.delivery.retry import next_delay
from relay.drivers import Driver, driver_class
from relay.drivers.base import Answers
from relay.drivers.http import HttpClient
from relay.store.deliveries import Attempt, Claim, Confirmation

log = logging.getLogger("relay.delivery")

ERROR_TEXT_LIMIT = 500


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
            cached = self._drivers.get(destination.name)
            if cached is not None and cached[0] == destination:
                return cached[1]
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


@dataclass(frozen=True)
class Sent:
    """What one attempt got back: a result or the error the driver raised."""

    claim: Claim
    answer: DeliveryResult | BaseException
    latency_ms: float


@dataclass(frozen=True)
class Request:
    """What one driver call did: an answer per claim, and how many requests it made (more
    than one when a vendor refused a batch whole and the driver split it)."""

    sent: list[Sent]
    requests: int = 1


def send(driver: Driver, claims: Sequence[Claim]) -> Request:
    """Send claimed deliveries with one driver call (a driver of a bulk API takes several at
    once, see :attr:`relay.drivers.base.Driver.max_batch`). Never raises: a failure is an
    answer like any other."""
    started = time.perf_counter()
    answers: Sequence[DeliveryResult | BaseException]
    try:
        answers = driver.send_batch([c.event for c in claims])
    except Exception as exc:  # noqa: BLE001 - every failure is an answer; decide() sorts them
        answers = [exc] * len(claims)
    ms = round((time.perf_counter() - started) * 1000, 1)
    if len(answers) != len(claims):  # a driver bug: decide() retries them on schedule
        answers = [RuntimeError(f"{type(driver).__name__}.send_batch gave {len(answers)} "
                                f"answers for {len(claims)} events")] * len(claims)
    return Request([Sent(claim, answer, ms)
                    for claim, answer in zip(claims, answers, strict=True)],
                   answers.requests if isinstance(answers, Answers) else 1)


class Decider:
    """Turns attempts into confirmations: retry on the destination's schedule (``Retry-After``
    as a floor) or make a dead letter. ``on_gone`` is told of a 410 from an API subscription."""

    def __init__(self, rng: random.Random | None = None,
                 on_gone: Callable[[Destination], None] | None = None) -> None:
        self.rng = rng or random.Random()
        self.on_gone = on_gone

    def decide(self, destination: Destination, sent: Sent) -> Confirmation:
        claim, answer = sent.claim, sent.answer
        if isinstance(answer, DeliveryResult):
            outcome = "skipped" if answer.skipped else "delivered"
            attempt = Attempt(destination.name, claim.attempt, outcome, answer.status_code,
                              sent.latency_ms, answer.detail or None, at=time.time())
            log.info("delivered", extra={"event_id": claim.event.event_id,
                                         "destination": destination.name,
                                         "attempt": claim.attempt, "status": answer.status_code,
                                         "outcome": outcome})
            return Confirmation(claim.event, attempt, claim.entry_id, extra=_kept(claim),
                                attempt_id=claim.attempt_id)
        if isinstance(answer, PermanentDeliveryError):
            return self._dead(destination, claim, answer, sent.latency_ms)
        if isinstance(answer, BudgetSpentError):
            return self._wait_for_budget(destination, claim, answer)
        if not isinstance(answer, RetryableDeliveryError):
            # A driver bug: retry on schedule rather than lose the event.
            log.error("driver %s crashed delivering %s: %s: %s", destination.type,
                      claim.event.event_id, type(answer).__name__, answer, exc_info=answer)
            answer = RetryableDeliveryError(f"internal error: {type(answer).__name__}: {answer}")
        return self._failed(destination, claim, answer, sent.latency_ms)

    def _failed(self, destination: Destination, claim: Claim, exc: RetryableDeliveryError,
                latency_ms: float) -> Confirmation:
        delay = next_delay(destination.retry, claim.attempt, exc.retry_after, self.rng)
        if delay is None:
            reason = f"gave up after {claim.attempt} attempts: {exc.message}"
            return self._dead(destination, claim,
                              PermanentDeliveryError(reason, exc.status_code), latency_ms)
        due = time.time() + delay
        attempt = Attempt(destination.name, claim.attempt, "retrying", exc.status_code,
                          latency_ms, _cut(exc.message), next_attempt_at=due, at=time.time())
        log.warning("attempt failed, retrying", extra={
            "event_id": claim.event.event_id, "destination": destination.name,
            "attempt": claim.attempt, "status": exc.status_code, "retry_in": round(delay, 1),
            "error": _cut(exc.message)})
        return Confirmation(claim.event, attempt, claim.entry_id, retry_at=due,
                            extra=_kept(claim), attempt_id=claim.attempt_id)

    def _wait_for_budget(self, destination: Destination, claim: Claim,
                         exc: BudgetSpentError) -> Confirmation:
        """The vendor refused the request because the account's budget is spent: the
        delivery waits for the budget's reset in the lane's order of things, without an
        attempt counted (the request did nothing, and a day-long wait must not use up its
        retries or make it a dead letter)."""
        now = time.time()
        attempt = Attempt(destination.name, claim.attempt - 1, "deferred", exc.status_code,
                          error=_cut(exc.message), next_attempt_at=exc.until, at=now)
        log.warning("the account's budget is spent: waiting for its reset", extra={
            "event_id": claim.event.event_id, "destination": destination.name,
            "until": round(exc.until, 3)})
        return Confirmation(claim.event, attempt, claim.entry_id, retry_at=max(now, exc.until),
                            extra=_kept(claim))

    def _dead(self, destination: Destination, claim: Claim, exc: DeliveryError,
              latency_ms: float | None) -> Confirmation:
        attempt = Attempt(destination.name, claim.attempt, "dead", exc.status_code,
                          latency_ms, _cut(exc.message), at=time.time())
        log.error("dead letter", extra={
            "event_id": claim.event.event_id, "destination": destination.name,
            "attempt": claim.attempt, "status": exc.status_code, "error": _cut(exc.message)})
        if isinstance(exc, PermanentDeliveryError) and exc.gone and self.on_gone is not None:
            self.on_gone(destination)
        return Confirmation(claim.event, attempt, claim.entry_id, dead_reason=_cut(exc.message),
                            extra=_kept(claim), attempt_id=claim.attempt_id)

    def bury(self, destination: Destination, claim: Claim, reason: str) -> Confirmation:
        """A dead letter without an attempt (the delivery kept killing its worker)."""
        return self._dead(destination, claim, PermanentDeliveryError(reason), None)


def _kept(claim: Claim) -> dict[str, int]:
    # The crash count outlives the attempt: it is what turns a repeat offender into a dead
    # letter however its attempts ended.
    return {"crashes": claim.crashes} if claim.crashes else {}


def _cut(text: str) -> str:
    return text if len(text) <= ERROR_TEXT_LIMIT else text[:ERROR_TEXT_LIMIT] + "…"
