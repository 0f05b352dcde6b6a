"""One rule each, the strict one (issue 18, points 2 and 7): one nesting limit at the ingress
for JSON and forms alike; a field given twice is a 400 in a form as in JSON; every source token
a request carries must be right; ``all`` is JSON's ``true``; the subscription API takes each
parameter once."""

from __future__ import annotations

import json
from typing import Any

import pytest
from flask import Flask
from flask.testing import FlaskClient
from marshmallow import ValidationError
from werkzeug.test import TestResponse

from relay.config.settings import Settings
from relay.core.nesting import MAX_DEPTH, deeper_than
from relay.operations.dead_letters import ReplayRequest
from tests.support.helpers import accepted_events, config, make_app

HOOK = "/hooks/kickofflabs"
LEAD = {"__event": "new_signup", "email": "ada@example.com"}
FORM = "application/x-www-form-urlencoded"


@pytest.fixture
def app() -> Flask:
    return make_app()


@pytest.fixture
def client(app: Flask) -> FlaskClient:
    return app.test_client()


def stored(app: Flask) -> list[dict[str, Any]]:
    return accepted_events(app.extensions["relay"].redis)


def refused(response: TestResponse, status: int) -> dict[str, Any]:
    assert response.status_code == status, response.get_data(as_text=True)
    body: dict[str, Any] = response.get_json()
    assert set(body) == {"error", "details"} and body["error"]
    return body


def nested(levels: int) -> dict[str, Any]:
    """A lead whose ``custom_fields`` makes the body ``levels`` levels deep."""
    inner: dict[str, Any] = {"leaf": "x"}
    for _ in range(levels - 2):
        inner = {"a": inner}
    return {**LEAD, "custom_fields": inner}


# -- point 2: one nesting limit -------------------------------------------------------------------


def test_the_limit_counts_levels_of_objects_and_arrays() -> None:
    assert not deeper_than(nested(MAX_DEPTH))
    assert deeper_than(nested(MAX_DEPTH + 1))
    assert not deeper_than([[[1]]], 3) and deeper_than([[[1]]], 2)
    assert not deeper_than("text", 0)
    assert deeper_than(nested(5000))  # no recursion: a walk deeper than Python's stack


@pytest.mark.parametrize("levels", [MAX_DEPTH + 1, 490, 900])
def test_a_json_lead_nested_past_the_limit_is_a_400(app: Flask, client: FlaskClient,
                                                     levels: int) -> None:
    # 490 levels of custom_fields were accepted (202), then broke the console's event page.
    body = refused(client.post(HOOK, json=nested(levels)), 400)
    assert f"at most {MAX_DEPTH} levels" in body["error"]
    assert stored(app) == []


def test_a_json_lead_at_the_limit_is_accepted(app: Flask, client: FlaskClient) -> None:
    assert client.post(HOOK, json=nested(MAX_DEPTH)).status_code == 202
    lists = {**LEAD, "custom_fields": json.loads("[" * (MAX_DEPTH - 1) + "]" * (MAX_DEPTH - 1))}
    lists["custom_fields"] = {"x": lists["custom_fields"][0]}  # custom_fields is an object
    assert client.post(HOOK, json=lists).status_code == 202
    assert len(stored(app)) == 2


def test_many_brackets_in_strings_and_siblings_are_not_depth(client: FlaskClient) -> None:
    wide = {**LEAD, "custom_fields": {f"k{i}": {"v": [i]} for i in range(200)},
            "note": "[[[[{{{{" * 50}
    assert client.post(HOOK, json=wide).status_code == 202


@pytest.mark.parametrize("content_type", [FORM, "multipart/form-data"])
def test_a_form_nested_past_the_limit_is_the_same_400(app: Flask, client: FlaskClient,
                                                      content_type: str) -> None:
    data = {**LEAD, "custom_fields" + "[a]" * MAX_DEPTH: "x"}  # MAX_DEPTH + 1 levels
    body = refused(client.post(HOOK, data=data, content_type=content_type), 400)
    assert f"at most {MAX_DEPTH} levels" in body["error"]
    ok = {**LEAD, "custom_fields" + "[a]" * (MAX_DEPTH - 1): "x"}
    assert client.post(HOOK, data=ok, content_type=content_type).status_code == 202
    assert len(stored(app)) == 1


# -- point 7: a field given twice ----------------------------------------------------------------


@pytest.mark.parametrize("body", [
    "__event=new_signup&email=ada%40example.com&__event=deleted",
    "__event=new_signup&email=ada%40example.com&email=eve%40example.com",
    "__event=new_signup&email=ada%40example.com&custom_fields[plan]=pro"
    "&custom_fields[plan]=free",
])
def test_a_form_field_given_twice_is_a_400_as_in_json(app: Flask, client: FlaskClient,
                                                      body: str) -> None:
    # It was stored with the last value: ``__event=new_signup&__event=deleted`` as deleted.
    details = refused(client.post(HOOK, data=body, content_type=FORM), 400)["details"]
    assert "given more than once" in json.dumps(details)
    as_json = '{"__event": "new_signup", "email": "a@b.c", "__event": "deleted"}'
    refused(client.post(HOOK, data=as_json, content_type="application/json"), 400)
    assert stored(app) == []


def test_a_multipart_field_given_twice_is_a_400(app: Flask, client: FlaskClient) -> None:
    data = {"__event": ["new_signup", "deleted"], "email": "ada@example.com"}
    refused(client.post(HOOK, data=data, content_type="multipart/form-data"), 400)
    assert stored(app) == []


# -- point 7: the source token ---------------------------------------------------------------------

TOKEN = "s3cret-token"


@pytest.fixture
def guarded() -> Flask:
    return make_app(config(sources={"kickofflabs": {"token": TOKEN}}))


@pytest.mark.parametrize(("query", "headers"), [
    (f"?token={TOKEN}&token=wrong", {}),  # the first one used to win
    (f"?token=wrong&token={TOKEN}", {}),
    ("?token=", {"X-Relay-Token": TOKEN}),  # an empty ?token= fell back to the header
    (f"?token={TOKEN}", {"X-Relay-Token": "wrong"}),  # the header was not looked at
    (f"?token={TOKEN}", {"X-Relay-Token": ""}),
])
def test_every_token_a_request_carries_must_be_right(guarded: Flask, query: str,
                                                     headers: dict[str, str]) -> None:
    response = guarded.test_client().post(HOOK + query, json=LEAD, headers=headers)
    refused(response, 401)
    assert stored(guarded) == []


@pytest.mark.parametrize(("query", "headers"), [
    (f"?token={TOKEN}", {}),
    ("", {"X-Relay-Token": TOKEN}),
    (f"?token={TOKEN}", {"X-Relay-Token": TOKEN}),
    (f"?token={TOKEN}&token={TOKEN}", {}),
])
def test_the_right_token_however_often_it_is_given(guarded: Flask, query: str,
                                                   headers: dict[str, str]) -> None:
    response = guarded.test_client().post(HOOK + query, json=LEAD, headers=headers)
    assert response.status_code == 202, response.get_json()


# -- point 7: replay's ``all`` ---------------------------------------------------------------------


@pytest.mark.parametrize("value", ["yes", "true", "on", 1, "1", False, None])
def test_all_is_json_true_and_nothing_else(value: Any) -> None:
    # ``{"all": "yes"}`` replayed every dead letter.
    with pytest.raises(ValidationError):
        ReplayRequest().load({"all": value})
    assert ReplayRequest().load({"all": True}) == {"all": True}


def test_the_admin_api_refuses_all_yes_with_422() -> None:
    app = make_app(settings=Settings(api_keys=("k",)))
    response = app.test_client().post("/api/dead-letters/replay", json={"all": "yes"},
                                      headers={"Authorization": "Bearer k"})
    assert response.status_code == 422, response.get_json()
    assert "all" in response.get_json()["details"]


# -- the subscription API takes each parameter once ------------------------------------------------

SUBSCRIBE = "/v2/135544/outbound-webhook"


@pytest.fixture
def subscriptions() -> FlaskClient:
    app = make_app(settings=Settings(api_keys=("k",), allowed_networks=("127.0.0.0/8",)))
    return app.test_client()


@pytest.mark.parametrize(("query", "data", "content_type"), [
    ("", "url=http://127.0.0.1:9/a&url=http://127.0.0.1:9/b&event=new_signup", FORM),
    ("?url=http://127.0.0.1:9/a&url=http://127.0.0.1:9/b&event=new_signup", "", None),
    ("", '{"url": "http://127.0.0.1:9/a", "url": "http://127.0.0.1:9/b", "event": "referral"}',
     "application/json"),
    ("", '{"url": "http://127.0.0.1:9/a", "events": ["referral"], "events": ["deleted"]}',
     "application/json"),
    ("", "url=http://127.0.0.1:9/a&source=a&source=b&event=new_signup", FORM),
    # The key check saw only the last copy: a wrong key, then the right one, was let in.
    ("", '{"api_key": "wrong", "api_key": "k", "url": "http://127.0.0.1:9/a", '
     '"event": "referral"}', "application/json"),
    ("", "url=http://127.0.0.1:9/a&url[]=http://127.0.0.1:9/b&event=new_signup", FORM),
])
def test_a_subscription_parameter_given_twice_is_a_400(subscriptions: FlaskClient, query: str,
                                                       data: str,
                                                       content_type: str | None) -> None:
    response = subscriptions.post(SUBSCRIBE + query, data=data, content_type=content_type,
                                  headers={"Authorization": "Bearer k"})
    assert response.status_code == 400, response.get_json()
    assert "given more than once" in response.get_json()["message"]
    listed = subscriptions.get(SUBSCRIBE, headers={"Authorization": "Bearer k"}).get_json()
    assert listed == {"webhooks": []}


@pytest.mark.parametrize(("data", "content_type"), [
    ("url=http://127.0.0.1:9/a&events[]=new_signup&events[]=referral&events=deleted"
     "&extra=1&extra=2", FORM),
    ('{"url": "http://127.0.0.1:9/a", "events": ["new_signup", "referral", "deleted"], '
     '"extra": 1, "extra": 2, "custom": {"a": 1, "a": 2}}', "application/json"),
])
def test_lists_keys_and_what_the_api_ignores_may_come_again(
        subscriptions: FlaskClient, data: str, content_type: str) -> None:
    # events is a list; api_key has the keys' rule; a parameter the API does not read is
    # ignored however it is given (the OpenAPI document allows extra properties).
    response = subscriptions.post(SUBSCRIBE + "?api_key=k&api_key=k", data=data,
                                  content_type=content_type)
    assert response.status_code == 200, response.get_json()
    assert response.get_json()["events"] == ["new_signup", "referral", "deleted"]
