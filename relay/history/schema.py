"""The history's tables (SQLAlchemy Core). Times are UNIX seconds (floats) as everywhere else in
the relay; every table carries the ingress's ``received_at`` of its event, the column retention
deletes by.

On PostgreSQL the five tables of :data:`HISTORY_TABLES` are partitioned by day of
``received_at`` (:mod:`relay.history.partitions`), so retention drops a day's partition instead
of deleting its rows. A partitioned table's keys must hold the partition column, so each
primary key ends with ``received_at``: every record of an event carries the same ingress time,
so the key is as unique as the id before it."""

from __future__ import annotations

from sqlalchemy import (
    BigInteger,
    Column,
    Float,
    Index,
    Integer,
    MetaData,
    String,
    Table,
    Text,
)

metadata = MetaData()

#: The history tables' partitioning on PostgreSQL (other databases ignore it).
BY_DAY = {"postgresql_partition_by": "RANGE (received_at)"}

ID = 200  # event ids, destination names, attempt ids: short strings
LEAD_VALUE = 320  # an email address at most

#: One row per admitted event. ``event_json`` is the event as the relay stored it in Redis
#: (name, source, times, metadata and the payload's exact bytes last), kept as text: a webhook
#: destination is sent these bytes, and JSONB would reorder keys and refuse ``\u0000``.
events = Table(
    "relay_events", metadata,
    Column("event_id", String(ID), primary_key=True),
    Column("name", String(ID), nullable=False),
    Column("source", String(ID), nullable=False),
    Column("campaign_id", String(ID)),
    Column("received_at", Float, primary_key=True),
    Column("admitted_at", Float),
    Column("event_json", Text, nullable=False),
    Index("relay_events_received", "received_at"),
    Index("relay_events_campaign", "campaign_id", "received_at"),
    **BY_DAY,
)

#: A repeat of an event id inside the dedupe window, keyed by its intake entry (so a record
#: applied twice counts once).
duplicates = Table(
    "relay_duplicates", metadata,
    Column("entry_id", String(ID), primary_key=True),
    Column("event_id", String(ID), nullable=False),
    Column("at", Float, nullable=False),
    Column("received_at", Float, primary_key=True),
    Index("relay_duplicates_event", "event_id"),
    **BY_DAY,
)

#: Each delivery's latest state: pending, inflight, retrying, delivered, skipped or dead.
#: A dead letter is a delivery whose status is ``dead``.
deliveries = Table(
    "relay_deliveries", metadata,
    Column("event_id", String(ID), primary_key=True),
    Column("destination", String(ID), primary_key=True),
    Column("status", String(20), nullable=False),
    Column("attempts", Integer, nullable=False, default=0),
    Column("version", BigInteger, nullable=False),
    Column("updated_at", Float, nullable=False),
    Column("received_at", Float, primary_key=True),
    Column("status_code", Integer),
    Column("error", Text),
    Column("next_attempt_at", Float),
    Column("dead_at", Float),
    Column("crashes", Integer),  # attempts whose worker died before recording them
    Index("relay_deliveries_list", "destination", "status", "updated_at"),
    Index("relay_deliveries_dead", "status", "dead_at"),
    Index("relay_deliveries_received", "received_at"),
    **BY_DAY,
)

#: One row per attempt, keyed by the id minted when its delivery was claimed.
attempts = Table(
    "relay_attempts", metadata,
    Column("attempt_id", String(ID), primary_key=True),
    Column("event_id", String(ID), nullable=False),
    Column("destination", String(ID), nullable=False),
    Column("attempt", Integer, nullable=False),
    Column("outcome", String(20), nullable=False),
    Column("at", Float, nullable=False),
    Column("received_at", Float, primary_key=True),
    Column("status_code", Integer),
    Column("latency_ms", Float),
    Column("error", Text),  # the error, or what a successful answer said
    Column("next_attempt_at", Float),
    Index("relay_attempts_event", "event_id", "at"),
    Index("relay_attempts_received", "received_at"),
    **BY_DAY,
)

#: The lead index: each way a lead can be looked up (``email``, ``social_id``, ``phone``,
#: ``id``) -> its events.
lead_keys = Table(
    "relay_lead_keys", metadata,
    Column("kind", String(20), primary_key=True),
    Column("value", String(LEAD_VALUE), primary_key=True),
    Column("event_id", String(ID), primary_key=True),
    Column("received_at", Float, primary_key=True),
    Index("relay_lead_keys_event", "event_id"),
    Index("relay_lead_keys_received", "received_at"),
    **BY_DAY,
)

#: Erasures (GDPR): which lead was erased when, so that history records still on their way when
#: the lead was erased are not written back. The lead key is kept as a SHA-256 digest only
#: (:func:`relay.history.leads.erasure_digest`), never in clear.
erasures = Table(
    "relay_erasures", metadata,
    Column("digest", String(64), primary_key=True),
    Column("erased_at", Float, nullable=False),
)

#: The events an erasure removed, each as a SHA-256 of its id
#: (:func:`relay.history.leads.event_digest`): a record of theirs that arrives later is not
#: written.
erased_events = Table(
    "relay_erased_events", metadata,
    Column("digest", String(64), primary_key=True),
    Column("erased_at", Float, nullable=False),
)

#: The tables kept for the retention period (partitioned by day on PostgreSQL).
HISTORY_TABLES = (events, duplicates, deliveries, attempts, lead_keys)
