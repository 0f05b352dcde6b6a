"""The admin API under ``/api`` (API keys from ``RELAY_API_KEYS``, as for the subscription API).

Answers "did lead X reach the CRM, and if not why" (``GET /api/events/<id>``), lists deliveries
and dead letters, replays dead letters, pauses and resumes destinations, reports their health,
and erases a lead. The operations themselves live in :mod:`relay.operations`, which the
console and the CLI call too; the views only parse, authenticate and answer JSON.
"""

from __future__ import annotations

import json
import re
from typing import Any

from flask import Blueprint, Response, current_app, jsonify, request
from marshmallow import EXCLUDE, Schema, ValidationError, fields, validate

from relay.api.auth import require_api_key
from relay.core.errors import BadRequest, NotFound, ValidationFailed
from relay.core.redaction import redacted, redacted_record
from relay.operations import dead_letters, destinations, events, leads
from relay.operations.context import OperatorContext
from relay.operations.dead_letters import ReplayRequest, destination_name
from relay.store.deliveries import RECENT_STATUSES

bp = Blueprint("admin", __name__, url_prefix="/api")
MAX_PAGE = 500


# -- request schemas --------------------------------------------------------------------------
# The contract of every admin endpoint (also its OpenAPI document):
#   400  the request cannot be read: a query parameter that is not a number, out of its bounds,
#        or given twice; a body that is not UTF-8 JSON, or not a JSON object
#   401  no valid API key          404  no such event / destination (pause, resume, replay)
#   413  body over RELAY_MAX_BODY_BYTES          422  a JSON object whose fields are invalid
#   503  Redis unavailable (Retry-After)
# Every error body is {"error": "<what went wrong>", "details": <per-field problems or null>}.

MAX_OFFSET = 1_000_000
_INTEGER = re.compile(r"-?[0-9]{1,16}")
_NUMBER = re.compile(r"-?[0-9]{1,20}(?:\.[0-9]{1,20})?(?:[eE][-+]?[0-9]{1,3})?")


class QueryInteger(fields.Integer):
    """An integer query parameter in plain decimal digits (``int()`` would also take ``" 5"``,
    ``"1_0"`` and ``"٣"``)."""

    def _deserialize(self, value: Any, attr: str | None, data: Any, **kwargs: Any) -> int:
        if not isinstance(value, str) or not _INTEGER.fullmatch(value):
            raise self.make_error("invalid")
        result: int = super()._deserialize(value, attr, data, **kwargs)
        return result


class QueryNumber(fields.Float):
    """A finite decimal number (a cursor), without the spellings ``float()`` also reads."""

    def _deserialize(self, value: Any, attr: str | None, data: Any, **kwargs: Any) -> float:
        if not isinstance(value, str) or not _NUMBER.fullmatch(value):
            raise self.make_error("invalid")
        result: float = super()._deserialize(value, attr, data, **kwargs)
        return result


class DeliveriesQuery(Schema):
    class Meta:
        unknown = EXCLUDE  # api_key may come as a query parameter

    destination = destination_name(required=True)
    status = fields.String(validate=validate.OneOf(RECENT_STATUSES))
    limit = QueryInteger(load_default=50, validate=validate.Range(min=1, max=MAX_PAGE),
                         metadata={"description": "Page size (default 50)."})
    cursor = QueryNumber(metadata={"description": "next_cursor of the previous page"})


class DeadLettersQuery(Schema):
    class Meta:
        unknown = EXCLUDE

    destination = destination_name(metadata={"description": "Only this destination's."})
    limit = QueryInteger(load_default=100, validate=validate.Range(min=1, max=MAX_PAGE),
                         metadata={"description": "Page size (default 100)."})
    offset = QueryInteger(load_default=0, validate=validate.Range(min=0, max=MAX_OFFSET),
                          metadata={"description": "Dead letters to skip, newest first."})


class PauseRequest(Schema):
    class Meta:
        unknown = EXCLUDE

    reason = fields.String(load_default="", validate=validate.Length(max=500))


class EraseRequest(Schema):
    class Meta:
        unknown = EXCLUDE

    email = fields.Email(required=True, validate=validate.Length(max=320))


def _query(schema: Schema) -> dict[str, Any]:
    args = request.args
    repeated = sorted(key for key in args if len(args.getlist(key)) > 1)
    if repeated:
        raise BadRequest("invalid query parameters",
                         {key: ["given more than once"] for key in repeated})
    try:
        loaded: dict[str, Any] = schema.load(args.to_dict())
    except ValidationError as exc:
        raise BadRequest("invalid query parameters", exc.normalized_messages()) from None
    return loaded


def _body(schema: Schema) -> dict[str, Any]:
    """The JSON object body (none at all reads as ``{}``), loaded with ``schema``."""
    raw = request.get_data(cache=True)
    data: Any = {}
    if raw.strip():
        try:
            data = _JSON.decode(raw.decode("utf-8"))
        except UnicodeDecodeError as exc:
            raise BadRequest(f"the body is not valid UTF-8 (byte {exc.start})") from None
        except RecursionError:
            raise BadRequest("the body is JSON nested too deeply") from None
        except ValueError as exc:
            raise BadRequest(f"the body is not valid JSON: {exc}") from None
        if not isinstance(data, dict):
            raise BadRequest(f"the body must be a JSON object, not {_json_type(data)}")
    try:
        loaded: dict[str, Any] = schema.load(data)
    except ValidationError as exc:
        raise ValidationFailed("invalid request", exc.normalized_messages()) from None
    return loaded


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


_JSON = json.JSONDecoder(parse_constant=_reject_constant)


def _json_type(value: Any) -> str:
    return {list: "an array", str: "a string", bool: "a boolean", type(None): "null"}.get(
        type(value), "a number")


# -- views ------------------------------------------------------------------------------------


@bp.before_request
def _authenticate() -> None:
    require_api_key()


def _ctx() -> Any:
    return current_app.extensions["relay"]


def _ops() -> OperatorContext:
    ctx = _ctx()
    return OperatorContext(ctx.redis, ctx.database, ctx.settings.retention)


def _require_destination(name: str, ops: OperatorContext | None = None) -> None:
    """404 unless the relay knows ``name`` (configured, subscribed, counted; or, given
    ``ops``, one with dead letters left to replay)."""
    ctx = _ctx()
    if destinations.destination_known(ctx.redis, ctx.config, name):
        return
    if ops is None or not dead_letters.has_dead_letters(ops, name):
        raise NotFound(f"unknown destination {name!r}")


# What the views answer is redacted by the relay's one policy (relay.core.redaction), as the
# console and the CLI show it: the payload by field names and texts, the rest by texts.


@bp.get("/events/<event_id>")
def get_event(event_id: str) -> Response:
    detail = events.event_detail(_ops(), event_id)
    if detail is None:
        raise NotFound(f"no event {event_id!r} (never received, expired or erased)")
    return jsonify(redacted_record(detail))


@bp.get("/deliveries")
def get_deliveries() -> Response:
    query = _query(DeliveriesQuery())
    return jsonify(redacted(events.list_deliveries(
        _ops(), query["destination"], query.get("status"), query["limit"], query.get("cursor")),
        by_name=False))


@bp.get("/dead-letters")
def get_dead_letters() -> Response:
    query = _query(DeadLettersQuery())
    return jsonify({"dead_letters": redacted(dead_letters.list_dead_letters(
        _ops(), query.get("destination"), query["limit"], query["offset"]), by_name=False)})


@bp.post("/dead-letters/replay")
def post_replay() -> Response:
    body = _body(ReplayRequest())
    ops = _ops()
    if body.get("destination"):
        _require_destination(body["destination"], ops)  # as pause and resume answer
    targets = dead_letters.replay_targets(ops, body.get("ids") or (), body.get("destination"),
                                          bool(body.get("all")))
    return jsonify({"queued": dead_letters.replay_dead_letters(ops, targets)})


@bp.get("/destinations")
def get_destinations() -> Response:
    ctx = _ctx()
    types = {d.name: d.type for d in ctx.config.destinations}
    names = destinations.known_destinations(ctx.redis, types)
    return jsonify({"destinations": redacted(
        destinations.destination_health(_ops(), names, types), by_name=False)})


@bp.post("/destinations/<name>/pause")
def pause(name: str) -> Response:
    reason = _body(PauseRequest())["reason"]  # a bad body is refused before anything changes
    _require_destination(name)
    destinations.pause(_ctx().redis, name, reason)
    return jsonify({"destination": name, "state": "paused"})


@bp.post("/destinations/<name>/resume")
def resume(name: str) -> Response:
    _body(_NO_FIELDS)
    _require_destination(name)
    return jsonify(destinations.resume(_ctx().redis, name))


@bp.post("/erase")
def erase() -> Response:
    email = _body(EraseRequest())["email"]
    return jsonify(leads.erase(_ops(), email).to_json())


class _NoFields(Schema):
    class Meta:
        unknown = EXCLUDE


_NO_FIELDS = _NoFields()

