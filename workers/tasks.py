"""The two tasks. Thin on purpose: the work is in :mod:`relay.pipeline`."""

from __future__ import annotations

import os
from typing import Any

from celery import Task, shared_task
from celery.signals import worker_process_shutdown

from relay.pipeline import Relay
from relay.runtime import build_relay

_relay: tuple[int, Relay] | None = None


def current_relay() -> Relay:
    """The process's Relay, built after fork so each prefork child has its own pools."""
    global _relay
    if _relay is None or _relay[0] != os.getpid():
        _relay = (os.getpid(), build_relay())
    return _relay[1]


@shared_task(name="relay.process_event", bind=True)
def process_event(self: Task, message: dict[str, Any]) -> dict[str, str]:
    return current_relay().process_event(message, self.request.id)


@shared_task(name="relay.deliver", bind=True)
def deliver(self: Task, event_id: str, destination: str) -> str:
    return current_relay().deliver(event_id, destination, self.request.id)


@worker_process_shutdown.connect
def _close_drivers(**_: Any) -> None:
    if _relay is not None and _relay[0] == os.getpid():
        _relay[1].deliverer.drivers.close()
