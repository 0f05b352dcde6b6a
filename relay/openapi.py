"""The OpenAPI 3 document of the relay's HTTP API, served at ``GET /api/openapi.json``.

Request and response bodies are generated from the same marshmallow schemas the views load and
dump with (apispec's marshmallow plugin), so the document cannot drift from the validation; the
operations (paths, parameters, status codes) are listed here, and ``tests/test_openapi.py``
checks that every route of the app under ``/v2``, ``/hooks`` and ``/api`` is documented with its
methods. A new API blueprint adds its operations in :func:`build_spec`.
"""

from __future__ import annotations

from importlib import metadata
from typing import Any

from apispec import APISpec
from apispec.ext.marshmallow import MarshmallowPlugin
from flask import Blueprint, Response, current_app, jsonify
from marshmallow import Schema, fields

from relay import subscriptions_api as subs
from relay.events import ALIASES, EVENTS
from relay.schemas import LeadSchema

bp = Blueprint("openapi", __name__)
OPENAPI_PATH = "/api/openapi.json"
_CACHE = "relay.openapi"

_BODY_TYPES = ("application/json", "application/x-www-form-urlencoded")
_EVENT_NAME = {"type": "string", "enum": [*EVENTS, *ALIASES]}


class IngressAcceptedSchema(Schema):
    status = fields.String(required=True, metadata={"example": "accepted"})
    event_id = fields.String(required=True, metadata={"example": "evt_4f0c…"})


class ErrorSchema(Schema):
    error = fields.String(required=True)
    details = fields.Raw(allow_none=True)


class HealthSchema(Schema):
    status = fields.String(required=True)


@bp.get(OPENAPI_PATH)
def openapi_json() -> Response:
    document = current_app.extensions.get(_CACHE)
    if document is None:
        document = current_app.extensions[_CACHE] = build_spec().to_dict()
    return jsonify(document)


def build_spec() -> APISpec:
    plugin = MarshmallowPlugin()
    spec = APISpec(
        title="leadrelay",
        version=_version(),
        openapi_version="3.0.3",
        plugins=[plugin],
        info={"description": "Relay for KickoffLabs lead-event webhooks: the ingress and the "
                             "KickoffLabs-compatible subscription API."},
    )
    plugin.converter.add_attribute_function(_event_names)  # type: ignore[union-attr]
    _security(spec)
    for name, schema in {
        "Lead": LeadSchema,
        "IngressAccepted": IngressAcceptedSchema,
        "Error": ErrorSchema,
        "Health": HealthSchema,
        "SubscribeRequest": subs.SubscribeRequest,
        "UnsubscribeRequest": subs.UnsubscribeRequest,
        "Message": subs.MessageSchema,
        "WebhookCreated": subs.WebhookCreatedSchema,
        "WebhookDeleted": subs.WebhookDeletedSchema,
        "Webhook": subs.WebhookSchema,
        "WebhookList": subs.WebhookListSchema,
    }.items():
        spec.components.schema(name, schema=schema)
    _ingress(spec)
    _subscriptions(spec)
    _ops(spec)
    from relay import admin_api  # imports this module's neighbours; keep it out of import time

    admin_api.document(spec)
    return spec


def _event_names(self: Any, field: fields.Field, ret: dict[str, Any], **kwargs: Any
                 ) -> dict[str, Any]:
    if isinstance(field, subs.EventNames):
        return {"oneOf": [_EVENT_NAME, {"type": "array", "items": _EVENT_NAME}]}
    return {}


def _security(spec: APISpec) -> None:
    spec.components.security_scheme(
        "apiKeyParameter", {"type": "apiKey", "in": "query", "name": "api_key",
                            "description": "Also accepted as a form or JSON body field."})
    spec.components.security_scheme(
        "apiKeyBearer", {"type": "http", "scheme": "bearer",
                         "description": "Authorization: Bearer <key> (the last token of the "
                                        "Authorization or Authentication header is the key)."})
    spec.components.security_scheme(
        "sourceTokenParameter", {"type": "apiKey", "in": "query", "name": "token"})
    spec.components.security_scheme(
        "sourceTokenHeader", {"type": "apiKey", "in": "header", "name": "X-Relay-Token"})


def _json(schema: str) -> dict[str, Any]:
    return {"application/json": {"schema": schema}}


def _reply(description: str, schema: str) -> dict[str, Any]:
    return {"description": description, "content": _json(schema)}


def _ingress(spec: APISpec) -> None:
    error = "Error"
    spec.path(
        path="/hooks/{source}",
        parameters=[{"name": "source", "in": "path", "required": True,
                     "schema": {"type": "string"}, "example": "kickofflabs",
                     "description": "A source from the YAML configuration."}],
        operations={"post": {
            "operationId": "receiveLeadEvent",
            "summary": "Receive one KickoffLabs lead event",
            "description": "Stored in Redis before the 202; delivered by the workers. JSON or "
                           "form bodies (bracket notation) are accepted; unknown fields are "
                           "kept verbatim. The event id comes from an Idempotency-Key or "
                           "webhook-id header when present.",
            "security": [{}, {"sourceTokenParameter": []}, {"sourceTokenHeader": []}],
            "parameters": [
                {"name": header, "in": "header", "required": False,
                 "schema": {"type": "string", "maxLength": 256}}
                for header in ("Idempotency-Key", "webhook-id")
            ],
            "requestBody": {"required": True, "content": {
                "application/json": {"schema": "Lead"},
                "application/x-www-form-urlencoded": {"schema": "Lead"},
            }},
            "responses": {
                "202": _reply("Stored; it will be delivered", "IngressAccepted"),
                "400": _reply("The body cannot be parsed", error),
                "401": _reply("Missing or wrong source token", error),
                "404": _reply("Unknown source", error),
                "413": _reply("Body over RELAY_MAX_BODY_BYTES", error),
                "415": _reply("Neither JSON nor a form", error),
                "422": _reply("Not a lead event", error),
                "503": {**_reply("Redis cannot take the event; retry", error),
                        "headers": {"Retry-After": {"schema": {"type": "integer"}}}},
            },
        }},
    )


def _subscriptions(spec: APISpec) -> None:
    message = "Message"
    security = [{"apiKeyParameter": []}, {"apiKeyBearer": []}]

    def body(schema: str) -> dict[str, Any]:
        return {"required": False, "description": "Or the same fields as query parameters.",
                "content": {kind: {"schema": schema} for kind in _BODY_TYPES}}

    common = {
        "401": _reply("Missing or invalid API key", message),
        "422": _reply("Invalid parameters", message),
        "503": _reply("Redis is unavailable; retry", message),
    }
    spec.path(
        path="/v2/{campaign_id}/outbound-webhook",
        parameters=[{"name": "campaign_id", "in": "path", "required": True,
                     "schema": {"type": "integer"}, "example": 135544}],
        operations={
            "post": {
                "operationId": "createWebhook",
                "summary": "Subscribe a URL to events of the campaign",
                "description": "Registering a URL the campaign already has replaces that "
                               "subscription's events. The URL must resolve to public "
                               "addresses (422 otherwise).",
                "security": security,
                "requestBody": body("SubscribeRequest"),
                "responses": {
                    "200": _reply("Created (or updated)", "WebhookCreated"),
                    **common,
                    "409": _reply("Invalid event type <name>; nothing stored", message),
                },
            },
            "delete": {
                "operationId": "deleteWebhook",
                "summary": "Remove the campaign's subscription for a URL",
                "security": security,
                "requestBody": body("UnsubscribeRequest"),
                "responses": {
                    "200": _reply("Deleted", "WebhookDeleted"),
                    **common,
                    "404": _reply("The campaign has no subscription for this URL", message),
                },
            },
            "get": {
                "operationId": "listWebhooks",
                "summary": "List the campaign's subscriptions",
                "security": security,
                "responses": {
                    "200": _reply("The subscriptions, by referenceId", "WebhookList"),
                    "401": common["401"], "503": common["503"],
                },
            },
        },
    )


def _ops(spec: APISpec) -> None:
    spec.path(path="/api/openapi.json", operations={"get": {
        "operationId": "openapi", "summary": "This document",
        "responses": {"200": {"description": "OpenAPI 3 document",
                              "content": {"application/json": {"schema": {"type": "object"}}}}},
    }})
    spec.path(path="/healthz", operations={"get": {
        "operationId": "healthz", "summary": "The process is up",
        "responses": {"200": _reply("Up", "Health")},
    }})
    spec.path(path="/readyz", operations={"get": {
        "operationId": "readyz", "summary": "Redis answers",
        "responses": {"200": _reply("Ready", "Health"),
                      "503": _reply("Redis unreachable", "Health")},
    }})


def _version() -> str:
    try:
        return metadata.version("leadrelay")
    except metadata.PackageNotFoundError:
        return "0.0.0"
