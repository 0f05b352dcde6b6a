"""Applying history records to the database: one transaction per batch, multi-row statements,
idempotent, so a batch applied twice (a writer that died between its commit and its
acknowledgement in Redis) leaves the same rows as once.

A history record is a JSON object with a kind ``k`` (written by the scripts of
:mod:`relay.store`; the stream entry that carries it adds the version ``v``):

``event``     an admitted event: ``id``, ``name``, ``source``, ``campaign_id``, ``received_at``,
              ``admitted_at``, ``leads`` ([kind, value] pairs), ``destinations`` (its routed
              deliveries, pending) and ``event``, the stored event JSON verbatim: absent from
              the stream (Redis keeps one copy of a payload, in the event's record), the
              writer reads it from there (:meth:`Batch.payloads_read`)
``duplicate`` a repeat inside the dedupe window: ``entry``, ``id``, ``at``, ``received_at``
``attempt``   an attempt and the state it left its delivery in: ``attempt_id``, ``id``,
              ``destination``, ``attempt``, ``outcome``, ``at``, ``received_at``,
              ``status_code``, ``latency_ms``, ``error``, ``next_attempt_at``, ``status``
              (the delivery's, after it)
``replay``    a dead letter queued again: ``id``, ``destination``, ``at``, ``received_at``
"""

from __future__ import annotations

import functools
import json
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import Connection, Table, and_, literal_column, select
from sqlalchemy.dialects import postgresql, sqlite

from relay.core.models import SUCCESSES
from relay.history import schema
from relay.history.leads import erasure_digest, event_digest

FINAL = frozenset({"delivered", "skipped", "dead"})


@dataclass
class Batch:
    """The rows of a batch of records, each table's deduplicated by its key."""

    events: dict[str, dict[str, Any]] = field(default_factory=dict)
    duplicates: dict[str, dict[str, Any]] = field(default_factory=dict)
    deliveries: dict[tuple[str, str], dict[str, Any]] = field(default_factory=dict)
    attempts: dict[str, dict[str, Any]] = field(default_factory=dict)
    lead_keys: dict[tuple[str, str, str], dict[str, Any]] = field(default_factory=dict)
    digests: dict[str, set[str]] = field(default_factory=dict)  # event id -> its lead digests

    def add(self, record: Mapping[str, Any], version: int) -> None:
        kind = record.get("k")
        if kind == "event":
            self._event(record, version)
        elif kind == "duplicate":
            self.duplicates.setdefault(record["entry"], {
                "entry_id": record["entry"], "event_id": record["id"], "at": record["at"],
                "received_at": record["received_at"]})
        elif kind == "attempt":
            self._attempt(record, version)
        elif kind == "replay":
            self._delivery(record["id"], record["destination"], version, {
                "status": "pending", "attempts": 0, "updated_at": record["at"],
                "received_at": record["received_at"], "status_code": None, "error": None,
                "next_attempt_at": None, "dead_at": None, "crashes": None})

    def _event(self, record: Mapping[str, Any], version: int) -> None:
        event_id = record["id"]
        self.events.setdefault(event_id, {
            "event_id": event_id, "name": record["name"], "source": record["source"],
            "campaign_id": record.get("campaign_id"), "received_at": record["received_at"],
            "admitted_at": record.get("admitted_at"), "event_json": record.get("event")})
        for kind, value in record.get("leads") or ():
            self.lead_keys[(kind, value, event_id)] = {
                "kind": kind, "value": value, "event_id": event_id,
                "received_at": record["received_at"]}
            self.digests.setdefault(event_id, set()).add(erasure_digest(kind, value))
        for destination in record.get("destinations") or ():
            # Admission's version is the lowest a delivery has: any outcome replaces it.
            self._delivery(event_id, destination, version, {
                "status": "pending", "attempts": 0, "updated_at": record.get("admitted_at")
                or record["received_at"], "received_at": record["received_at"],
                "status_code": None, "error": None, "next_attempt_at": None, "dead_at": None,
                "crashes": None})

    def _attempt(self, record: Mapping[str, Any], version: int) -> None:
        self.attempts.setdefault(record["attempt_id"], {
            "attempt_id": record["attempt_id"], "event_id": record["id"],
            "destination": record["destination"], "attempt": record["attempt"],
            "outcome": record["outcome"], "at": record["at"],
            "received_at": record["received_at"], "status_code": record.get("status_code"),
            "latency_ms": record.get("latency_ms"), "error": record.get("error"),
            "next_attempt_at": record.get("next_attempt_at")})
        status = record["status"]
        self._delivery(record["id"], record["destination"], version, {
            "status": status, "attempts": record["attempt"], "updated_at": record["at"],
            "received_at": record["received_at"], "status_code": record.get("status_code"),
            "error": record.get("error"), "next_attempt_at": record.get("next_attempt_at"),
            "dead_at": record["at"] if status == "dead" else None,
            "crashes": record.get("crashes")})

    def _delivery(self, event_id: str, destination: str, version: int,
                  values: dict[str, Any]) -> None:
        key = (event_id, destination)
        current = self.deliveries.get(key)
        if current is None or (current["version"] <= version
                               and current["status"] not in SUCCESSES):
            self.deliveries[key] = {"event_id": event_id, "destination": destination,
                                    "version": version, **values}

    def unread_payloads(self) -> list[str]:
        """The events whose stored JSON the records did not carry."""
        return [event_id for event_id, row in self.events.items() if row["event_json"] is None]

    def payloads_read(self, stored: Mapping[str, str]) -> None:
        """Fill in the stored JSON of :meth:`unread_payloads`; an event Redis no longer has
        (erased meanwhile) is left out, with its lead keys."""
        for event_id in self.unread_payloads():
            if event_id in stored:
                self.events[event_id]["event_json"] = stored[event_id]
            else:
                del self.events[event_id]
                self.lead_keys = {k: v for k, v in self.lead_keys.items() if k[2] != event_id}

    def __len__(self) -> int:
        return (len(self.events) + len(self.duplicates) + len(self.deliveries)
                + len(self.attempts))


def batch_of(entries: Iterable[tuple[int, Sequence[Mapping[str, Any]]]]) -> Batch:
    """The rows of stream entries, each a (version, records) pair, in stream order."""
    batch = Batch()
    for version, records in entries:
        for record in records:
            batch.add(record, version)
    return batch


def apply(connection: Connection, batch: Batch, now: float) -> int:
    """Write a batch in the caller's transaction; the rows written (or found written)."""
    _drop_erased(connection, batch)
    _insert_new(connection, schema.events, list(batch.events.values()))
    _insert_new(connection, schema.lead_keys, list(batch.lead_keys.values()))
    _insert_new(connection, schema.duplicates, list(batch.duplicates.values()))
    _insert_new(connection, schema.attempts, list(batch.attempts.values()))
    _upsert_newer(connection, list(batch.deliveries.values()))
    return len(batch)


def _drop_erased(connection: Connection, batch: Batch) -> None:
    """Leave out every row of an event that was erased, or whose lead was erased after the
    event was received (its records were on their way when the erasure ran)."""
    ids = {*batch.events, *(r["event_id"] for r in batch.duplicates.values()),
           *(e for e, _ in batch.deliveries), *(r["event_id"] for r in batch.attempts.values())}
    if not ids:
        return
    digests_of = {event_digest(event_id): event_id for event_id in ids}
    erased = {digests_of[d] for d in connection.scalars(
        select(schema.erased_events.c.digest).where(
            schema.erased_events.c.digest.in_(digests_of)))}
    digests = {d for found in batch.digests.values() for d in found}
    if digests:
        rows = connection.execute(select(schema.erasures.c.digest, schema.erasures.c.erased_at)
                                  .where(schema.erasures.c.digest.in_(digests)))
        when = {digest: erased_at for digest, erased_at in rows}
        for event_id, found in batch.digests.items():
            received = batch.events[event_id]["received_at"]
            if any(when.get(d, -1.0) >= received for d in found):
                erased.add(event_id)
    if not erased:
        return
    batch.events = {k: v for k, v in batch.events.items() if k not in erased}
    batch.lead_keys = {k: v for k, v in batch.lead_keys.items() if k[2] not in erased}
    batch.duplicates = {k: v for k, v in batch.duplicates.items()
                        if v["event_id"] not in erased}
    batch.attempts = {k: v for k, v in batch.attempts.items() if v["event_id"] not in erased}
    batch.deliveries = {k: v for k, v in batch.deliveries.items() if k[0] not in erased}


def _insert(dialect: str, table: Table) -> Any:
    if dialect == "postgresql":
        return postgresql.insert(table)
    if dialect == "sqlite":
        return sqlite.insert(table)
    raise NotImplementedError(f"the history needs PostgreSQL or SQLite, not {dialect}")


@functools.cache
def _insert_new_statement(dialect: str, table: Table) -> Any:
    return _insert(dialect, table).on_conflict_do_nothing(
        index_elements=list(table.primary_key.columns))


@functools.cache
def _upsert_newer_statement(dialect: str) -> Any:
    table = schema.deliveries
    statement = _insert(dialect, table)
    key = list(table.primary_key.columns)  # (event, destination, received_at)
    replaced = {c.name: statement.excluded[c.name] for c in table.columns if c not in key}
    return statement.on_conflict_do_update(
        index_elements=key, set_=replaced,
        # Literal statuses: an expanding IN parameter cannot be used with executemany.
        where=and_(table.c.version < statement.excluded.version,
                   *(table.c.status != literal_column(f"'{status}'")
                     for status in sorted(SUCCESSES))))


# One statement, built and compiled once per dialect and table, executed with many rows:
# SQLAlchemy's "insertmanyvalues" sends them to PostgreSQL as multi-row VALUES pages and
# SQLite runs them through executemany, so a batch costs no SQL compilation (compiling a
# 500-row VALUES clause per batch was most of the writer's CPU).
def _insert_new(connection: Connection, table: Table, rows: list[dict[str, Any]]) -> None:
    """Insert the rows; rows already there (by primary key) stay as they are."""
    if rows:
        connection.execute(_insert_new_statement(connection.dialect.name, table), rows)


def _upsert_newer(connection: Connection, rows: list[dict[str, Any]]) -> None:
    """Deliveries: insert, or replace a row whose version is older (never a newer one, and
    never a success: as in Redis, a second send that failed does not undo the first)."""
    if rows:
        connection.execute(_upsert_newer_statement(connection.dialect.name), rows)


def decode_entry(fields: Mapping[bytes, bytes]) -> tuple[int, list[dict[str, Any]]]:
    """A history stream entry's (version, records)."""
    return int(fields[b"v"]), json.loads(fields[b"r"])
