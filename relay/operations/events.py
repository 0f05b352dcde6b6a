"""What the relay knows of one event, and a destination's latest deliveries: the history
database, with what Redis holds of the work in flight laid over it (an event accepted a
moment ago, a delivery being sent right now)."""

from __future__ import annotations

import json
from typing import Any

from relay.core.models import SUCCESSES
from relay.history import reader
from relay.history.database import reading
from relay.operations.context import OperatorContext


def event_detail(ops: OperatorContext, event_id: str) -> dict[str, Any] | None:
    """The event, each destination's delivery state with its attempts, duplicates and dead
    letters; None when the relay knows nothing of it (never seen, past the retention, or
    erased)."""
    with reading(ops.database) as connection:
        record = reader.event_record(connection, event_id)
        states = reader.delivery_states(connection, event_id)
        attempts = reader.attempts(connection, event_id)
        dead = {d["destination"]: d
                for d in reader.dead_letters(connection, event_id=event_id, limit=1000)}
    if record is None:
        record = ops.store.event_record(event_id)  # admitted, not yet written
    states = overlay(states, ops.store.delivery_states(event_id))
    if record is None and not states and not attempts:
        return None
    event = (record or {}).get("event") or next(
        (d["event"] for d in dead.values() if d.get("event")), None)
    destinations: dict[str, dict[str, Any]] = {}
    for name in sorted(set(states) | {a["destination"] for a in attempts}):
        entry: dict[str, Any] = dict(states.get(name, {"status": "unknown"}))
        entry["attempts_log"] = [a for a in attempts if a["destination"] == name]
        if name in dead and entry["status"] == "dead":
            entry["dead_letter"] = {k: v for k, v in dead[name].items() if k != "event"}
        destinations[name] = entry
    return {
        "event_id": event_id,
        "name": event["name"] if event else None,
        "source": event["source"] if event else None,
        "payload": event["payload"] if event else None,
        "received_at": event.get("received_at") if event else None,
        "admitted_at": (record or {}).get("admitted_at"),
        "duplicates": (record or {}).get("duplicates", 0),
        "destinations": destinations,
    }


def overlay(written: dict[str, dict[str, Any]], live: dict[str, dict[str, Any]]
            ) -> dict[str, dict[str, Any]]:
    """The delivery states of an event: Redis changes a state first, so where it has one it is
    the newest, unless it is what Redis keeps of a final state the database holds (its status
    alone)."""
    merged = dict(written)
    for name, state in live.items():
        if not (set(state) == {"status"} and name in written):
            merged[name] = state
    return merged


def search(ops: OperatorContext, query: str, offset: int = 0, limit: int = 25
           ) -> tuple[list[dict[str, Any]], int]:
    """The console's lead search: one row per event of the lead (email, ``social_id``, phone
    number, lead id, or an event id; every event when the query is empty), newest first, and
    how many there are in all."""
    with reading(ops.database) as connection:
        page = reader.search(connection, query, offset, limit)
        stored = reader.event_json(connection, page.event_ids)
        statuses = reader.delivery_statuses(connection, page.event_ids)
    rows = []
    for event_id in page.event_ids:
        event = json.loads(stored[event_id]) if event_id in stored else {}
        payload = event.get("payload") or {}
        states = statuses.get(event_id, {})
        states.update({name: state.get("status", "unknown")  # Redis is newer where it knows
                       for name, state in ops.store.delivery_states(event_id).items()})
        rows.append({
            "event_id": event_id,
            "name": event.get("name"),
            "campaign": payload.get("campaign_id", payload.get("list_id")),
            "lead": payload.get("email") or payload.get("social_id")
            or payload.get("phone_number"),
            "received_at": event.get("received_at") or page.at.get(event_id),
            "states": dict(sorted(states.items())),
            "gone": event_id not in stored,
        })
    return rows, page.total


def list_deliveries(ops: OperatorContext, destination: str, status: str | None = None,
                    limit: int = 50, cursor: float | None = None) -> dict[str, Any]:
    """The destination's latest deliveries (delivered, retrying or dead; a skipped one is
    listed as delivered), latest change first; ``next_cursor`` pages on."""
    listed = [status] if status else ["delivered", "retrying", "dead"]
    statuses = {s for name in listed for s in (SUCCESSES if name == "delivered" else {name})}
    with reading(ops.database) as connection:
        rows = reader.deliveries_page(connection, destination, statuses, limit, cursor)
    items = [{"event_id": row["event_id"], "destination": destination,
              "status": "delivered" if row["status"] in SUCCESSES else row["status"],
              "at": row["at"], **{k: v for k, v in row.items()
                                  if k not in ("event_id", "status", "at")}}
             for row in rows]
    next_cursor = str(rows[-1]["at"]) if len(rows) == limit else None
    return {"deliveries": items, "next_cursor": next_cursor}
