"""Marshmallow schemas at the edges: the KickoffLabs lead payload (ingress).

JSON and form bodies load into the same typed payload: known fields are typed, unknown fields
are kept verbatim, ``fraudulent`` becomes ``marked_as_fraudulent``. The event blocks
(``__tagged`` …) and the items of ``tags`` are typed too, because the same event sent as JSON
and as a form must be the same event, with the same id and the same payload downstream.

The typing is exact, so the OpenAPI document can say it: an integer field takes a JSON integer
or its decimal digits as a string (``"268"``, what a form carries), not ``1.5`` or ``true``; a
boolean takes ``true`` / ``false`` or the strings ``"true"``, ``"false"``, ``"1"``, ``"0"``; an
empty string in a typed field means null. A form body goes through :func:`load_form_lead`,
where an empty value of *any* declared field (``phone_number=``) is null, as JSON says it, and
an empty item of a declared list (``completed_actions[]=``, Rails' "nothing selected" marker)
is no item.
"""

from __future__ import annotations

import re
from typing import Any

from marshmallow import INCLUDE, Schema, ValidationError, fields, pre_load, validates_schema

from relay.core.events import LEAD_IDENTITY_FIELDS, canonical_event_name

_DECIMAL = re.compile(r"-?[0-9]{1,30}")
FORM_TRUE = ("true", "1")
FORM_FALSE = ("false", "0")


class LeadInteger(fields.Integer):
    """A JSON integer, or its decimal digits as a string (``int()`` alone would also take
    ``1.5`` as 1, ``" 5"``, ``"1_0"``)."""

    def _deserialize(self, value: Any, attr: str | None, data: Any, **kwargs: Any) -> int:
        if type(value) is int:
            return value
        if isinstance(value, str) and _DECIMAL.fullmatch(value):
            return int(value)
        raise self.make_error("invalid")


class LeadBoolean(fields.Boolean):
    """``true`` / ``false``, or the strings form encoders write for them."""

    def _deserialize(self, value: Any, attr: str | None, data: Any, **kwargs: Any) -> bool:
        if type(value) is bool:
            return value
        if value in FORM_TRUE:
            return True
        if value in FORM_FALSE:
            return False
        raise self.make_error("invalid")


def _ints(*names: str) -> dict[str, fields.Field]:
    return {name: LeadInteger(allow_none=True) for name in names}


def _bools(*names: str) -> dict[str, fields.Field]:
    return {name: LeadBoolean(allow_none=True) for name in names}


def _strings(*names: str) -> dict[str, fields.Field]:
    return {name: fields.String(allow_none=True) for name in names}


class _Typed(Schema):
    """Keeps unknown keys; an empty string in a non-string field means null (forms)."""

    class Meta:
        unknown = INCLUDE

    @pre_load
    def _blank_is_null(self, data: Any, **kwargs: Any) -> Any:
        if not isinstance(data, dict):
            return data
        return {
            key: None
            if value == ""
            and not isinstance(self.fields.get(key), fields.String)
            and key in self.fields
            else value
            for key, value in data.items()
        }


def _schema(name: str, declared: dict[str, fields.Field]) -> type[Schema]:
    return _Typed.from_dict(declared, name=name)


def _nested(schema: type[Schema]) -> fields.Nested:
    return fields.Nested(schema, allow_none=True)


_Counts = _schema("LeadCounts", _ints("direct", "indirect"))
_Referral = _schema("ReferralBlock", _strings("social_id", "email", "phone_number"))
_Fraudulent = _schema("FraudulentBlock", _bools("excluded", "fraudulent"))
_ScoreChange = _schema(
    "ScoreChangeBlock", {**_ints("points", "contest_score"), **_strings("message")}
)
_Tagged = _schema("TaggedBlock", {**_ints("tag_id", "points"), **_strings("name")})
_Tag = _schema("Tag", {**_ints("id", "points"), **_strings("name")})
_RewardLevel = _schema(
    "RewardLevelBlock",
    {**_ints("reward_level_id", "required_points"), **_strings("subject"), **_bools("emailed")},
)


class _EventName(fields.String):
    def _deserialize(self, value: Any, attr: str | None, data: Any, **kwargs: Any) -> str:
        name = canonical_event_name(super()._deserialize(value, attr, data, **kwargs))
        if not name:
            raise ValidationError("must not be empty")
        return name


_LEAD_FIELDS: dict[str, fields.Field] = {
    "__event": _EventName(required=True),
    **_ints(
        "id",
        "campaign_id",
        "list_id",
        "rank",
        "rank_relative_position",
        "counter",
        "lead_count",
        "contest_score",
        "contest_score_rank",
        "contest_score_rank_relative_position",
        "referrals",
        "subscription_number",
        "parent_id",
    ),
    **_bools(
        "enhanced",
        "anonymous",
        "verified",
        "verified_email",
        "verified_phone_number",
        "waitlisted",
        "opted_out",
        "sms_opted_out",
        "fraudulent",
    ),
    **_strings(
        "social_id",
        "email",
        "phone_number",
        "first_name",
        "given_name",
        "family_name",
        "display_name",
        "avatar",
        "social_url",
        "when",
        "redirect_url",
        "thankyou_url",
        "status_url",
        "ip",
        "referrer",
    ),
    "uid": fields.Raw(allow_none=True),
    "unverified_leads": _nested(_Counts),
    "verified_leads": _nested(_Counts),
    "influence": _nested(_Counts),
    "custom_fields": fields.Dict(allow_none=True),
    "utm": fields.Dict(allow_none=True),
    "unsubscribe_url": fields.Dict(allow_none=True),
    "completed_actions": fields.List(fields.Raw(allow_none=True), allow_none=True),
    "tags": fields.List(fields.Nested(_Tag), allow_none=True),
    "__referral": _nested(_Referral),
    "__fraudulent": _nested(_Fraudulent),
    "__score_change": _nested(_ScoreChange),
    "__tagged": _nested(_Tagged),
    "__reward_level": _nested(_RewardLevel),
}


class LeadSchema(_schema("LeadBase", _LEAD_FIELDS)):  # type: ignore[misc]
    """A KickoffLabs lead event: the lead object plus ``__event`` (SPEC §2)."""

    @validates_schema
    def _has_identity(self, data: dict[str, Any], **kwargs: Any) -> None:
        if all(data.get(name) in (None, "") for name in LEAD_IDENTITY_FIELDS):
            raise ValidationError(
                f"at least one of {', '.join(LEAD_IDENTITY_FIELDS)} is required", "_lead"
            )


# -- the ingress fast path ----------------------------------------------------------------------
# A JSON body from KickoffLabs already has the declared types; for such a body marshmallow's load
# is an (expensive) identity. Checking the exact types is a tenth of its cost; anything else
# (a string for an int, "" for a null, a bool for an int, an invalid value) goes to marshmallow.


class _Items(dict):  # type: ignore[type-arg]
    """The plan of a list of typed records (``tags``): each item's plan."""


def _plan(schema: type[Schema]) -> dict[str, Any]:
    plan: dict[str, Any] = {}
    for name, field in schema._declared_fields.items():
        if isinstance(field, _EventName):
            plan[name] = "event"
        elif isinstance(field, fields.Nested):
            plan[name] = _plan(field.nested)  # type: ignore[arg-type]
        elif isinstance(field, fields.List) and isinstance(field.inner, fields.Nested):
            plan[name] = _Items(_plan(field.inner.nested))  # type: ignore[arg-type]
        elif isinstance(field, fields.Boolean):
            plan[name] = bool
        elif isinstance(field, fields.Integer):
            plan[name] = int
        elif isinstance(field, fields.String):
            plan[name] = str
        elif isinstance(field, fields.Dict):
            plan[name] = dict
        elif isinstance(field, fields.List):
            plan[name] = list
        else:
            plan[name] = None  # Raw: any value but ""
    return plan


def _already_typed(data: dict[str, Any], plan: dict[str, Any]) -> bool:
    for key, value in data.items():
        kind = plan.get(key, ...)
        if kind is ... or value is None:
            continue  # unknown keys are kept verbatim; every declared field allows null
        if type(value) is kind and kind is not list:
            continue  # the common case: exactly the declared type (a list's items are checked)
        if kind is str or kind == "event":
            if type(value) is not str:
                return False
        elif value == "" and not isinstance(value, bool):
            return False  # "" in a typed field means null: marshmallow's pre_load does that
        elif kind is None:
            continue
        elif isinstance(kind, _Items):
            if type(value) is not list or not all(
                    type(item) is dict and _already_typed(item, kind) for item in value):
                return False
        elif isinstance(kind, dict):
            if type(value) is not dict or not _already_typed(value, kind):
                return False
        elif type(value) is not kind:
            return False
    return True


_PLAN = _plan(LeadSchema)
_SCHEMA = LeadSchema()


def load_lead(data: Any) -> dict[str, Any]:
    """``LeadSchema().load(data)``, without its cost when ``data`` is already typed."""
    if type(data) is dict and _already_typed(data, _PLAN):
        name = data.get("__event")
        if (
            isinstance(name, str)
            and canonical_event_name(name)
            and any(data.get(key) not in (None, "") for key in LEAD_IDENTITY_FIELDS)
        ):
            lead = dict(data)
            lead["__event"] = canonical_event_name(name)
            return lead
    loaded: dict[str, Any] = _SCHEMA.load(data)
    return loaded


def load_form_lead(data: dict[str, Any]) -> dict[str, Any]:
    """:func:`load_lead` for a decoded form body: a form cannot say null or an empty list, so
    an empty value of a declared field is null and an empty item of a declared list is none."""
    return load_lead(_form_blanks(data, _PLAN))


def _form_blanks(data: dict[str, Any], plan: dict[str, Any]) -> dict[str, Any]:
    result: dict[str, Any] = {}
    for key, value in data.items():
        kind = plan.get(key, ...)
        if kind is ...:
            result[key] = value  # unknown: verbatim
        elif value == "":
            result[key] = None
        elif isinstance(kind, _Items) and isinstance(value, list):
            result[key] = [_form_blanks(item, kind) if isinstance(item, dict) else item
                           for item in value if item != ""]
        elif kind is list and isinstance(value, list):
            result[key] = [item for item in value if item != ""]
        elif isinstance(kind, dict) and isinstance(value, dict):
            result[key] = _form_blanks(value, kind)
        else:
            result[key] = value
    return result
