"""The lead index: which events a lead had, newest first, for the console's lead search.

The workers keep it: each batch they admit is indexed with one script
(:class:`LeadIndexer`, ``lua/lead_index.lua``), before the admit script, so every admitted
event is indexed. Its keys (``relay:lead:...``, listed in :mod:`relay.store.keys`) are bounded
like the events they point to: a lead's zset by email, ``social_id`` or phone number, the
latest events of every lead, and per event the index keys it was added to (for erasure).

Each lead zset expires ``retention`` after its last event, and entries older than that are
trimmed when the next one is added; a lead keeps at most :data:`PER_LEAD_CAP` entries, the whole
relay :data:`ALL_CAP`. ``relay erase`` removes a lead's entries (:func:`forget_events`).
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import redis

from relay.core.models import LeadEvent
from relay.store.keys import (
    LEAD_ALL,
    LEAD_EMAIL_PREFIX,
    LEAD_OF_PREFIX,
    LEAD_PHONE_PREFIX,
    LEAD_SOCIAL_PREFIX,
    event_key,
    lead_of_key,
)
from relay.store.scripts import register

PER_LEAD_CAP = 1000
ALL_CAP = 10_000
_PHONE_JUNK = re.compile(r"[^0-9+]")
_EVENT_ID = re.compile(r"^evt_[0-9a-zA-Z_-]{1,200}$")


def email_key(email: str) -> str:
    return LEAD_EMAIL_PREFIX + email.strip().lower()


def social_key(social_id: str) -> str:
    return LEAD_SOCIAL_PREFIX + social_id.strip()


def phone_key(phone: str) -> str:
    return LEAD_PHONE_PREFIX + normalise_phone(phone)


def normalise_phone(phone: str) -> str:
    """``+1 (555) 010-0000`` and ``+15550100000`` are one number."""
    return _PHONE_JUNK.sub("", phone)


def lead_keys(payload: Mapping[str, Any]) -> list[str]:
    """The index keys of a lead payload: one per identity it carries."""
    keys = []
    for field, key_of in (("email", email_key), ("social_id", social_key),
                          ("phone_number", phone_key)):
        value = payload.get(field)
        if isinstance(value, int | float) and not isinstance(value, bool):
            value = str(value)
        if isinstance(value, str) and value.strip() and (field != "phone_number"
                                                         or normalise_phone(value)):
            keys.append(key_of(value))
    return keys


class LeadIndexer:
    """Adds admitted events to the index, a batch per round trip (the workers hold one)."""

    def __init__(self, client: redis.Redis) -> None:
        self._script = register(client, "lead_index")

    def add(self, events: Iterable[LeadEvent], retention: float) -> None:
        """Add ``events`` to their leads' entries (and the latest events). Idempotent:
        indexing an event twice leaves one entry."""
        args: list[Any] = [max(1, int(retention)), PER_LEAD_CAP, ALL_CAP, LEAD_OF_PREFIX]
        for event in events:
            at = event.received_at or time.time()
            keys = lead_keys(event.payload)
            args += [event.event_id, repr(at), repr(at - retention),
                     json.dumps(keys) if keys else "", len(keys), *keys]
        if len(args) > 4:
            self._script(keys=[LEAD_ALL], args=args)


def index_event(client: redis.Redis, event: LeadEvent, retention: float) -> None:
    """Add one event to the index (:class:`LeadIndexer` for a batch)."""
    LeadIndexer(client).add([event], retention)


@dataclass(frozen=True)
class SearchPage:
    event_ids: list[str]  # newest first
    total: int  # entries matching, over all pages
    at: dict[str, float]  # event id -> time received


def search(client: redis.Redis, query: str, offset: int = 0, limit: int = 25) -> SearchPage:
    """Events of the lead whose email, social_id or phone number is ``query``, or the event
    whose id it is; the latest events of every lead when ``query`` is empty. Newest first."""
    query = query.strip()
    if not query:
        total = int(client.zcard(LEAD_ALL))
        found = client.zrevrange(LEAD_ALL, offset, offset + limit - 1, withscores=True)
        return SearchPage([m.decode() for m, _ in found], total,
                          {m.decode(): float(s) for m, s in found})
    keys = [email_key(query), social_key(query)]
    if normalise_phone(query):
        keys.append(phone_key(query))
    pipe = client.pipeline(transaction=False)
    for key in keys:
        pipe.zrange(key, 0, -1, withscores=True)
    at: dict[str, float] = {}
    for entries in pipe.execute():
        at.update({m.decode(): float(s) for m, s in entries})
    if _EVENT_ID.match(query) and query not in at:
        score = client.zscore(LEAD_ALL, query)
        if score is not None or client.exists(event_key(query)):
            at[query] = float(score or 0.0)
    ordered = sorted(at, key=lambda e: (at[e], e), reverse=True)
    return SearchPage(ordered[offset:offset + limit], len(ordered), at)


def forget_events(client: redis.Redis, email: str, event_ids: Iterable[str]) -> int:
    """Remove a lead's entries (``relay erase``): its email's zset, and the given events from
    every key they were indexed under. Returns how many entries went."""
    event_ids = sorted(set(event_ids))
    pipe = client.pipeline(transaction=False)
    for event_id in event_ids:
        pipe.get(lead_of_key(event_id))
    indexed = pipe.execute()
    pipe = client.pipeline(transaction=False)
    pipe.zcard(email_key(email))
    pipe.delete(email_key(email))
    counted = 1  # replies that count removed entries: the zcard, then one per other key
    for event_id, raw in zip(event_ids, indexed, strict=True):
        for key in json.loads(raw) if raw else []:
            if key != email_key(email):
                pipe.zrem(key, event_id)
                counted += 1
    for event_id in event_ids:
        pipe.zrem(LEAD_ALL, event_id)
        pipe.delete(lead_of_key(event_id))
    answers = pipe.execute()
    return int(answers[0]) + sum(int(a) for a in answers[2:counted + 1])
