"""The two tasks. Thin on purpose: the work is in :mod:`relay.delivery.engine`.

A task is a *kick*: ``relay.admit`` drains the intake, ``relay.drain`` one destination's lane,
each until its stream is empty or its time budget is spent. The streams hold every event and
delivery until its outcome is recorded, so a task that fails or whose worker dies loses
nothing: the next kick (or the sweep in every worker's scheduler) picks its work up again.
So a task never needs a requeue, and a failure is logged and answered with a pause, so that a
persistent one (Redis away) does not spin a core.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable
from typing import Any

import redis
from celery import shared_task
from celery.signals import worker_process_shutdown, worker_shutting_down

from relay.delivery.assembly import build_engine
from relay.delivery.engine import Engine

log = logging.getLogger("relay.tasks")
#: Pause after a failed task, so a persistent failure (Redis away) does not spin a core.
FAILURE_PAUSE = 1.0
#: How long one task drains before it hands over to a fresh one (Flower, warm shutdown).
DRAIN_BUDGET = 10.0

_engine: tuple[int, Engine] | None = None


def current_engine() -> Engine:
    """The process's engine, built after fork so each process has its own pools."""
    global _engine
    if _engine is None or _engine[0] != os.getpid():
        _engine = (os.getpid(), build_engine())
    return _engine[1]


def _budget(engine: Engine) -> float:
    return min(DRAIN_BUDGET, engine.time_limit / 2)


def _guarded(what: str, work: Callable[[], dict[str, int]]) -> dict[str, int]:
    try:
        return work()
    except redis.RedisError as exc:
        log.warning("%s: Redis error, the next kick resumes it: %s", what, exc)
    except Exception:
        log.exception("%s failed; the next kick resumes it", what)
    time.sleep(FAILURE_PAUSE)
    return {"failed": 1}


@shared_task(name="relay.admit")
def admit() -> dict[str, int]:
    engine = current_engine()
    return _guarded("admit", lambda: engine.admit(_budget(engine)).as_dict())


@shared_task(name="relay.drain")
def drain(destination: str, batch: int = 0) -> dict[str, int]:
    engine = current_engine()
    return _guarded(f"drain {destination}",
                    lambda: engine.drain(destination, _budget(engine), batch or None).as_dict())


@worker_shutting_down.connect
def _stop_reading(**_: Any) -> None:
    # Warm shutdown: drainers stop taking new deliveries, finish and confirm what is in flight.
    if _engine is not None and _engine[0] == os.getpid():
        _engine[1].stopping.set()


@worker_process_shutdown.connect
def _close(**_: Any) -> None:
    if _engine is not None and _engine[0] == os.getpid():
        _engine[1].close()
