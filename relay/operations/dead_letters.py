"""Dead letters: list them, choose which to replay, and replay them."""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

from marshmallow import EXCLUDE, Schema, ValidationError, fields, validate, validates_schema

from relay.history import reader
from relay.history.database import reading
from relay.operations.context import OperatorContext


def destination_name(**kwargs: Any) -> fields.String:
    """A destination's name as a request field (the API's and the console's)."""
    return fields.String(validate=validate.Length(min=1, max=200), **kwargs)


class JsonBoolean(fields.Boolean):
    """JSON's ``true`` or ``false`` and nothing else: marshmallow's own Boolean also reads
    ``"yes"``, ``"on"``, ``1`` as true, and ``{"all": "yes"}`` would replay every dead letter."""

    def _deserialize(self, value: Any, attr: str | None, data: Any, **kwargs: Any) -> bool:
        if type(value) is not bool:
            raise self.make_error("invalid")
        return value


class ReplayRequest(Schema):
    """What to replay, as the admin API and the console's form ask for it."""

    class Meta:
        unknown = EXCLUDE

    ids = fields.List(fields.String(validate=validate.Length(min=1, max=600)),
                      validate=validate.Length(min=1, max=10_000),
                      metadata={"description": "<event_id>|<destination>, or an event id for "
                                               "all of its dead letters"})
    destination = destination_name()
    all = JsonBoolean(validate=validate.Equal(True))

    @validates_schema
    def _one_choice(self, data: dict[str, Any], **kwargs: Any) -> None:
        chosen = [k for k in ("ids", "destination", "all") if k in data]
        if len(chosen) != 1:
            raise ValidationError("give exactly one of ids, destination or all: true")


def dead_letters_of(ops: OperatorContext, event_id: str) -> list[dict[str, Any]]:
    """The dead letters of one event, one per destination that gave up on it."""
    with reading(ops.database) as connection:
        return reader.dead_letters(connection, event_id=event_id, limit=1000)


def dead_letter_counts(ops: OperatorContext) -> Counter[str]:
    """destination -> how many of its dead letters wait for replay: the one count, which the
    console, the CLI and the API show."""
    with reading(ops.database) as connection:
        return reader.dead_letter_counts(connection)


def dead_letters_page(ops: OperatorContext, destination: str | None = None, limit: int = 100,
                      offset: int = 0) -> list[dict[str, Any]]:
    """Newest first, each with its event (the console shows who the lead is)."""
    with reading(ops.database) as connection:
        return reader.dead_letters(connection, destination, limit, offset)


def list_dead_letters(ops: OperatorContext, destination: str | None = None, limit: int = 100,
                      offset: int = 0) -> list[dict[str, Any]]:
    """Newest first, each with its event's name instead of its payload (a list shows no lead
    data; the event's page does)."""
    return [_without_payload(d) for d in dead_letters_page(ops, destination, limit, offset)]


def _without_payload(letter: dict[str, Any]) -> dict[str, Any]:
    shown = {k: v for k, v in letter.items() if k != "event"}
    shown["event"] = (letter.get("event") or {}).get("name")
    return shown


@dataclass(frozen=True)
class ReplayTarget:
    event_id: str
    destination: str


def replay_targets(ops: OperatorContext, ids: Iterable[str] = (), destination: str | None = None,
                   everything: bool = False) -> list[ReplayTarget]:
    """What to replay: ``<event_id>|<destination>`` ids (a bare event id means all of that
    event's dead letters), every dead letter of a destination, or all of them. Only dead
    letters that exist: what a confirmation counts is what a replay would queue."""
    with reading(ops.database) as connection:
        if everything or destination:
            keys = reader.dead_letter_keys(connection, None if everything else destination)
            return [ReplayTarget(event_id, name) for event_id, name in keys]
        found: list[tuple[str, str]] = []
        for given in dict.fromkeys(ids):
            if "|" in given:
                event_id, name = given.rsplit("|", 1)
                if reader.dead_letter(connection, event_id, name) is not None:
                    found.append((event_id, name))
            else:
                found.extend((given, d["destination"]) for d in reader.dead_letters(
                    connection, event_id=given, limit=1000))
    return [ReplayTarget(event_id, name) for event_id, name in dict.fromkeys(found)]


def has_dead_letters(ops: OperatorContext, destination: str) -> bool:
    """Whether ``destination`` has a dead letter (a replay may name a destination the relay
    no longer routes to, for the dead letters it left)."""
    with reading(ops.database) as connection:
        return bool(reader.dead_letters(connection, destination, limit=1))


def replay_dead_letters(ops: OperatorContext, targets: Iterable[ReplayTarget],
                        on_each: Callable[[ReplayTarget, bool], None] | None = None) -> int:
    """Put a fresh delivery of each dead letter into its destination's lane (one script each:
    two replays of one dead letter queue it once, and a crash leaves it dead or queued; the
    workers' sweep picks the lane up within a second). Returns how many were queued; a target
    that is not a dead letter (any more) is not."""
    queued = 0
    for target in targets:
        with reading(ops.database) as connection:
            letter = reader.dead_letter(connection, target.event_id, target.destination)
        done = letter is not None and ops.store.replay(
            target.event_id, target.destination,
            float((letter.get("event") or {}).get("received_at") or 0.0))
        queued += int(done)
        if on_each is not None:
            on_each(target, done)
    return queued


__all__ = ["JsonBoolean", "ReplayRequest", "ReplayTarget", "dead_letter_counts",
           "dead_letters_of", "dead_letters_page", "has_dead_letters", "list_dead_letters",
           "replay_dead_letters", "replay_targets"]
