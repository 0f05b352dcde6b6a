"""What operators read from the history: an event with its deliveries and attempts, a
destination's latest deliveries, dead letters, the lead search, and the payloads a delivery
needs once Redis has let them go. Shapes match what the admin API has always answered (a
delivery state's ``last_status`` / ``last_error``, a dead letter's ``reason``)."""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from sqlalchemy import Connection, bindparam, func, or_, select, tuple_

from relay.history import schema
from relay.history.leads import normalise

D, A, E = schema.deliveries, schema.attempts, schema.events


def event_record(connection: Connection, event_id: str) -> dict[str, Any] | None:
    """``{"event": …, "duplicates": n, "admitted_at": t}``, or None."""
    row = connection.execute(select(E.c.event_json, E.c.admitted_at).where(
        E.c.event_id == event_id)).first()
    if row is None:
        return None
    duplicates = connection.scalar(select(func.count()).select_from(schema.duplicates).where(
        schema.duplicates.c.event_id == event_id)) or 0
    return {"event": json.loads(row.event_json), "duplicates": int(duplicates),
            "admitted_at": row.admitted_at}


# Built once: the drain asks it for every batch of claims whose payload Redis let go.
# An id the ingress took again after its dedupe window has a row for each time: the newest
# (ordered last, so it is the one kept) with its own delivery row (joined on received_at).
_CLAIMED = select(E.c.event_id, E.c.event_json, D.c.status).select_from(
    E.outerjoin(D, (D.c.event_id == E.c.event_id) & (D.c.received_at == E.c.received_at)
                & (D.c.destination == bindparam("destination")))).where(
    E.c.event_id.in_(bindparam("ids", expanding=True))).order_by(E.c.received_at)


def event_json(connection: Connection, event_ids: Iterable[str]) -> dict[str, str]:
    """event id -> the event as stored (its exact bytes), one query for a batch."""
    ids = sorted(set(event_ids))
    if not ids:
        return {}
    rows = connection.execute(select(E.c.event_id, E.c.event_json).where(E.c.event_id.in_(ids)))
    return {event_id: text for event_id, text in rows}


def _state(row: Any) -> dict[str, Any]:
    state: dict[str, Any] = {"status": row.status, "attempts": row.attempts,
                             "updated_at": row.updated_at}
    if row.status_code is not None:
        state["last_status"] = row.status_code
    if row.error:
        state["last_error"] = row.error
    if row.next_attempt_at is not None and row.status == "retrying":
        state["next_attempt_at"] = row.next_attempt_at
    if row.crashes:
        state["crashes"] = row.crashes
    return state


def delivery_states(connection: Connection, event_id: str) -> dict[str, dict[str, Any]]:
    rows = connection.execute(select(D).where(D.c.event_id == event_id))
    return {row.destination: _state(row) for row in rows}


def delivery_statuses(connection: Connection, event_ids: Iterable[str]
                      ) -> dict[str, dict[str, str]]:
    """event id -> destination -> status, for a page of events (one query)."""
    ids = sorted(set(event_ids))
    found: dict[str, dict[str, str]] = {}
    if ids:
        rows = connection.execute(select(D.c.event_id, D.c.destination, D.c.status).where(
            D.c.event_id.in_(ids)))
        for event_id, destination, status in rows:
            found.setdefault(event_id, {})[destination] = status
    return found


def claimed_events(connection: Connection, event_ids: Iterable[str], destination: str
                   ) -> dict[str, tuple[str, str | None]]:
    """event id -> (the event as stored, the status of its delivery to ``destination`` or
    None): what the drain reads for claims whose payload Redis let go, one query a batch."""
    ids = sorted(set(event_ids))
    if not ids:
        return {}
    rows = connection.execute(_CLAIMED, {"ids": ids, "destination": destination})
    return {event_id: (text, status) for event_id, text, status in rows}


def attempts(connection: Connection, event_id: str) -> list[dict[str, Any]]:
    rows = connection.execute(select(A).where(A.c.event_id == event_id).order_by(
        A.c.at, A.c.attempt))
    found = []
    for row in rows:
        attempt = {"destination": row.destination, "attempt": row.attempt,
                   "outcome": row.outcome, "status_code": row.status_code,
                   "latency_ms": row.latency_ms, "error": row.error,
                   "next_attempt_at": row.next_attempt_at, "at": row.at}
        found.append({k: v for k, v in attempt.items() if v is not None})
    return found


def _letter(row: Any, with_event: bool) -> dict[str, Any]:
    letter: dict[str, Any] = {"event_id": row.event_id, "destination": row.destination,
                              "reason": row.error or "", "attempts": row.attempts,
                              "status_code": row.status_code, "dead_at": row.dead_at}
    if with_event:
        letter["event"] = json.loads(row.event_json) if row.event_json else None
    return letter


def dead_letters(connection: Connection, destination: str | None = None, limit: int = 100,
                 offset: int = 0, event_id: str | None = None) -> list[dict[str, Any]]:
    """Newest first, each with its event."""
    query = (select(D, E.c.event_json).join(E, E.c.event_id == D.c.event_id, isouter=True)
             .where(D.c.status == "dead"))
    if destination:
        query = query.where(D.c.destination == destination)
    if event_id:
        query = query.where(D.c.event_id == event_id)
    query = query.order_by(D.c.dead_at.desc(), D.c.event_id).limit(limit).offset(offset)
    return [_letter(row, True) for row in connection.execute(query)]


def dead_letter(connection: Connection, event_id: str, destination: str
                ) -> dict[str, Any] | None:
    found = dead_letters(connection, destination, 1, 0, event_id)
    return found[0] if found else None


def dead_letter_keys(connection: Connection, destination: str | None = None
                     ) -> list[tuple[str, str]]:
    """(event id, destination) of every dead letter (of one destination), newest first."""
    query = select(D.c.event_id, D.c.destination).where(D.c.status == "dead")
    if destination:
        query = query.where(D.c.destination == destination)
    rows = connection.execute(query.order_by(D.c.dead_at.desc()))
    return [(event_id, name) for event_id, name in rows]


def status_counts(connection: Connection, status: str) -> Counter[str]:
    """destination -> how many of its deliveries are in ``status`` now."""
    rows = connection.execute(select(D.c.destination, func.count()).where(
        D.c.status == status).group_by(D.c.destination))
    return Counter({name: int(n) for name, n in rows})


def dead_letter_counts(connection: Connection) -> Counter[str]:
    return status_counts(connection, "dead")


def deliveries_page(connection: Connection, destination: str, statuses: Iterable[str],
                    limit: int = 50, before: float | None = None) -> list[dict[str, Any]]:
    """A destination's deliveries in these statuses, latest change first."""
    query = select(D).where(D.c.destination == destination, D.c.status.in_(list(statuses)))
    if before is not None:
        query = query.where(D.c.updated_at < before)
    rows = connection.execute(query.order_by(D.c.updated_at.desc(), D.c.event_id).limit(limit))
    return [{"event_id": row.event_id, "at": row.updated_at, **_state(row)} for row in rows]


@dataclass(frozen=True)
class SearchPage:
    event_ids: list[str]
    total: int
    at: dict[str, float]


def search(connection: Connection, query: str, offset: int = 0, limit: int = 25) -> SearchPage:
    """A lead's events by email, ``social_id``, phone number or lead id (an event id finds
    itself; an empty query lists the latest events), newest first, every one of them."""
    query = query.strip()
    if not query:
        total = connection.scalar(select(func.count()).select_from(E)) or 0
        rows = connection.execute(select(E.c.event_id, E.c.received_at).order_by(
            E.c.received_at.desc(), E.c.event_id.desc()).limit(limit).offset(offset))
        found = [(event_id, at) for event_id, at in rows]
        return SearchPage([e for e, _ in found], int(total), dict(found))
    wanted = [(kind, normalise(kind, query)) for kind in ("email", "social_id", "phone", "id")]
    wanted = [(k, v) for k, v in wanted if v]
    keys = schema.lead_keys
    matches = (select(keys.c.event_id, keys.c.received_at)
               .where(or_(tuple_(keys.c.kind, keys.c.value).in_(wanted),
                          keys.c.event_id == query))
               .distinct())
    also = select(E.c.event_id, E.c.received_at).where(E.c.event_id == query)
    union = matches.union(also).subquery()
    total = connection.scalar(select(func.count()).select_from(union)) or 0
    rows = connection.execute(select(union.c.event_id, union.c.received_at).order_by(
        union.c.received_at.desc(), union.c.event_id.desc()).limit(limit).offset(offset))
    found = [(event_id, at) for event_id, at in rows]
    return SearchPage([e for e, _ in found], int(total), dict(found))


def received_at(connection: Connection, event_ids: Iterable[str], since: float
                ) -> dict[str, float]:
    """event id -> when it was received, for those of these events admitted at or after
    ``since``: the long dedupe window, one lookup by primary key per admitted batch."""
    ids = sorted(set(event_ids))
    if not ids:
        return {}
    rows = connection.execute(select(E.c.event_id, E.c.received_at).where(
        E.c.event_id.in_(ids), E.c.received_at >= since))
    return {event_id: at for event_id, at in rows}
