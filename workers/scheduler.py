"""The retry scheduler that runs inside every ``relay worker``: once a second it moves due
parked tasks (retries, held deliveries) onto the queue. The move is one Lua script, so any
number of workers can run it at once and each parked task is queued exactly once."""

from __future__ import annotations

import logging
import threading
from typing import Any

import redis
from celery import bootsteps

from relay.settings import Settings
from relay.taskqueue import TaskQueue, connect

log = logging.getLogger("relay.scheduler")


class Scheduler:
    def __init__(self, queue: TaskQueue, interval: float = 1.0) -> None:
        self.queue = queue
        self.interval = interval
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def run_once(self) -> int:
        moved = 0
        while True:  # drain a backlog in batches, without holding Redis in one long script
            batch = self.queue.release_due()
            moved += batch
            if batch < 500:
                break
        lost = self.queue.requeue_lost()
        if lost:
            log.warning("requeued %d tasks that never started (lost by a killed worker?)", lost)
        return moved + lost

    def _loop(self) -> None:
        failing = False
        while not self._stop.wait(self.interval):
            try:
                moved = self.run_once()
            except redis.RedisError as exc:
                if not failing:
                    log.warning("scheduler cannot reach Redis: %s", exc)
                failing = True
                continue
            if failing:
                log.info("scheduler reconnected to Redis")
                failing = False
            if moved:
                log.debug("released %d parked tasks", moved)

    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name="relay-scheduler", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)


class SchedulerStep(bootsteps.StartStopStep):
    """Celery worker bootstep: the scheduler lives and dies with the worker's main process."""

    def __init__(self, worker: Any, **kwargs: Any) -> None:
        super().__init__(worker, **kwargs)
        self.scheduler: Scheduler | None = None

    def start(self, worker: Any) -> None:
        settings = Settings.from_env()
        queue = TaskQueue(connect(settings.redis_url, timeout=5),
                          grace=settings.visibility_timeout)
        self.scheduler = Scheduler(queue,
                                   settings.scheduler_interval)
        self.scheduler.start()

    def stop(self, worker: Any) -> None:
        if self.scheduler is not None:
            self.scheduler.stop()
