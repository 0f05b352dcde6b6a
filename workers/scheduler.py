"""The scheduler that runs inside every ``relay worker``: once a second (RELAY_SCHEDULER_INTERVAL)
it moves due parked deliveries (retries) back into their lanes and sweeps the lanes, kicking
any that has work and no drainer: a kick lost with a killed worker, a hold that ran out
(pause lifted, circuit cool-down over, next rate window), a dead worker's deliveries to take
over. Both are Lua scripts, so any number of workers can run them at once."""

from __future__ import annotations

import logging
import os
import socket
import threading
from typing import Any

import redis
from celery import bootsteps

from relay.config.settings import Settings
from relay.delivery.engine import MAX_DRAINERS
from relay.delivery.history_writer import HistoryWriter
from relay.delivery.kicks import Kicks
from relay.history.database import shared_database
from relay.store.connection import connect
from relay.store.lanes import Lanes

log = logging.getLogger("relay.scheduler")


class Scheduler:
    def __init__(self, lanes: Lanes, kicks: Kicks, interval: float = 1.0) -> None:
        self.lanes = lanes
        self.kicks = kicks
        self.interval = interval
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def run_once(self) -> int:
        moved = 0
        touched: set[str] = set()
        while True:  # drain a backlog in batches, without holding Redis in one long script
            batch, lanes = self.lanes.release_due()
            moved += batch
            touched.update(lanes)
            if batch < 500:
                break
        kicks = set(self.lanes.claim_kicks(touched))
        kicks.update(self.lanes.sweep(MAX_DRAINERS))
        for lane in sorted(kicks):
            self.kicks.send(lane)
        return moved + len(kicks)

    def _loop(self) -> None:
        failing = False
        while not self._stop.wait(self.interval):
            try:
                self.run_once()
            except redis.RedisError as exc:
                if not failing:
                    log.warning("scheduler cannot reach Redis: %s", exc)
                failing = True
                continue
            if failing:
                log.info("scheduler reconnected to Redis")
                failing = False

    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name="relay-scheduler", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)


class SchedulerStep(bootsteps.StartStopStep):
    """Celery worker bootstep: the scheduler and the history writer live and die with the
    worker's main process (a lease in Redis lets one worker's writer write at a time)."""

    def __init__(self, worker: Any, **kwargs: Any) -> None:
        super().__init__(worker, **kwargs)
        self.scheduler: Scheduler | None = None
        self.history: HistoryWriter | None = None

    def start(self, worker: Any) -> None:
        settings = Settings.from_env()
        client = connect(settings.redis_url, timeout=5)
        self.scheduler = Scheduler(Lanes(client), Kicks(client), settings.scheduler_interval)
        self.scheduler.start()
        self.history = HistoryWriter(
            client, shared_database(settings.database_url),
            holder=f"{socket.gethostname()}:{os.getpid()}",
            retention_seconds=settings.retention)
        self.history.start()

    def stop(self, worker: Any) -> None:
        if self.scheduler is not None:
            self.scheduler.stop()
        if self.history is not None:
            self.history.stop()
