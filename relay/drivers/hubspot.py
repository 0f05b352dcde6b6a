"""HubSpot CRM: upsert the lead as a contact, keyed by email (CRM v3 batch upsert).

YAML::

    - name: crm
      type: hubspot
      access_token: ${HUBSPOT_TOKEN}        # private app token, scope crm.objects.contacts.write
      events: [new_signup, referral, score_change, verified]
      properties:                           # contact property -> dotted lead path
        company: custom_fields.company
        kickofflabs_rank: null              # turn a default off

The ``kickofflabs_*`` defaults are custom contact properties: create them in HubSpot (single-
line text / number / checkbox) or turn them off, else HubSpot refuses the whole contact.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from marshmallow import Schema, fields, validate

from relay.core.models import DeliveryResult, Destination, LeadEvent
from relay.drivers.base import Driver
from relay.drivers.http import HttpClient, HttpResponse, parse_retry_after
from relay.drivers.mapping import (
    apply_mapping,
    lead_email,
    mapping_field,
    raise_vendor_error,
    resolve_mapping,
)

UPSERT_PATH = "/crm/v3/objects/contacts/batch/upsert"

DEFAULT_PROPERTIES: dict[str, str] = {
    "firstname": "first_name",
    "lastname": "family_name",
    "phone": "phone_number",
    "kickofflabs_rank": "rank",
    "kickofflabs_referral_link": "social_url",
    "kickofflabs_score": "contest_score",
    "kickofflabs_verified": "verified",
    "kickofflabs_opted_out": "opted_out",
}

# HubSpot counts requests in a rolling ten-second window; when a 429 names no wait, one
# window is the shortest wait that can help.
_DEFAULT_RATE_LIMIT_WAIT = 10.0
# The daily allowance resets at midnight in the account's own time zone, which the API does
# not tell us: wait an hour and let the retry schedule take it from there.
_DAILY_LIMIT_WAIT = 3600.0
# HubSpot's error-handling guide: 423 Locked comes from syncing a large volume in a short time
# and the lock lasts 2 seconds, so wait at least that; 477 Migration in Progress comes while
# the account moves between data-hosting locations, with a Retry-After (up to about 24 hours).
RETRYABLE_ANSWERS: dict[int, float | None] = {423: 2.0, 477: None}


class HubSpotOptions(Schema):
    access_token = fields.String(required=True, validate=validate.Length(min=1))
    properties = mapping_field()


class HubSpotDriver(Driver):
    type_name = "hubspot"
    # HubSpot answers 429 past 100 requests per rolling 10 s (private apps, Free and Starter).
    # The relay's windows are fixed and aligned: 9 a second puts at most 99 in any 10 s.
    default_rate_limit = "9/s"
    default_concurrency = 4  # requests in flight: 4 x ~100-300 ms is far above 9/s
    max_batch = 100  # the batch endpoints' limit: inputs per request
    default_batch_wait = 0.2
    options_schema = HubSpotOptions
    secret_fields = frozenset({"access_token"})
    default_base_url = "https://api.hubapi.com"
    retryable_answers = RETRYABLE_ANSWERS

    def __init__(self, destination: Destination, http: HttpClient | None = None) -> None:
        super().__init__(destination, http)
        self.properties = resolve_mapping(DEFAULT_PROPERTIES, self.options.get("properties"))
        self.properties.pop("email", None)  # the email is the upsert key, always sent as is

    def send(self, event: LeadEvent) -> DeliveryResult:
        if event.name == "deleted":
            # Removing a lead from a campaign is no reason to delete a CRM contact.
            return DeliveryResult(skipped=True, detail="deleted events leave HubSpot contacts")
        email = lead_email(event.payload)
        if email is None:
            return DeliveryResult(
                skipped=True, detail="lead has no email; HubSpot contacts are upserted by email"
            )
        properties = {
            name: _property_value(value)
            for name, value in apply_mapping(self.properties, event.payload).items()
        }
        properties["email"] = email
        body = {"inputs": [{"idProperty": "email", "id": email, "properties": properties}]}
        response = self.http.request(
            "POST",
            self.base_url + UPSERT_PATH,
            body=json.dumps(body).encode(),
            headers={
                "Authorization": f"Bearer {self.options['access_token']}",
                "Content-Type": "application/json",
                "Accept": "application/json",
            },
            timeout=self.timeout,
        )
        answer = response.json_object()
        errors = answer.get("errors") if isinstance(answer, dict) else None
        if not 200 <= response.status < 300 or errors:
            self._raise(response, answer)
        results = answer.get("results") if isinstance(answer, dict) else None
        contact = results[0] if isinstance(results, list) and results else {}
        verb = "created" if contact.get("new") else "updated"
        return DeliveryResult(
            status_code=response.status, detail=f"contact {contact.get('id', email)} {verb}"
        )

    def _raise(self, response: HttpResponse, answer: Any) -> None:
        status = response.status
        detail = _error_text(answer) or response.text(200).strip()
        where = f"HubSpot answered HTTP {status}"
        if status == 401:
            message = (
                f"{where}: the access_token was refused (expired, revoked or mistyped); "
                f"put a valid private app token in access_token. {detail}"
            )
        elif status == 403:
            message = (
                f"{where}: the access_token lacks permission; give the private app the "
                f"crm.objects.contacts.write scope. {detail}"
            )
        elif status == 429:
            message = f"{where}: rate limit reached. {detail}"
            raise_vendor_error(response, "HubSpot", message.strip(), _rate_limit_wait(response))
        elif status == 423:
            message = f"{where}: records locked by a burst of writes; retrying. {detail}"
        elif status == 477:
            message = f"{where}: the account is migrating between data centres; retrying. {detail}"
        elif "PROPERTY_DOESNT_EXIST" in detail or "does not exist" in detail:
            message = (
                f"{where}: {detail}. Create the contact property in HubSpot, or turn it off "
                f"with `<property>: null` under properties:"
            )
        else:
            message = f"{where}: {detail}" if detail else where
        raise_vendor_error(response, "HubSpot", message.strip(),
                           retryable=self.retryable_answers)


def _property_value(value: Any) -> str:
    """HubSpot property values are strings: checkboxes want "true"/"false"."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, dict | list):
        return json.dumps(value, separators=(",", ":"))
    return str(value)



def _error_text(answer: Any) -> str:
    """HubSpot's error body (``message`` + ``category``), or the first error of a batch."""
    if not isinstance(answer, dict):
        return ""
    errors = answer.get("errors")
    if isinstance(errors, list) and errors and isinstance(errors[0], dict):
        answer = errors[0]
    message = str(answer.get("message") or "")
    category = answer.get("category")
    return f"{category}: {message}" if category and message else message


def _rate_limit_wait(response: HttpResponse) -> float:
    """Seconds to wait after a 429, from ``Retry-After`` or HubSpot's rate-limit headers."""
    headers: Mapping[str, str] = response.headers
    explicit = parse_retry_after(headers.get("Retry-After"))
    if explicit is not None:
        return explicit
    answer = response.json_object()
    policy = str(answer.get("policyName", "")) if isinstance(answer, dict) else ""
    if policy == "DAILY" or headers.get("X-HubSpot-RateLimit-Daily-Remaining") == "0":
        return _DAILY_LIMIT_WAIT
    if headers.get("X-HubSpot-RateLimit-Secondly-Remaining") == "0":
        return 1.0
    interval = headers.get("X-HubSpot-RateLimit-Interval-Milliseconds")
    try:
        return max(1.0, float(interval) / 1000.0) if interval else _DEFAULT_RATE_LIMIT_WAIT
    except ValueError:
        return _DEFAULT_RATE_LIMIT_WAIT
