"""``POST /hooks/<source>`` on the Flask test client over fakeredis (SPEC §3): 202 only once the
event is on the queue, the documented 4xx for bad input, 503 when Redis cannot take it, and
never a 500."""

from __future__ import annotations

import json
import string
from typing import Any

import fakeredis
import pytest
import redis
from flask import Flask
from flask.testing import FlaskClient
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from werkzeug.test import TestResponse

from relay.config.settings import Settings
from relay.core import formdata as forms
from relay.core.events import event_id_from_header
from relay.store.connection import connect
from tests.support.helpers import accepted_events, config, make_app, queued_tasks
from tests.support.loopback import closed_port
from tests.support.samples import SAMPLE_EVENTS, sample

HOOK = "/hooks/kickofflabs"
LEAD = {"__event": "new_signup", "email": "ada@example.com", "social_id": "36N38P"}


@pytest.fixture
def app() -> Flask:
    return make_app()


@pytest.fixture
def client(app: Flask) -> FlaskClient:
    return app.test_client()


def queue_of(app: Flask) -> redis.Redis:
    client: redis.Redis = app.extensions["relay"].redis
    return client


def post_json(client: FlaskClient, body: Any, path: str = HOOK, **kwargs: Any) -> TestResponse:
    return client.post(path, data=json.dumps(body), content_type="application/json", **kwargs)


def post_raw(client: FlaskClient, body: bytes | str, content_type: str | None = "application/json",
             **kwargs: Any) -> TestResponse:
    if content_type is None:
        return client.post(HOOK, data=body, **kwargs)
    return client.post(HOOK, data=body, content_type=content_type, **kwargs)


def assert_error(response: TestResponse, status: int) -> dict[str, Any]:
    assert response.status_code == status, response.get_data(as_text=True)
    body: dict[str, Any] = response.get_json()
    assert set(body) == {"error", "details"}
    assert isinstance(body["error"], str) and body["error"]
    assert "Traceback" not in response.get_data(as_text=True)
    return body


# -- accepted ------------------------------------------------------------------------------------


def test_accepted_event_is_in_the_intake_and_an_admit_task_is_queued(
        app: Flask, client: FlaskClient) -> None:
    response = post_json(client, sample("new_signup"))
    assert response.status_code == 202
    body = response.get_json()
    assert body["status"] == "accepted"
    event_id = body["event_id"]
    [event] = accepted_events(queue_of(app))
    assert event["event_id"] == event_id
    assert event["source"] == "kickofflabs"
    assert event["name"] == "new_signup" and event["known"] is True
    assert event["payload"]["email"] == "ada@example.com"
    assert event["payload"]["__event"] == "new_signup"
    assert event["payload"]["custom_fields"] == {"company": "Analytical Engines Ltd",
                                                 "role": "engineer"}
    # The first event received under its id is marked as it is stored.
    assert queue_of(app).get(f"relay:seen:{event_id}") is not None
    [task] = queued_tasks(queue_of(app))
    assert task.name == "relay.admit" and task.args == [] and task.kwargs == {}
    assert task.envelope["properties"]["delivery_info"]["routing_key"] == "relay"
    # Flower shows argsrepr: never the lead's personal data.
    assert "ada@example.com" not in json.dumps(task.envelope)
    # While that admit task waits, further events queue no other.
    assert post_json(client, sample("new_signup", social_id="other")).status_code == 202
    assert len(queued_tasks(queue_of(app))) == 1
    assert len(accepted_events(queue_of(app))) == 2


@pytest.mark.parametrize("name", SAMPLE_EVENTS)
def test_every_sample_is_accepted_as_json_and_form_with_one_id(client: FlaskClient,
                                                                name: str) -> None:
    as_json = post_json(client, sample(name))
    as_form = post_raw(client, forms.encode(sample(name)), "application/x-www-form-urlencoded")
    assert as_json.status_code == as_form.status_code == 202
    assert as_json.get_json()["event_id"] == as_form.get_json()["event_id"]


def test_form_body_is_typed_like_json(app: Flask, client: FlaskClient) -> None:
    post_json(client, sample("tagged"))
    post_raw(client, forms.encode(sample("tagged")), "application/x-www-form-urlencoded")
    from_json, from_form = (event["payload"] for event in accepted_events(queue_of(app)))
    for key in ("id", "campaign_id", "rank", "verified", "waitlisted", "email", "__tagged",
                "custom_fields"):
        assert from_form[key] == from_json[key], key
    assert from_form["rank"] == 268 and from_form["verified"] is False
    # Items of declared lists are typed by the lead schema too (issue 12: "42" was kept).
    assert from_form["tags"] == from_json["tags"] == [{"id": 42, "name": "vip"}]


def test_multipart_form_is_accepted(client: FlaskClient) -> None:
    response = client.post(HOOK, data=dict(LEAD), content_type="multipart/form-data")
    assert response.status_code == 202


def test_json_with_charset_and_json_suffix_types(client: FlaskClient) -> None:
    for content_type in ("application/json; charset=utf-8", "application/vnd.kickofflabs+json"):
        assert post_raw(client, json.dumps(LEAD), content_type).status_code == 202


def test_fraudulent_alias_is_stored_under_the_canonical_name(app: Flask,
                                                            client: FlaskClient) -> None:
    alias = post_json(client, sample("marked_as_fraudulent", __event="fraudulent"))
    canonical = post_json(client, sample("marked_as_fraudulent"))
    assert alias.get_json()["event_id"] == canonical.get_json()["event_id"]
    first = accepted_events(queue_of(app))[0]
    assert first["name"] == first["payload"]["__event"] == "marked_as_fraudulent"


def test_unknown_event_is_accepted_and_flagged(app: Flask, client: FlaskClient) -> None:
    lead = {**LEAD, "__event": "lead_exploded", "__lead_exploded": {"why": "test"}}
    response = post_json(client, lead)
    assert response.status_code == 202
    [event] = accepted_events(queue_of(app))
    assert event["known"] is False
    assert event["name"] == "lead_exploded"
    assert event["payload"]["__lead_exploded"] == {"why": "test"}  # relayed unchanged


def test_unknown_fields_are_kept_verbatim(app: Flask, client: FlaskClient) -> None:
    extra = {"brand_new_field": {"nested": [1, "two", None]}, "x-y": "z"}
    assert post_json(client, {**LEAD, **extra}).status_code == 202
    payload = accepted_events(queue_of(app))[0]["payload"]
    assert payload["brand_new_field"] == extra["brand_new_field"] and payload["x-y"] == "z"


@pytest.mark.parametrize("identity", [{"social_id": "S"}, {"id": 7}, {"email": "a@b.c"},
                                      {"phone_number": "+15555550100"}])
def test_any_one_identity_field_is_enough(client: FlaskClient, identity: dict[str, Any]) -> None:
    assert post_json(client, {"__event": "new_signup", **identity}).status_code == 202


# -- event id from the sender's header ------------------------------------------------------------


@pytest.mark.parametrize("header", ["Idempotency-Key", "webhook-id"])
def test_idempotency_header_decides_the_id(client: FlaskClient, header: str) -> None:
    key = "msg_2mWqB8DfmzCGTbHKdTk3g3l7kBb"
    first = post_json(client, LEAD, headers={header: key}).get_json()["event_id"]
    other_body = post_json(client, {**LEAD, "email": "bob@example.com", "social_id": "X"},
                           headers={header: key}).get_json()["event_id"]
    other_key = post_json(client, LEAD, headers={header: key + "2"}).get_json()["event_id"]
    without = post_json(client, LEAD).get_json()["event_id"]
    assert first == other_body == event_id_from_header("kickofflabs", key)
    assert other_key != first and without != first


def test_idempotency_key_is_namespaced_by_source() -> None:
    client = make_app(config(sources={"kickofflabs": {}, "shop": {}})).test_client()
    key = {"Idempotency-Key": "same-key"}
    a = post_json(client, LEAD, headers=key).get_json()["event_id"]
    b = post_json(client, LEAD, path="/hooks/shop", headers=key).get_json()["event_id"]
    assert a != b


def test_unusable_idempotency_key_is_a_400(app: Flask, client: FlaskClient) -> None:
    assert_error(post_json(client, LEAD, headers={"Idempotency-Key": "k" * 1000}), 400)
    assert_error(post_json(client, LEAD, headers={"Idempotency-Key": "a\tb"}), 400)
    assert accepted_events(queue_of(app)) == []


# -- sources and tokens ---------------------------------------------------------------------------


@pytest.fixture
def guarded() -> Flask:
    return make_app(config(sources={"kickofflabs": {"token": "s3cret-token"}}))


def test_token_as_query_parameter(guarded: Flask) -> None:
    client = guarded.test_client()
    assert post_json(client, LEAD, path=HOOK + "?token=s3cret-token").status_code == 202


def test_token_as_header(guarded: Flask) -> None:
    client = guarded.test_client()
    response = post_json(client, LEAD, headers={"X-Relay-Token": "s3cret-token"})
    assert response.status_code == 202


@pytest.mark.parametrize(
    ("path", "headers"),
    [
        (HOOK, {}),
        (HOOK + "?token=wrong", {}),
        (HOOK + "?token=", {}),
        (HOOK + "?token=s3cret-token-and-more", {}),
        (HOOK, {"X-Relay-Token": "s3cret-toke"}),
        (HOOK, {"X-Relay-Token": ""}),
        (HOOK + "?token=wrong", {"X-Relay-Token": "s3cret-token"}),  # a wrong token is wrong
    ],
)
def test_missing_or_wrong_token_is_401(guarded: Flask, path: str,
                                       headers: dict[str, str]) -> None:
    response = post_json(guarded.test_client(), LEAD, path=path, headers=headers)
    assert_error(response, 401)
    assert accepted_events(queue_of(guarded)) == []


def test_source_without_token_needs_none(client: FlaskClient) -> None:
    assert post_json(client, LEAD).status_code == 202


def test_unknown_source_is_404(app: Flask, client: FlaskClient) -> None:
    assert_error(post_json(client, LEAD, path="/hooks/nope"), 404)
    assert accepted_events(queue_of(app)) == []


def test_only_post(client: FlaskClient) -> None:
    assert client.get(HOOK).status_code == 405


# -- refused bodies -------------------------------------------------------------------------------


def test_body_over_the_configured_limit_is_413() -> None:
    app = make_app(settings=Settings(max_body_bytes=2048))
    client = app.test_client()
    small = {**LEAD, "pad": "x" * 1000}
    big = {**LEAD, "pad": "x" * 3000}
    assert post_json(client, small).status_code == 202
    assert_error(post_json(client, big), 413)
    form = forms.encode(big)
    assert_error(post_raw(client, form, "application/x-www-form-urlencoded"), 413)
    assert len(accepted_events(queue_of(app))) == 1


def test_ten_megabyte_body_is_413(app: Flask, client: FlaskClient) -> None:
    body = json.dumps({**LEAD, "pad": "x" * (10 * 1024 * 1024)})
    assert_error(post_raw(client, body), 413)
    assert accepted_events(queue_of(app)) == []


def test_body_without_length_is_cut_at_the_limit(app: Flask, client: FlaskClient) -> None:
    import io

    # A chunked upload has no Content-Length: the limit must hold while reading.
    response = client.post(HOOK, input_stream=io.BytesIO(b"[" * (3 * 1024 * 1024)),
                           content_type="application/json",
                           environ_overrides={"wsgi.input_terminated": True})
    assert_error(response, 413)


@pytest.mark.parametrize("content_type", [None, "text/plain", "application/xml",
                                          "text/html; charset=utf-8", "image/png"])
def test_missing_or_other_content_type_is_415(client: FlaskClient,
                                              content_type: str | None) -> None:
    assert_error(post_raw(client, json.dumps(LEAD), content_type), 415)


@pytest.mark.parametrize(
    "body",
    [
        b"",
        b"\xff\xfe{}",  # not UTF-8
        b'{"__event": "new_signup", "email": "\xe9@x.com"}',  # Latin-1, not UTF-8
        b'{"__event": "new_signup",',
        b"{'__event': 'new_signup'}",
        b'{"__event": "new_signup", "email": "a@b.c", "email": "x@y.z"}',  # duplicate key
        b'{"__event": "new_signup", "email": "a@b.c", "custom_fields": {"a": 1, "a": 2}}',
        b'{"__event": "new_signup", "email": "a@b.c", "score": NaN}',
        b'{"__event": "new_signup", "email": "a@b.c", "score": Infinity}',
        b'{"__event": "new_signup", "email": "a@b.c", "score": -Infinity}',
        b"[" * 100_000,
        b'{"__event": "new_signup", "email": "a@b.c", "x": ' + b"[" * 100_000 + b"]" * 100_000
        + b"}",
        b'{"a": ' * 50_000 + b"1" + b"}" * 50_000,
    ],
)
def test_unparseable_json_is_400(app: Flask, client: FlaskClient, body: bytes) -> None:
    assert_error(post_raw(client, body), 400)
    assert accepted_events(queue_of(app)) == []


def test_empty_form_is_400(client: FlaskClient) -> None:
    assert_error(post_raw(client, b"", "application/x-www-form-urlencoded"), 400)


@pytest.mark.parametrize("body", ["[]", '"new_signup"', "1", "null", "true", '[{"a": 1}]'])
def test_json_that_is_not_an_object_is_422(client: FlaskClient, body: str) -> None:
    assert_error(post_raw(client, body), 422)


@pytest.mark.parametrize(
    ("lead", "field"),
    [
        ({"email": "a@b.c"}, "__event"),
        ({"__event": "", "email": "a@b.c"}, "__event"),
        ({"__event": None, "email": "a@b.c"}, "__event"),
        ({"__event": 5, "email": "a@b.c"}, "__event"),
        ({"__event": "new_signup"}, None),
        ({"__event": "new_signup", "email": "", "social_id": None}, None),
        ({"__event": "new_signup", "email": "a@b.c", "id": "abc"}, "id"),
        ({"__event": "new_signup", "email": ["a@b.c"]}, "email"),
        ({"__event": "new_signup", "email": "a@b.c", "custom_fields": []}, "custom_fields"),
        ({"__event": "tagged", "email": "a@b.c", "__tagged": "vip"}, "__tagged"),
        ({"__event": "new_signup", "email": "a@b.c", "verified": "perhaps"}, "verified"),
    ],
)
def test_not_a_lead_event_is_422(app: Flask, client: FlaskClient, lead: dict[str, Any],
                                 field: str | None) -> None:
    body = assert_error(post_json(client, lead), 422)
    if field is not None:
        assert field in body["details"]
    assert accepted_events(queue_of(app)) == []


def test_form_without_identity_is_422(client: FlaskClient) -> None:
    response = post_raw(client, "__event=new_signup&first_name=Ada",
                        "application/x-www-form-urlencoded")
    assert_error(response, 422)


def test_conflicting_form_fields_are_422_not_500(client: FlaskClient) -> None:
    for body in ("__event=new_signup&email=a@b.c&custom_fields=1&custom_fields[x][y]=2",
                 "__event=new_signup&email=a@b.c&tags[]=1&tags[x]=2"):
        assert_error(post_raw(client, body, "application/x-www-form-urlencoded"), 422)


def test_too_deep_form_keys_are_refused(client: FlaskClient) -> None:
    body = "__event=new_signup&email=a@b.c&custom_fields" + "[a]" * 100 + "=1"
    response = post_raw(client, body, "application/x-www-form-urlencoded")
    assert response.status_code in (400, 413, 422)


def test_hundred_thousand_form_fields_are_refused(app: Flask, client: FlaskClient) -> None:
    fields = "&".join(f"f{i}=1" for i in range(100_000))
    body = f"__event=new_signup&email=a%40b.c&{fields}"
    response = post_raw(client, body, "application/x-www-form-urlencoded")
    assert response.status_code in (400, 413), response.status_code
    assert_error(response, response.status_code)
    assert accepted_events(queue_of(app)) == []


def test_hundred_thousand_multipart_fields_are_refused(client: FlaskClient) -> None:
    data = {**LEAD, **{f"f{i}": "1" for i in range(100_000)}}
    response = client.post(HOOK, data=data, content_type="multipart/form-data")
    assert response.status_code in (400, 413)


# -- the queue ------------------------------------------------------------------------------------


def test_redis_down_is_503_with_retry_after() -> None:
    down = connect(f"redis://127.0.0.1:{closed_port()}/0", timeout=0.5)
    client = make_app(client=down).test_client()
    response = post_json(client, sample("new_signup"))
    assert_error(response, 503)
    assert int(response.headers["Retry-After"]) > 0
    ready = client.get("/readyz")
    assert ready.status_code == 503
    assert client.get("/healthz").status_code == 200  # the process itself is up


class FullRedis(fakeredis.FakeRedis):
    """A Redis at maxmemory under ``noeviction``: every write is refused."""

    error: type[redis.RedisError] = redis.exceptions.OutOfMemoryError

    def execute_command(self, *args: Any, **kwargs: Any) -> Any:
        if str(args[0]).upper() in {"LPUSH", "EVALSHA", "EVAL"}:  # writes, scripts included
            raise self.error("OOM command not allowed when used memory > 'maxmemory'.")
        return super().execute_command(*args, **kwargs)

    def pipeline(self, *args: Any, **kwargs: Any) -> Any:  # writes in a transaction, too
        pipe = super().pipeline(*args, **kwargs)

        def refuse(*_: Any, **__: Any) -> Any:
            raise self.error("OOM command not allowed when used memory > 'maxmemory'.")

        pipe.execute = refuse  # type: ignore[method-assign]
        return pipe


class FullRedisOldClient(FullRedis):
    error = redis.exceptions.ResponseError


@pytest.mark.parametrize("full", [FullRedis, FullRedisOldClient])
def test_redis_full_is_503_with_retry_after(full: type[FullRedis]) -> None:
    client = make_app(client=full()).test_client()
    response = post_json(client, sample("new_signup"))
    assert_error(response, 503)
    assert int(response.headers["Retry-After"]) > 0


def test_probes(client: FlaskClient) -> None:
    assert client.get("/healthz").status_code == 200
    assert client.get("/readyz").status_code == 200


# -- never a 500 ----------------------------------------------------------------------------------

_CONTENT_TYPES = st.one_of(
    st.sampled_from([
        "application/json", "application/x-www-form-urlencoded", "multipart/form-data",
        "multipart/form-data; boundary=xyz", "text/plain", "application/json; charset=latin-1",
        "application/problem+json", "", "application/", "*/*",
    ]),
    st.text(string.printable.strip(), max_size=30),
)
_JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=20),
    lambda children: st.lists(children, max_size=4)
    | st.dictionaries(st.text(max_size=10), children, max_size=4),
    max_leaves=20,
)
_LEAD_KEYS = st.sampled_from([
    "__event", "social_id", "id", "email", "phone_number", "campaign_id", "list_id", "counter",
    "verified", "custom_fields", "tags", "__tagged", "__referral", "__reward_level",
    "__score_change", "__fraudulent", "unverified_leads", "uid", "rank",
])
_LEADISH = st.dictionaries(_LEAD_KEYS | st.text(max_size=10), _JSON, max_size=8).map(
    lambda d: {"__event": "new_signup", "email": "a@b.c", **d}
)
_BODIES = st.one_of(
    st.binary(max_size=300),
    _JSON.map(lambda v: json.dumps(v).encode()),
    _LEADISH.map(lambda v: json.dumps(v).encode()),
    _LEADISH.map(lambda v: forms.encode(v).encode()),
    st.text(max_size=200).map(str.encode),
)
_ALLOWED = {202, 400, 413, 415, 422}


@settings(max_examples=400, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(body=_BODIES, content_type=_CONTENT_TYPES)
def test_ingress_never_answers_500(client: FlaskClient, body: bytes, content_type: str) -> None:
    response = client.post(HOOK, data=body, headers={"Content-Type": content_type})
    assert response.status_code in _ALLOWED, (response.status_code, response.get_data())
    if response.status_code != 202:
        assert_error(response, response.status_code)


@settings(max_examples=150, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(lead=_LEADISH, as_form=st.booleans(),
       key=st.none() | st.text(st.characters(min_codepoint=32, max_codepoint=255), max_size=300))
def test_lead_like_bodies_never_answer_500(client: FlaskClient, lead: dict[str, Any],
                                           as_form: bool, key: str | None) -> None:
    headers = {} if key is None else {"Idempotency-Key": key}
    if as_form:
        response = post_raw(client, forms.encode(lead), "application/x-www-form-urlencoded",
                            headers=headers)
    else:
        response = post_json(client, lead, headers=headers)
    assert response.status_code in _ALLOWED, (response.status_code, response.get_data())
