"""Dead letters: list them, choose which to replay, and replay them."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

from marshmallow import EXCLUDE, Schema, ValidationError, fields, validate, validates_schema

from relay.store.deliveries import DeliveryStore, dead_letter_counts
from relay.store.keys import DEAD_INDEX, DEAD_KEY, dead_id


def destination_name(**kwargs: Any) -> fields.String:
    """A destination's name as a request field (the API's and the console's)."""
    return fields.String(validate=validate.Length(min=1, max=200), **kwargs)


class ReplayRequest(Schema):
    """What to replay, as the admin API and the console's form ask for it."""

    class Meta:
        unknown = EXCLUDE

    ids = fields.List(fields.String(validate=validate.Length(min=1, max=600)),
                      validate=validate.Length(min=1, max=10_000),
                      metadata={"description": "<event_id>|<destination>, or an event id for "
                                               "all of its dead letters"})
    destination = destination_name()
    all = fields.Boolean(validate=validate.Equal(True))

    @validates_schema
    def _one_choice(self, data: dict[str, Any], **kwargs: Any) -> None:
        chosen = [k for k in ("ids", "destination", "all") if k in data]
        if len(chosen) != 1:
            raise ValidationError("give exactly one of ids, destination or all: true")


def dead_letters_of(store: DeliveryStore, event_id: str) -> list[dict[str, Any]]:
    """The dead letters of one event, one per destination that gave up on it."""
    keys = [m.decode() for m, _ in store.redis.zscan_iter(DEAD_INDEX, match=dead_id(event_id, "*"))]
    keys = [k for k in keys if k.rsplit("|", 1)[0] == event_id]
    if not keys:
        return []
    return [json.loads(raw) for raw in store.redis.hmget(DEAD_KEY, keys) if raw]


def dead_letters_page(store: DeliveryStore, destination: str | None = None, limit: int = 100,
                      offset: int = 0) -> list[dict[str, Any]]:
    """Newest first, each with its event (the console shows who the lead is)."""
    return store.dead_letters(destination, limit, offset)


def list_dead_letters(store: DeliveryStore, destination: str | None = None, limit: int = 100,
                      offset: int = 0) -> list[dict[str, Any]]:
    """Newest first, each with its event's name instead of its payload (a list shows no lead
    data; the event's page does)."""
    return [_without_payload(d) for d in store.dead_letters(destination, limit, offset)]


def _without_payload(letter: dict[str, Any]) -> dict[str, Any]:
    shown = {k: v for k, v in letter.items() if k != "event"}
    shown["event"] = (letter.get("event") or {}).get("name")
    return shown


@dataclass(frozen=True)
class ReplayTarget:
    event_id: str
    destination: str


def replay_targets(store: DeliveryStore, ids: Iterable[str] = (), destination: str | None = None,
                   everything: bool = False) -> list[ReplayTarget]:
    """What to replay: ``<event_id>|<destination>`` ids (a bare event id means all of that
    event's dead letters), every dead letter of a destination, or all of them."""
    if everything or destination:
        keys = [m.decode() for m, _ in store.redis.zscan_iter(DEAD_INDEX, count=1000)]
    else:
        keys = []
        for given in ids:
            if "|" in given:
                keys.append(given)
            else:
                keys.extend(dead_id(given, d["destination"]) for d in dead_letters_of(store, given))
    targets = [ReplayTarget(*key.rsplit("|", 1)) for key in dict.fromkeys(keys)]
    if destination and not everything:
        targets = [t for t in targets if t.destination == destination]
    return targets


def replay_dead_letters(store: DeliveryStore, targets: Iterable[ReplayTarget],
                        on_each: Callable[[ReplayTarget, bool], None] | None = None) -> int:
    """Take each dead letter out and put a fresh delivery into its destination's lane (one
    script each: two replays of one dead letter queue it once, and a crash leaves it dead or
    queued; the workers' sweep picks the lane up within a second). Returns how many were
    queued."""
    queued = 0
    for target in targets:
        event = store.replay(target.event_id, target.destination)
        if event is not None:
            queued += 1
        if on_each is not None:
            on_each(target, event is not None)
    return queued


__all__ = ["ReplayRequest", "ReplayTarget", "dead_letter_counts", "dead_letters_of",
           "dead_letters_page", "list_dead_letters", "replay_dead_letters", "replay_targets"]
