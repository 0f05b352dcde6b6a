"""The ingress's fast path (``load_lead``) must be exactly ``LeadSchema().load``: same result,
same errors, for any input. It only skips marshmallow when the body is already typed."""

from __future__ import annotations

import json
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st
from marshmallow import ValidationError

from relay.ingress.lead_schema import _PLAN, LeadSchema, _already_typed, load_lead
from tests.support.samples import SAMPLES

SCHEMA = LeadSchema()


def both(data: Any) -> tuple[tuple[str, Any], tuple[str, Any]]:
    try:
        slow: tuple[str, Any] = ("ok", SCHEMA.load(data))
    except ValidationError as exc:
        slow = ("error", exc.messages)
    try:
        fast: tuple[str, Any] = ("ok", load_lead(data))
    except ValidationError as exc:
        fast = ("error", exc.messages)
    return slow, fast


def test_every_sample_takes_the_fast_path_with_the_same_result() -> None:
    for path in SAMPLES.glob("*.json"):
        lead = json.loads(path.read_text())
        assert _already_typed(lead, _PLAN), path.name
        slow, fast = both(lead)
        assert slow == fast == ("ok", lead)


_keys = st.sampled_from([*SCHEMA.fields, "x", "custom_fields", "__tagged", "__referral"])
_leaf = (st.none() | st.booleans() | st.integers() | st.text(max_size=5) | st.just("")
         | st.floats(allow_nan=False))
_values = st.recursive(
    _leaf,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(
        st.sampled_from(["tag_id", "name", "points", "social_id", "email", "direct", "x"]),
        inner, max_size=3),
    max_leaves=6,
)


@settings(max_examples=1500, deadline=None)
@given(
    st.dictionaries(_keys, _values, max_size=8),
    st.sampled_from(["new_signup", " Fraudulent", "", "tagged", 5, None]),
    st.sampled_from([{}, {"email": "a@b"}, {"id": 5}, {"social_id": ""}]),
)
def test_fast_path_equals_marshmallow_on_any_payload(
    body: dict[str, Any], event: Any, identity: dict[str, Any]
) -> None:
    data = {**identity, **body}
    if event is not None:
        data["__event"] = event
    slow, fast = both(data)
    assert slow == fast
