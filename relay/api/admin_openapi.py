"""The admin API's part of the OpenAPI document (:mod:`relay.api.admin`'s operations).

Request bodies and query parameters come from the schemas the views load with, so the bounds
the server enforces are the bounds documented; response bodies are described by the schemas
below, which say what the views answer (they build plain dicts).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from apispec import APISpec
from marshmallow import INCLUDE, Schema, fields, validate

from relay.api.admin import (
    DeadLettersQuery,
    DeliveriesQuery,
    EraseRequest,
    PauseRequest,
)
from relay.operations.dead_letters import ReplayRequest
from relay.store.deliveries import RECENT_STATUSES


class DeliveryItemSchema(Schema):
    event_id = fields.String(required=True)
    destination = fields.String(required=True)
    status = fields.String(required=True, validate=validate.OneOf(RECENT_STATUSES), metadata={
        "description": "A skipped delivery is listed as delivered."})
    at = fields.Float(required=True, metadata={"description": "When its state last changed "
                                                              "(epoch seconds)."})
    attempts = fields.Integer(required=True, metadata={"description": "Attempts made so far."})
    updated_at = fields.Float(required=True, metadata={"description": "The same as at."})
    last_status = fields.Integer(metadata={
        "description": "The HTTP status of the last attempt, when it got an answer."})
    last_error = fields.String(metadata={
        "description": "What the last attempt's failure said (or a successful answer's "
                       "detail)."})
    next_attempt_at = fields.Float(metadata={"description": "retrying: when it is due."})
    crashes = fields.Integer(metadata={
        "description": "Attempts whose worker died before recording them."})


class DeliveryListSchema(Schema):
    deliveries = fields.List(fields.Nested(DeliveryItemSchema), required=True)
    next_cursor = fields.String(required=True, allow_none=True, metadata={
        "description": "Pass as cursor for the next page; null on the last page."})


class DeadLetterSchema(Schema):
    event_id = fields.String(required=True)
    destination = fields.String(required=True)
    reason = fields.String(required=True)
    attempts = fields.Integer(required=True)
    status_code = fields.Integer(required=True, allow_none=True, metadata={
        "description": "The HTTP status of the last attempt (null without an answer)."})
    dead_at = fields.Float(required=True, allow_none=True)
    event = fields.String(allow_none=True, metadata={"description": "The event's name."})


class DeadLetterListSchema(Schema):
    dead_letters = fields.List(fields.Nested(DeadLetterSchema), required=True)


class ReplayResultSchema(Schema):
    queued = fields.Integer(required=True)


STATES = ["active", "paused", "open", "half-open", "slowed"]


class DestinationHealthSchema(Schema):
    name = fields.String(required=True)
    type = fields.String(required=True, allow_none=True)
    state = fields.String(required=True, validate=validate.OneOf(STATES))
    success_rate = fields.Float(required=True, allow_none=True)
    delivered = fields.Integer(required=True)
    failed = fields.Integer(required=True)
    consecutive_failures = fields.Integer(required=True)
    last_error = fields.String(required=True, allow_none=True)
    last_error_at = fields.Float(required=True, allow_none=True)
    last_success_at = fields.Float(required=True, allow_none=True)
    queued = fields.Integer(required=True, metadata={
        "description": "Deliveries in its lane or in flight, and those waiting behind an "
                       "earlier event of their lead (ordering: per_lead)."})
    waiting = fields.Integer(required=True, metadata={
        "description": "Of those, how many wait behind an earlier event of their lead."})
    parked = fields.Integer(required=True)
    retrying = fields.Integer(required=True)
    dead = fields.Integer(required=True)
    paused_at = fields.Float(required=True, allow_none=True, metadata={
        "description": "When an operator paused it; null unless paused."})
    paused_reason = fields.String(required=True, allow_none=True, metadata={
        "description": "The reason given with the pause (may be empty); null unless paused."})


class DestinationListSchema(Schema):
    destinations = fields.List(fields.Nested(DestinationHealthSchema), required=True)


class DestinationStateSchema(Schema):
    destination = fields.String(required=True)
    state = fields.String(required=True, validate=validate.OneOf(STATES))
    released = fields.Integer(metadata={"description": "resume: held deliveries released"})


class AttemptSchema(Schema):
    destination = fields.String(required=True)
    attempt = fields.Integer(required=True)
    outcome = fields.String(required=True, metadata={
        "description": "delivered, skipped, retrying or dead"})
    status_code = fields.Integer(metadata={"description": "The answer's HTTP status."})
    latency_ms = fields.Float()
    error = fields.String(metadata={"description": "What went wrong, or what a successful "
                                                   "answer said."})
    next_attempt_at = fields.Float(metadata={"description": "retrying: when it is due."})
    at = fields.Float(required=True)


class DeliveryStateSchema(Schema):
    """A delivery's state (the fields of :class:`DeliveryItemSchema` and, while it is in
    flight, the lease's end), with its attempts and its dead letter."""

    class Meta:
        unknown = INCLUDE

    status = fields.String(required=True, metadata={
        "description": "pending, inflight, delivered, skipped, retrying, dead, or unknown"})
    attempts = fields.Integer()
    updated_at = fields.Float()
    attempts_log = fields.List(fields.Nested(AttemptSchema), required=True)
    dead_letter = fields.Dict(metadata={"description": "dead: the dead letter (reason, "
                                                       "attempts, status_code, dead_at)."})


class EventDetailSchema(Schema):
    event_id = fields.String(required=True)
    name = fields.String(required=True, allow_none=True)
    source = fields.String(required=True, allow_none=True)
    payload = fields.Dict(required=True, allow_none=True)
    received_at = fields.Float(required=True, allow_none=True)
    admitted_at = fields.Float(required=True, allow_none=True)
    duplicates = fields.Integer(required=True)
    destinations = fields.Dict(keys=fields.String(), values=fields.Nested(DeliveryStateSchema),
                               required=True, metadata={"description": "By destination name."})


class ErasureSchema(Schema):
    email = fields.String(required=True)
    event_ids = fields.List(fields.String(), required=True)
    removed = fields.Dict(keys=fields.String(), values=fields.Integer(), required=True)


_DOCUMENTED = {
    "ReplayRequest": ReplayRequest, "PauseRequest": PauseRequest, "EraseRequest": EraseRequest,
    "DeliveryList": DeliveryListSchema, "DeadLetterList": DeadLetterListSchema,
    "ReplayResult": ReplayResultSchema, "DestinationList": DestinationListSchema,
    "DestinationState": DestinationStateSchema, "EventDetail": EventDetailSchema,
    "Erasure": ErasureSchema,
}


def _iter_ops() -> Iterator[tuple[str, list[dict[str, Any]], dict[str, Any]]]:
    def reply(description: str, schema: str) -> dict[str, Any]:
        return {"description": description, "content": {"application/json": {"schema": schema}}}

    def error(description: str) -> dict[str, Any]:
        return reply(description, "Error")

    unavailable = {**error("Redis is unavailable; retry"),
                   "headers": {"Retry-After": {"schema": {"type": "integer"}}}}
    common = {"401": error("Missing or invalid API key"), "503": unavailable}
    bad_query = {"400": error("A query parameter is not a number, out of its bounds, or "
                              "given twice (details name it)")}
    bad_body = {
        "400": error("The body is not UTF-8 JSON, or not a JSON object"),
        "413": error("Body over RELAY_MAX_BODY_BYTES"),
        "422": error("Invalid fields (details name them)"),
    }
    missing = {"404": error("Not found")}

    def path_param(name: str) -> list[dict[str, Any]]:
        return [{"name": name, "in": "path", "required": True, "schema": {"type": "string"}}]

    def body(schema: str, required: bool = True) -> dict[str, Any]:
        return {"required": required, "content": {"application/json": {"schema": schema}}}

    def links(reply: dict[str, Any], source: str, **targets: str) -> dict[str, Any]:
        """``reply`` with links: a parameter of each target operation taken from the first
        item of this answer's list (what a client, and a stateful fuzzer, does next)."""
        return {**reply, "links": {
            target: {"operationId": target,
                     "parameters": {parameter: f"$response.body#/{source}"}}
            for target, parameter in targets.items()}}

    yield "/api/events/{event_id}", path_param("event_id"), {"get": {
        "operationId": "getEvent", "summary": "An event, its deliveries and their attempts",
        "responses": {"200": reply("The event", "EventDetail"), **common, **missing}}}
    yield "/api/deliveries", [], {"get": {
        "operationId": "listDeliveries", "summary": "A destination's latest deliveries",
        "parameters": [{"in": "query", "schema": DeliveriesQuery}],
        "responses": {"200": links(reply("Newest first", "DeliveryList"), "deliveries/0/event_id",
                                   getEvent="event_id"),
                      **common, **bad_query}}}
    yield "/api/dead-letters", [], {"get": {
        "operationId": "listDeadLetters", "summary": "Dead letters, newest first",
        "parameters": [{"in": "query", "schema": DeadLettersQuery}],
        "responses": {"200": links(reply("Dead letters", "DeadLetterList"),
                                   "dead_letters/0/event_id", getEvent="event_id"),
                      **common, **bad_query}}}
    yield "/api/dead-letters/replay", [], {"post": {
        "operationId": "replayDeadLetters", "summary": "Queue dead letters for delivery again",
        "requestBody": body("ReplayRequest"),
        "responses": {"200": reply("Queued", "ReplayResult"), **common, **bad_body,
                      "404": error("No such destination")}}}
    yield "/api/destinations", [], {"get": {
        "operationId": "listDestinations", "summary": "Destinations with state and health",
        "responses": {"200": links(reply("Destinations", "DestinationList"),
                                   "destinations/0/name", listDeliveries="destination",
                                   listDeadLetters="destination"),
                      **common}}}
    for action in ("pause", "resume"):
        yield f"/api/destinations/{{name}}/{action}", path_param("name"), {"post": {
            "operationId": f"{action}Destination",
            "summary": "Hold every delivery to the destination" if action == "pause" else
            "Deliver again, releasing held deliveries oldest first",
            "requestBody": body("PauseRequest" if action == "pause" else "Empty", False),
            "responses": {"200": reply("Its state", "DestinationState"),
                          **common, **missing, **bad_body}}}
    yield "/api/erase", [], {"post": {
        "operationId": "eraseLead", "summary": "Erase every trace of a lead (GDPR)",
        "requestBody": body("EraseRequest"),
        "responses": {"200": reply("What was removed", "Erasure"), **common, **bad_body}}}


def document(spec: APISpec, security: list[dict[str, list[str]]]) -> None:
    """Add the admin API to the OpenAPI document (:func:`relay.api.openapi.build_spec` calls
    it), every operation under ``security`` (the API-key schemes)."""
    for name, schema in _DOCUMENTED.items():
        spec.components.schema(name, schema=schema)
    spec.components.schema("Empty", {"type": "object", "description": "No fields are read."})
    replay = spec.components.schemas["ReplayRequest"]
    replay["oneOf"] = [{"required": [name]} for name in ("ids", "destination", "all")]
    for path, parameters, operations in _iter_ops():
        for operation in operations.values():
            operation["security"] = security
        spec.path(path=path, parameters=parameters or None, operations=operations)
