"""The history writer: drains the history stream (:mod:`relay.store.history`) into the
database (:mod:`relay.history`), in batches, one transaction each, and only then lets Redis
forget what the database holds. Every worker process runs one (a thread, like the scheduler);
a lease in Redis lets one of them write at a time.

While the database is down or slow, deliveries go on: their records wait in the stream, and
the payloads of events not yet written stay in Redis. The ingress's high-water mark bounds how
long that can last (see docs/delivery.md, "The database away"). Every :data:`PURGE_EVERY`
seconds the writer also makes PostgreSQL's day partitions ahead of time and removes what is
older than the retention period.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Callable

import redis
from sqlalchemy import Engine
from sqlalchemy.exc import SQLAlchemyError

from relay.history import partitions, retention, writer
from relay.store.history import PAYLOAD_GRACE_MS, READ_BATCH, HistoryOutbox

log = logging.getLogger("relay.history")

LEASE_MS = 30_000
IDLE_WAIT = 0.2  # seconds between looks at an empty stream
PURGE_EVERY = 600.0


class HistoryWriter:
    def __init__(self, client: redis.Redis, database: Engine, holder: str,
                 retention_seconds: float, batch: int = READ_BATCH,
                 clock: Callable[[], float] = time.time,
                 on_written: Callable[[int, int], None] | None = None,
                 payload_grace_ms: int = PAYLOAD_GRACE_MS) -> None:
        self.outbox = HistoryOutbox(client)
        self.payload_grace_ms = payload_grace_ms
        self.database = database
        self.holder = holder
        self.retention = retention_seconds
        self.batch = batch
        self.clock = clock
        self.on_written = on_written
        self._purged_at = 0.0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def run_once(self) -> int:
        """Write one batch of entries if this process holds the lease; how many it wrote."""
        if not self.outbox.lead(self.holder, LEASE_MS):
            return 0
        entries = self.outbox.read(self.batch)
        if entries:
            batch = writer.batch_of((e.version, e.records) for e in entries)
            events = list(batch.events)
            batch.payloads_read(self.outbox.payloads(batch.unread_payloads()))
            final = [key for key, row in batch.deliveries.items()
                     if row["status"] in writer.FINAL]
            with self.database.begin() as connection:
                rows = writer.apply(connection, batch, self.clock())
            self.outbox.release(entries, events, final, self.payload_grace_ms)
            if self.on_written is not None:
                self.on_written(len(entries), rows)
        if self.clock() - self._purged_at >= PURGE_EVERY:
            self._purged_at = self.clock()
            try:  # PostgreSQL's days ahead; a failure here must not skip the retention
                with self.database.begin() as connection:
                    partitions.ensure(connection, self.clock())
            except SQLAlchemyError as exc:
                log.warning("cannot make the history's day partitions ahead: %s", exc)
            deleted = retention.purge(self.database, self.clock() - self.retention)
            if deleted:
                log.info("deleted %d history rows older than the retention period", deleted)
        return len(entries)

    def flush(self) -> int:
        """Write until the stream is empty (tests, ``relay dev``'s shutdown)."""
        total = 0
        while True:
            written = self.run_once()
            total += written
            if written < self.batch:
                return total

    # -- the thread --------------------------------------------------------------------------

    def _loop(self) -> None:
        failing = False
        while not self._stop.is_set():
            try:
                written = self.run_once()
            except (redis.RedisError, SQLAlchemyError, OSError) as exc:
                if not failing:
                    log.warning("cannot write the history (it waits in Redis): %s", exc)
                failing = True
                self._stop.wait(1.0)
                continue
            if failing:
                log.info("writing the history again")
                failing = False
            if written < self.batch:
                self._stop.wait(IDLE_WAIT)

    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name="relay-history", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
        with contextlib.suppress(redis.RedisError):  # else it runs out by itself
            self.outbox.resign(self.holder)
