"""Webhook subscriptions registered through the KickoffLabs-compatible API, kept in Redis.

A subscription is a ``webhook`` destination in KickoffLabs format for one campaign, built on
the fly as :class:`~relay.core.models.Destination` ``sub-<referenceId>`` (``untrusted``: delivered
through the SSRF-guarded HTTP client). :class:`SubscriptionStore` is the
:class:`relay.delivery.engine.SubscriptionSource` the workers route with, and the storage of the web
API.

Keys (``relay:sub:...``, listed in :mod:`relay.store.keys`), persistent like the rest of
Redis' AOF-backed data: the counter of ``referenceId`` values, one JSON record per
subscription, per campaign a hash of its active ones (url -> id) and a zset of those a 410
removed, and a version counter bumped by every change, in the change's transaction.

One active subscription per (campaign, url): the campaign hash is the uniqueness index, updated
in WATCH/MULTI transactions so two concurrent registrations of a URL cannot make twins.

Two ways out: ``DELETE`` through the API forgets the subscription at once; a ``410 Gone`` from
the URL (:meth:`SubscriptionStore.remove_destination`) keeps the record for the retention
period with ``state: "removed"`` and the reason, so ``GET`` shows why it disappeared (the 410
attempt itself is a dead letter in the delivery log). A removed subscription is no longer routed
to, and its parked retries are dropped; registering the URL again creates a new one.

Workers keep what they read for a campaign while ``sub:version`` has not moved: the admit
script reads the version in the round trip it makes anyway, so routing an event to its
subscriptions costs no round trip of its own, and a change is seen by the next event admitted.
"""

from __future__ import annotations

import json
import logging
import re
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import redis

from relay.core.errors import Conflict
from relay.core.models import Destination, LeadEvent
from relay.store.keys import (
    SUB_SEQ,
    SUB_VERSION,
    campaign_gone_key,
    campaign_key,
    subscription_key,
)

log = logging.getLogger("relay.subscriptions")

#: A worker forgets what it read after this long even if the version did not move (a version
#: can repeat if Redis loses its last second of writes).
ROUTES_TTL = 60.0
ROUTES_CAP = 10_000  # campaigns remembered per worker process
ACTIVE = "active"
REMOVED = "removed"
NAME_PREFIX = "sub-"
_NAME = re.compile(r"^sub-([0-9]+)$")


class TooManySubscriptions(Conflict):
    """The campaign already has ``max_per_campaign`` subscriptions."""


def normalise_campaign(campaign: object) -> str:
    """Campaign ids as the router sees them: ``135544`` and ``"0135544"`` are one campaign."""
    text = str(campaign).strip()
    return str(int(text)) if text.isascii() and text.isdigit() else text


@dataclass(frozen=True)
class Subscription:
    reference_id: int
    campaign: str
    url: str
    events: tuple[str, ...]
    source: str | None
    created_at: float
    updated_at: float
    state: str = ACTIVE
    removed_at: float | None = None
    removed_reason: str | None = None

    @property
    def name(self) -> str:
        return f"{NAME_PREFIX}{self.reference_id}"

    def destination(self) -> Destination:
        """The subscription as the pipeline delivers it: a YAML-like webhook destination."""
        return Destination(
            name=self.name,
            type="webhook",
            events=frozenset(self.events),
            campaigns=frozenset({self.campaign}),
            options={"url": self.url, "format": None, "headers": {}, "signing_secret": None},
            untrusted=True,
        )

    def to_json(self) -> dict[str, Any]:
        return {
            "id": self.reference_id,
            "campaign": self.campaign,
            "url": self.url,
            "events": list(self.events),
            "source": self.source,
            "created_at": self.created_at,
            "updated_at": self.updated_at,
            "state": self.state,
            "removed_at": self.removed_at,
            "removed_reason": self.removed_reason,
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> Subscription:
        return cls(
            reference_id=int(data["id"]),
            campaign=str(data["campaign"]),
            url=data["url"],
            events=tuple(data["events"]),
            source=data.get("source"),
            created_at=float(data["created_at"]),
            updated_at=float(data.get("updated_at") or data["created_at"]),
            state=data.get("state", ACTIVE),
            removed_at=data.get("removed_at"),
            removed_reason=data.get("removed_reason"),
        )


class SubscriptionStore:
    """Redis-backed subscriptions; implements :class:`relay.delivery.engine.SubscriptionSource`.

    ``retention`` bounds how long the record of a subscription removed by a 410 is kept.
    """

    def __init__(self, client: redis.Redis, retention: float = 7 * 86400,
                 max_per_campaign: int = 100) -> None:
        self.redis = client
        self.retention = int(retention)
        self.max_per_campaign = max_per_campaign
        self.version_key = SUB_VERSION
        # campaign -> (version, read at (monotonic), its active subscriptions as destinations)
        self._routes: dict[str, tuple[bytes, float, list[Destination]]] = {}

    # -- the API side ---------------------------------------------------------------------

    def register(self, campaign: object, url: str, events: Iterable[str],
                 source: str | None = None) -> tuple[Subscription, bool]:
        """Create the campaign's subscription for ``url``, or update its events (and source,
        when given) if the campaign has one. Returns the subscription and whether it is new.

        ``events`` must already be canonical catalogue names; the caller validates them."""
        campaign = normalise_campaign(campaign)
        wanted = tuple(dict.fromkeys(events))
        index = campaign_key(campaign)
        result: list[tuple[Subscription, bool]] = []

        def attempt(pipe: redis.client.Pipeline) -> None:
            result.clear()
            now = time.time()
            existing_id = pipe.hget(index, url)
            current = self._load(pipe, int(existing_id)) if existing_id is not None else None
            if current is not None and current.state == ACTIVE:
                updated = Subscription(
                    current.reference_id, campaign, url, wanted,
                    source if source is not None else current.source,
                    current.created_at, now,
                )
                pipe.multi()
                pipe.set(subscription_key(updated.reference_id), _dumps(updated))
                pipe.incr(SUB_VERSION)
                result.append((updated, False))
                return
            if pipe.hlen(index) >= self.max_per_campaign:
                raise TooManySubscriptions(
                    f"campaign {campaign} already has {self.max_per_campaign} webhooks"
                )
            # INCR runs outside the transaction: a retried attempt only leaves a gap in ids.
            reference_id = int(self.redis.incr(SUB_SEQ))
            created = Subscription(reference_id, campaign, url, wanted, source, now, now)
            pipe.multi()
            pipe.set(subscription_key(reference_id), _dumps(created))
            pipe.hset(index, url, reference_id)
            pipe.incr(SUB_VERSION)
            result.append((created, True))

        self.redis.transaction(attempt, index)
        subscription, is_new = result[0]
        log.info("subscription %s", "created" if is_new else "updated",
                 extra={"destination": subscription.name, "campaign": campaign,
                        "events": list(subscription.events)})
        return subscription, is_new

    def find(self, campaign: object, url: str) -> Subscription | None:
        """The campaign's active subscription for ``url``."""
        found = self.redis.hget(campaign_key(normalise_campaign(campaign)), url)
        subscription = self._load(self.redis, int(found)) if found is not None else None
        return subscription if subscription is not None and subscription.state == ACTIVE else None

    def delete(self, campaign: object, url: str) -> Subscription | None:
        """Forget the campaign's subscription for ``url`` (API ``DELETE``); None if unknown."""
        campaign = normalise_campaign(campaign)
        index = campaign_key(campaign)
        deleted: list[Subscription] = []

        def attempt(pipe: redis.client.Pipeline) -> None:
            deleted.clear()
            found = pipe.hget(index, url)
            if found is None:
                return
            subscription = self._load(pipe, int(found))
            pipe.multi()
            pipe.hdel(index, url)
            pipe.delete(subscription_key(int(found)))
            pipe.incr(SUB_VERSION)
            if subscription is not None:
                deleted.append(subscription)

        self.redis.transaction(attempt, index)
        if deleted:
            log.info("subscription deleted", extra={"destination": deleted[0].name,
                                                    "campaign": campaign})
        return deleted[0] if deleted else None

    def list(self, campaign: object) -> list[Subscription]:
        """The campaign's active subscriptions and those a 410 removed within the retention,
        by referenceId."""
        campaign = normalise_campaign(campaign)
        now = time.time()
        self.redis.zremrangebyscore(campaign_gone_key(campaign), "-inf", now - self.retention)
        ids = {int(i) for i in self.redis.hvals(campaign_key(campaign))}
        ids.update(int(i) for i in self.redis.zrange(campaign_gone_key(campaign), 0, -1))
        return sorted(self._load_many(ids), key=lambda s: s.reference_id)

    def active_names(self) -> list[str]:
        """Every active subscription's destination name (``sub-<id>``), of every campaign: the
        per-destination gauges and the admin API list them beside the YAML destinations."""
        ids: set[int] = set()
        for key in self.redis.scan_iter(match=campaign_key("*"), count=1000):
            if not key.endswith(b":gone"):
                ids.update(int(i) for i in self.redis.hvals(key))
        return sorted(f"{NAME_PREFIX}{i}" for i in ids)

    def active_campaigns(self) -> dict[str, str]:
        """Every active subscription's destination name -> its campaign (``/metrics`` sums
        them by campaign when there are many)."""
        prefix = campaign_key("")
        keys = [key for key in self.redis.scan_iter(match=campaign_key("*"), count=1000)
                if not key.endswith(b":gone")]
        pipe = self.redis.pipeline(transaction=False)
        for key in keys:
            pipe.hvals(key)
        found: dict[str, str] = {}
        for key, ids in zip(keys, pipe.execute(), strict=True):
            campaign = key.decode()[len(prefix):]
            found.update((f"{NAME_PREFIX}{int(i)}", campaign) for i in ids)
        return found

    def active_by_campaign(self) -> dict[str, list[str]]:
        """campaign -> the destination names (``sub-<id>``) of its active subscriptions, in
        the order they were made: the console's overview sums them up per campaign."""
        found: dict[str, list[str]] = {}
        names = self.active_campaigns()
        for name in sorted(names, key=lambda n: int(n[len(NAME_PREFIX):])):
            found.setdefault(names[name], []).append(name)
        return found

    # -- the worker side (SubscriptionSource) ---------------------------------------------

    def for_event(self, event: LeadEvent, version: bytes | None = None) -> list[Destination]:
        """The active subscriptions of the event's campaign (``campaign_id``, else
        ``list_id``); the router then filters them by event name like any destination.
        With ``version`` (the value of :attr:`version_key` read before this call), what was
        read for the same campaign at the same version is reused."""
        campaign = event.campaign_id
        if campaign is None:
            return []
        campaign = normalise_campaign(campaign)
        now = time.monotonic()
        if version is not None:
            cached = self._routes.get(campaign)
            if cached is not None and cached[0] == version and now - cached[1] < ROUTES_TTL:
                return cached[2]
        ids = self.redis.hvals(campaign_key(campaign))
        found = [s.destination() for s in self._load_many(int(i) for i in ids)
                 if s.state == ACTIVE]
        if version is not None:
            if len(self._routes) >= ROUTES_CAP:
                self._routes.clear()
            self._routes[campaign] = (version, now, found)
        return found

    def get(self, name: str) -> Destination | None:
        """An active subscription by destination name (``sub-<id>``), for parked deliveries."""
        match = _NAME.match(name)
        if match is None:
            return None
        subscription = self._load(self.redis, int(match.group(1)))
        if subscription is None or subscription.state != ACTIVE:
            return None
        return subscription.destination()

    def remove_destination(self, destination: Destination, reason: str) -> None:
        """Take a subscription out of routing because its URL said so (410 Gone), keeping a
        record with the reason for the retention period."""
        match = _NAME.match(destination.name)
        if match is None:
            return
        reference_id = int(match.group(1))
        key = subscription_key(reference_id)
        removed: list[Subscription] = []

        def attempt(pipe: redis.client.Pipeline) -> None:
            removed.clear()
            current = self._load(pipe, reference_id)
            if current is None or current.state != ACTIVE:
                return  # already deleted or removed (two workers saw the 410)
            now = time.time()
            gone = Subscription(
                current.reference_id, current.campaign, current.url, current.events,
                current.source, current.created_at, now, REMOVED, now, reason,
            )
            index = campaign_key(current.campaign)
            pipe.watch(index)
            still_indexed = pipe.hget(index, current.url)
            pipe.multi()
            if still_indexed is not None and int(still_indexed) == reference_id:
                pipe.hdel(index, current.url)
            pipe.set(key, _dumps(gone), ex=self.retention)
            pipe.zadd(campaign_gone_key(current.campaign), {str(reference_id): now})
            pipe.expire(campaign_gone_key(current.campaign), self.retention)
            pipe.incr(SUB_VERSION)
            removed.append(gone)

        self.redis.transaction(attempt, key)
        if removed:
            log.warning("subscription removed: %s", reason,
                        extra={"destination": destination.name,
                               "campaign": removed[0].campaign})

    # -- records --------------------------------------------------------------------------

    def _load(self, client: Any, reference_id: int) -> Subscription | None:
        raw = client.get(subscription_key(reference_id))
        return None if raw is None else Subscription.from_json(json.loads(raw))

    def _load_many(self, ids: Iterable[int]) -> list[Subscription]:
        keys = [subscription_key(i) for i in ids]
        if not keys:
            return []
        return [Subscription.from_json(json.loads(raw))
                for raw in self.redis.mget(keys) if raw is not None]


def _dumps(subscription: Subscription) -> str:
    return json.dumps(subscription.to_json(), separators=(",", ":"))
