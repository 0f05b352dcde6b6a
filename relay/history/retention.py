"""Retention and erasure in the history database.

Retention goes by the events' ``received_at``: PostgreSQL drops whole day partitions
(:mod:`.partitions`); SQLite, and PostgreSQL's default partitions, delete in batches (5,000
rows a statement, as Svix does), so no statement holds locks for long and SQLite's writer is
never blocked for more than a moment. Erasure removes every row of a lead's events and leaves
a digest of the lead key, so that records still on their way when it ran are not written back
(:mod:`.writer`)."""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Iterable

from sqlalchemy import Connection, Engine, Table, column, delete, func, select, tuple_
from sqlalchemy import table as sql_table
from sqlalchemy.sql.expression import TableClause

from relay.history import partitions, schema
from relay.history.leads import erasure_digest, event_digest, normalise

log = logging.getLogger(__name__)

DELETE_BATCH = 5_000
_BY_EVENT = (schema.attempts, schema.deliveries, schema.duplicates, schema.lead_keys,
             schema.events)


def purge(engine: Engine, cutoff: float, batch: int = DELETE_BATCH) -> int:
    """Remove what was received before ``cutoff``. On PostgreSQL: drop the day partitions
    older than it, then delete what the default partitions hold; elsewhere delete in batches,
    each its own transaction. Returns the rows deleted (a dropped partition's are not
    counted: it is logged)."""
    with engine.begin() as connection:
        dropped = partitions.drop_before(connection, cutoff)
        by_day = partitions.partitioned(connection)
    if dropped:
        log.info("dropped %d day partitions of the history older than the retention period: %s",
                 len(dropped), ", ".join(dropped))
    deleted = 0
    for table in _BY_EVENT:
        target = _default_partition(table) if by_day else table
        deleted += _delete_before(engine, target, [c.name for c in table.primary_key.columns],
                                  "received_at", cutoff, batch)
    erased = schema.erased_events
    return deleted + _delete_before(engine, erased, ["digest"], "erased_at", cutoff, batch)


def _default_partition(table: Table) -> TableClause:
    return sql_table(partitions.default_name(table.name), *(column(c.name) for c in table.columns))


def _delete_before(engine: Engine, table: TableClause, key_names: list[str], time_name: str,
                   cutoff: float, batch: int) -> int:
    key = [table.c[name] for name in key_names]
    deleted = 0
    while True:
        with engine.begin() as connection:
            doomed = select(*key).where(table.c[time_name] < cutoff).limit(batch)
            rows = connection.execute(doomed).all()
            if not rows:
                break
            connection.execute(delete(table).where(tuple_(*key).in_([tuple(r) for r in rows])))
            deleted += len(rows)
        if len(rows) < batch:
            break
    return deleted


def erase_lead(connection: Connection, email: str, now: float) -> tuple[list[str], Counter[str]]:
    """Remove the lead with this email from the history (in the caller's transaction): the
    event ids it had, and the rows removed per table. A digest of the address stays, so the
    lead's records still on their way are not written back."""
    value = normalise("email", email)
    keys = schema.lead_keys
    event_ids = sorted(set(connection.scalars(select(keys.c.event_id).where(
        keys.c.kind == "email", keys.c.value == value))))
    digest = erasure_digest("email", value)
    connection.execute(delete(schema.erasures).where(schema.erasures.c.digest == digest))
    connection.execute(schema.erasures.insert().values(digest=digest, erased_at=now))
    return event_ids, forget_events(connection, event_ids, now)


def forget_events(connection: Connection, event_ids: Iterable[str], now: float) -> Counter[str]:
    """Remove these events' rows and remember them as erased (a record of theirs still on its
    way is then not written): the events an erasure found in Redis only."""
    ids = sorted(set(event_ids))
    removed: Counter[str] = Counter()
    for i in range(0, len(ids), 500):
        chunk = ids[i:i + 500]
        removed["dead_letters"] += int(connection.scalar(
            select(func.count()).select_from(schema.deliveries).where(
                schema.deliveries.c.event_id.in_(chunk),
                schema.deliveries.c.status == "dead")) or 0)
        for table in _BY_EVENT:
            result = connection.execute(delete(table).where(table.c.event_id.in_(chunk)))
            removed[table.name] += result.rowcount or 0
        digests = [event_digest(event_id) for event_id in chunk]
        connection.execute(delete(schema.erased_events).where(
            schema.erased_events.c.digest.in_(digests)))
        connection.execute(schema.erased_events.insert(), [
            {"digest": digest, "erased_at": now} for digest in digests])
    return removed
