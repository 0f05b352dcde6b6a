"""Bracket-notation form bodies (``custom_fields[company]=…``, ``tags[][name]=…``), both ways."""

from __future__ import annotations

from typing import Any
from urllib.parse import parse_qsl

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from relay import forms
from relay.errors import ValidationFailed


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


def test_repeated_plain_key_keeps_the_last_value() -> None:
    assert forms.decode([("email", "a@x.com"), ("email", "b@x.com")]) == {"email": "b@x.com"}
    assert forms.decode([("c[k]", "1"), ("c[k]", "2")]) == {"c": {"k": "2"}}


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
    ],
)
def test_conflicting_keys_are_a_validation_error(pairs: list[tuple[str, str]]) -> None:
    with pytest.raises(ValidationFailed) as caught:
        forms.decode(pairs)
    assert caught.value.status_code == 422


def test_too_deep_keys_are_refused() -> None:
    key = "a" + "[b]" * (forms.MAX_DEPTH + 5)
    with pytest.raises(ValidationFailed, match="too deeply"):
        forms.decode([(key, "1")])
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
# say an empty list or object, nor where a list inside a list element ends, so the property is
# stated over what it can say: non-empty objects, lists of scalars, and lists of records of one
# shape (scalars and nested objects, like tags).
_key = st.text(
    st.characters(blacklist_categories=("Cs", "Cc"), blacklist_characters="[]"),
    min_size=1,
    max_size=8,
)
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
@given(st.dictionaries(_key, _value, min_size=1, max_size=4))
def test_encode_then_decode_is_identity(payload: dict[str, Any]) -> None:
    assert decode_body(forms.encode(payload)) == payload
