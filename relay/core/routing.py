"""Which destinations an event goes to: ``events``, ``campaigns`` and ``where`` (SPEC §3)."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from relay.core.dotted import dotted_get
from relay.core.models import Destination, LeadEvent

_MISSING = object()


def matches(destination: Destination, event: LeadEvent) -> bool:
    if "*" not in destination.events and (not event.known or event.name not in destination.events):
        return False
    if destination.campaigns is not None and event.campaign_id not in destination.campaigns:
        return False
    return all(
        _equal(dotted_get(event.payload, path, _MISSING), expected)
        for path, expected in destination.where.items()
    )


def route(event: LeadEvent, destinations: Iterable[Destination]) -> list[Destination]:
    return [d for d in destinations if matches(d, event)]


def _equal(actual: Any, expected: Any) -> bool:
    if actual is _MISSING:
        return expected is None
    if isinstance(actual, bool) or isinstance(expected, bool):
        return actual is expected or str(actual).lower() == str(expected).lower()
    if isinstance(expected, list | tuple):
        return any(_equal(actual, option) for option in expected)
    if isinstance(actual, Mapping) or isinstance(expected, Mapping):
        return actual == expected
    # ``campaign_id: 135544`` in YAML matches ``"135544"`` from a form body and vice versa.
    return actual == expected or str(actual) == str(expected)
