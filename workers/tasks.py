"""The two tasks. Thin on purpose: the work is in :mod:`relay.pipeline`.

A task must never fail in a way that acknowledges its message without having done its work:
Celery acknowledges a failed ``acks_late`` task, which would lose an accepted event. So every
failure is turned into a requeue (:class:`celery.exceptions.Reject`). When Redis itself is
away, the requeue cannot happen either, and the message stays among the broker's unacknowledged
messages until the visibility timeout brings it back. A task that fails every time is stopped
by the run counter (``RELAY_MAX_TASK_RUNS``) and becomes a dead letter.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable
from typing import Any, TypeVar

import redis
from celery import Task, shared_task
from celery.exceptions import Reject
from celery.signals import worker_process_shutdown

from relay.pipeline import Relay
from relay.runtime import build_relay

log = logging.getLogger("relay.tasks")
T = TypeVar("T")
#: Pause before a requeue, so a persistent failure (Redis full) does not spin a core.
REQUEUE_PAUSE = 1.0

_relay: tuple[int, Relay] | None = None


def current_relay() -> Relay:
    """The process's Relay, built after fork so each prefork child has its own pools."""
    global _relay
    if _relay is None or _relay[0] != os.getpid():
        _relay = (os.getpid(), build_relay())
    return _relay[1]


def _requeue_on_failure(task_id: str, work: Callable[[], T]) -> T:
    try:
        return work()
    except redis.RedisError as exc:
        log.warning("Redis error, requeueing task %s: %s", task_id, exc)
        time.sleep(REQUEUE_PAUSE)
        raise Reject(f"Redis error: {exc}", requeue=True) from exc
    except Exception as exc:
        log.exception("task %s failed, requeueing", task_id)
        time.sleep(REQUEUE_PAUSE)
        raise Reject(f"{type(exc).__name__}: {exc}", requeue=True) from exc


@shared_task(name="relay.process_event", bind=True)
def process_event(self: Task, message: dict[str, Any]) -> dict[str, str]:
    task_id = self.request.id
    return _requeue_on_failure(task_id,
                               lambda: current_relay().process_event(message, task_id))


@shared_task(name="relay.deliver", bind=True)
def deliver(self: Task, event_id: str, destination: str) -> str:
    task_id = self.request.id
    return _requeue_on_failure(task_id,
                               lambda: current_relay().deliver(event_id, destination, task_id))


@worker_process_shutdown.connect
def _close_drivers(**_: Any) -> None:
    if _relay is not None and _relay[0] == os.getpid():
        _relay[1].deliverer.drivers.close()
