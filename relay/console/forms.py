"""The console's queries and forms, validated at the edge with marshmallow like the APIs'
request bodies. Each ``load_*`` takes the request's multidict and answers a plain dict, or
raises :class:`FormError` with a message for the page."""

from __future__ import annotations

from typing import Any

from marshmallow import EXCLUDE, Schema, ValidationError, fields, validate
from werkzeug.datastructures import MultiDict

from relay.operations.dead_letters import ReplayRequest

PAGE_SIZE = 25


class FormError(Exception):
    """A query or form the console cannot act on; ``message`` is shown on the page."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class SignInForm(Schema):
    class Meta:
        unknown = EXCLUDE

    api_key = fields.String(load_default="", validate=validate.Length(max=512))
    next = fields.String(load_default="", validate=validate.Length(max=2000))


class SearchQuery(Schema):
    class Meta:
        unknown = EXCLUDE

    q = fields.String(load_default="", validate=validate.Length(max=320))
    page = fields.Integer(load_default=1, validate=validate.Range(min=1, max=10_000))


class DeadLetterQuery(Schema):
    class Meta:
        unknown = EXCLUDE

    destination = fields.String(load_default="", validate=validate.Length(max=200))
    page = fields.Integer(load_default=1, validate=validate.Range(min=1, max=10_000))


class ReplayForm(Schema):
    """What to replay, as the admin API takes it (``ids``, ``destination`` or ``all``), and
    whether the operator has confirmed."""

    class Meta:
        unknown = EXCLUDE

    ids = fields.List(fields.String(validate=validate.Length(min=1, max=600)),
                      load_default=list, validate=validate.Length(max=10_000))
    destination = fields.String(load_default="", validate=validate.Length(max=200))
    all = fields.Boolean(load_default=False)
    confirmed = fields.Boolean(load_default=False)
    back = fields.String(load_default="", validate=validate.Length(max=2000))


class PauseForm(Schema):
    class Meta:
        unknown = EXCLUDE

    reason = fields.String(load_default="", validate=validate.Length(max=500))
    back = fields.String(load_default="", validate=validate.Length(max=2000))


class OverviewQuery(Schema):
    class Meta:
        unknown = EXCLUDE

    seen = fields.String(load_default="", validate=validate.Length(max=64))


class DestinationsQuery(Schema):
    class Meta:
        unknown = EXCLUDE

    q = fields.String(load_default="", validate=validate.Length(max=200))
    campaign = fields.String(load_default="", validate=validate.Length(max=100))
    page = fields.Integer(load_default=1, validate=validate.Range(min=1, max=10_000))


class SubscriptionsQuery(Schema):
    class Meta:
        unknown = EXCLUDE

    campaign = fields.String(load_default="", validate=validate.Length(max=100))


def _load(schema: Schema, data: MultiDict[str, str], lists: tuple[str, ...] = ()
          ) -> dict[str, Any]:
    flat: dict[str, Any] = {k: v for k, v in data.items() if k not in lists}
    for name in lists:
        flat[name] = [v for v in data.getlist(name) if v]
    try:
        loaded: dict[str, Any] = schema.load(flat)
    except ValidationError as exc:
        fields_wrong = ", ".join(sorted(str(k) for k in exc.messages))
        raise FormError(f"Invalid {fields_wrong}.") from None
    return loaded


def load_sign_in(data: MultiDict[str, str]) -> dict[str, Any]:
    return _load(SignInForm(), data)


def load_search(data: MultiDict[str, str]) -> dict[str, Any]:
    return _load(SearchQuery(), data)


def load_dead_letter_query(data: MultiDict[str, str]) -> dict[str, Any]:
    return _load(DeadLetterQuery(), data)


def load_replay(data: MultiDict[str, str]) -> dict[str, Any]:
    form = _load(ReplayForm(), data, lists=("ids",))
    try:  # exactly one of ids, destination, all: the admin API's own rule
        ReplayRequest().load({k: form[k] for k in ("ids", "destination", "all") if form[k]})
    except ValidationError:
        raise FormError("Choose dead letters to replay (or a destination).") from None
    return form


def load_pause(data: MultiDict[str, str]) -> dict[str, Any]:
    return _load(PauseForm(), data)


def load_overview(data: MultiDict[str, str]) -> dict[str, Any]:
    return _load(OverviewQuery(), data)


def load_destinations(data: MultiDict[str, str]) -> dict[str, Any]:
    return _load(DestinationsQuery(), data)


def load_subscriptions(data: MultiDict[str, str]) -> dict[str, Any]:
    return _load(SubscriptionsQuery(), data)
