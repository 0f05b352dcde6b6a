"""The history tables: events, duplicates, deliveries, attempts, the lead index, erasures.

Revision ID: 0001
Revises: (none)
Create Date: 2026-12-06 01:02:21.983392
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = '0001'
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table('relay_attempts',
    sa.Column('attempt_id', sa.String(length=200), nullable=False),
    sa.Column('event_id', sa.String(length=200), nullable=False),
    sa.Column('destination', sa.String(length=200), nullable=False),
    sa.Column('attempt', sa.Integer(), nullable=False),
    sa.Column('outcome', sa.String(length=20), nullable=False),
    sa.Column('at', sa.Float(), nullable=False),
    sa.Column('received_at', sa.Float(), nullable=False),
    sa.Column('status_code', sa.Integer(), nullable=True),
    sa.Column('latency_ms', sa.Float(), nullable=True),
    sa.Column('error', sa.Text(), nullable=True),
    sa.Column('next_attempt_at', sa.Float(), nullable=True),
    sa.PrimaryKeyConstraint('attempt_id')
    )
    with op.batch_alter_table('relay_attempts', schema=None) as batch_op:
        batch_op.create_index('relay_attempts_event', ['event_id', 'at'], unique=False)
        batch_op.create_index('relay_attempts_received', ['received_at'], unique=False)

    op.create_table('relay_deliveries',
    sa.Column('event_id', sa.String(length=200), nullable=False),
    sa.Column('destination', sa.String(length=200), nullable=False),
    sa.Column('status', sa.String(length=20), nullable=False),
    sa.Column('attempts', sa.Integer(), nullable=False),
    sa.Column('version', sa.BigInteger(), nullable=False),
    sa.Column('updated_at', sa.Float(), nullable=False),
    sa.Column('received_at', sa.Float(), nullable=False),
    sa.Column('status_code', sa.Integer(), nullable=True),
    sa.Column('error', sa.Text(), nullable=True),
    sa.Column('next_attempt_at', sa.Float(), nullable=True),
    sa.Column('dead_at', sa.Float(), nullable=True),
    sa.Column('crashes', sa.Integer(), nullable=True),
    sa.PrimaryKeyConstraint('event_id', 'destination')
    )
    with op.batch_alter_table('relay_deliveries', schema=None) as batch_op:
        batch_op.create_index('relay_deliveries_dead', ['status', 'dead_at'], unique=False)
        batch_op.create_index('relay_deliveries_list', ['destination', 'status', 'updated_at'],
                              unique=False)
        batch_op.create_index('relay_deliveries_received', ['received_at'], unique=False)

    op.create_table('relay_duplicates',
    sa.Column('entry_id', sa.String(length=200), nullable=False),
    sa.Column('event_id', sa.String(length=200), nullable=False),
    sa.Column('at', sa.Float(), nullable=False),
    sa.Column('received_at', sa.Float(), nullable=False),
    sa.PrimaryKeyConstraint('entry_id')
    )
    with op.batch_alter_table('relay_duplicates', schema=None) as batch_op:
        batch_op.create_index('relay_duplicates_event', ['event_id'], unique=False)

    op.create_table('relay_erased_events',
    sa.Column('digest', sa.String(length=64), nullable=False),
    sa.Column('erased_at', sa.Float(), nullable=False),
    sa.PrimaryKeyConstraint('digest')
    )
    op.create_table('relay_erasures',
    sa.Column('digest', sa.String(length=64), nullable=False),
    sa.Column('erased_at', sa.Float(), nullable=False),
    sa.PrimaryKeyConstraint('digest')
    )
    op.create_table('relay_events',
    sa.Column('event_id', sa.String(length=200), nullable=False),
    sa.Column('name', sa.String(length=200), nullable=False),
    sa.Column('source', sa.String(length=200), nullable=False),
    sa.Column('campaign_id', sa.String(length=200), nullable=True),
    sa.Column('received_at', sa.Float(), nullable=False),
    sa.Column('admitted_at', sa.Float(), nullable=True),
    sa.Column('event_json', sa.Text(), nullable=False),
    sa.PrimaryKeyConstraint('event_id')
    )
    with op.batch_alter_table('relay_events', schema=None) as batch_op:
        batch_op.create_index('relay_events_campaign', ['campaign_id', 'received_at'], unique=False)
        batch_op.create_index('relay_events_received', ['received_at'], unique=False)

    op.create_table('relay_lead_keys',
    sa.Column('kind', sa.String(length=20), nullable=False),
    sa.Column('value', sa.String(length=320), nullable=False),
    sa.Column('event_id', sa.String(length=200), nullable=False),
    sa.Column('received_at', sa.Float(), nullable=False),
    sa.PrimaryKeyConstraint('kind', 'value', 'event_id')
    )
    with op.batch_alter_table('relay_lead_keys', schema=None) as batch_op:
        batch_op.create_index('relay_lead_keys_event', ['event_id'], unique=False)
        batch_op.create_index('relay_lead_keys_received', ['received_at'], unique=False)



def downgrade() -> None:
    with op.batch_alter_table('relay_lead_keys', schema=None) as batch_op:
        batch_op.drop_index('relay_lead_keys_received')
        batch_op.drop_index('relay_lead_keys_event')

    op.drop_table('relay_lead_keys')
    with op.batch_alter_table('relay_events', schema=None) as batch_op:
        batch_op.drop_index('relay_events_received')
        batch_op.drop_index('relay_events_campaign')

    op.drop_table('relay_events')
    op.drop_table('relay_erasures')
    op.drop_table('relay_erased_events')
    with op.batch_alter_table('relay_duplicates', schema=None) as batch_op:
        batch_op.drop_index('relay_duplicates_event')

    op.drop_table('relay_duplicates')
    with op.batch_alter_table('relay_deliveries', schema=None) as batch_op:
        batch_op.drop_index('relay_deliveries_received')
        batch_op.drop_index('relay_deliveries_list')
        batch_op.drop_index('relay_deliveries_dead')

    op.drop_table('relay_deliveries')
    with op.batch_alter_table('relay_attempts', schema=None) as batch_op:
        batch_op.drop_index('relay_attempts_received')
        batch_op.drop_index('relay_attempts_event')

    op.drop_table('relay_attempts')
