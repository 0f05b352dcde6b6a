"""Marshmallow schemas at the edges: the KickoffLabs lead payload (ingress).

JSON and form bodies load into the same typed payload: known fields are typed (``"268"`` from a
form becomes ``268``), unknown fields are kept verbatim, ``fraudulent`` becomes
``marked_as_fraudulent``.
"""

from __future__ import annotations

from typing import Any

from marshmallow import INCLUDE, Schema, ValidationError, fields, pre_load, validates_schema

from relay.events import LEAD_IDENTITY_FIELDS, canonical_event_name

_INTEGERS = [
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
]
_BOOLEANS = [
    "enhanced",
    "anonymous",
    "verified",
    "verified_email",
    "verified_phone_number",
    "waitlisted",
    "opted_out",
    "sms_opted_out",
    "fraudulent",
]
_STRINGS = [
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
]
_OBJECTS = [
    "unverified_leads",
    "verified_leads",
    "influence",
    "custom_fields",
    "utm",
    "unsubscribe_url",
    "__referral",
    "__fraudulent",
    "__score_change",
    "__tagged",
    "__reward_level",
]
_LISTS = ("completed_actions", "tags")
_TYPED = frozenset(_INTEGERS + _BOOLEANS + list(_OBJECTS) + list(_LISTS))


class _EventName(fields.String):
    def _deserialize(self, value: Any, attr: str | None, data: Any, **kwargs: Any) -> str:
        name = canonical_event_name(super()._deserialize(value, attr, data, **kwargs))
        if not name:
            raise ValidationError("must not be empty")
        return name


def _lead_fields() -> dict[str, fields.Field]:
    declared: dict[str, fields.Field] = {"__event": _EventName(required=True)}
    declared.update({name: fields.Integer(allow_none=True) for name in _INTEGERS})
    declared.update({name: fields.Boolean(allow_none=True) for name in _BOOLEANS})
    declared.update({name: fields.String(allow_none=True) for name in _STRINGS})
    declared.update({name: fields.Dict(allow_none=True) for name in _OBJECTS})
    declared.update({name: fields.List(fields.Raw(), allow_none=True) for name in _LISTS})
    declared["uid"] = fields.Raw(allow_none=True)
    declared["parent_id"] = fields.Raw(allow_none=True)
    return declared


class LeadSchema(Schema.from_dict(_lead_fields(), name="LeadBase")):  # type: ignore[misc]
    """A KickoffLabs lead event: the lead object plus ``__event`` (SPEC §2)."""

    class Meta:
        unknown = INCLUDE

    @pre_load
    def _blank_is_null(self, data: Any, **kwargs: Any) -> Any:
        # Form bodies cannot say null: an empty value of a typed field means "no value".
        if isinstance(data, dict):
            return {
                key: (None if value == "" and key in _TYPED else value)
                for key, value in data.items()
            }
        return data

    @validates_schema
    def _has_identity(self, data: dict[str, Any], **kwargs: Any) -> None:
        if all(data.get(name) in (None, "") for name in LEAD_IDENTITY_FIELDS):
            raise ValidationError(
                f"at least one of {', '.join(LEAD_IDENTITY_FIELDS)} is required", "_lead"
            )
