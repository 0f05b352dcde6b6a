"""A lead as an operator acts on it: erase it from the relay (GDPR)."""

from __future__ import annotations

import time

from relay.history import retention
from relay.operations.context import OperatorContext
from relay.store.erase import ErasureReport, erase_lead


def erase(ops: OperatorContext, email: str) -> ErasureReport:
    """Remove every trace of the lead with this email: from the history database first (its
    events, deliveries, attempts, lead index; a digest of the address stays, so that records
    still on their way are not written back), then from Redis (events not yet written, lane
    entries, parked retries, dedupe markers), then the events only Redis knew of from the
    database too (in case the writer committed them meanwhile)."""
    now = time.time()
    with ops.database.begin() as connection:
        event_ids, removed = retention.erase_lead(connection, email, now)
    report = erase_lead(ops.redis, email, event_ids)
    fresh = report.event_ids - set(event_ids)
    if fresh:
        with ops.database.begin() as connection:
            removed += retention.forget_events(connection, fresh, now)
    for table, rows in removed.items():
        report.removed[table.removeprefix("relay_")] += rows
    return report
