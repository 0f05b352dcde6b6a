"""The driver contract.

A driver delivers one lead event to one kind of destination::

    class EchoDriver(Driver):
        type_name = "echo"
        options_schema = EchoOptions        # marshmallow schema of its own YAML keys
        secret_fields = frozenset({"token"})  # masked by `relay check-config`

        def send(self, event: LeadEvent) -> DeliveryResult:
            answer = self.http.request("POST", self.options["url"], body=..., timeout=self.timeout)
            raise_for_status(answer)
            return DeliveryResult(status_code=answer.status)

``send`` either returns a :class:`DeliveryResult` or raises ``RetryableDeliveryError`` (with
``retry_after`` when the destination said when) or ``PermanentDeliveryError`` with a message a
person can act on. It never retries, sleeps, or swallows a failure: the delivery step decides.
Drivers are built once per worker process and destination and must be thread-safe: a
worker keeps many deliveries in flight at once, up to the destination's ``concurrency``.

A driver for a bulk API subclasses :class:`BulkDriver` (one event is a batch of one), sets
``max_batch`` (the most events its vendor takes in one request) and implements
``send_batch``. A destination of it then gets ``batch: {max, wait}`` (default:
``default_batch_max`` or ``max_batch``, and ``default_batch_wait``; ``max`` above
``max_batch`` is a config error), and the engine hands the driver up to ``max`` claimed
deliveries of the destination per call. The driver answers one result or error per event,
in order (each delivery keeps its own outcome, retry and dead letter). A call may make more
than one request (a batch split after the vendor refused it whole): the driver says how many
by returning :class:`Answers`, so the extra requests are charged to the destination's
``rate_limit``.

A vendor's limits are a *budget* of the account, shared by the destinations that use it: a
driver declares ``default_rate_limit``, ``default_daily_limit`` and the ``account_fields`` that
name the account (destinations with the same credential share one budget), and raises
:class:`~relay.core.errors.BudgetSpentError` (``until`` the vendor's reset) when the vendor says
the account's day is spent: every destination of the budget then waits for the reset, without
attempts counted.

Which answers are worth retrying is decided once, in :func:`relay.drivers.http.raise_for_status`
(timeouts, 408, 425, 429, 5xx); a vendor that documents more of them declares them in
``retryable_answers`` (status -> least wait in seconds, or None for its ``Retry-After``) and
passes them on: ``raise_for_status(answer, retryable=self.retryable_answers)``.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any, ClassVar

from marshmallow import Schema

from relay.core.errors import DeliveryError
from relay.core.models import DeliveryResult, Destination, LeadEvent
from relay.drivers.http import HttpClient, RetryableAnswers, shared_client

Answer = DeliveryResult | DeliveryError | Exception


class Answers(list[Answer]):
    """``send_batch``'s answers (one per event, in order) and ``requests``: how many requests
    the call made (more than one when the vendor refused a batch whole and it was split)."""

    def __init__(self, answers: Iterable[Answer] = (), requests: int = 1) -> None:
        super().__init__(answers)
        self.requests = requests


class Driver:
    type_name: ClassVar[str]
    options_schema: ClassVar[type[Schema]]
    secret_fields: ClassVar[frozenset[str]] = frozenset()
    #: The vendor's real API host; ``base_url`` in the YAML overrides it (tests, proxies).
    default_base_url: ClassVar[str | None] = None
    #: Deliveries in flight to one destination across all workers, unless the YAML says
    #: ``concurrency:``. Vendor drivers keep a common account tier clear of 429s.
    default_concurrency: ClassVar[int] = 50
    #: The most events one ``send_batch`` call may carry: the vendor's own maximum per request
    #: (1: the engine sends each event on its own, and the driver takes no ``batch:``).
    max_batch: ClassVar[int] = 1
    #: ``batch.max`` unless the YAML says otherwise (None: ``max_batch``).
    default_batch_max: ClassVar[int | None] = None
    #: How long a lone delivery waits for company by default (``batch.wait``).
    default_batch_wait: ClassVar[float] = 0.2
    #: ``rate_limit`` unless the YAML says otherwise (e.g. ``"9/s"``): a vendor's documented
    #: limit, kept clear of 429s. None: no limit.
    default_rate_limit: ClassVar[str | None] = None
    #: The options that name the vendor account a destination uses (its credential, e.g.
    #: ``("api_key",)``): destinations of this type with the same values (and API host) share
    #: one budget, its ``rate_limit`` windows and ``daily_limit``, unless ``account:`` in the
    #: YAML names it. Only a digest of them is kept. Empty: a destination shares nothing
    #: unless the YAML says ``account:``.
    account_fields: ClassVar[tuple[str, ...]] = ()
    #: Requests a day the vendor allows the account (``daily_limit`` unless the YAML says
    #: otherwise; counted in the account's day, ``account_timezone``). None: not counted. A
    #: vendor answer that says the day is spent is raised as
    #: :class:`~relay.core.errors.BudgetSpentError`.
    default_daily_limit: ClassVar[int | None] = None
    #: The vendor's documented retryable answers beyond the common ones (SPEC §4).
    retryable_answers: ClassVar[RetryableAnswers] = {}
    #: ``timeout`` unless the YAML says otherwise: how long one send may take, all its
    #: requests together (a vendor whose bulk calls are slow, or whose jobs are followed to
    #: their end inside the send, needs more than the common 10 s).
    default_timeout: ClassVar[float] = 10.0

    def __init__(self, destination: Destination, http: HttpClient | None = None) -> None:
        self.destination = destination
        self.options: dict[str, Any] = dict(destination.options)
        self.timeout = destination.timeout
        self._http = http

    @property
    def http(self) -> HttpClient:
        return self._http or shared_client()

    @property
    def base_url(self) -> str:
        url = self.destination.base_url or self.default_base_url
        if not url:
            raise ValueError(f"{self.type_name} driver has no base_url")
        return url.rstrip("/")

    def send(self, event: LeadEvent) -> DeliveryResult:
        raise NotImplementedError

    def send_batch(self, events: Sequence[LeadEvent]) -> Sequence[Answer]:
        """One answer per event, in order: a result, or the error its delivery met. The
        default sends each event with :meth:`send` (a request each)."""
        answers = Answers(requests=len(events))
        for event in events:
            try:
                answers.append(self.send(event))
            except Exception as exc:  # noqa: BLE001 - the engine decides about every failure
                answers.append(exc)
        return answers

    @classmethod
    def review(cls, destination: Destination) -> list[str]:
        """What ``relay check-config`` says of a loaded destination beyond its keys (a choice
        in force that a reader should see). Raises ``ValueError`` for keys that cannot work
        together (the driver's own keys with the common ones, e.g. its ``events``)."""
        return []

    def close(self) -> None:
        """Release pooled resources (database engines); HTTP pools are process-wide."""


class BulkDriver(Driver):
    """A driver whose vendor takes events in bulk: it implements :meth:`send_batch`, and one
    event is sent as a batch of one."""

    def send(self, event: LeadEvent) -> DeliveryResult:
        [answer] = self.send_batch([event])
        if isinstance(answer, Exception):
            raise answer
        return answer

    def send_batch(self, events: Sequence[LeadEvent]) -> Sequence[Answer]:
        raise NotImplementedError
