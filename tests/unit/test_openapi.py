"""The OpenAPI document stays true: routes, methods, request fields and response shapes."""

from __future__ import annotations

import re
from typing import Any

import fakeredis
import pytest
from flask import Flask
from marshmallow import Schema

from relay.api import subscriptions as subs
from relay.api.auth import KEY_PARAMETER
from relay.api.openapi import _SERVER_ANSWERS as SERVER_ANSWERS
from relay.app import create_app
from relay.config.relay_yaml import parse_config
from relay.config.settings import Settings
from relay.ingress.lead_schema import LeadSchema

KEY = "k1"
DOCUMENTED_PREFIXES = ("/v2/", "/hooks/", "/api/")
IGNORED_METHODS = {"HEAD", "OPTIONS"}


@pytest.fixture
def app() -> Flask:
    return create_app({
        "RELAY_SETTINGS": Settings(api_keys=(KEY,), allowed_networks=("127.0.0.0/8",)),
        "RELAY_CONFIG_OBJECT": parse_config({}, {}),
        "RELAY_REDIS": fakeredis.FakeRedis(),
    })


@pytest.fixture
def document(app: Flask) -> dict[str, Any]:
    response = app.test_client().get("/api/openapi.json")
    assert response.status_code == 200
    body: dict[str, Any] = response.get_json()
    return body


def openapi_path(rule: str) -> str:
    return re.sub(r"<(?:[^:<>]+:)?([^<>]+)>", r"{\1}", rule)


def schema_of(document: dict[str, Any], ref_or_schema: dict[str, Any]) -> dict[str, Any]:
    ref = ref_or_schema.get("$ref")
    if ref is None:
        return ref_or_schema
    found: dict[str, Any] = document["components"]["schemas"][ref.rsplit("/", 1)[-1]]
    return found


def test_it_is_an_openapi_3_document(document: dict[str, Any]) -> None:
    assert document["openapi"].startswith("3.")
    assert document["info"]["title"] == "leadrelay"
    for path, item in document["paths"].items():
        for method, operation in item.items():
            if method == "parameters":
                continue
            assert operation["responses"], (path, method)
            assert operation["operationId"]


def test_every_api_route_is_documented_with_its_methods(
    app: Flask, document: dict[str, Any]
) -> None:
    routes: dict[str, set[str]] = {}
    for rule in app.url_map.iter_rules():
        if rule.rule.startswith(DOCUMENTED_PREFIXES):
            methods = set(rule.methods or ()) - IGNORED_METHODS
            routes.setdefault(openapi_path(rule.rule), set()).update(methods)
    assert "/v2/{campaign_id}/outbound-webhook" in routes
    assert "/hooks/{source}" in routes
    for path, methods in routes.items():
        assert path in document["paths"], path
        documented = {m.upper() for m in document["paths"][path] if m != "parameters"}
        assert documented == methods, path


def test_every_documented_path_exists(app: Flask, document: dict[str, Any]) -> None:
    served = {openapi_path(rule.rule) for rule in app.url_map.iter_rules()}
    assert set(document["paths"]) <= served


def test_path_parameters_are_declared(document: dict[str, Any]) -> None:
    for path, item in document["paths"].items():
        names = set(re.findall(r"{([^}]+)}", path))
        declared = {p["name"] for p in item.get("parameters", []) if p["in"] == "path"}
        assert declared == names, path


@pytest.mark.parametrize(("path", "method", "schema"), [
    ("/hooks/{source}", "post", LeadSchema),
    ("/v2/{campaign_id}/outbound-webhook", "post", subs.SubscribeRequest),
    ("/v2/{campaign_id}/outbound-webhook", "delete", subs.UnsubscribeRequest),
])
def test_documented_request_fields_match_the_schemas(
    document: dict[str, Any], path: str, method: str, schema: type[Schema]
) -> None:
    content = document["paths"][path][method]["requestBody"]["content"]
    assert set(content) == {"application/json", "application/x-www-form-urlencoded"}
    for media in content.values():
        documented = schema_of(document, media["schema"])
        fields = schema().fields
        # api_key is a credential: documented by the security schemes, not as a field to fill.
        assert set(documented["properties"]) == {
            f.data_key or n for n, f in fields.items()} - {KEY_PARAMETER}
        required = {f.data_key or n for n, f in fields.items() if f.required}
        assert set(documented.get("required", [])) == required


def test_the_lead_keeps_unknown_fields(document: dict[str, Any]) -> None:
    lead = document["components"]["schemas"]["Lead"]
    assert lead["additionalProperties"] is True
    assert lead["required"] == ["__event"]


def test_event_parameters_list_the_catalogue(document: dict[str, Any]) -> None:
    events = document["components"]["schemas"]["SubscribeRequest"]["properties"]["events"]
    single, many = events["oneOf"]
    assert "referral" in single["enum"] and "fraudulent" in single["enum"]
    assert many["items"]["enum"] == single["enum"]


def documented_keys(document: dict[str, Any], path: str, method: str, status: int) -> set[str]:
    response = document["paths"][path][method]["responses"][str(status)]
    schema = schema_of(document, response["content"]["application/json"]["schema"])
    return set(schema["properties"])


def test_real_answers_have_the_documented_shapes(app: Flask, document: dict[str, Any]) -> None:
    client = app.test_client()
    path = "/v2/{campaign_id}/outbound-webhook"
    url = "/v2/1/outbound-webhook"
    auth = {"Authorization": f"Bearer {KEY}"}
    body = {"url": "http://127.0.0.1/x", "events": ["new_signup"]}

    created = client.post(url, json=body, headers=auth)
    assert set(created.get_json()) == documented_keys(document, path, "post", 200)
    invalid = client.post(url, json={**body, "events": ["nope"]}, headers=auth)
    assert invalid.status_code == 409
    assert set(invalid.get_json()) <= documented_keys(document, path, "post", 409)
    listing = client.get(url, headers=auth).get_json()
    assert set(listing) == documented_keys(document, path, "get", 200)
    item_schema = schema_of(document, document["components"]["schemas"]["WebhookList"]
                            ["properties"]["webhooks"]["items"])
    assert set(listing["webhooks"][0]) <= set(item_schema["properties"])
    assert set(item_schema["required"]) <= set(listing["webhooks"][0])
    deleted = client.delete(url, json={"url": body["url"]}, headers=auth)
    assert set(deleted.get_json()) == documented_keys(document, path, "delete", 200)
    missing = client.delete(url, json={"url": body["url"]}, headers=auth)
    assert missing.status_code == 404
    assert set(missing.get_json()) <= documented_keys(document, path, "delete", 404)
    assert client.get(url).status_code == 401

    accepted = client.post("/hooks/kickofflabs", json={"__event": "new_signup", "id": 1})
    assert accepted.status_code == 202
    assert set(accepted.get_json()) == documented_keys(document, "/hooks/{source}", "post", 202)
    refused = client.post("/hooks/kickofflabs", json={"__event": "new_signup"})
    assert refused.status_code == 422
    assert set(refused.get_json()) == documented_keys(document, "/hooks/{source}", "post", 422)


def test_every_documented_status_of_the_subscription_api_is_json(
    document: dict[str, Any],
) -> None:
    for operation in document["paths"]["/v2/{campaign_id}/outbound-webhook"].values():
        if not isinstance(operation, dict) or "responses" not in operation:
            continue
        for status, response in operation["responses"].items():
            if status in SERVER_ANSWERS:  # the HTTP server's own, before the app
                continue
            assert "application/json" in response["content"], status


def test_the_api_key_is_a_credential_not_a_field(document: dict[str, Any]) -> None:
    """A tool that authenticates as the document says (its security schemes) must not also
    send generated api_key values, which the relay refuses (every key must be valid)."""
    schemes = document["components"]["securitySchemes"]
    assert schemes["apiKeyParameter"] == {**schemes["apiKeyParameter"], "type": "apiKey",
                                          "in": "query", "name": KEY_PARAMETER}
    assert schemes["apiKeyBearer"]["scheme"] == "bearer"
    for path, item in document["paths"].items():
        for method, operation in item.items():
            if method == "parameters":
                continue
            names = {p["name"] for p in [*item.get("parameters", []),
                                         *operation.get("parameters", [])]}
            assert KEY_PARAMETER not in names, (path, method)
            for media in operation.get("requestBody", {}).get("content", {}).values():
                assert KEY_PARAMETER not in schema_of(document, media["schema"]).get(
                    "properties", {}), (path, method)
            if path.startswith(("/v2/", "/api/")) and path != "/api/openapi.json":
                assert operation["security"] == [{"apiKeyBearer": []},
                                                 {"apiKeyParameter": []}], (path, method)


def test_every_operation_documents_what_the_server_answers_before_the_app(
    document: dict[str, Any],
) -> None:
    for path, item in document["paths"].items():
        for method, operation in item.items():
            if method == "parameters":
                continue
            responses = operation["responses"]
            assert {"414", "431"} <= set(responses), (path, method)
            if "requestBody" in operation or operation.get("security"):
                # Over RELAY_MAX_BODY_BYTES, and a body that stalled (relay web's --timeout).
                assert {"413", "408"} <= set(responses), (path, method)
