"""The KickoffLabs-compatible subscription API and its Redis store (fakeredis, no worker)."""

from __future__ import annotations

import json
import logging
from typing import Any

import fakeredis
import pytest
from flask import Flask
from flask.testing import FlaskClient

from relay.app import create_app
from relay.config.relay_yaml import parse_config
from relay.config.settings import Settings
from relay.core.api_keys import key_matches
from relay.core.models import Destination, LeadEvent
from relay.core.redaction import RedactApiKeys, redact
from relay.core.routing import route
from relay.store.subscriptions import SubscriptionStore

KEY = "k1-s3cret-key"
CAMPAIGN = 135544
PATH = f"/v2/{CAMPAIGN}/outbound-webhook"
SINK = "http://127.0.0.1:9/kol"
BEARER = {"Authorization": f"Bearer {KEY}"}
FORM = "application/x-www-form-urlencoded"


def make_app(allowed: tuple[str, ...] = ("127.0.0.0/8",), client: Any = None,
             keys: tuple[str, ...] = (KEY,)) -> Flask:
    return create_app({
        "RELAY_SETTINGS": Settings(api_keys=keys, allowed_networks=allowed),
        "RELAY_CONFIG_OBJECT": parse_config({}, {}),
        "RELAY_REDIS": client if client is not None else fakeredis.FakeRedis(),
        "TESTING": True,
    })


@pytest.fixture
def app() -> Flask:
    return make_app()


@pytest.fixture
def client(app: Flask) -> FlaskClient:
    return app.test_client()


def register(client: FlaskClient, url: str = SINK, events: Any = ("new_signup", "referral"),
             path: str = PATH, **extra: Any) -> Any:
    body = {"url": url, "events": list(events) if not isinstance(events, str) else events,
            **extra}
    return client.post(path, json=body, headers=BEARER)


def listed(client: FlaskClient, path: str = PATH) -> list[dict[str, Any]]:
    response = client.get(path, headers=BEARER)
    assert response.status_code == 200
    webhooks: list[dict[str, Any]] = response.get_json()["webhooks"]
    return webhooks


# -- registration ------------------------------------------------------------------------------


def test_the_readme_curl_example_gives_exactly_the_documented_body(client: FlaskClient) -> None:
    # curl -X POST …/outbound-webhook -H "Authorization: Bearer KEY" -d '{"url": …}' sends the
    # JSON body labelled application/x-www-form-urlencoded.
    body = json.dumps({"url": SINK, "events": ["new_signup", "referral"]})
    response = client.post(PATH, data=body, content_type=FORM, headers=BEARER)
    assert response.status_code == 200
    assert response.get_json() == {
        "message": "Webhook Created", "referenceId": 1, "events": ["new_signup", "referral"],
    }
    assert response.mimetype == "application/json"


def test_json_registration_and_listing(client: FlaskClient) -> None:
    created = register(client, source="zapier").get_json()
    [webhook] = listed(client)
    assert set(webhook) == {"referenceId", "url", "events", "source", "created_at", "state"}
    assert webhook["referenceId"] == created["referenceId"]
    assert webhook["url"] == SINK
    assert webhook["events"] == ["new_signup", "referral"]
    assert webhook["source"] == "zapier"
    assert webhook["state"] == "active"
    assert webhook["created_at"].endswith("Z")


@pytest.mark.parametrize("form", [
    [("url", SINK), ("events", "new_signup"), ("events", "referral")],
    [("url", SINK), ("events[]", "new_signup"), ("events[]", "referral")],
    [("url", SINK), ("events", "new_signup,referral")],
    [("url", SINK), ("event", "new_signup"), ("events", "referral")],
])
def test_form_encoded_registration(client: FlaskClient, form: list[tuple[str, str]]) -> None:
    from urllib.parse import urlencode

    response = client.post(PATH, data=urlencode(form + [("api_key", KEY)]), content_type=FORM)
    assert response.status_code == 200, response.get_json()
    assert response.get_json()["events"] == ["new_signup", "referral"]


def test_query_parameters_alone_register(client: FlaskClient) -> None:
    response = client.post(PATH, query_string={"api_key": KEY, "url": SINK, "event": "verified",
                                               "source": "cli"})
    assert response.status_code == 200
    assert response.get_json()["events"] == ["verified"]
    assert listed(client)[0]["source"] == "cli"


def test_one_event_as_a_string_and_the_fraudulent_alias(client: FlaskClient) -> None:
    assert register(client, events="fraudulent").get_json()["events"] == ["marked_as_fraudulent"]
    response = client.post(PATH, json={"url": SINK + "2", "event": "Referral"}, headers=BEARER)
    assert response.get_json()["events"] == ["referral"]


def test_the_same_url_again_updates_the_subscription(client: FlaskClient) -> None:
    first = register(client, events=["new_signup"], source="zapier").get_json()
    second = register(client, events=["referral", "verified"]).get_json()
    assert second == {"message": "Webhook Created", "referenceId": first["referenceId"],
                      "events": ["referral", "verified"]}
    [webhook] = listed(client)
    assert webhook["events"] == ["referral", "verified"]
    assert webhook["source"] == "zapier"  # kept when the update does not name one


def test_the_same_url_in_another_campaign_is_another_subscription(client: FlaskClient) -> None:
    first = register(client).get_json()["referenceId"]
    other = register(client, path="/v2/777/outbound-webhook").get_json()["referenceId"]
    assert first != other
    assert [w["referenceId"] for w in listed(client)] == [first]
    assert [w["referenceId"] for w in listed(client, "/v2/777/outbound-webhook")] == [other]


def test_reference_ids_are_increasing_integers(client: FlaskClient) -> None:
    ids = [register(client, url=f"{SINK}/{n}").get_json()["referenceId"] for n in range(3)]
    assert ids == [1, 2, 3]


def test_an_invalid_event_among_valid_ones_is_409_and_stores_nothing(
    client: FlaskClient,
) -> None:
    response = register(client, events=["new_signup", "lead_won", "referral"])
    assert response.status_code == 409
    assert response.get_json() == {"message": "Invalid event type lead_won"}
    assert listed(client) == []


def test_an_invalid_event_does_not_touch_an_existing_subscription(client: FlaskClient) -> None:
    register(client, events=["new_signup"])
    assert register(client, events=["*"]).status_code == 409
    assert listed(client)[0]["events"] == ["new_signup"]


@pytest.mark.parametrize(("body", "field"), [
    ({"events": ["new_signup"]}, "url"),
    ({"url": "ftp://example.com/x", "events": ["new_signup"]}, "url"),
    ({"url": "http://127.0.0.1/" + "a" * 2048, "events": ["new_signup"]}, "url"),
    ({"url": SINK}, "events"),
    ({"url": SINK, "events": []}, "events"),
    ({"url": SINK, "events": [1]}, "events"),
    ({"url": ["http://127.0.0.1/"], "events": ["new_signup"]}, "url"),
])
def test_invalid_parameters_are_422_with_a_message(
    client: FlaskClient, body: dict[str, Any], field: str
) -> None:
    response = client.post(PATH, json=body, headers=BEARER)
    assert response.status_code == 422
    answer = response.get_json()
    assert answer["message"].startswith(field)
    assert field in answer["errors"]
    assert listed(client) == []


def test_a_url_of_exactly_2048_characters_is_accepted(client: FlaskClient) -> None:
    url = "http://127.0.0.1/"
    url += "a" * (2048 - len(url))
    assert register(client, url=url).status_code == 200


def test_a_malformed_json_body_is_400(client: FlaskClient) -> None:
    response = client.post(PATH, data="[1, 2]", content_type="application/json", headers=BEARER)
    assert response.status_code == 400
    assert "message" in response.get_json()


# -- SSRF --------------------------------------------------------------------------------------


@pytest.mark.parametrize("url", [
    "http://127.0.0.1/hook",
    "http://127.1/hook",
    "http://2130706433/hook",
    "http://0x7f.0.0.1/hook",
    "http://0177.0.0.1/hook",
    "http://[::1]/hook",
    "http://[::ffff:127.0.0.1]/hook",
    "http://169.254.169.254/latest/meta-data/",
    "http://10.0.0.1/hook",
    "http://192.168.1.1./hook",
    "http://localhost/hook",
    "http://user:pw@93.184.215.14/hook",
    "httpx://93.184.215.14/hook",
])
def test_unsafe_urls_are_refused_at_registration(url: str) -> None:
    client = make_app(allowed=()).test_client()
    response = register(client, url=url)
    assert response.status_code == 422, url
    assert response.get_json()["message"].startswith(("url refused:", "url:"))
    assert listed(client) == []


def test_a_public_address_literal_is_accepted_without_any_lookup() -> None:
    client = make_app(allowed=()).test_client()
    assert register(client, url="https://93.184.215.14/hook").status_code == 200


def test_the_refusal_says_why() -> None:
    client = make_app(allowed=()).test_client()
    message = register(client, url="http://169.254.169.254/").get_json()["message"]
    assert "link-local" in message and "public" in message


# -- authentication ----------------------------------------------------------------------------


@pytest.mark.parametrize("how", ["query", "form", "json", "bearer", "authentication", "bare",
                                 "token"])
def test_each_way_of_presenting_the_key(client: FlaskClient, how: str) -> None:
    base = {"url": SINK, "events": "new_signup"}
    if how == "query":
        response = client.post(PATH, json=base, query_string={"api_key": KEY})
    elif how == "form":
        response = client.post(PATH, data={**base, "api_key": KEY})
    elif how == "json":
        response = client.post(PATH, json={**base, "api_key": KEY})
    else:
        header, value = {
            "bearer": ("Authorization", f"Bearer {KEY}"),
            "authentication": ("Authentication", f"Bearer {KEY}"),
            "bare": ("Authorization", KEY),
            "token": ("Authorization", f"Token token=x {KEY}"),
        }[how]
        response = client.post(PATH, json=base, headers={header: value})
    assert response.status_code == 200, response.get_json()


@pytest.mark.parametrize("how", ["none", "query", "form", "json", "bearer", "authentication",
                                 "empty-header", "basic", "prefix", "param-wrong-header-right"])
def test_each_wrong_key_is_401_with_a_json_message(client: FlaskClient, how: str) -> None:
    base = {"url": SINK, "events": "new_signup"}
    wrong = "k1-s3cret-kez"
    kwargs: dict[str, Any] = {"json": base}
    if how == "query":
        kwargs["query_string"] = {"api_key": wrong}
    elif how == "form":
        kwargs = {"data": {**base, "api_key": wrong}}
    elif how == "json":
        kwargs = {"json": {**base, "api_key": wrong}}
    elif how == "bearer":
        kwargs["headers"] = {"Authorization": f"Bearer {wrong}"}
    elif how == "authentication":
        kwargs["headers"] = {"Authentication": wrong}
    elif how == "empty-header":
        kwargs["headers"] = {"Authorization": "Bearer"}
    elif how == "basic":
        kwargs["headers"] = {"Authorization": "Basic azE6czNjcmV0"}
    elif how == "prefix":
        kwargs["headers"] = {"Authorization": f"Bearer {KEY[:-1]}"}
    elif how == "param-wrong-header-right":
        kwargs = {"json": {**base, "api_key": wrong}, "headers": BEARER}
    for method in (client.post, client.delete, client.get):
        response = method(PATH, **kwargs)
        assert response.status_code == 401, (how, method)
        answer = response.get_json()
        assert set(answer) == {"message"}
        assert KEY not in response.get_data(as_text=True)
    assert listed(client) == []


@pytest.mark.parametrize("given", [f" {KEY}", f"{KEY} ", f"{KEY}\x1c", f"\x1f{KEY}",
                                   f"{KEY}\u00a0", f"{KEY}\n", KEY.upper()])
@pytest.mark.parametrize("how", ["query", "form", "json", "header"])
def test_keys_are_compared_exactly(client: FlaskClient, given: str, how: str) -> None:
    # Nothing is stripped: a space or a control character around the key makes it wrong.
    base = {"url": SINK, "events": "new_signup"}
    if how == "query":
        response = client.post(PATH, json=base, query_string={"api_key": given})
    elif how == "form":
        response = client.post(PATH, data={**base, "api_key": given})
    elif how == "json":
        response = client.post(PATH, json={**base, "api_key": given})
    else:
        if given != given.strip(" \t\n\x1c\x1f"):
            pytest.skip("spaces around a header token separate it; controls are not header text")
        response = client.post(PATH, json=base, headers={"Authorization": f"Bearer {given}"})
    assert response.status_code == 401, (given, how)
    assert listed(client) == []


@pytest.mark.parametrize("kwargs", [
    {"query_string": {"api_key": ""}, "headers": BEARER},
    {"query_string": [("api_key", KEY), ("api_key", "")]},
    {"query_string": [("api_key", KEY), ("api_key", "wrong")]},
    {"query_string": {"api_key": KEY}, "headers": {"Authentication": "Bearer wrong"}},
    {"headers": {**BEARER, "Authentication": ""}},
    {"json": {"api_key": ""}, "headers": BEARER},
    {"json": {"api_key": 17}, "headers": BEARER},
    {"data": {"api_key": ""}, "headers": BEARER},
])
def test_a_request_carrying_several_keys_needs_every_one_valid(
    client: FlaskClient, kwargs: dict[str, Any]
) -> None:
    for method in (client.get, client.delete):
        response = method(PATH, **kwargs)
        assert response.status_code == 401, kwargs
        assert set(response.get_json()) == {"message"}


def test_several_keys_all_valid_are_accepted() -> None:
    client = make_app(keys=("first-key", "second-key")).test_client()
    response = client.get(PATH, query_string={"api_key": "first-key"},
                          headers={"Authorization": "Bearer second-key",
                                   "Authentication": "first-key"})
    assert response.status_code == 200
    response = client.get(PATH, query_string=[("api_key", "first-key"),
                                              ("api_key", "second-key")])
    assert response.status_code == 200


def test_any_of_several_keys_works() -> None:
    client = make_app(keys=("first-key", "second-key")).test_client()
    for key in ("first-key", "second-key"):
        response = client.get(PATH, headers={"Authorization": f"Bearer {key}"})
        assert response.status_code == 200
    assert client.get(PATH, headers={"Authorization": "Bearer third"}).status_code == 401


def test_without_configured_keys_everything_is_401() -> None:
    client = make_app(keys=()).test_client()
    response = client.get(PATH, headers={"Authorization": "Bearer "})
    assert response.status_code == 401
    assert "RELAY_API_KEYS" in response.get_json()["message"]


def test_key_matches_is_exact() -> None:
    assert key_matches("abc", ["x", "abc"])
    assert not key_matches("abcd", ["abc"])
    assert not key_matches("", ["", "abc"])
    assert not key_matches(None, ["abc"])


def test_keys_never_reach_the_logs(client: FlaskClient, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    register(client)
    client.post(PATH, query_string={"api_key": KEY, "url": SINK, "event": "nope"})
    client.delete(PATH, json={"url": SINK, "api_key": KEY})
    client.get(PATH, query_string={"api_key": "wrong-" + KEY})
    assert KEY not in caplog.text


def test_the_redacting_filter_for_access_logs() -> None:
    line = f'127.0.0.1 - - "POST /v2/1/outbound-webhook?url=x&api_key={KEY}&a=b HTTP/1.1" 200'
    assert KEY not in redact(line)
    assert "api_key=[redacted]&a=b" in redact(line)
    assert KEY not in redact(f"Authorization: Bearer {KEY}")
    record = logging.LogRecord("werkzeug", logging.INFO, __file__, 1, "%s", (line,), None)
    assert RedactApiKeys().filter(record)
    assert KEY not in record.getMessage()


# -- delete and list ---------------------------------------------------------------------------


@pytest.mark.parametrize("how", ["json", "form-json", "form", "query"])
def test_delete(client: FlaskClient, how: str) -> None:
    reference_id = register(client).get_json()["referenceId"]
    register(client, url=SINK + "/other")
    if how == "json":
        response = client.delete(PATH, json={"url": SINK}, headers=BEARER)
    elif how == "form-json":
        response = client.delete(PATH, data=json.dumps({"url": SINK, "api_key": KEY}),
                                 content_type=FORM)
    elif how == "form":
        response = client.delete(PATH, data={"url": SINK, "api_key": KEY})
    else:
        response = client.delete(PATH, query_string={"url": SINK, "api_key": KEY})
    assert response.status_code == 200
    assert response.get_json() == {"message": "Webhook Deleted", "referenceId": reference_id}
    assert [w["url"] for w in listed(client)] == [SINK + "/other"]
    again = client.delete(PATH, json={"url": SINK}, headers=BEARER)
    assert again.status_code == 404
    assert "message" in again.get_json()


def test_delete_of_an_unknown_url_or_another_campaigns_url_is_404(client: FlaskClient) -> None:
    register(client, path="/v2/777/outbound-webhook")
    assert client.delete(PATH, json={"url": SINK}, headers=BEARER).status_code == 404
    assert len(listed(client, "/v2/777/outbound-webhook")) == 1


def test_delete_needs_a_url(client: FlaskClient) -> None:
    response = client.delete(PATH, headers=BEARER)
    assert response.status_code == 422
    assert response.get_json()["message"].startswith("url")


def test_registering_again_after_delete_makes_a_new_subscription(client: FlaskClient) -> None:
    first = register(client).get_json()["referenceId"]
    client.delete(PATH, json={"url": SINK}, headers=BEARER)
    assert register(client).get_json()["referenceId"] == first + 1


def test_redis_down_is_503_with_a_message() -> None:
    server = fakeredis.FakeServer()
    server.connected = False
    dead = fakeredis.FakeRedis(server=server)
    response = register(make_app(client=dead).test_client())
    assert response.status_code == 503
    assert "message" in response.get_json()
    assert response.headers["Retry-After"]


# -- the store, as the workers use it ----------------------------------------------------------


def lead_event(campaign: Any = CAMPAIGN, name: str = "referral", key: str = "campaign_id",
               known: bool = True) -> LeadEvent:
    payload: dict[str, Any] = {"__event": name, "social_id": "abc", "email": "a@example.com"}
    if campaign is not None:
        payload[key] = campaign
    return LeadEvent("evt_1", "kickofflabs", name, payload, known)


@pytest.fixture
def store() -> SubscriptionStore:
    return SubscriptionStore(fakeredis.FakeRedis(), retention=3600)


def routed(store: SubscriptionStore, event: LeadEvent) -> list[Destination]:
    return route(event, store.for_event(event))


def test_a_subscription_is_an_untrusted_kickofflabs_webhook(store: SubscriptionStore) -> None:
    subscription, is_new = store.register(CAMPAIGN, SINK, ["referral"], "zapier")
    assert is_new
    [destination] = store.for_event(lead_event())
    assert destination == Destination(
        name=f"sub-{subscription.reference_id}", type="webhook", events=frozenset({"referral"}),
        campaigns=frozenset({str(CAMPAIGN)}), untrusted=True,
        options={"url": SINK, "format": None, "headers": {}, "signing_secret": None},
    )
    assert store.get(destination.name) == destination


def test_routing_by_campaign_then_list_id_then_event(store: SubscriptionStore) -> None:
    store.register(CAMPAIGN, SINK, ["referral"])
    assert len(routed(store, lead_event())) == 1
    assert len(routed(store, lead_event(str(CAMPAIGN)))) == 1
    assert len(routed(store, lead_event(key="list_id"))) == 1
    assert routed(store, lead_event(777)) == []
    assert routed(store, lead_event(None)) == []
    assert routed(store, lead_event(name="new_signup")) == []
    assert routed(store, lead_event(name="referral_v2", known=False)) == []


def test_campaign_id_wins_over_list_id(store: SubscriptionStore) -> None:
    store.register(CAMPAIGN, SINK, ["referral"])
    event = lead_event(777)
    event = LeadEvent("e", "kickofflabs", "referral",
                      {**event.payload, "list_id": CAMPAIGN}, True)
    assert routed(store, event) == []


def test_removal_by_410_keeps_a_record_with_the_reason(app: Flask) -> None:
    client = app.test_client()
    store: SubscriptionStore = app.extensions["relay.subscriptions"]
    reference_id = register(client).get_json()["referenceId"]
    destination = store.get(f"sub-{reference_id}")
    assert destination is not None
    store.remove_destination(destination, "the URL answered 410 Gone")
    store.remove_destination(destination, "the URL answered 410 Gone")  # a second worker
    assert store.for_event(lead_event()) == []
    assert store.get(destination.name) is None
    [webhook] = listed(client)
    assert webhook["state"] == "removed"
    assert webhook["removed_reason"] == "the URL answered 410 Gone"
    assert webhook["removed_at"].endswith("Z")
    # The URL is free again: registering it makes a new, active subscription.
    assert register(client).get_json()["referenceId"] == reference_id + 1
    assert [w["state"] for w in listed(client)] == ["removed", "active"]
    # Deleting works on the active one; the removed record stays until it expires.
    assert client.delete(PATH, json={"url": SINK}, headers=BEARER).status_code == 200
    assert [w["state"] for w in listed(client)] == ["removed"]


def test_removed_records_expire_with_the_retention(store: SubscriptionStore) -> None:
    subscription, _ = store.register(CAMPAIGN, SINK, ["referral"])
    store.remove_destination(subscription.destination(), "gone")
    ttl = store.redis.ttl(f"relay:sub:{subscription.reference_id}")
    assert 0 < ttl <= 3600
    assert store.redis.ttl(f"relay:sub:{subscription.reference_id + 1}") == -2


def test_yaml_destination_names_are_not_subscriptions(store: SubscriptionStore) -> None:
    assert store.get("backend") is None
    assert store.get("sub-x") is None
    store.remove_destination(Destination("backend", "webhook"), "gone")  # no effect, no error


def test_a_campaign_has_at_most_max_per_campaign_subscriptions() -> None:
    store = SubscriptionStore(fakeredis.FakeRedis(), max_per_campaign=2)
    store.register(CAMPAIGN, SINK + "1", ["referral"])
    store.register(CAMPAIGN, SINK + "2", ["referral"])
    store.register(CAMPAIGN, SINK + "2", ["verified"])  # an update is not a new one
    from relay.store.subscriptions import TooManySubscriptions

    with pytest.raises(TooManySubscriptions):
        store.register(CAMPAIGN, SINK + "3", ["referral"])


def test_a_worker_rereads_a_campaigns_subscriptions_only_when_the_version_moves(
    store: SubscriptionStore,
) -> None:
    def version() -> bytes:
        return store.redis.get(store.version_key) or b""

    reads = 0
    hvals = store.redis.hvals

    def counted(key: str) -> Any:
        nonlocal reads
        reads += 1
        return hvals(key)

    store.redis.hvals = counted  # type: ignore[method-assign]
    event = lead_event()
    assert store.for_event(event, version()) == []
    assert store.for_event(event, version()) == [] and reads == 1  # the same version: reused
    subscription, _ = store.register(CAMPAIGN, SINK, ["referral"])
    [destination] = store.for_event(event, version())  # each change moves the version
    assert reads == 2
    store.register(CAMPAIGN, SINK, ["referral", "new_signup"])
    [updated] = store.for_event(event, version())
    assert updated.events == frozenset({"referral", "new_signup"})
    store.remove_destination(updated, "the URL answered 410 Gone")
    assert store.for_event(event, version()) == []
    store.register(CAMPAIGN, SINK, ["referral"])
    assert len(store.for_event(event, version())) == 1
    store.delete(CAMPAIGN, SINK)
    assert store.for_event(event, version()) == []
    assert reads == 6
