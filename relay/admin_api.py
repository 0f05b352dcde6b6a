"""The admin API under ``/api`` (API keys from ``RELAY_API_KEYS``, as for the subscription API).

Answers "did lead X reach the CRM, and if not why" (``GET /api/events/<id>``), lists deliveries
and dead letters, replays dead letters, pauses and resumes destinations, reports their health,
and erases a lead. The operations themselves are plain functions over Redis (``event_detail``,
``replay_dead_letters``, ``destination_health`` …) so that ``relay`` CLI commands
(:mod:`relay.cli_ops`) share them; the views only parse, authenticate and answer JSON.
"""

from __future__ import annotations

import json
import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import redis
from apispec import APISpec
from flask import Blueprint, Response, current_app, jsonify, request
from marshmallow import EXCLUDE, Schema, ValidationError, fields, validate, validates_schema

from relay.auth import require_api_key
from relay.config import RelayConfig
from relay.erase import erase_lead
from relay.errors import NotFound, ValidationFailed
from relay.gates import (
    PAUSED_KEY,
    PauseGate,
    destination_state,
    parked_deliveries,
    queued_tasks,
)
from relay.store import (
    DEAD_INDEX,
    DEAD_KEY,
    PREFIX,
    RECENT_STATUSES,
    DeliveryStore,
    delivery_key,
    recent_key,
)
from relay.taskqueue import DELIVER, TaskQueue

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


def replay_dead_letters(store: DeliveryStore, queue: TaskQueue, targets: Iterable[ReplayTarget],
                        on_each: Callable[[ReplayTarget, bool], None] | None = None) -> int:
    """Take each dead letter (atomically: two replays of one dead letter queue it once) and
    queue a fresh ``relay.deliver``. Returns how many were queued."""
    queued = 0
    for target in targets:
        event = store.take_dead_letter(target.event_id, target.destination)
        if event is not None:
            queue.publish(DELIVER, [target.event_id, target.destination],
                          f"('{target.event_id}', '{target.destination}')")
            queued += 1
        if on_each is not None:
            on_each(target, event is not None)
    return queued


def known_destinations(client: redis.Redis, configured: Iterable[str]) -> list[str]:
    """Configured destinations, plus any with counters (API subscriptions) or paused."""
    names = set(configured)
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
    queued, parked (retry delays and holds), retrying and dead deliveries of each destination."""
    names = list(names)
    queued: Counter[str] = Counter()
    for _, task, args in queued_tasks(client):
        if task == DELIVER and len(args) >= 2:
            queued[str(args[1])] += 1
    parked = Counter(p.destination for p in parked_deliveries(client))
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
            "queued": queued[name],
            "parked": parked[name],
            "retrying": int(answers[2 * i + 1]),
            "dead": dead[name],
        })
    return health


# -- request schemas --------------------------------------------------------------------------


class DeliveriesQuery(Schema):
    class Meta:
        unknown = EXCLUDE

    destination = fields.String(required=True, validate=validate.Length(min=1, max=200))
    status = fields.String(validate=validate.OneOf(RECENT_STATUSES))
    limit = fields.Integer(load_default=50, validate=validate.Range(min=1, max=MAX_PAGE))
    cursor = fields.Float(metadata={"description": "next_cursor of the previous page"})


class ReplayRequest(Schema):
    class Meta:
        unknown = EXCLUDE

    ids = fields.List(fields.String(validate=validate.Length(min=1, max=600)),
                      validate=validate.Length(min=1, max=10_000),
                      metadata={"description": "<event_id>|<destination>, or an event id for "
                                               "all of its dead letters"})
    destination = fields.String(validate=validate.Length(min=1, max=200))
    all = fields.Boolean()

    @validates_schema
    def _one_choice(self, data: dict[str, Any], **kwargs: Any) -> None:
        chosen = [k for k in ("ids", "destination", "all") if data.get(k)]
        if len(chosen) != 1:
            raise ValidationError("give exactly one of ids, destination or all: true")


class PauseRequest(Schema):
    class Meta:
        unknown = EXCLUDE

    reason = fields.String(load_default="", validate=validate.Length(max=500))


class EraseRequest(Schema):
    class Meta:
        unknown = EXCLUDE

    email = fields.Email(required=True)


def _load(schema: Schema, data: Any) -> dict[str, Any]:
    try:
        loaded: dict[str, Any] = schema.load(data if isinstance(data, dict) else {})
    except ValidationError as exc:
        raise ValidationFailed("invalid request", exc.messages) from None
    return loaded


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
    query = _load(DeliveriesQuery(), request.args.to_dict())
    return jsonify(list_deliveries(_ctx().redis, query["destination"], query.get("status"),
                                   query["limit"], query.get("cursor")))


@bp.get("/dead-letters")
def get_dead_letters() -> Response:
    limit = min(max(request.args.get("limit", 100, type=int) or 100, 1), MAX_PAGE)
    offset = max(request.args.get("offset", 0, type=int) or 0, 0)
    letters = _store().dead_letters(request.args.get("destination") or None, limit, offset)
    return jsonify({"dead_letters": [_without_payload(d) for d in letters]})


def _without_payload(letter: dict[str, Any]) -> dict[str, Any]:
    shown = {k: v for k, v in letter.items() if k != "event"}
    shown["event"] = (letter.get("event") or {}).get("name")
    return shown


@bp.post("/dead-letters/replay")
def post_replay() -> Response:
    body = _load(ReplayRequest(), request.get_json(silent=True))
    store = _store()
    targets = replay_targets(store, body.get("ids") or (), body.get("destination"),
                             bool(body.get("all")))
    return jsonify({"queued": replay_dead_letters(store, _ctx().queue, targets)})


@bp.get("/destinations")
def get_destinations() -> Response:
    ctx = _ctx()
    types = {d.name: d.type for d in ctx.config.destinations}
    names = known_destinations(ctx.redis, types)
    return jsonify({"destinations": destination_health(ctx.redis, names, types)})


@bp.post("/destinations/<name>/pause")
def pause(name: str) -> Response:
    _require_destination(name)
    reason = _load(PauseRequest(), request.get_json(silent=True))["reason"]
    PauseGate(_ctx().redis).pause(name, reason)
    return jsonify({"destination": name, "state": "paused"})


@bp.post("/destinations/<name>/resume")
def resume(name: str) -> Response:
    _require_destination(name)
    client = _ctx().redis
    released = PauseGate(client).resume(name)
    return jsonify({"destination": name, "state": destination_state(client, name),
                    "released": released})


@bp.post("/erase")
def erase() -> Response:
    email = _load(EraseRequest(), request.get_json(silent=True))["email"]
    return jsonify(erase_lead(_ctx().redis, email).to_json())


# -- OpenAPI ----------------------------------------------------------------------------------


def _iter_ops() -> Iterator[tuple[str, list[dict[str, Any]], dict[str, Any]]]:
    def reply(description: str, properties: dict[str, Any]) -> dict[str, Any]:
        return {"description": description, "content": {"application/json": {"schema": {
            "type": "object", "properties": properties}}}}

    obj: dict[str, Any] = {"type": "object"}
    arr: dict[str, Any] = {"type": "array", "items": obj}
    error = {"description": "Error", "content": {"application/json": {"schema": "Error"}}}
    common = {"401": {**error, "description": "Missing or invalid API key"}}
    invalid = {"422": {**error, "description": "Invalid request"}}
    missing = {"404": {**error, "description": "Not found"}}

    def path_param(name: str) -> list[dict[str, Any]]:
        return [{"name": name, "in": "path", "required": True, "schema": {"type": "string"}}]

    def body(schema: str) -> dict[str, Any]:
        return {"required": True, "content": {"application/json": {"schema": schema}}}

    yield "/api/events/{event_id}", path_param("event_id"), {"get": {
        "operationId": "getEvent", "summary": "An event, its deliveries and their attempts",
        "responses": {"200": reply("The event", {
            "event_id": {"type": "string"}, "name": {"type": "string"}, "payload": obj,
            "duplicates": {"type": "integer"}, "destinations": obj}), **common, **missing}}}
    yield "/api/deliveries", [], {"get": {
        "operationId": "listDeliveries", "summary": "A destination's latest deliveries",
        "parameters": [{"name": n, "in": "query", "required": n == "destination",
                        "schema": s} for n, s in (
            ("destination", {"type": "string"}),
            ("status", {"type": "string", "enum": list(RECENT_STATUSES)}),
            ("limit", {"type": "integer", "minimum": 1, "maximum": MAX_PAGE}),
            ("cursor", {"type": "number"}))],
        "responses": {"200": reply("Newest first", {"deliveries": arr,
                                                    "next_cursor": {"type": "string"}}),
                      **common, **invalid}}}
    yield "/api/dead-letters", [], {"get": {
        "operationId": "listDeadLetters", "summary": "Dead letters, newest first",
        "parameters": [{"name": n, "in": "query", "required": False, "schema": {"type": t}}
                       for n, t in (("destination", "string"), ("limit", "integer"),
                                    ("offset", "integer"))],
        "responses": {"200": reply("Dead letters", {"dead_letters": arr}), **common}}}
    yield "/api/dead-letters/replay", [], {"post": {
        "operationId": "replayDeadLetters", "summary": "Queue dead letters for delivery again",
        "requestBody": body("ReplayRequest"),
        "responses": {"200": reply("Queued", {"queued": {"type": "integer"}}),
                      **common, **invalid}}}
    yield "/api/destinations", [], {"get": {
        "operationId": "listDestinations", "summary": "Destinations with state and health",
        "responses": {"200": reply("Destinations", {"destinations": arr}), **common}}}
    for action in ("pause", "resume"):
        yield f"/api/destinations/{{name}}/{action}", path_param("name"), {"post": {
            "operationId": f"{action}Destination",
            "summary": "Hold every delivery to the destination" if action == "pause" else
            "Deliver again, releasing held deliveries oldest first",
            **({"requestBody": {**body("PauseRequest"), "required": False}}
               if action == "pause" else {}),
            "responses": {"200": reply("Its state", {"destination": {"type": "string"},
                                                     "state": {"type": "string"},
                                                     "released": {"type": "integer"}}),
                          **common, **missing}}}
    yield "/api/erase", [], {"post": {
        "operationId": "eraseLead", "summary": "Erase every trace of a lead (GDPR)",
        "requestBody": body("EraseRequest"),
        "responses": {"200": reply("What was removed", {"email": {"type": "string"},
                                                        "removed": obj}),
                      **common, **invalid}}}


def document(spec: APISpec) -> None:
    """Add the admin API to the OpenAPI document (called by :func:`relay.openapi.build_spec`)."""
    for name, schema in (("ReplayRequest", ReplayRequest), ("PauseRequest", PauseRequest),
                         ("EraseRequest", EraseRequest)):
        spec.components.schema(name, schema=schema)
    security = [{"apiKeyParameter": []}, {"apiKeyBearer": []}]
    for path, parameters, operations in _iter_ops():
        for operation in operations.values():
            operation["security"] = security
        spec.path(path=path, parameters=parameters or None, operations=operations)
