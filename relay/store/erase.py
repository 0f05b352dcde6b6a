"""GDPR erasure, the Redis half: remove every trace of one lead (by email) that Redis holds.
The history database has its own half (:func:`relay.history.retention.erase_lead`);
:func:`relay.operations.leads.erase` runs both.

What a lead leaves here, and what goes:

- stored events (``relay:event:<id>``: admitted, not yet written to the database) whose
  payload's ``email`` is the address, and the events the database named (``event_ids``), with
  each one's delivery states and dedupe marker;
- events accepted and not yet admitted (intake entries carrying the lead), and its events'
  deliveries waiting in a lane or parked for a retry;
- the lead's order lists at destinations with ``ordering: per_lead`` (its events waiting
  behind its earliest one; the list is named by the digest of the lead's email);
- the dev inbox's copies.

Everything is found with SCAN / HSCAN / ZSCAN in batches, so Redis is never blocked, and only
records whose own lead is the address are touched: other leads' events stay as they are, even
where they mention the address (a referral's ``__referral.email``). What the destinations
themselves hold (the CRM, the database) is theirs to erase.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qs

import redis

from relay.store.keys import (
    DEV_INBOX,
    EVENT_PREFIX,
    INTAKE,
    LANES,
    SCHEDULED,
    delivery_key,
    event_key,
    lane_key,
    order_key,
    order_lead,
    parked_member,
    seen_key,
    stats_key,
)
from relay.store.lanes import Lanes, intake_events, parked
from relay.store.scripts import register

BATCH = 500


@dataclass
class ErasureReport:
    email: str
    event_ids: set[str] = field(default_factory=set)
    removed: Counter[str] = field(default_factory=Counter)

    def to_json(self) -> dict[str, Any]:
        return {"email": self.email, "event_ids": sorted(self.event_ids),
                "removed": dict(sorted(self.removed.items()))}


def _is_lead(payload: Any, email: str) -> bool:
    if not isinstance(payload, Mapping):
        return False
    value = payload.get("email")
    return isinstance(value, str) and value.strip().lower() == email


def erase_lead(client: redis.Redis, email: str, event_ids: Iterable[str] = ()) -> ErasureReport:
    """Erase the lead from Redis; ``event_ids``: its events the database knows of."""
    target = email.strip().lower()
    report = ErasureReport(target, set(event_ids))
    _order_lists(client, target, report)  # first: nothing is let into a lane from them after
    _queued_events(client, target, report)
    _stored_events(client, target, report)
    _event_keys(client, report)
    _parked(client, report)
    _dev_inbox(client, target, report)
    return report


def _stored_events(client: redis.Redis, email: str, report: ErasureReport) -> None:
    for keys in _batches(client.scan_iter(match=EVENT_PREFIX + "*", count=BATCH)):
        pipe = client.pipeline(transaction=False)
        for key in keys:
            pipe.hget(key, "event")
        for key, raw in zip(keys, pipe.execute(), strict=True):
            if raw is None:
                continue
            event = json.loads(raw)
            if _is_lead(event.get("payload"), email):
                report.event_ids.add(key.decode()[len(EVENT_PREFIX):])


def _event_keys(client: redis.Redis, report: ErasureReport) -> None:
    for ids in _batches(sorted(report.event_ids)):
        pipe = client.pipeline(transaction=False)
        for event_id in ids:
            pipe.delete(event_key(event_id))
            pipe.delete(delivery_key(event_id))
            pipe.delete(seen_key(event_id))
        answers = pipe.execute()
        for i, kind in enumerate(("events", "delivery_states", "dedupe_markers")):
            report.removed[kind] += sum(int(a) for a in answers[i::3])


def _order_lists(client: redis.Redis, email: str, report: ErasureReport) -> None:
    """The lead's events waiting behind its earliest one, at each ordered destination (their
    lane entries are gone already; the list holds their ids)."""
    lead = order_lead("email", email)  # the first of its lead keys (an email is normalised)
    lanes = sorted(m.decode() for m in client.smembers(LANES))
    if not lanes:
        return
    keys = [key for lane in lanes for key in (order_key(lane, lead), stats_key(lane))]
    report.removed["order_lists"] += int(register(client, "order_drop")(keys=keys))


def _queued_events(client: redis.Redis, email: str, report: ErasureReport) -> None:
    """Events accepted and not yet admitted: the intake entries carrying the lead."""
    doomed = []
    for entry_id, event in intake_events(client):
        if _is_lead(event.get("payload"), email):
            report.event_ids.add(str(event.get("event_id")))
            doomed.append(entry_id)
    for batch in _batches(doomed):
        report.removed["queued_events"] += int(client.xdel(INTAKE, *batch))


def _parked(client: redis.Redis, report: ErasureReport) -> None:
    """Deliveries of the erased events, waiting in a lane or for a retry's time: they would
    find nothing to send."""
    doomed = [parked_member(event_id, destination) for event_id, destination, _ in parked(client)
              if event_id in report.event_ids]
    for batch in _batches(doomed):
        report.removed["parked_deliveries"] += int(client.zrem(SCHEDULED, *batch))
    lanes = Lanes(client)
    for lane in lanes.lane_depths():
        entries = [entry for entry, event_id in lanes.lane_entries(lane)
                   if event_id in report.event_ids]
        for batch in _batches(entries):
            report.removed["lane_entries"] += int(client.xdel(lane_key(lane), *batch))


def _dev_inbox(client: redis.Redis, email: str, report: ErasureReport) -> None:
    for raw in client.lrange(DEV_INBOX, 0, -1):
        body = json.loads(raw).get("body")
        if isinstance(body, str):
            body = {k: v[0] for k, v in parse_qs(body).items()}
        if _is_lead(body, email):
            report.removed["dev_inbox"] += int(client.lrem(DEV_INBOX, 0, raw))


def _batches(items: Iterable[Any], size: int = BATCH) -> Iterable[list[Any]]:
    batch: list[Any] = []
    for item in items:
        batch.append(item)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch
