"""The history tables keyed with their received_at, and partitioned by day on PostgreSQL.

Each of the five history tables is made again beside the old one (PostgreSQL: partitioned by
range of received_at, with a default partition and a partition for each day its rows fall on),
its rows copied over, the old table dropped. Keys get received_at as their last column (a
partitioned table's keys must hold the partition column).

Revision ID: 0002
Revises: 0001
Create Date: 2026-12-06 03:20:00
"""

from __future__ import annotations

import time

import sqlalchemy as sa
from alembic import op

from relay.history import partitions

revision = '0002'
down_revision = '0001'
branch_labels = None
depends_on = None

# Each table: its key before this revision, and its indexes (as 0001 made them).
TABLES = {
    'relay_events': (['event_id'], {
        'relay_events_campaign': ['campaign_id', 'received_at'],
        'relay_events_received': ['received_at']}),
    'relay_duplicates': (['entry_id'], {'relay_duplicates_event': ['event_id']}),
    'relay_deliveries': (['event_id', 'destination'], {
        'relay_deliveries_dead': ['status', 'dead_at'],
        'relay_deliveries_list': ['destination', 'status', 'updated_at'],
        'relay_deliveries_received': ['received_at']}),
    'relay_attempts': (['attempt_id'], {
        'relay_attempts_event': ['event_id', 'at'],
        'relay_attempts_received': ['received_at']}),
    'relay_lead_keys': (['kind', 'value', 'event_id'], {
        'relay_lead_keys_event': ['event_id'],
        'relay_lead_keys_received': ['received_at']}),
}


def upgrade() -> None:
    for name, (key, indexes) in TABLES.items():
        _rebuild(name, [*key, 'received_at'], indexes, by_day=True)


def downgrade() -> None:
    for name, (key, indexes) in TABLES.items():
        _rebuild(name, key, indexes, by_day=False)


def _rebuild(name: str, key: list[str], indexes: dict[str, list[str]], by_day: bool) -> None:
    bind = op.get_bind()
    old = sa.Table(name, sa.MetaData(), autoload_with=bind)
    for index in indexes:
        op.drop_index(index, table_name=name)
    if bind.dialect.name == 'postgresql':  # its key's name is taken until the table goes
        op.drop_constraint(old.primary_key.name, name, type_='primary')
    op.rename_table(name, f'{name}_before')
    partitioned = by_day and partitions.partitioned(bind)
    options = {'postgresql_partition_by': 'RANGE (received_at)'} if partitioned else {}
    columns = [sa.Column(c.name, c.type, nullable=c.nullable) for c in old.columns]
    op.create_table(name, *columns, sa.PrimaryKeyConstraint(*key), **options)
    for index, indexed in indexes.items():
        op.create_index(index, name, indexed)
    if partitioned:
        op.execute(sa.text(f'CREATE TABLE "{partitions.default_name(name)}" '
                           f'PARTITION OF "{name}" DEFAULT'))
        days = bind.execute(sa.text(
            f'SELECT DISTINCT floor(received_at / {partitions.DAY}) * {partitions.DAY} '
            f'FROM "{name}_before"')).scalars()
        partitions.ensure(bind, time.time(), also=[int(day) for day in days], tables=[name])
    listed = ', '.join(f'"{c.name}"' for c in old.columns)
    op.execute(sa.text(f'INSERT INTO "{name}" ({listed}) SELECT {listed} FROM "{name}_before"'))
    op.drop_table(f'{name}_before')
