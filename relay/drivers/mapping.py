"""Pieces shared by the SaaS drivers (HubSpot, Mailchimp, Klaviyo).

Field mappings: YAML maps a destination field to a dotted path in the lead payload::

    properties:
      company: custom_fields.company   # added
      kickofflabs_rank: null           # a default turned off (``false`` works too)

:func:`mapping_field` validates that shape and :func:`resolve_mapping` merges it over the
driver's defaults. :func:`raise_vendor_error` keeps the generic status classification of
``relay.drivers.http.raise_for_status`` while letting a driver say what went wrong in its vendor's
words.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, NoReturn

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
