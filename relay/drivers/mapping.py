"""Pieces shared by the SaaS drivers (HubSpot, Mailchimp, Klaviyo).

Field mappings: YAML maps a destination field to a dotted path in the lead payload::

    properties:
      company: custom_fields.company   # added
      kickofflabs_rank: null           # a default turned off (``false`` works too)

:func:`mapping_field` validates that shape and :func:`resolve_mapping` merges it over the
driver's defaults. :func:`lead_kind` says what kind of value a lead path holds (a whole number,
yes/no, text, an object, a list) when KickoffLabs declares it, so a driver can refuse at
``check-config`` a mapping its vendor's field could never take, and :func:`as_text` writes a
value as the string an API that wants strings accepts. :func:`raise_vendor_error` keeps the
generic status classification of ``relay.drivers.http.raise_for_status`` while letting a driver
say what went wrong in its vendor's words.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any, Literal, NoReturn

from marshmallow import ValidationError, fields

from relay.core.dotted import dotted_get
from relay.core.errors import PermanentDeliveryError, RetryableDeliveryError
from relay.drivers.http import HttpResponse, RetryableAnswers, raise_for_status


class _LeadPathOrOff(fields.Field):
    """A dotted lead path, or ``null`` / ``false`` to turn a default mapping off."""

    def _deserialize(self, value: Any, attr: str | None, data: Any, **kwargs: Any) -> Any:
        if value is None or value is False:
            return None
        if not isinstance(value, str) or not value.strip():
            raise ValidationError(
                "must be a dotted lead path (e.g. custom_fields.company), or null to turn it off"
            )
        return value.strip()


def mapping_field() -> fields.Dict:
    """The marshmallow field for a ``properties`` / ``merge_fields`` mapping."""
    return fields.Dict(
        keys=fields.String(validate=lambda key: bool(key.strip())),
        values=_LeadPathOrOff(allow_none=True),
        load_default=dict,
    )


def resolve_mapping(
    defaults: Mapping[str, str], configured: Mapping[str, str | None] | None
) -> dict[str, str]:
    """The defaults overlaid by the configured mapping; a ``None`` path removes the field."""
    merged: dict[str, str | None] = {**defaults, **(configured or {})}
    return {name: path for name, path in merged.items() if path}


def apply_mapping(mapping: Mapping[str, str], payload: Mapping[str, Any]) -> dict[str, Any]:
    """Destination field -> lead value. Absent (``None``) values are left out rather than sent
    as blanks, so an event that lacks a field never clears what the destination already has."""
    values: dict[str, Any] = {}
    for name, path in mapping.items():
        value = dotted_get(payload, path)
        if value is not None:
            values[name] = value
    return values


def lead_email(payload: Mapping[str, Any]) -> str | None:
    email = payload.get("email")
    if isinstance(email, str) and email.strip():
        return email.strip()
    return None


def raise_vendor_error(
    response: HttpResponse, what: str, message: str, retry_after: float | None = None,
    retryable: RetryableAnswers | None = None,
) -> NoReturn:
    """Raise the error ``raise_for_status`` would (retryable or permanent, ``gone`` kept), but
    with ``message``; ``retry_after`` replaces the ``Retry-After`` header when given;
    ``retryable`` is the driver's own retryable answers (``Driver.retryable_answers``)."""
    try:
        raise_for_status(response, what, retryable)
    except RetryableDeliveryError as exc:
        wait = retry_after if retry_after is not None else exc.retry_after
        raise RetryableDeliveryError(message, exc.status_code, wait) from None
    except PermanentDeliveryError as exc:
        raise PermanentDeliveryError(message, exc.status_code, gone=exc.gone) from None
    # A 2xx that the vendor still reports as failed (HubSpot's 207 multi-status).
    raise PermanentDeliveryError(message, response.status)


# -- what a lead path holds --------------------------------------------------------------------

Kind = Literal["integer", "boolean", "text", "object", "list"]

#: The kinds of the lead fields KickoffLabs declares (``relay/ingress/lead_schema.py`` types
#: them at the ingress; tests/unit keeps the two in step). A path not here (``custom_fields.x``,
#: ``utm.utm_source``) may hold anything: its values are converted, or refused, one by one.
LEAD_KINDS: dict[str, Kind] = {
    **dict.fromkeys(
        ("id", "campaign_id", "list_id", "rank", "rank_relative_position", "counter",
         "lead_count", "contest_score", "contest_score_rank",
         "contest_score_rank_relative_position", "referrals", "subscription_number",
         "parent_id", "unverified_leads.direct", "unverified_leads.indirect",
         "verified_leads.direct", "verified_leads.indirect", "influence.direct",
         "influence.indirect", "__score_change.points", "__score_change.contest_score",
         "__tagged.tag_id", "__tagged.points", "__reward_level.reward_level_id",
         "__reward_level.required_points"), "integer"),
    **dict.fromkeys(
        ("enhanced", "anonymous", "verified", "verified_email", "verified_phone_number",
         "waitlisted", "opted_out", "sms_opted_out", "fraudulent",
         "__fraudulent.excluded", "__fraudulent.fraudulent", "__reward_level.emailed"),
        "boolean"),
    **dict.fromkeys(
        ("social_id", "email", "phone_number", "first_name", "given_name", "family_name",
         "display_name", "avatar", "social_url", "when", "redirect_url", "thankyou_url",
         "status_url", "ip", "referrer", "__tagged.name", "__score_change.message",
         "__referral.social_id", "__referral.email", "__referral.phone_number",
         "__reward_level.subject"), "text"),
    **dict.fromkeys(
        ("custom_fields", "utm", "unsubscribe_url", "unverified_leads", "verified_leads",
         "influence", "__referral", "__fraudulent", "__score_change", "__tagged",
         "__reward_level"), "object"),
    **dict.fromkeys(("completed_actions", "tags"), "list"),
}


def lead_kind(path: str) -> Kind | None:
    """The kind of value KickoffLabs declares at ``path``, or None when it does not say."""
    return LEAD_KINDS.get(path)


def as_text(value: Any) -> str:
    """A value as an API that wants strings takes it: ``true``/``false`` for yes/no, numbers
    in their decimal form, objects and lists as compact JSON."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, dict | list):
        return json.dumps(value, separators=(",", ":"))
    return str(value)
