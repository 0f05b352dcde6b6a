"""What a worker does with an event: admit (dedupe), route, deliver — Celery-free, so it can
be tested on fakeredis and called by thin tasks in ``workers``."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any, Protocol

import redis

from relay.config import RelayConfig, Source
from relay.delivery import Deliverer, DriverCache, Gate
from relay.models import Destination, LeadEvent
from relay.routing import route
from relay.settings import Settings
from relay.store import DeliveryStore
from relay.taskqueue import TaskQueue

log = logging.getLogger("relay.pipeline")


class SubscriptionSource(Protocol):
    """Destinations registered at run time (the subscription API).

    ``version_key`` names a Redis key whose value changes with every change of the
    subscriptions: the admit script reads it in its round trip, and ``for_event`` reuses what it
    read for the same version instead of asking Redis again."""

    version_key: str

    def for_event(self, event: LeadEvent, version: bytes | None = None) -> list[Destination]: ...

    def get(self, name: str) -> Destination | None: ...

    def remove_destination(self, destination: Destination, reason: str) -> None: ...


class Relay:
    """The worker-side core, built once per worker process."""

    def __init__(
        self,
        settings: Settings,
        config: RelayConfig,
        client: redis.Redis,
        subscriptions: SubscriptionSource | None = None,
        drivers: DriverCache | None = None,
        gates: tuple[Gate, ...] = (),
    ) -> None:
        self.settings = settings
        self.config = config
        self.redis = client
        self.store = DeliveryStore(client, settings.retention)
        self.queue = TaskQueue(client, grace=settings.visibility_timeout)
        self.subscriptions = subscriptions
        self.deliverer = Deliverer(self.store, self.queue, drivers, gates,
                                   on_gone=self._gone, max_crashes=settings.max_task_runs)

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

    def process_event(self, message: Mapping[str, Any], task_id: str) -> dict[str, str]:
        """Admit one event from the ingress and attempt each of its deliveries once."""
        event = LeadEvent.from_json(message)
        admission = self.store.admit(
            event, task_id, self.source(event.source).dedupe_window,
            watch=self.subscriptions.version_key if self.subscriptions is not None else "")
        if admission.outcome == "duplicate":
            log.info("duplicate dropped", extra={"event_id": event.event_id})
            return {"_event": "duplicate"}
        targets = self.destinations_for(event, admission.watched)
        if admission.runs > self.settings.max_task_runs:
            reason = f"the task crashed its worker {self.settings.max_task_runs} times"
            for destination in targets:
                self.deliverer.bury(event, destination, reason)
            return {"_event": "dead"}
        outcomes: dict[str, str] = {"_event": admission.outcome}
        outcomes.update(self.deliverer.deliver_all(event, targets))
        if not targets:
            log.info("no destination subscribed", extra={"event_id": event.event_id,
                                                         "event": event.name})
        return outcomes

    def deliver(self, event_id: str, destination_name: str, task_id: str) -> str:
        """A parked (retry, held) delivery coming back."""
        self.queue.started(task_id)
        event = self.store.load_event(event_id)
        destination = self.destination(destination_name)
        if event is None or destination is None:
            log.warning("delivery dropped: %s", "event expired" if event is None else
                        "destination no longer configured",
                        extra={"event_id": event_id, "destination": destination_name})
            return "gone"
        if self.store.count_task_run(task_id) > self.settings.max_task_runs:
            self.deliverer.bury(event, destination, "the delivery crashed its worker "
                                f"{self.settings.max_task_runs} times")
            return "dead"
        return self.deliverer.deliver(event, destination)

    def _gone(self, destination: Destination) -> None:
        if destination.untrusted and self.subscriptions is not None:
            self.subscriptions.remove_destination(destination, "the URL answered 410 Gone")
