"""The event catalogue and event identity (SPEC §2, §4): the same KickoffLabs event gets the
same id however it arrives; different events never share one."""

from __future__ import annotations

import json
from typing import Any
from urllib.parse import parse_qsl

import pytest

from relay.core import formdata as forms
from relay.core.events import (
    EVENTS,
    canonical_event_name,
    derive_event_id,
    event_id_from_header,
    is_known,
    lead_identity,
)
from relay.ingress.lead_schema import LeadSchema
from tests.support.samples import SAMPLE_EVENTS, sample

SOURCE = "kickofflabs"


def load(payload: dict[str, Any]) -> dict[str, Any]:
    loaded: dict[str, Any] = LeadSchema().load(payload)
    return loaded


def event_id(payload: dict[str, Any], source: str = SOURCE) -> str:
    lead = load(payload)
    return derive_event_id(source, lead["__event"], lead)


def via_form(payload: dict[str, Any]) -> dict[str, Any]:
    """What the ingress sees when KickoffLabs posts the payload form-encoded."""
    return forms.decode(parse_qsl(forms.encode(payload), keep_blank_values=True))


def test_catalogue_has_the_twelve_events_and_samples() -> None:
    assert len(EVENTS) == 12 == len(set(EVENTS))
    for name in EVENTS:
        assert sample(name)["__event"] == name


@pytest.mark.parametrize("alias", ["fraudulent", "Fraudulent", " fraudulent "])
def test_fraudulent_is_an_alias(alias: str) -> None:
    assert canonical_event_name(alias) == "marked_as_fraudulent"
    assert is_known(canonical_event_name(alias))
    payload = sample("marked_as_fraudulent", __event=alias)
    assert load(payload)["__event"] == "marked_as_fraudulent"
    assert event_id(payload) == event_id(sample("marked_as_fraudulent"))


def test_unknown_names_are_not_known() -> None:
    assert not is_known("lead_exploded")
    assert not is_known("fraudulent")  # only the canonical name is in the catalogue


@pytest.mark.parametrize("name", SAMPLE_EVENTS)
def test_event_id_is_the_same_for_json_and_form(name: str) -> None:
    payload = sample(name)
    as_json = json.loads(json.dumps(payload))
    assert event_id(via_form(payload)) == event_id(as_json)


@pytest.mark.parametrize("name", SAMPLE_EVENTS)
def test_event_block_is_typed_the_same_for_json_and_form(name: str) -> None:
    from_json, from_form = load(sample(name)), load(via_form(sample(name)))
    for key in ("__event", "campaign_id", "list_id", "social_id", "id", "email", "counter"):
        assert from_form.get(key) == from_json.get(key), key
    blocks = [k for k in from_json if k.startswith("__") and k != "__event"]
    for block in blocks:
        assert from_form[block] == from_json[block], block


def test_event_id_is_stable_and_shaped() -> None:
    first, second = event_id(sample("new_signup")), event_id(sample("new_signup"))
    assert first == second
    assert first.startswith("evt_") and len(first) == 4 + 32


def test_identity_precedence_social_id_then_id_then_email_then_phone() -> None:
    lead = {"social_id": "S1", "id": 7, "email": "Ada@Example.COM", "phone_number": "+1555"}
    assert lead_identity(lead) == "social_id:S1"
    del lead["social_id"]
    assert lead_identity(lead) == "id:7"
    del lead["id"]
    assert lead_identity(lead) == "email:ada@example.com"
    del lead["email"]
    assert lead_identity(lead) == "phone_number:+1555"
    del lead["phone_number"]
    assert lead_identity(lead) is None
    assert lead_identity({"social_id": "", "id": None, "email": "x@y.z"}) == "email:x@y.z"


def test_social_id_decides_even_when_other_fields_change() -> None:
    base = sample("new_signup")
    changed = sample("new_signup", email="someone-else@example.com", id=1, phone_number="+1")
    assert event_id(base) == event_id(changed)
    assert event_id(base) != event_id(sample("new_signup", social_id="OTHER"))


def test_email_identity_ignores_case() -> None:
    def lead(email: str) -> dict[str, Any]:
        return {"__event": "new_signup", "campaign_id": 1, "email": email}

    assert event_id(lead("Ada@Example.com")) == event_id(lead("ada@example.com"))
    assert event_id(lead("ada@example.com")) != event_id(lead("bob@example.com"))


def test_fields_outside_the_identity_do_not_change_the_id() -> None:
    base = sample("new_signup")
    noisy = sample("new_signup", rank=1, first_name="Grace", custom_fields={"plan": "pro"})
    assert event_id(base) == event_id(noisy)


def test_source_campaign_and_list_are_part_of_the_id() -> None:
    base = event_id(sample("new_signup"))
    assert event_id(sample("new_signup"), source="other") != base
    assert event_id(sample("new_signup", campaign_id=1)) != base
    assert event_id(sample("new_signup", list_id=1)) != base


def test_each_event_name_gets_its_own_id() -> None:
    ids = {event_id(sample("new_signup", __event=name)) for name in EVENTS}
    assert len(ids) == len(EVENTS)


def test_two_tagged_events_with_different_tags_differ() -> None:
    vip = sample("tagged")
    beta = sample("tagged", __tagged={"tag_id": 43, "name": "beta", "points": 10})
    assert event_id(vip) != event_id(beta)
    assert event_id(vip) == event_id(sample("tagged", rank=9))


@pytest.mark.parametrize(
    ("name", "block", "change"),
    [
        ("referral", "__referral", {"social_id": "ZZZZZZ"}),
        ("score_change", "__score_change", {"points": 99}),
        ("reward_level", "__reward_level", {"reward_level_id": 99}),
        ("marked_as_fraudulent", "__fraudulent", {"excluded": True, "fraudulent": False}),
    ],
)
def test_event_block_is_part_of_the_id(name: str, block: str, change: dict[str, Any]) -> None:
    base = sample(name)
    other = sample(name, **{block: {**base[block], **change}})
    assert event_id(base) != event_id(other)


def test_repeat_signup_counter_is_part_of_the_id() -> None:
    first = sample("repeat_signup", counter=2)
    second = sample("repeat_signup", counter=3)
    assert event_id(first) != event_id(second)
    # For other events the counter is just lead state.
    assert event_id(sample("new_signup", counter=2)) == event_id(sample("new_signup", counter=3))


def test_unknown_events_are_identified_by_their_blocks() -> None:
    def lead(block: dict[str, Any]) -> dict[str, Any]:
        return {"__event": "lead_exploded", "social_id": "S1", "__lead_exploded": block}

    assert event_id(lead({"n": 1})) != event_id(lead({"n": 2}))
    assert event_id(lead({"n": 1})) == event_id(lead({"n": 1}))


def test_header_id_is_namespaced_by_source() -> None:
    key = "3f0c1e1e-7c3a-4b8e-9a0e-2f6d1b1c9d11"
    assert event_id_from_header("kickofflabs", key) == event_id_from_header("kickofflabs", key)
    assert event_id_from_header("kickofflabs", key) != event_id_from_header("shop", key)
    assert event_id_from_header("kickofflabs", key) != event_id_from_header("kickofflabs", "k2")
    assert event_id_from_header("kickofflabs", key).startswith("evt_")
