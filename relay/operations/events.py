"""What the relay knows of one event, and a destination's latest deliveries."""

from __future__ import annotations

import json
from typing import Any

import redis

from relay.operations.dead_letters import dead_letters_of
from relay.store.deliveries import RECENT_STATUSES, DeliveryStore, delivery_key, recent_key


def event_detail(store: DeliveryStore, event_id: str) -> dict[str, Any] | None:
    """The event, each destination's delivery state with its attempts, duplicates and dead
    letters; None when the relay knows nothing of it (never seen, expired or erased)."""
    record = store.event_record(event_id)
    states = store.delivery_states(event_id)
    attempts = store.attempts(event_id)
    dead = {d["destination"]: d for d in dead_letters_of(store, event_id)}
    if record is None and not states and not attempts and not dead:
        return None
    event = (record or {}).get("event") or next(
        (d["event"] for d in dead.values() if "event" in d), None)
    destinations: dict[str, dict[str, Any]] = {}
    for name in sorted(set(states) | set(dead) | {a["destination"] for a in attempts}):
        entry: dict[str, Any] = dict(states.get(name, {"status": "unknown"}))
        entry["attempts_log"] = [a for a in attempts if a["destination"] == name]
        if name in dead:
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


def list_deliveries(client: redis.Redis, destination: str, status: str | None = None,
                    limit: int = 50, cursor: float | None = None) -> dict[str, Any]:
    """The destination's latest deliveries, newest first; ``next_cursor`` pages on."""
    statuses = [status] if status else list(RECENT_STATUSES)
    top = f"({cursor}" if cursor is not None else "+inf"
    pipe = client.pipeline(transaction=False)
    for s in statuses:
        pipe.zrevrangebyscore(recent_key(destination, s), top, "-inf", start=0, num=limit,
                              withscores=True)
    found = [(float(score), member.decode(), s)
             for s, page in zip(statuses, pipe.execute(), strict=True) for member, score in page]
    found.sort(reverse=True)
    found = found[:limit]
    pipe = client.pipeline(transaction=False)
    for _, event_id, _ in found:
        pipe.hget(delivery_key(event_id), destination)
    items = []
    for (at, event_id, s), raw in zip(found, pipe.execute(), strict=True):
        state = json.loads(raw) if raw else {}
        items.append({"event_id": event_id, "destination": destination, "status": s,
                      "at": at, **{k: v for k, v in state.items() if k != "status"}})
    next_cursor = str(found[-1][0]) if len(found) == limit else None
    return {"deliveries": items, "next_cursor": next_cursor}
