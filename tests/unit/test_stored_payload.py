"""A webhook's JSON body is its payload's compact JSON; the worker cuts it out of the event
as the ingress stored it instead of parsing and encoding it again
(:func:`relay.store.deliveries.parse_event`). Held here: the cut is byte for byte what encoding
the payload gives, for any JSON payload, and a record stored another way gets no cut."""

from __future__ import annotations

import json
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from relay.core.models import LazyPayload, LeadEvent
from relay.drivers.webhook import encode_body
from relay.ingress.intake import _encode
from relay.store.deliveries import ParsedEvents, parse_event

JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=12), inner,
                                                                max_size=4),
    max_leaves=20)


def stored(payload: dict[str, Any], source: str = "kickofflabs") -> bytes:
    """The record as the ingress writes it (relay.ingress.view: the payload last)."""
    return _encode({"event_id": "evt_1", "source": source, "name": "new_signup",
                    "known": True, "received_at": 1764590000.123456,
                    "payload": payload}).encode()


@settings(max_examples=300, deadline=None)
@given(st.dictionaries(st.text(max_size=12), JSON, max_size=6),
       st.text(max_size=20))
def test_the_cut_is_the_payload_encoded(payload: dict[str, Any], source: str) -> None:
    event = parse_event(stored(payload, source))
    assert event.payload == payload
    body, _ = encode_body(payload, "json")
    assert event.payload_json == body


def test_a_record_stored_otherwise_gets_no_cut() -> None:
    payload = {"email": "ada@example.com", "payload": {"nested": True}}
    event = LeadEvent("evt_1", "kickofflabs", "new_signup", payload)
    spaced = json.dumps(event.to_json()).encode()  # replay and older writers: ", " and ": "
    assert parse_event(spaced).payload_json is None
    old_order = _encode({"event_id": "evt_1", "source": "s", "name": "new_signup",
                         "payload": payload, "known": True, "received_at": 1.0}).encode()
    assert parse_event(old_order).payload_json is None  # stored before the payload went last
    assert parse_event(old_order).payload == payload


def test_a_claimed_event_keeps_its_payload_as_json_until_read() -> None:
    payload = {"email": "ada@example.com", "custom_fields": {"company": "ACME"}}
    event = parse_event(stored(payload))  # as a claim reads it: not parsed before
    assert isinstance(event.payload, LazyPayload)
    assert event.payload._data is None  # nothing parsed yet
    assert event.payload_json == encode_body(payload, "json")[0]
    assert (event.event_id, event.name, event.known) == ("evt_1", "new_signup", True)
    # Read like a mapping (drivers, dotted paths), it is the payload; so is the event's JSON
    # (a dead letter's record).
    assert event.payload["custom_fields"]["company"] == "ACME"
    assert event.payload == payload and dict(event.payload) == payload
    assert event.to_json()["payload"] == payload
    assert event == parse_event(stored(payload), json.loads(stored(payload)))


def test_parsed_events_are_found_by_id_while_recent() -> None:
    """A claim that comes without its payload (Redis let it go once written) is served from
    the events parsed here lately, found by id, before the database is asked; bounded."""
    parsed = ParsedEvents(size=2)
    first = parsed.get(stored({"email": "ada@example.com"}))
    assert parsed.recent("evt_1") is first
    for n in (2, 3):
        raw = stored({"email": f"lead{n}@example.com"}).replace(b"evt_1", f"evt_{n}".encode())
        parsed.get(raw)
    assert parsed.recent("evt_1") is None  # pushed out by two newer events
    assert parsed.recent("evt_3") is not None
