"""``/v2/<campaign_id>/outbound-webhook``: KickoffLabs' subscription API (SPEC §2, §3).

Answers in KickoffLabs' own shapes (``{"message": …}``), not the relay's ``{"error": …}``, so
clients written for KickoffLabs keep working; the blueprint has its own error handlers for that.

Parameters may come as a query string, a form body or a JSON body, merged in that order (later
wins). ``curl -d '{"url": …}'`` without a Content-Type sends JSON labelled as a form, as many
KickoffLabs clients do: a body that parses as a JSON object is read as JSON whatever its label.
Inside one of them a parameter the API reads is given once (``events`` excepted, a list:
``events[]=a&events[]=b``): ``url=a&url=b``, or ``url`` twice in a JSON object, is a 400, as at
the ingress. ``api_key`` has the keys' own rule (:mod:`relay.api.auth`: every key a request
carries must be valid); parameters the API does not read are ignored, however given.
"""

from __future__ import annotations

import json
import logging
from collections import Counter
from datetime import UTC, datetime
from typing import Any

import redis
from flask import Blueprint, Flask, Response, current_app, jsonify, request
from flask.blueprints import BlueprintSetupState
from marshmallow import EXCLUDE, Schema, ValidationError, fields, validate, validates_schema
from werkzeug.datastructures import MultiDict

from relay.api.auth import KEY_PARAMETER, json_object, require_api_key
from relay.core.errors import (
    BadRequest,
    IngressError,
    NotFound,
    UnsafeURLError,
    ValidationFailed,
)
from relay.core.events import EVENTS, canonical_event_name, is_known
from relay.drivers.ssrf_guard import MAX_URL_LENGTH, AddressGuard
from relay.store.subscriptions import Subscription, SubscriptionStore, TooManySubscriptions

log = logging.getLogger("relay.subscriptions")

bp = Blueprint("subscriptions", __name__)
PATH = "/v2/<int:campaign_id>/outbound-webhook"
STORE_EXTENSION = "relay.subscriptions"
GUARD_EXTENSION = "relay.address_guard"
_LIST_PARAMETERS = frozenset({"event", "events"})
MAX_EVENTS = 50


# -- schemas (also the source of the OpenAPI document) -----------------------------------------


class EventNames(fields.Field):
    """One event name or an array of them (a comma-separated string works too), returned as a
    list of canonical names (``fraudulent`` → ``marked_as_fraudulent``). Catalogue membership is
    checked by the view: an unknown name is a 409, not a validation error."""

    def _deserialize(self, value: Any, attr: str | None, data: Any, **kwargs: Any) -> list[str]:
        items = value if isinstance(value, list) else [value]
        names: list[str] = []
        for item in items:
            if not isinstance(item, str):
                raise ValidationError("event names must be strings")
            names.extend(part.strip() for part in item.split(",") if part.strip())
        if not names:
            raise ValidationError("must name at least one event")
        if len(names) > MAX_EVENTS:
            raise ValidationError(f"at most {MAX_EVENTS} event names")
        return names


# KickoffLabs' rule is "starts with http"; written as a pattern so the document carries it.
_STARTS_WITH_HTTP = validate.Regexp(r"^[Hh][Tt][Tt][Pp]",
                                    error="must start with http:// or https://")


class _KeyedRequest(Schema):
    class Meta:
        unknown = EXCLUDE

    api_key = fields.String(
        load_only=True,
        metadata={"description": "An API key from RELAY_API_KEYS; or send it as the last "
                                 "token of an Authorization or Authentication header."},
    )
    url = fields.String(
        required=True,
        validate=[validate.Length(min=1, max=MAX_URL_LENGTH), _STARTS_WITH_HTTP],
        metadata={"description": "The http(s) URL to POST events to; it must resolve to "
                                 "public addresses only.", "example": "https://example.com/kol"},
    )


class SubscribeRequest(_KeyedRequest):
    """``POST``: register a URL (or update the events of a URL already registered)."""

    event = EventNames(metadata={"description": "One event name."})
    events = EventNames(metadata={"description": "One event name or an array of them."})
    source = fields.String(
        allow_none=True, validate=validate.Length(max=200),
        metadata={"description": "Free text naming who registered the hook (e.g. zapier)."},
    )

    @validates_schema
    def _needs_events(self, data: dict[str, Any], **kwargs: Any) -> None:
        if "event" not in data and "events" not in data:
            raise ValidationError("event or events is required", "events")


class UnsubscribeRequest(_KeyedRequest):
    """``DELETE``: remove the campaign's subscription for ``url``."""


class MessageSchema(Schema):
    message = fields.String(required=True)
    errors = fields.Dict(metadata={"description": "Per-field problems (validation errors)."})


class WebhookCreatedSchema(Schema):
    message = fields.String(required=True, metadata={"example": "Webhook Created"})
    referenceId = fields.Integer(required=True, metadata={"example": 123})  # noqa: N815
    events = fields.List(fields.String(validate=validate.OneOf(EVENTS)), required=True)


class WebhookDeletedSchema(Schema):
    message = fields.String(required=True, metadata={"example": "Webhook Deleted"})
    referenceId = fields.Integer(required=True, metadata={"example": 123})  # noqa: N815


class WebhookSchema(Schema):
    referenceId = fields.Integer(required=True)  # noqa: N815
    url = fields.String(required=True)
    events = fields.List(fields.String(validate=validate.OneOf(EVENTS)), required=True)
    source = fields.String(allow_none=True, required=True)
    created_at = fields.String(required=True, metadata={"format": "date-time"})
    state = fields.String(
        required=True, validate=validate.OneOf(["active", "removed"]),
        metadata={"description": "removed: the URL answered 410 Gone; kept for a while so "
                                 "you can see why it stopped receiving events."},
    )
    removed_at = fields.String(metadata={"format": "date-time"})
    removed_reason = fields.String()


class WebhookListSchema(Schema):
    webhooks = fields.List(fields.Nested(WebhookSchema), required=True)


_SUBSCRIBE = SubscribeRequest()
_UNSUBSCRIBE = UnsubscribeRequest()
#: The parameters a request may give once only: those the API reads, but the key and lists.
_ONCE = frozenset(_SUBSCRIBE.fields) - _LIST_PARAMETERS - {KEY_PARAMETER}


# -- views -------------------------------------------------------------------------------------


@bp.record_once
def _setup(state: BlueprintSetupState) -> None:
    app: Flask = state.app
    ctx = app.extensions["relay"]
    app.extensions.setdefault(STORE_EXTENSION,
                              SubscriptionStore(ctx.redis, ctx.settings.retention))
    app.extensions.setdefault(GUARD_EXTENSION, AddressGuard(ctx.settings.allowed_networks))


@bp.post(PATH)
def subscribe(campaign_id: int) -> Response:
    require_api_key()
    parameters = _parameters()
    data = _load(_SUBSCRIBE, parameters)
    given = [*data.get("event", []), *data.get("events", [])]
    for name in given:
        if not is_known(canonical_event_name(name)):
            # KickoffLabs names the offending event and stores nothing.
            return message_response(409, f"Invalid event type {name}")
    events = list(dict.fromkeys(canonical_event_name(name) for name in given))
    url: str = data["url"]
    _check_url(url)
    try:
        subscription, _ = _store().register(campaign_id, url, events, data.get("source"))
    except TooManySubscriptions as exc:
        return message_response(409, str(exc))
    return _dump(WebhookCreatedSchema(), {
        "message": "Webhook Created",
        "referenceId": subscription.reference_id,
        "events": list(subscription.events),
    })


@bp.delete(PATH)
def unsubscribe(campaign_id: int) -> Response:
    require_api_key()
    parameters = _parameters()
    data = _load(_UNSUBSCRIBE, parameters)
    deleted = _store().delete(campaign_id, data["url"])
    if deleted is None:
        raise NotFound(f"No webhook with this url for campaign {campaign_id}")
    return _dump(WebhookDeletedSchema(),
                 {"message": "Webhook Deleted", "referenceId": deleted.reference_id})


@bp.get(PATH)
def list_webhooks(campaign_id: int) -> Response:
    require_api_key()
    return _dump(WebhookListSchema(),
                 {"webhooks": [_webhook(s) for s in _store().list(campaign_id)]})


def _webhook(subscription: Subscription) -> dict[str, Any]:
    item: dict[str, Any] = {
        "referenceId": subscription.reference_id,
        "url": subscription.url,
        "events": list(subscription.events),
        "source": subscription.source,
        "created_at": _iso(subscription.created_at),
        "state": subscription.state,
    }
    if subscription.removed_at is not None:
        item["removed_at"] = _iso(subscription.removed_at)
        item["removed_reason"] = subscription.removed_reason
    return item


# -- helpers -----------------------------------------------------------------------------------


def _store() -> SubscriptionStore:
    store: SubscriptionStore = current_app.extensions[STORE_EXTENSION]
    return store


def _check_url(url: str) -> None:
    guard: AddressGuard = current_app.extensions[GUARD_EXTENSION]
    try:
        guard.check_url(url)
    except UnsafeURLError as exc:
        raise ValidationFailed(f"url refused: {exc.message}") from None


def _parameters() -> dict[str, Any]:
    """Query string, then form fields, then a JSON object body (later sources win)."""
    parameters = _from_multidict(request.args)
    body = request.get_data(cache=True)
    decoded = json_object(body)
    if decoded is not None:
        # A JSON list is one value: given twice, it is two; and a key given twice reached the
        # key check as its last copy only (a JSON object keeps one), so it is refused here.
        twice = json.loads(body, object_pairs_hook=_Members).given_twice & (
            _ONCE | _LIST_PARAMETERS | {KEY_PARAMETER})
        if twice:
            raise _given_twice(min(twice))
        parameters.update(decoded)
    elif body.strip() and request.mimetype == "application/json":
        raise BadRequest("the body is not a JSON object")
    elif request.mimetype in ("application/x-www-form-urlencoded", "multipart/form-data"):
        parameters.update(_from_multidict(request.form))
    return parameters


def _from_multidict(source: MultiDict[str, str]) -> dict[str, Any]:
    # ``events=a&events=b`` and ``events[]=a&events[]=b`` both mean a list; any other key
    # given twice is refused (``api_key`` has its own rule, applied by require_api_key).
    parameters: dict[str, Any] = {}
    for key in source:
        name = key[:-2] if key.endswith("[]") else key
        values = source.getlist(key)
        if name in _LIST_PARAMETERS:  # ``events=a&events[]=b`` is two names as well
            earlier = parameters.get(name, [])
            values = [*(earlier if isinstance(earlier, list) else [earlier]), *values]
            parameters[name] = values if len(values) != 1 else values[0]
        elif name in _ONCE and (len(values) > 1 or name in parameters):
            raise _given_twice(key)
        else:
            parameters[name] = values[-1]
    return parameters


class _Members(dict):  # type: ignore[type-arg]
    """A JSON object, and the names it gives more than once."""

    def __init__(self, pairs: list[tuple[str, Any]]) -> None:
        super().__init__(pairs)
        self.given_twice: set[str] = set()
        if len(self) != len(pairs):
            counts = Counter(name for name, _ in pairs)
            self.given_twice = {name for name, count in counts.items() if count > 1}


def _given_twice(key: str) -> BadRequest:
    return BadRequest(f"{key[:100]}: given more than once", {key[:100]: ["given more than once"]})


def _load(schema: Schema, parameters: dict[str, Any]) -> dict[str, Any]:
    try:
        loaded: dict[str, Any] = schema.load(parameters)
    except ValidationError as exc:
        messages = exc.normalized_messages()
        field, problems = next(iter(messages.items()))
        first = problems[0] if isinstance(problems, list) and problems else problems
        label = "" if field == "_schema" else f"{field}: "
        raise ValidationFailed(f"{label}{first}", messages) from None
    return loaded


def _dump(schema: Schema, data: dict[str, Any]) -> Response:
    return jsonify(schema.dump(data))


def _iso(timestamp: float) -> str:
    return datetime.fromtimestamp(timestamp, UTC).isoformat(timespec="seconds").replace(
        "+00:00", "Z")


def message_response(status: int, message: str, errors: Any = None) -> Response:
    """KickoffLabs' error body, ``{"message": …}``, with ``errors`` (per-field problems, an
    object) when there are any; :func:`relay.app.error_response` uses it for every ``/v2/``
    path, so Flask's own 404 and 405 answers have this shape too."""
    body: dict[str, Any] = {"message": message}
    if errors:
        body["errors"] = errors if isinstance(errors, dict) else {"_request": errors}
    response = jsonify(body)
    response.status_code = status
    return response


# KickoffLabs' shapes for every failure of this blueprint's views (Flask's HTTP errors, raised
# before or inside a view, go through the app's handler, which picks the same shape by path).


@bp.errorhandler(IngressError)
def _ingress_error(exc: IngressError) -> Response:
    return message_response(exc.status_code, exc.message, exc.details)


@bp.errorhandler(redis.RedisError)
def _redis_down(exc: redis.RedisError) -> Response:
    log.error("subscription store unavailable: %s", exc)
    response = message_response(503, "subscriptions are unavailable right now; retry later")
    response.headers["Retry-After"] = "5"
    return response
