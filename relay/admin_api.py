"""The admin API under ``/api`` (API keys from ``RELAY_API_KEYS``, as for the subscription API).

Answers "did lead X reach the CRM, and if not why" (``GET /api/events/<id>``), lists deliveries
and dead letters, replays dead letters, pauses and resumes destinations, reports their health,
and erases a lead. The operations themselves are plain functions over Redis (``event_detail``,
``replay_dead_letters``, ``destination_health`` …) so that ``relay`` CLI commands
(:mod:`relay.cli_ops`) share them; the views only parse, authenticate and answer JSON.
"""

from __future__ import annotations

import json
import re
import time
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import redis
from flask import Blueprint, Response, current_app, jsonify, request
from marshmallow import EXCLUDE, Schema, ValidationError, fields, validate, validates_schema

from relay.auth import require_api_key
from relay.config import RelayConfig
from relay.delivery.gates import PAUSED_KEY, PauseGate, destination_state
from relay.delivery.lanes import Lanes, parked
from relay.delivery.state import (
    DEAD_INDEX,
    DEAD_KEY,
    PREFIX,
    RECENT_STATUSES,
    DeliveryStore,
    delivery_key,
    recent_key,
)
from relay.erase import erase_lead
from relay.errors import BadRequest, NotFound, ValidationFailed

bp = Blueprint("admin", __name__, url_prefix="/api")
MAX_PAGE = 500


# -- operations, shared with the CLI ----------------------------------------------------------


def event_detail(store: DeliveryStore, event_id: str) -> dict[str, Any] | None:
    """The event, each destination's delivery state with its attempts, duplicates and dead
    letters; None when the relay knows nothing of it (never seen, expired or erased)."""
    record = store.event_record(event_id)
    states = store.delivery_states(event_id)
    attempts = store.attempts(event_id)
    dead = {d["destination"]: d for d in _dead_letters_of(store, event_id)}
    if record is None and not states and not attempts and not dead:
        return None
    event = (record or {}).get("event") or next(
        (d["event"] for d in dead.values() if "event" in d), None)
    destinations: dict[str, dict[str, Any]] = {}
    for name in sorted(set(states) | set(dead) | {a["destination"] for a in attempts}):
        entry: dict[str, Any] = dict(states.get(name, {"status": "unknown"}))
        entry["attempts_log"] = [a for a in attempts if a["destination"] == name]
        if name in dead:
            entry["dead_letter"] = {k: v for k, v in dead[name].items() if k != "event"}
        destinations[name] = entry
    return {
        "event_id": event_id,
        "name": event["name"] if event else None,
        "source": event["source"] if event else None,
        "payload": event["payload"] if event else None,
        "received_at": event.get("received_at") if event else None,
        "admitted_at": (record or {}).get("admitted_at"),
        "duplicates": (record or {}).get("duplicates", 0),
        "destinations": destinations,
    }


def _dead_letters_of(store: DeliveryStore, event_id: str) -> list[dict[str, Any]]:
    keys = [m.decode() for m, _ in store.redis.zscan_iter(DEAD_INDEX, match=f"{event_id}|*")]
    keys = [k for k in keys if k.rsplit("|", 1)[0] == event_id]
    if not keys:
        return []
    return [json.loads(raw) for raw in store.redis.hmget(DEAD_KEY, keys) if raw]


def list_deliveries(client: redis.Redis, destination: str, status: str | None = None,
                    limit: int = 50, cursor: float | None = None) -> dict[str, Any]:
    """The destination's latest deliveries, newest first; ``next_cursor`` pages on."""
    statuses = [status] if status else list(RECENT_STATUSES)
    top = f"({cursor}" if cursor is not None else "+inf"
    pipe = client.pipeline(transaction=False)
    for s in statuses:
        pipe.zrevrangebyscore(recent_key(destination, s), top, "-inf", start=0, num=limit,
                              withscores=True)
    found = [(float(score), member.decode(), s)
             for s, page in zip(statuses, pipe.execute(), strict=True) for member, score in page]
    found.sort(reverse=True)
    found = found[:limit]
    pipe = client.pipeline(transaction=False)
    for _, event_id, _ in found:
        pipe.hget(delivery_key(event_id), destination)
    items = []
    for (at, event_id, s), raw in zip(found, pipe.execute(), strict=True):
        state = json.loads(raw) if raw else {}
        items.append({"event_id": event_id, "destination": destination, "status": s,
                      "at": at, **{k: v for k, v in state.items() if k != "status"}})
    next_cursor = str(found[-1][0]) if len(found) == limit else None
    return {"deliveries": items, "next_cursor": next_cursor}


@dataclass(frozen=True)
class ReplayTarget:
    event_id: str
    destination: str


def replay_targets(store: DeliveryStore, ids: Iterable[str] = (), destination: str | None = None,
                   everything: bool = False) -> list[ReplayTarget]:
    """What to replay: ``<event_id>|<destination>`` ids (a bare event id means all of that
    event's dead letters), every dead letter of a destination, or all of them."""
    if everything or destination:
        keys = [m.decode() for m, _ in store.redis.zscan_iter(DEAD_INDEX, count=1000)]
    else:
        keys = []
        for given in ids:
            if "|" in given:
                keys.append(given)
            else:
                keys.extend(f"{given}|{d['destination']}" for d in _dead_letters_of(store, given))
    targets = [ReplayTarget(*key.rsplit("|", 1)) for key in dict.fromkeys(keys)]
    if destination and not everything:
        targets = [t for t in targets if t.destination == destination]
    return targets


def replay_dead_letters(store: DeliveryStore, targets: Iterable[ReplayTarget],
                        on_each: Callable[[ReplayTarget, bool], None] | None = None) -> int:
    """Take each dead letter out and put a fresh delivery into its destination's lane
    (atomically: two replays of one dead letter queue it once; the workers' sweep picks the
    lane up within a second). Returns how many were queued."""
    queued = 0
    for target in targets:
        event = store.replay(target.event_id, target.destination)
        if event is not None:
            queued += 1
        if on_each is not None:
            on_each(target, event is not None)
    return queued


def known_destinations(client: redis.Redis, configured: Iterable[str]) -> list[str]:
    """Configured destinations, every active API subscription, and any with counters (a
    subscription since removed) or paused."""
    from relay.subscriptions import SubscriptionStore

    names = set(configured) | set(SubscriptionStore(client).active_names())
    for key in client.scan_iter(match=f"{PREFIX}stats:*", count=1000):
        names.add(key.decode()[len(PREFIX) + len("stats:"):])
    names.update(k.decode() for k in client.hkeys(PAUSED_KEY))
    return sorted(names)


def destination_known(client: redis.Redis, config: RelayConfig, name: str) -> bool:
    """Whether ``name`` is a destination pause / resume may act on: configured, an API
    subscription, or one Redis has counters for."""
    if config.destination(name) is not None:
        return True
    from relay.subscriptions import SubscriptionStore

    return SubscriptionStore(client).get(name) is not None or name in known_destinations(
        client, ())


def destination_health(client: redis.Redis, names: Iterable[str],
                       types: dict[str, str] | None = None,
                       clock: Callable[[], float] = time.time) -> list[dict[str, Any]]:
    """State (active / paused / open / half-open), success rate, last error and the counts of
    queued (waiting in the lane or in flight), parked (retry delays), retrying and dead
    deliveries of each destination."""
    names = list(names)
    queued = Lanes(client).lane_depths()
    waiting = Counter(destination for _, destination, _ in parked(client))
    dead: Counter[str] = Counter()
    for member, _ in client.zscan_iter(DEAD_INDEX, count=1000):
        dead[member.decode().rsplit("|", 1)[-1]] += 1
    pipe = client.pipeline(transaction=False)
    for name in names:
        pipe.hgetall(f"{PREFIX}stats:{name}")
        pipe.zcard(recent_key(name, "retrying"))
    answers = pipe.execute()
    health = []
    for i, name in enumerate(names):
        stats = {k.decode(): v.decode() for k, v in answers[2 * i].items()}
        delivered, failed = int(stats.get("delivered", 0)), int(stats.get("failed", 0))
        health.append({
            "name": name,
            "type": (types or {}).get(name),
            "state": destination_state(client, name, clock),
            "success_rate": round(delivered / (delivered + failed), 4)
            if delivered + failed else None,
            "delivered": delivered,
            "failed": failed,
            "consecutive_failures": int(stats.get("consecutive_failures", 0)),
            "last_error": stats.get("last_error") or None,
            "last_error_at": float(stats["last_error_at"]) if "last_error_at" in stats else None,
            "last_success_at": float(stats["last_success_at"])
            if "last_success_at" in stats else None,
            "queued": queued.get(name, 0),
            "parked": waiting[name],
            "retrying": int(answers[2 * i + 1]),
            "dead": dead[name],
        })
    return health


# -- request schemas --------------------------------------------------------------------------
# The contract of every admin endpoint (also its OpenAPI document):
#   400  the request cannot be read: a query parameter that is not a number, out of its bounds,
#        or given twice; a body that is not UTF-8 JSON, or not a JSON object
#   401  no valid API key          404  no such event / destination
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


def _destination_name(**kwargs: Any) -> fields.String:
    return fields.String(validate=validate.Length(min=1, max=200), **kwargs)


class DeliveriesQuery(Schema):
    class Meta:
        unknown = EXCLUDE  # api_key may come as a query parameter

    destination = _destination_name(required=True)
    status = fields.String(validate=validate.OneOf(RECENT_STATUSES))
    limit = QueryInteger(load_default=50, validate=validate.Range(min=1, max=MAX_PAGE),
                         metadata={"description": "Page size (default 50)."})
    cursor = QueryNumber(metadata={"description": "next_cursor of the previous page"})


class DeadLettersQuery(Schema):
    class Meta:
        unknown = EXCLUDE

    destination = _destination_name(metadata={"description": "Only this destination's."})
    limit = QueryInteger(load_default=100, validate=validate.Range(min=1, max=MAX_PAGE),
                         metadata={"description": "Page size (default 100)."})
    offset = QueryInteger(load_default=0, validate=validate.Range(min=0, max=MAX_OFFSET),
                          metadata={"description": "Dead letters to skip, newest first."})


class ReplayRequest(Schema):
    class Meta:
        unknown = EXCLUDE

    ids = fields.List(fields.String(validate=validate.Length(min=1, max=600)),
                      validate=validate.Length(min=1, max=10_000),
                      metadata={"description": "<event_id>|<destination>, or an event id for "
                                               "all of its dead letters"})
    destination = _destination_name()
    all = fields.Boolean(validate=validate.Equal(True))

    @validates_schema
    def _one_choice(self, data: dict[str, Any], **kwargs: Any) -> None:
        chosen = [k for k in ("ids", "destination", "all") if k in data]
        if len(chosen) != 1:
            raise ValidationError("give exactly one of ids, destination or all: true")


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


def _store() -> DeliveryStore:
    ctx = _ctx()
    return DeliveryStore(ctx.redis, ctx.settings.retention)


def _require_destination(name: str) -> None:
    ctx = _ctx()
    if not destination_known(ctx.redis, ctx.config, name):
        raise NotFound(f"unknown destination {name!r}")


@bp.get("/events/<event_id>")
def get_event(event_id: str) -> Response:
    detail = event_detail(_store(), event_id)
    if detail is None:
        raise NotFound(f"no event {event_id!r} (never received, expired or erased)")
    return jsonify(detail)


@bp.get("/deliveries")
def get_deliveries() -> Response:
    query = _query(DeliveriesQuery())
    return jsonify(list_deliveries(_ctx().redis, query["destination"], query.get("status"),
                                   query["limit"], query.get("cursor")))


@bp.get("/dead-letters")
def get_dead_letters() -> Response:
    query = _query(DeadLettersQuery())
    letters = _store().dead_letters(query.get("destination"), query["limit"], query["offset"])
    return jsonify({"dead_letters": [_without_payload(d) for d in letters]})


def _without_payload(letter: dict[str, Any]) -> dict[str, Any]:
    shown = {k: v for k, v in letter.items() if k != "event"}
    shown["event"] = (letter.get("event") or {}).get("name")
    return shown


@bp.post("/dead-letters/replay")
def post_replay() -> Response:
    body = _body(ReplayRequest())
    store = _store()
    targets = replay_targets(store, body.get("ids") or (), body.get("destination"),
                             bool(body.get("all")))
    return jsonify({"queued": replay_dead_letters(store, targets)})


@bp.get("/destinations")
def get_destinations() -> Response:
    ctx = _ctx()
    types = {d.name: d.type for d in ctx.config.destinations}
    names = known_destinations(ctx.redis, types)
    return jsonify({"destinations": destination_health(ctx.redis, names, types)})


@bp.post("/destinations/<name>/pause")
def pause(name: str) -> Response:
    reason = _body(PauseRequest())["reason"]  # a bad body is refused before anything changes
    _require_destination(name)
    PauseGate(_ctx().redis).pause(name, reason)
    return jsonify({"destination": name, "state": "paused"})


@bp.post("/destinations/<name>/resume")
def resume(name: str) -> Response:
    _body(_NO_FIELDS)
    _require_destination(name)
    client = _ctx().redis
    released = PauseGate(client).resume(name)
    return jsonify({"destination": name, "state": destination_state(client, name),
                    "released": released})


@bp.post("/erase")
def erase() -> Response:
    email = _body(EraseRequest())["email"]
    return jsonify(erase_lead(_ctx().redis, email).to_json())


class _NoFields(Schema):
    class Meta:
        unknown = EXCLUDE


_NO_FIELDS = _NoFields()

