"""PostgreSQL's day partitions of the history tables: retention drops a day, it deletes no rows.

Each table of :data:`relay.history.schema.HISTORY_TABLES` is partitioned by range of
``received_at`` (UNIX seconds) into one partition a UTC day, named ``<table>_dYYYYMMDD``, plus a
``<table>_default`` partition for a row no day partition takes (the days ahead were not made
yet: no writer ran for days). The history writer keeps :data:`AHEAD` days made ahead of time
(and ``relay db upgrade`` does once); a day made later takes over its rows from the default
partition. Retention drops the partitions whose whole day is older than the retention period,
so PostgreSQL keeps up to one day more than ``RELAY_RETENTION``, and deletes in batches only
what the default partition holds (:func:`relay.history.retention.purge`).

Convoy moved to partitions after delete-based retention hurt its database; a dropped partition
leaves nothing for vacuum to do. SQLite has no partitions: there retention deletes in batches.
"""

from __future__ import annotations

import datetime as dt
import re
from collections.abc import Iterable

from sqlalchemy import Connection, text

from relay.history.schema import HISTORY_TABLES

DAY = 86_400
AHEAD = 2  # days made ahead of today
#: Serialises partition changes between processes (any fixed number, the relay's own).
_LOCK = 7_271_946
_DAY_NAME = re.compile(r"_d(\d{8})$")
HISTORY = tuple(table.name for table in HISTORY_TABLES)


def partitioned(connection: Connection) -> bool:
    return connection.dialect.name == "postgresql"


def day_of(timestamp: float) -> int:
    """The start of the UTC day of ``timestamp``."""
    return int(timestamp // DAY * DAY)


def partition_name(table: str, day: int) -> str:
    return f"{table}_d{dt.datetime.fromtimestamp(day, dt.UTC):%Y%m%d}"


def default_name(table: str) -> str:
    return f"{table}_default"


def days(connection: Connection, table: str) -> dict[int, str]:
    """The day partitions of ``table``: day start -> partition name."""
    rows = connection.execute(text(
        "SELECT c.relname FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid "
        "JOIN pg_class p ON p.oid = i.inhparent WHERE p.relname = :table"), {"table": table})
    found = {}
    for (name,) in rows:
        match = _DAY_NAME.search(name)
        if match:
            day = dt.datetime.strptime(match.group(1), "%Y%m%d").replace(tzinfo=dt.UTC)
            found[int(day.timestamp())] = name
    return found


def ensure(connection: Connection, now: float, ahead: int = AHEAD, also: Iterable[int] = (),
           tables: Iterable[str] = HISTORY) -> list[str]:
    """Make the day partitions of today, the ``ahead`` days after it and the days ``also``
    (times in them) that are missing, in the caller's transaction; the partitions made."""
    if not partitioned(connection):
        return []
    connection.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": _LOCK})
    wanted = {day_of(now) + n * DAY for n in range(ahead + 1)} | {day_of(d) for d in also}
    made = []
    for table in tables:
        have = days(connection, table)
        for day in sorted(wanted - set(have)):
            made.append(_make(connection, table, day))
    return made


def _make(connection: Connection, table: str, day: int) -> str:
    """A day's partition, made beside the table, filled with the day's rows from the default
    partition, then attached (attaching a day whose rows are still in the default partition
    would fail)."""
    name = partition_name(table, day)
    connection.execute(text(f'CREATE TABLE "{name}" (LIKE "{table}" INCLUDING DEFAULTS)'))
    bounds = {"low": float(day), "high": float(day + DAY)}
    connection.execute(text(
        f'WITH moved AS (DELETE FROM "{default_name(table)}" WHERE received_at >= :low '
        f'AND received_at < :high RETURNING *) INSERT INTO "{name}" SELECT * FROM moved'),
        bounds)
    connection.execute(text(
        f'ALTER TABLE "{table}" ATTACH PARTITION "{name}" '
        f'FOR VALUES FROM ({bounds["low"]!r}) TO ({bounds["high"]!r})'))
    return name


def drop_before(connection: Connection, cutoff: float) -> list[str]:
    """Drop the day partitions whose whole day is before ``cutoff``; the partitions dropped."""
    if not partitioned(connection):
        return []
    connection.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": _LOCK})
    dropped = []
    for table in HISTORY:
        for day, name in sorted(days(connection, table).items()):
            if day + DAY <= cutoff:
                connection.execute(text(f'DROP TABLE "{name}"'))
                dropped.append(name)
    return dropped
