"""The history database in the unit layer: an in-memory SQLite per Redis client, so the app,
the engine and the history writer of one test share it as a deployment shares its database."""

from __future__ import annotations

import time
import weakref
from typing import Any

import redis
from sqlalchemy import Connection, Engine, create_engine
from sqlalchemy.pool import StaticPool

from relay.core.models import LeadEvent
from relay.delivery.history_writer import HistoryWriter
from relay.history import reader
from relay.history.schema import metadata
from relay.operations.events import overlay
from relay.store.deliveries import DeliveryStore
from relay.store.keys import HISTORY

_databases: weakref.WeakKeyDictionary[redis.Redis, Engine] = weakref.WeakKeyDictionary()


def memory_database() -> Engine:
    """A fresh in-memory history database, its tables created (one connection, shared by the
    test's threads)."""
    engine = create_engine("sqlite://", poolclass=StaticPool,
                           connect_args={"check_same_thread": False})
    metadata.create_all(engine)
    return engine


def history_for(client: redis.Redis) -> Engine:
    """The history database that goes with this Redis client."""
    database = _databases.get(client)
    if database is None:
        database = _databases[client] = memory_database()
    return database


def flush_history(client: redis.Redis, database: Engine | None = None,
                  timeout: float = 10.0, grace_ms: int = 0) -> int:
    """Play the history writer: write everything the history stream holds (or, when a
    worker's writer holds the lease, wait until it has). Redis lets the committed payloads go
    after ``grace_ms`` (at once by default: tests see the state after the grace)."""
    writer = HistoryWriter(client, database or history_for(client), holder="tests",
                           retention_seconds=7 * 86400, payload_grace_ms=grace_ms)
    written = writer.flush()
    deadline = time.monotonic() + timeout
    while client.xlen(HISTORY) and time.monotonic() < deadline:
        time.sleep(0.05)
        written += writer.flush()
    return written


class HistoryView:
    """What a test reads of an event's story, as the store used to answer it: the history
    database (written first, as the worker's writer would) with Redis's newer states laid
    over it."""

    def __init__(self, client: redis.Redis, database: Engine | None = None,
                 retention: float = 7 * 86400) -> None:
        self.redis = client
        self.database = database or history_for(client)
        self.store = DeliveryStore(client, retention)

    def _written(self) -> Connection:
        flush_history(self.redis, self.database)
        return self.database.connect()

    def event_record(self, event_id: str) -> dict[str, Any] | None:
        with self._written() as connection:
            return reader.event_record(connection, event_id) or self.store.event_record(event_id)

    def load_event(self, event_id: str) -> LeadEvent | None:
        record = self.event_record(event_id)
        return LeadEvent.from_json(record["event"]) if record else None

    def delivery_states(self, event_id: str) -> dict[str, dict[str, Any]]:
        with self._written() as connection:
            states = reader.delivery_states(connection, event_id)
        return overlay(states, self.store.delivery_states(event_id))

    def attempts(self, event_id: str) -> list[dict[str, Any]]:
        with self._written() as connection:
            return reader.attempts(connection, event_id)

    def dead_letters(self, destination: str | None = None, limit: int = 100,
                     offset: int = 0) -> list[dict[str, Any]]:
        with self._written() as connection:
            return reader.dead_letters(connection, destination, limit, offset)

    def stats(self, destination: str) -> dict[str, str]:
        return self.store.stats(destination)

    def __getattr__(self, name: str) -> Any:  # the rest is the store's (take, confirm, …)
        return getattr(self.store, name)


def history_of(redis_url: str, database_url: str) -> HistoryView:
    """The story a deployment's Redis and history database tell (its workers write it)."""
    from relay.history.database import shared_database

    return HistoryView(redis.Redis.from_url(redis_url), shared_database(database_url))
