"""Small frozen values passed around inside leadrelay (only JSON crosses Redis)."""

from __future__ import annotations

import datetime
import json
import zoneinfo
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

#: Seconds a claimed delivery's lease adds to its destination's timeout (RELAY_LEASE_MARGIN).
LEASE_MARGIN = 10.0


class LazyPayload(Mapping[str, Any]):
    """A payload kept as its JSON until something reads it: a claimed webhook delivery sends
    the JSON as it is and never needs the parsed lead (other drivers read fields and parse
    it then, once)."""

    __slots__ = ("json", "_data")

    def __init__(self, raw: bytes) -> None:
        self.json = raw
        self._data: dict[str, Any] | None = None

    def _parsed(self) -> dict[str, Any]:
        if self._data is None:
            self._data = json.loads(self.json)
        return self._data

    def __getitem__(self, key: str) -> Any:
        return self._parsed()[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self._parsed())

    def __len__(self) -> int:
        return len(self._parsed())

    def __repr__(self) -> str:
        return f"LazyPayload({len(self.json)} bytes)"


@dataclass(frozen=True)
class LeadEvent:
    """One accepted lead event, as the workers see it.

    ``name`` is the event name after the ``fraudulent`` alias; ``known`` is False for a name
    outside the KickoffLabs catalogue (such events go only to destinations subscribed to ``*``).
    ``payload`` is the normalised lead plus ``__event`` and its ``__…`` block, relayed as is.
    """

    event_id: str
    source: str
    name: str
    payload: Mapping[str, Any]
    known: bool = True
    received_at: float = 0.0
    #: The payload's compact JSON (``json.dumps(payload, separators=(",", ":"))``) when it was
    #: cut out of the stored event (:func:`relay.store.deliveries.parse_event`), else None.
    payload_json: bytes | None = field(default=None, compare=False, repr=False)

    @property
    def campaign_id(self) -> str | None:
        value = self.payload.get("campaign_id")
        if value is None:
            value = self.payload.get("list_id")
        return None if value is None else str(value)

    def to_json(self) -> dict[str, Any]:
        return {  # the payload last, as the ingress stores it
            "event_id": self.event_id,
            "source": self.source,
            "name": self.name,
            "known": self.known,
            "received_at": self.received_at,
            "payload": dict(self.payload),
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any], payload_json: bytes | None = None
                  ) -> LeadEvent:
        return cls(
            event_id=data["event_id"],
            source=data["source"],
            name=data["name"],
            payload=data["payload"],
            known=data.get("known", True),
            received_at=data.get("received_at", 0.0),
            payload_json=payload_json,
        )


@dataclass(frozen=True)
class RetryPolicy:
    """Delays (seconds) before the 2nd, 3rd, … attempt: ``len(schedule) + 1`` attempts in all."""

    schedule: tuple[float, ...] = (10, 60, 300, 1800, 7200, 21600, 43200, 43200)
    jitter: float = 0.2

    @property
    def max_attempts(self) -> int:
        return len(self.schedule) + 1


@dataclass(frozen=True)
class RateLimit:
    """At most ``count`` deliveries per ``per_seconds``, shared by all workers (requests, for a
    destination with a batch), and by every destination of its :class:`Budget`."""

    count: int
    per_seconds: float


#: The ``ordering`` of a destination: ``none`` (the default) or ``per_lead``.
ORDERINGS = ("none", "per_lead")
PER_LEAD = "per_lead"


@dataclass(frozen=True)
class BatchPolicy:
    """``batch: {max: 100, wait: 200ms}``: up to ``max`` deliveries per request to a bulk API;
    a delivery without company is sent after waiting ``wait`` seconds for some, never longer."""

    max: int
    wait: float = 0.2


@dataclass(frozen=True)
class Budget:
    """What the destinations that use one vendor account share: its ``rate_limit`` windows
    (on each of them, equal: the config sees to it), its daily cap, and a ``429`` that holds
    one of them holds them all. ``name`` is ``<type>:<account>`` (the YAML's ``account:``),
    ``<type>:<digest>`` (a digest of the credential the driver names, never the credential) or
    a destination's own name (a ``daily_limit`` on a destination that shares nothing)."""

    name: str
    #: Requests a day for the whole account (None: not counted).
    daily_limit: int | None = None
    #: The account's time zone (IANA name): its day, and its daily cap, begin at midnight
    #: there. None: UTC.
    timezone: str | None = None

    def day(self, now: float) -> tuple[str, float]:
        """The account's day at ``now``: its date (``YYYY-MM-DD``) and when the next one
        begins (the reset, as an epoch time)."""
        return account_day(now, self.timezone)


def account_day(now: float, timezone: str | None = None) -> tuple[str, float]:
    """The date at ``now`` in ``timezone`` (None: UTC) and the epoch time of the next
    midnight there (daylight saving time included: a day may be 23 or 25 hours long)."""
    zone = zoneinfo.ZoneInfo(timezone) if timezone else datetime.UTC
    today = datetime.datetime.fromtimestamp(now, zone).date()
    midnight = datetime.datetime.combine(today + datetime.timedelta(days=1), datetime.time(),
                                         tzinfo=zone)
    return today.isoformat(), midnight.timestamp()


@dataclass(frozen=True)
class Destination:
    """A configured place to deliver to. ``options`` holds the driver's own validated keys."""

    name: str
    type: str
    events: frozenset[str] = frozenset({"*"})
    campaigns: frozenset[str] | None = None
    where: Mapping[str, Any] = field(default_factory=dict)
    timeout: float = 10.0
    retry: RetryPolicy = field(default_factory=RetryPolicy)
    rate_limit: RateLimit | None = None
    base_url: str | None = None
    concurrency: int = 50  # most deliveries in flight to it, across all workers
    options: Mapping[str, Any] = field(default_factory=dict)
    # True for URLs registered through the subscription API: untrusted, SSRF-guarded.
    untrusted: bool = False
    #: Deliveries per request to a bulk API (None: one per request). With a batch,
    #: ``concurrency`` and ``rate_limit`` count requests, not deliveries.
    batch: BatchPolicy | None = None
    #: The vendor account's budget it shares with other destinations, and its daily cap
    #: (None: its ``rate_limit`` is its own, and no daily cap).
    budget: Budget | None = None
    #: ``per_lead``: each lead's events reach the destination in the order they were
    #: received, one at a time per lead (``none``: no order kept).
    ordering: str = "none"

    def __hash__(self) -> int:  # mappings are not hashable; the name is unique
        return hash(self.name)

    @property
    def ordered(self) -> bool:
        """Whether the destination gets each lead's events in the order received."""
        return self.ordering == PER_LEAD

    @property
    def per_request(self) -> int:
        """The most deliveries one request carries (1 without a batch)."""
        return self.batch.max if self.batch is not None else 1

    @property
    def budget_name(self) -> str:
        """What its rate windows and daily count are kept under: its budget's name, or its
        own name when it has none."""
        return self.budget.name if self.budget is not None else self.name

    @property
    def daily_limit(self) -> int | None:
        return self.budget.daily_limit if self.budget is not None else None

    @property
    def lease(self) -> float:
        """:meth:`lease_with` the default ``RELAY_LEASE_MARGIN``."""
        return self.lease_with(LEASE_MARGIN)

    def lease_with(self, margin: float) -> float:
        """How long a claimed delivery is held: its timeout (which bounds a whole answer, see
        :mod:`relay.drivers.http`) plus ``margin`` (``RELAY_LEASE_MARGIN``) to record the
        outcome. A delivery whose worker died is taken over once this has passed; a circuit's
        half-open probe is held as long. A batch's ``wait`` is added: a claimed delivery may
        wait that long for company before it is sent. The one definition of a lease."""
        return self.timeout + margin + (self.batch.wait if self.batch is not None else 0.0)


#: The outcomes that count as delivered: a skipped delivery (nothing to send, e.g. a lead
#: without the email a CRM keys contacts by) is done, not failed. The one definition: the
#: engine, the metrics, the history and the Lua scripts (``success`` in ``step.lua``) agree.
SUCCESSES = frozenset({"delivered", "skipped"})


@dataclass(frozen=True)
class DeliveryResult:
    """What a successful send tells the delivery log."""

    status_code: int | None = None
    detail: str = ""
    skipped: bool = False  # nothing to send (e.g. HubSpot and a lead without an email)
