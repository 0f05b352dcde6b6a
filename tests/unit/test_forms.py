"""Bracket-notation form bodies (``custom_fields[company]=…``, ``tags[][name]=…``), both ways."""

from __future__ import annotations

import re
from typing import Any
from urllib.parse import parse_qsl

import pytest
import qs_codec as qs
from hypothesis import given, settings
from hypothesis import strategies as st
from qs_codec import EncodeOptions, ListFormat

from relay.core import formdata as forms
from relay.core.errors import BadRequest, ValidationFailed
from tests.support.helpers import accepted_events, make_app
from tests.support.samples import SAMPLE_EVENTS, sample


def decode_body(body: str) -> dict[str, Any]:
    return forms.decode(parse_qsl(body, keep_blank_values=True))


def test_nested_object_and_list_of_objects() -> None:
    body = (
        "email=ada%40example.com&custom_fields%5Bcompany%5D=Analytical+Engines"
        "&custom_fields%5Brole%5D=engineer"
        "&tags%5B%5D%5Bid%5D=42&tags%5B%5D%5Bname%5D=vip"
        "&tags%5B%5D%5Bid%5D=43&tags%5B%5D%5Bname%5D=beta"
    )
    assert decode_body(body) == {
        "email": "ada@example.com",
        "custom_fields": {"company": "Analytical Engines", "role": "engineer"},
        "tags": [{"id": "42", "name": "vip"}, {"id": "43", "name": "beta"}],
    }


def test_list_of_scalars_and_deep_objects() -> None:
    pairs = [("t[]", "x"), ("t[]", "y"), ("a[b][c][d]", "1"), ("a[b][e]", "2")]
    assert forms.decode(pairs) == {
        "t": ["x", "y"],
        "a": {"b": {"c": {"d": "1"}, "e": "2"}},
    }


def test_repeated_tag_name_starts_a_new_element() -> None:
    pairs = [("tags[][name]", "vip"), ("tags[][name]", "beta"), ("tags[][name]", "gamma")]
    assert forms.decode(pairs) == {
        "tags": [{"name": "vip"}, {"name": "beta"}, {"name": "gamma"}]
    }


def test_repeated_nested_path_in_list_starts_a_new_element() -> None:
    payload = {"t": [{"a": {"b": "1", "c": "2"}}, {"a": {"b": "3", "c": "4"}}]}
    assert decode_body(forms.encode(payload)) == payload


@pytest.mark.parametrize(
    "pairs",
    [
        [("email", "a@x.com"), ("email", "b@x.com")],  # issue 18: the last one used to win
        [("__event", "new_signup"), ("__event", "deleted")],
        [("email", "a@x.com"), ("email", "a@x.com")],  # the same value twice, as JSON's rule
        [("c[k]", "1"), ("c[k]", "2")],
        [("t[0]", "x"), ("t[0]", "y")],
        [("t[0][name]", "a"), ("t[0][name]", "b")],
        [("a]b", "1"), ("a]b", "2")],  # not bracket notation, kept verbatim: once
    ],
)
def test_a_field_given_twice_is_a_400_like_a_json_duplicate_key(
        pairs: list[tuple[str, str]]) -> None:
    with pytest.raises(BadRequest, match="more than once") as caught:
        forms.decode(pairs)
    assert caught.value.status_code == 400


def test_appending_is_not_giving_a_field_twice() -> None:
    assert forms.decode([("t[]", "x"), ("t[]", "x")]) == {"t": ["x", "x"]}
    assert forms.decode([("t[][a]", "1"), ("t[][a]", "1")]) == {"t": [{"a": "1"}, {"a": "1"}]}


@pytest.mark.parametrize(
    "pairs",
    [
        [("a[]", "1"), ("a[b]", "2")],  # list, then object
        [("a[b]", "1"), ("a[]", "2")],  # object, then list
        [("a", "1"), ("a[b]", "2")],  # string, then object
        [("a", "1"), ("a[b][c]", "2")],  # string, then a deeper object
        [("a", "1"), ("a[]", "2")],  # string, then list
        [("a[b]", "1"), ("a[b][c]", "2")],  # nested string, then object
        [("t[][a]", "1"), ("t[][a][b]", "2")],  # inside a list element
        [("a[b]", "1"), ("a", "2")],  # object, then string
        [("a[]", "1"), ("a", "2")],  # list, then string
    ],
)
def test_conflicting_keys_are_a_validation_error(pairs: list[tuple[str, str]]) -> None:
    with pytest.raises(ValidationFailed) as caught:
        forms.decode(pairs)
    assert caught.value.status_code == 422


def test_too_deep_keys_are_refused() -> None:
    # A 400, as the JSON nested too deeply is (issue 18: one nesting limit, one answer).
    key = "a" + "[b]" * (forms.MAX_DEPTH + 5)
    with pytest.raises(BadRequest, match="too deeply"):
        forms.decode([(key, "1")])
    with pytest.raises(BadRequest, match="too deeply"):
        forms.decode([("a" + "[b]" * forms.MAX_DEPTH, "1")])
    ok = "a" + "[b]" * (forms.MAX_DEPTH - 1)
    assert forms.decode([(ok, "1")])["a"]["b"]["b"]


def test_non_bracket_keys_are_kept_verbatim() -> None:
    assert forms.decode([("a]b", "1"), ("x[y]z", "2")]) == {"a]b": "1", "x[y]z": "2"}


def test_encode_uses_bracket_notation_and_plain_scalars() -> None:
    body = forms.encode(
        {
            "email": "ada@example.com",
            "verified": True,
            "opted_out": False,
            "referrer": None,
            "rank": 268,
            "custom_fields": {"company": "AE & Co"},
            "tags": [{"name": "vip"}],
        }
    )
    assert parse_qsl(body, keep_blank_values=True) == [
        ("email", "ada@example.com"),
        ("verified", "true"),
        ("opted_out", "false"),
        ("referrer", ""),
        ("rank", "268"),
        ("custom_fields[company]", "AE & Co"),
        ("tags[][name]", "vip"),
    ]


# Round trip: bracket notation cannot tell [{"a": 1}, {"b": 2}] from [{"a": 1, "b": 2}], nor
# say an empty list or object, nor where a list inside a list element ends, nor an object
# member named like an index (``a[0]=x`` is a list, as every index-style encoder means it), so
# the property is stated over what it can say: non-empty objects, lists of scalars, and lists
# of records of one shape (scalars and nested objects, like tags).
_top_key = st.text(
    st.characters(blacklist_categories=("Cs", "Cc"), blacklist_characters="[]"),
    min_size=1,
    max_size=8,
)
_key = _top_key.filter(lambda key: not re.fullmatch(r"0|[1-9][0-9]{0,8}", key))
_scalar = st.text(st.characters(blacklist_categories=("Cs",)), max_size=10)
# A record field's shape: a scalar, or an object of scalars with fixed keys.
_field_shape = st.one_of(
    st.just(_scalar),
    st.lists(_key, min_size=1, max_size=2, unique=True).map(
        lambda keys: st.fixed_dictionaries({k: _scalar for k in keys})
    ),
)
_records = st.dictionaries(_key, _field_shape, min_size=1, max_size=3).flatmap(
    lambda shape: st.lists(st.fixed_dictionaries(shape), min_size=1, max_size=3)
)
_value = st.recursive(
    st.one_of(_scalar, st.lists(_scalar, min_size=1, max_size=3), _records),
    lambda children: st.dictionaries(_key, children, min_size=1, max_size=3),
    max_leaves=10,
)


@settings(max_examples=150, deadline=None)
@given(st.dictionaries(_top_key, _value, min_size=1, max_size=4))
def test_encode_then_decode_is_identity(payload: dict[str, Any]) -> None:
    assert decode_body(forms.encode(payload)) == payload


# -- both list styles, as encoders write them ----------------------------------------------------


def test_index_style_lists_of_records_and_scalars() -> None:
    pairs = [("tags[0][id]", "42"), ("tags[0][name]", "vip"), ("tags[1][id]", "43"),
             ("tags[1][name]", "beta"), ("t[0]", "x"), ("t[1]", "y")]
    assert forms.decode(pairs) == {
        "tags": [{"id": "42", "name": "vip"}, {"id": "43", "name": "beta"}],
        "t": ["x", "y"],
    }


def test_indices_give_the_order_and_gaps_close_up() -> None:
    assert forms.decode([("a[1]", "x"), ("a[0]", "y")]) == {"a": ["y", "x"]}
    assert forms.decode([("a[5]", "x"), ("a[2]", "y"), ("a[10]", "z")]) == {"a": ["y", "x", "z"]}
    assert forms.decode([("t[1][name]", "b"), ("t[0][name]", "a"), ("t[1][id]", "2")]) == {
        "t": [{"name": "a"}, {"name": "b", "id": "2"}]}


def test_brackets_after_indices_append_after_the_highest() -> None:
    assert forms.decode([("a[0]", "x"), ("a[]", "y"), ("a[]", "z")]) == {"a": ["x", "y", "z"]}
    assert forms.decode([("a[]", "x"), ("a[3]", "y"), ("a[]", "z")]) == {"a": ["x", "y", "z"]}


def test_lists_nest_in_both_styles() -> None:
    assert forms.decode([("a[0][b][0]", "1"), ("a[0][b][1]", "2"), ("a[1][b][]", "3")]) == {
        "a": [{"b": ["1", "2"]}, {"b": ["3"]}]}


def test_only_plain_decimals_are_indices() -> None:
    assert forms.decode([("a[01]", "x"), ("a[-1]", "y")]) == {"a": {"01": "x", "-1": "y"}}
    assert forms.decode([("a[1234567890]", "x")]) == {"a": {"1234567890": "x"}}


@pytest.mark.parametrize(
    "pairs",
    [
        [("a[0]", "1"), ("a[b]", "2")],  # list by index, then object
        [("a[b]", "1"), ("a[0]", "2")],  # object, then list by index
        [("a[0]", "1"), ("a[0][b]", "2")],  # element a value, then an object
        [("a[0][b]", "1"), ("a[0][]", "2")],  # element an object, then a list
        [("a[0][b]", "1"), ("a[0]", "2")],  # element an object, then a value
    ],
)
def test_conflicting_index_keys_are_a_validation_error(pairs: list[tuple[str, str]]) -> None:
    with pytest.raises(ValidationFailed) as caught:
        forms.decode(pairs)
    assert caught.value.status_code == 422


# -- a form body and its JSON twin are one event --------------------------------------------------
# Encoded by qs-codec, a port of Node's ``qs`` (the most common form encoder), not by
# relay.core.formdata: in its default index style (``tags[0][id]=42``) and in brackets
# (``tags[][id]=42``), with empty lists written as ``key[]`` (qs' allowEmptyArrays).


@pytest.mark.parametrize("style", [ListFormat.INDICES, ListFormat.BRACKETS])
@pytest.mark.parametrize("name", SAMPLE_EVENTS)
def test_every_sample_as_an_independent_encoder_writes_it(name: str, style: ListFormat) -> None:
    app = make_app()
    client = app.test_client()
    lead = sample(name)
    body = qs.encode(lead, EncodeOptions(list_format=style, allow_empty_lists=True))
    as_json = client.post("/hooks/kickofflabs", json=lead)
    as_form = client.post("/hooks/kickofflabs", data=body,
                          content_type="application/x-www-form-urlencoded")
    assert as_json.status_code == as_form.status_code == 202, as_form.get_json()
    assert as_form.get_json()["event_id"] == as_json.get_json()["event_id"]
    from_json, from_form = (e["payload"]
                            for e in accepted_events(app.extensions["relay"].redis))
    assert from_form == from_json


def test_an_empty_form_value_of_a_nullable_field_is_null() -> None:
    app = make_app()
    client = app.test_client()
    response = client.post("/hooks/kickofflabs", content_type="application/x-www-form-urlencoded",
                           data="__event=new_signup&email=ada%40example.com&phone_number="
                                "&rank=&verified=&x_unknown=&__referral%5Bemail%5D=")
    assert response.status_code == 202
    [event] = accepted_events(app.extensions["relay"].redis)
    payload = event["payload"]
    assert payload["phone_number"] is None and payload["rank"] is None
    assert payload["verified"] is None and payload["__referral"] == {"email": None}
    assert payload["x_unknown"] == ""  # not a field of the lead: kept verbatim
