"""The OpenAPI 3 document of the relay's HTTP API, served at ``GET /api/openapi.json``.

Request and response bodies are generated from the same marshmallow schemas the views load and
dump with (apispec's marshmallow plugin), so the document cannot drift from the validation; the
operations (paths, parameters, status codes) are listed here, and ``tests/test_openapi.py``
checks that every route of the app under ``/v2``, ``/hooks`` and ``/api`` is documented with its
methods. A new API blueprint adds its operations in :func:`build_spec`.

``tests/integration/test_contract.py`` holds the server to this document with Schemathesis
(every check, several seeds, the repository's ``schemathesis.toml``): what the schemas cannot
say by themselves is added here (the lead's exact typing and identity rule, its form encoding,
the one-of rules of request bodies, the links a client follows), and every status an operation
can answer is listed with the error body of its family (``Error`` for the relay, ``Message``
under ``/v2``), the HTTP server's own answers (414, 431) included. API keys are credentials,
described by the security schemes only, never as a parameter or a body field a client fills
in.
"""

from __future__ import annotations

from importlib import metadata
from typing import Any

from apispec import APISpec
from apispec.ext.marshmallow import MarshmallowPlugin
from flask import Blueprint, Response, current_app, jsonify
from marshmallow import Schema, fields

from relay.api import subscriptions as subs
from relay.api.auth import KEY_PARAMETER
from relay.core.events import ALIASES, EVENTS, LEAD_IDENTITY_FIELDS
from relay.core.nesting import MAX_DEPTH
from relay.ingress.lead_schema import FORM_FALSE, FORM_TRUE, LeadBoolean, LeadInteger, LeadSchema
from relay.ingress.lead_schema import _Typed as _TypedSchema

bp = Blueprint("openapi", __name__)
OPENAPI_PATH = "/api/openapi.json"
_CACHE = "relay.openapi"

_BODY_TYPES = ("application/json", "application/x-www-form-urlencoded")
#: The subscription and admin APIs: a key as a bearer token or as ?api_key= (or a body field).
API_KEY_SECURITY: list[dict[str, list[str]]] = [{"apiKeyBearer": []}, {"apiKeyParameter": []}]
_EVENT_NAME = {"type": "string", "enum": [*EVENTS, *ALIASES]}


class IngressAcceptedSchema(Schema):
    status = fields.String(required=True, metadata={"example": "accepted"})
    event_id = fields.String(required=True, metadata={"example": "evt_4f0c…"})


class ErrorSchema(Schema):
    error = fields.String(required=True)
    details = fields.Raw(allow_none=True)


class HealthSchema(Schema):
    status = fields.String(required=True)


class HistoryLagSchema(Schema):
    backlog = fields.Integer(required=True, metadata={
        "description": "History records waiting in Redis to be written to the database"})
    lag_seconds = fields.Float(required=True, metadata={
        "description": "Age of the oldest of them (0 when none waits)"})


class ReadinessSchema(Schema):
    status = fields.String(required=True)
    redis = fields.String(metadata={"description": "Why Redis does not answer (503 only)"})
    history = fields.Nested(HistoryLagSchema, metadata={
        "description": "The history writer's lag (shown, not judged: the ingress needs only "
                       "Redis)"})


@bp.get(OPENAPI_PATH)
def openapi_json() -> Response:
    document = current_app.extensions.get(_CACHE)
    if document is None:
        document = current_app.extensions[_CACHE] = build_document()
    return jsonify(document)


def build_document() -> dict[str, Any]:
    """The document as served: :func:`build_spec`'s operations, each with the answers the
    HTTP server gives before the app sees the request (:func:`_server_answers`)."""
    document: dict[str, Any] = build_spec().to_dict()
    _server_answers(document)
    return document


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
    plugin.converter.add_attribute_function(_lead_types)  # type: ignore[union-attr]
    _security(spec)
    for name, schema in {
        "Lead": LeadSchema,
        "IngressAccepted": IngressAcceptedSchema,
        "Error": ErrorSchema,
        "Health": HealthSchema,
        "Readiness": ReadinessSchema,
        "SubscribeRequest": subs.SubscribeRequest,
        "UnsubscribeRequest": subs.UnsubscribeRequest,
        "Message": subs.MessageSchema,
        "WebhookCreated": subs.WebhookCreatedSchema,
        "WebhookDeleted": subs.WebhookDeletedSchema,
        "Webhook": subs.WebhookSchema,
        "WebhookList": subs.WebhookListSchema,
    }.items():
        spec.components.schema(name, schema=schema)
    lead = spec.components.schemas["Lead"]
    lead["properties"]["__event"].update(minLength=1, pattern=r"\S")
    lead["anyOf"] = [{"required": [name], "properties": {name: _IDENTITY[name]}}
                     for name in LEAD_IDENTITY_FIELDS]
    spec.components.schema("LeadForm", _lead_form())
    subscribe = spec.components.schemas["SubscribeRequest"]
    subscribe["anyOf"] = [{"required": ["event"]}, {"required": ["events"]}]
    for keyed in ("SubscribeRequest", "UnsubscribeRequest"):
        # The key is a credential (the apiKeyParameter and apiKeyBearer schemes), not a field
        # a client fills in with data: the views still read an api_key body field.
        spec.components.schemas[keyed]["properties"].pop(KEY_PARAMETER, None)
        spec.components.schemas[keyed]["description"] = (
            f"{spec.components.schemas[keyed].get('description', '')} The API key may also "
            f"come as an {KEY_PARAMETER} field of the body (see the security schemes).").strip()
    _ingress(spec)
    _subscriptions(spec)
    _ops(spec)
    from relay.api import admin_openapi  # imports the admin API; keep it out of import time

    admin_openapi.document(spec, API_KEY_SECURITY)
    return spec


def _event_names(self: Any, field: fields.Field, ret: dict[str, Any], **kwargs: Any
                 ) -> dict[str, Any]:
    if isinstance(field, subs.EventNames):
        return {"oneOf": [_EVENT_NAME, {"type": "array", "items": _EVENT_NAME, "minItems": 1,
                                        "maxItems": subs.MAX_EVENTS}],
                "description": "A catalogue name or an array of them (a comma-separated "
                               "string is read too); an unknown name is a 409."}
    return {}


# How the lead schema types values (relay.ingress.lead_schema), said in the document: an
# integer or its decimal digits, a boolean or its form spellings, and "" (null) for any field
# that is not a string. Identity fields count only when they hold something.
_DIGITS = r"^-?[0-9]{1,30}$"
_INTEGER = {"oneOf": [{"type": "integer"}, {"type": "string", "pattern": _DIGITS}]}
_BOOLEAN = {"oneOf": [{"type": "boolean"},
                      {"type": "string", "enum": [*FORM_TRUE, *FORM_FALSE]}]}
_BLANK = {"type": "string", "enum": [""]}
_IDENTITY = {"social_id": {"type": "string", "minLength": 1}, "id": _INTEGER,
             "email": {"type": "string", "minLength": 1},
             "phone_number": {"type": "string", "minLength": 1}}


def _lead_form() -> dict[str, Any]:
    """The lead as a form body: every value a string, typed the way relay.ingress.lead_schema
    reads it; objects and lists in bracket notation (``custom_fields[company]=…``,
    ``tags[0][id]=42``, or ``tags[][id]=42``), and an empty value of any field of the lead
    means null."""
    blank_or_digits = {"type": "string", "pattern": r"^(-?[0-9]{1,30})?$"}
    properties: dict[str, Any] = {}
    for name, field in LeadSchema().fields.items():
        if name == "__event":
            properties[name] = {"type": "string", "minLength": 1, "pattern": r"\S"}
        elif isinstance(field, LeadInteger):
            properties[name] = blank_or_digits
        elif isinstance(field, LeadBoolean):
            properties[name] = {"type": "string", "enum": [*FORM_TRUE, *FORM_FALSE, ""]}
        elif isinstance(field, fields.String | fields.Raw) and type(field) in (
                fields.String, fields.Raw):
            properties[name] = {"type": "string"}
        else:
            properties[name] = {**_BLANK, "description": f"Send its members as {name}[…]=…; "
                                                         "the plain key only as empty (null)."}
    identity = {name: {"type": "string", "minLength": 1} for name in LEAD_IDENTITY_FIELDS}
    identity["id"] = {"type": "string", "pattern": _DIGITS}
    return {
        "type": "object",
        "description": _lead_form.__doc__,
        "properties": properties,
        "additionalProperties": {"type": "string"},
        "required": ["__event"],
        "anyOf": [{"required": [name], "properties": {name: identity[name]}}
                  for name in LEAD_IDENTITY_FIELDS],
    }


def _lead_types(self: Any, field: fields.Field, ret: dict[str, Any], **kwargs: Any
                ) -> dict[str, Any]:
    if not isinstance(getattr(field, "parent", None), _TypedSchema):
        return {}
    if isinstance(field, LeadInteger | LeadBoolean):
        kind = _INTEGER if isinstance(field, LeadInteger) else _BOOLEAN
        ret.pop("type", None)
        ret.pop("format", None)
        ret["oneOf"] = [*kind["oneOf"], _BLANK]
    elif isinstance(field, fields.Nested):
        # apispec says "nullable object or the block"; the block or "" (null) is what is meant.
        ref = next(item for item in ret.pop("anyOf", ret.pop("allOf", [ret])) if "$ref" in item)
        ret.pop("$ref", None)
        ret.update(nullable=True, oneOf=[ref, _BLANK])
    elif isinstance(field, fields.Dict | fields.List):
        shape = {k: v for k, v in ret.items() if k not in ("nullable", "description")}
        for key in shape:
            del ret[key]
        ret["oneOf"] = [shape, _BLANK]
    return {}


def _security(spec: APISpec) -> None:
    # Both schemes carry the same kind of key (one of RELAY_API_KEYS). A request may carry a key
    # in several places, and then every one of them must be a valid key (relay.api.auth).
    spec.components.security_scheme(
        "apiKeyBearer", {"type": "http", "scheme": "bearer",
                         "description": "An API key from RELAY_API_KEYS as Authorization: "
                                        "Bearer <key> (the last token of the Authorization or "
                                        "Authentication header is the key)."})
    spec.components.security_scheme(
        "apiKeyParameter", {"type": "apiKey", "in": "query", "name": "api_key",
                            "description": "An API key from RELAY_API_KEYS as ?api_key=<key>; "
                                           "also read from an api_key field of a form or JSON "
                                           "body. Every key a request carries must be valid."})
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
                 "description": "The sender's event id (printable, at most 256 characters); "
                                "Idempotency-Key wins when both are given.",
                 "schema": {"type": "string", "maxLength": 256,
                            "pattern": "^[\\x20-\\x7e\\xa1-\\xac\\xae-\\xff]*$"}}
                for header in ("Idempotency-Key", "webhook-id")
            ],
            "requestBody": {"required": True, "content": {
                "application/json": {"schema": "Lead"},
                "application/x-www-form-urlencoded": {"schema": "LeadForm"},
            }},
            "responses": {
                "202": _reply("Stored; it will be delivered", "IngressAccepted"),
                "400": _reply("The body cannot be parsed, nests objects and arrays more "
                              f"than {MAX_DEPTH} levels deep, or gives a field twice", error),
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
    security = API_KEY_SECURITY

    def body(schema: str) -> dict[str, Any]:
        return {"required": True,
                "description": "The fields may come as query parameters instead (KickoffLabs "
                               "clients send both ways); a request with neither is a 422.",
                "content": {kind: {"schema": schema} for kind in _BODY_TYPES}}

    unavailable = {**_reply("Redis is unavailable; retry", message),
                   "headers": {"Retry-After": {"schema": {"type": "integer"}}}}
    reads = {
        "401": _reply("Missing or invalid API key", message),
        "404": _reply("No such path: campaign_id is not a decimal number", message),
        "503": unavailable,
    }
    common = {
        **reads,
        "400": _reply("A JSON body that is not a JSON object, or a parameter given twice",
                      message),
        "413": _reply("Body over RELAY_MAX_BODY_BYTES", message),
        "422": _reply("Invalid parameters (errors names them)", message),
    }
    spec.path(
        path="/v2/{campaign_id}/outbound-webhook",
        parameters=[{"name": "campaign_id", "in": "path", "required": True,
                     "schema": {"type": "integer", "minimum": 0}, "example": 135544}],
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
                    "200": {**_reply("Created (or updated)", "WebhookCreated"), "links": {
                        "listWebhooks": {"operationId": "listWebhooks", "parameters": {
                            "campaign_id": "$request.path.campaign_id"}},
                        "deleteWebhook": {"operationId": "deleteWebhook", "parameters": {
                            "campaign_id": "$request.path.campaign_id"},
                            "requestBody": {"url": "$request.body#/url"}},
                    }},
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
                    "404": _reply("The campaign has no subscription for this URL, or no "
                                  "such path", message),
                },
            },
            "get": {
                "operationId": "listWebhooks",
                "summary": "List the campaign's subscriptions",
                "security": security,
                "responses": {
                    "200": _reply("The subscriptions, by referenceId", "WebhookList"),
                    **reads,
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
        "responses": {"200": _reply("Ready", "Readiness"),
                      "503": _reply("Redis unreachable", "Readiness")},
    }})


# What the HTTP server in front of the app (gunicorn, `relay web`) answers by itself, before
# the app sees the request: every operation can get these.
_SERVER_ANSWERS = {
    "414": "The request line (path and query string) is longer than the HTTP server reads "
           "(4094 bytes); answered by the server, in HTML",
    "431": "The request's header fields are larger than the HTTP server reads (8190 bytes "
           "each, 100 fields); answered by the server, in HTML",
}


def _server_answers(document: dict[str, Any]) -> None:
    """Add to every operation what any request can be answered before its view runs: the HTTP
    server's 414 and 431, and a 413 (body over RELAY_MAX_BODY_BYTES) and a 408 (a body that
    stalled), in the operation's own error shape, wherever the app reads the body (a request
    body, or an API key that may come in it)."""
    html = {"text/html": {"schema": {"type": "string"}}}
    for path, item in document["paths"].items():
        error = "Message" if path.startswith("/v2/") else "Error"
        for method, operation in item.items():
            if method == "parameters":
                continue
            responses = operation["responses"]
            reads_body = "requestBody" in operation or any(
                "apiKeyParameter" in requirement for requirement in operation.get("security", ()))
            shape = {"application/json": {"schema": {"$ref": f"#/components/schemas/{error}"}}}
            if reads_body and "413" not in responses:
                responses["413"] = {"description": "Body over RELAY_MAX_BODY_BYTES",
                                    "content": shape}
            if reads_body and "408" not in responses:
                responses["408"] = {"description": "The body did not arrive within relay web's "
                                                   "--timeout (30 s by default)",
                                    "content": shape}
            for status, description in _SERVER_ANSWERS.items():
                responses.setdefault(status, {"description": description, "content": html})


def _version() -> str:
    try:
        return metadata.version("leadrelay")
    except metadata.PackageNotFoundError:
        return "0.0.0"
