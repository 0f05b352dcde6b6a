"""The history stream: the outbox between Redis and the history database.

The scripts that change relay state (admission, a drain step, a replay) add one entry to
``relay:history`` in the same script, so a state change and its history record are one atomic
step. An entry holds ``v``, a version (Redis's clock in microseconds when the script ran: one
clock for every worker, so versions of one delivery are in the order its states changed), and
``r``, a JSON array of history records (:mod:`relay.history.writer` says their kinds).

One worker at a time writes them to the database (:meth:`HistoryOutbox.lead`, a lease),
oldest first, and only after its commit it removes them and lets Redis forget what the database
now holds (:meth:`HistoryOutbox.release`): the payloads and dedupe markers of committed events
(after a grace of seconds, :data:`PAYLOAD_GRACE_MS`; admission looks the long dedupe window up
in the database), and the states of deliveries that are final (a stray lane entry of one is
recognised from the database, see :meth:`relay.delivery.engine.Engine.payloads`). A writer
that dies between its commit and the release leaves the entries for the next one, which writes
them again: the writes are idempotent.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import redis

from relay.store import scripts
from relay.store.keys import HISTORY, HISTORY_WRITER, delivery_key, event_key, seen_key

#: Entries one writer round takes (each holds one admitted batch or one drain step).
READ_BATCH = 200
#: How long a committed event's payload stays in Redis (ms): its deliveries are mostly claimed
#: in the next seconds, and read it here instead of from the database. What it costs is
#: bounded by the rate, not the backlog: 10 s at 1,000 events/s is about 27 MB.
PAYLOAD_GRACE_MS = 10_000


@dataclass(frozen=True)
class HistoryEntry:
    entry_id: str
    version: int
    records: list[dict[str, Any]]


class HistoryOutbox:
    def __init__(self, client: redis.Redis) -> None:
        self.redis = client
        self._release = client.register_script(scripts.load("history_release"))
        self._lead = client.register_script(scripts.load("history_lead"))

    def lead(self, holder: str, ttl_ms: int) -> bool:
        """Take or keep the writer's lease: one writer at a time (SQLite has one writer, and
        one is enough for PostgreSQL at the rates the relay sees)."""
        return bool(self._lead(keys=[HISTORY_WRITER], args=[holder, ttl_ms]))

    def resign(self, holder: str) -> None:
        self._lead(keys=[HISTORY_WRITER], args=[holder, 0])

    def read(self, count: int = READ_BATCH) -> list[HistoryEntry]:
        """The oldest entries, oldest first."""
        entries = []
        for entry_id, fields in self.redis.xrange(HISTORY, count=count):
            entries.append(HistoryEntry(entry_id.decode(), int(fields[b"v"]),
                                        json.loads(fields[b"r"])))
        return entries

    def payloads(self, event_ids: Sequence[str]) -> dict[str, str]:
        """event id -> its stored JSON, for the admitted events the database is to get (one
        round trip; an event erased meanwhile is not among them)."""
        if not event_ids:
            return {}
        pipe = self.redis.pipeline(transaction=False)
        for event_id in event_ids:
            pipe.hget(event_key(event_id), "event")
        return {event_id: raw.decode() for event_id, raw in zip(event_ids, pipe.execute(),
                                                                strict=True) if raw}

    def release(self, entries: Sequence[HistoryEntry], events: Iterable[str],
                final: Iterable[tuple[str, str]], grace_ms: int = PAYLOAD_GRACE_MS) -> None:
        """After the commit: remove the entries, let the committed events' payloads and
        dedupe markers expire within ``grace_ms`` (0: at once), and forget the final
        deliveries' states. Frees memory and writes nothing new, so it runs when Redis is at
        its limit too."""
        self._release(keys=[HISTORY], args=[
            json.dumps([e.entry_id for e in entries]),
            json.dumps(sorted({key for e in events for key in (event_key(e), seen_key(e))})),
            json.dumps(sorted({(delivery_key(e), d) for e, d in final})), grace_ms])

    def lag(self) -> tuple[int, float | None]:
        """(entries waiting, the oldest one's time in UNIX seconds) for /readyz and /metrics."""
        pipe = self.redis.pipeline(transaction=False)
        pipe.xlen(HISTORY)
        pipe.xrange(HISTORY, count=1)
        length, first = pipe.execute()
        oldest = int(first[0][0].decode().split("-")[0]) / 1000 if first else None
        return int(length), oldest
