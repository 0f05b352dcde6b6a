"""Klaviyo: upsert the lead as a profile; subscribe new signups; unsubscribe on opt-out.

YAML::

    - name: klaviyo
      type: klaviyo
      api_key: ${KLAVIYO_PRIVATE_KEY}      # scopes: profiles, lists, subscriptions (write)
      list_id: Y6nRLr                      # optional: subscribe new signups to this list
      properties:                          # profile field -> dotted lead path
        organization: custom_fields.company
        plan: custom_fields.plan           # not a standard attribute: a custom property

Requests use Klaviyo's JSON:API (``application/vnd.api+json``) with a pinned ``revision``,
not the form encoding KickoffLabs uses for webhook URLs that mention klaviyo.

- every event but ``deleted``: ``POST /api/profile-import`` (create or update by email /
  phone number). Keys of ``properties`` that are standard profile attributes go to the
  attributes, every other key to the profile's custom ``properties``.
- the ``subscribe_events`` (default: the two new-signup events) with ``list_id`` set and
  the lead not opted out: ``POST /api/profile-subscription-bulk-create-jobs`` gives email
  marketing consent and adds the profile to the list (the list's double opt-in applies).
- ``opted_out``: ``POST /api/profile-subscription-bulk-delete-jobs`` for email marketing;
  ``phone_number_opt_out`` does the same for SMS.
- ``deleted`` is skipped: deleting a Klaviyo profile is a data-privacy request, not a sync.
"""

from __future__ import annotations

import json
import re
from typing import Any

from marshmallow import Schema, fields, validate

from relay.core.models import DeliveryResult, Destination, LeadEvent
from relay.drivers.base import Driver
from relay.drivers.http import HttpClient, HttpResponse
from relay.drivers.mapping import (
    apply_mapping,
    lead_email,
    mapping_field,
    raise_vendor_error,
    resolve_mapping,
)

#: The API revision this driver was written against (Klaviyo keeps a revision for 2 years).
REVISION = "2026-10-15"
JSON_API = "application/vnd.api+json"
CUSTOM_SOURCE = "leadrelay (KickoffLabs)"

PROFILE_ATTRIBUTES = frozenset(
    {"first_name", "last_name", "phone_number", "external_id", "organization", "locale",
     "title", "image"}
)  # fmt: skip

DEFAULT_PROPERTIES: dict[str, str] = {
    "first_name": "first_name",
    "last_name": "family_name",
    "phone_number": "phone_number",
    "kickofflabs_rank": "rank",
    "kickofflabs_referral_link": "social_url",
    "kickofflabs_score": "contest_score",
    "kickofflabs_verified": "verified",
}

_E164 = re.compile(r"^\+[1-9]\d{6,14}$")
_PHONE_PUNCTUATION = re.compile(r"[\s().-]")


class KlaviyoOptions(Schema):
    api_key = fields.String(required=True, validate=validate.Length(min=1))
    list_id = fields.String(load_default=None, allow_none=True)
    properties = mapping_field()
    subscribe_events = fields.List(
        fields.String(), load_default=lambda: ["new_signup", "new_signup_not_excluded"]
    )
    revision = fields.String(
        load_default=REVISION, validate=validate.Regexp(r"^\d{4}-\d{2}-\d{2}(\.\w+)?$")
    )


class KlaviyoDriver(Driver):
    type_name = "klaviyo"
    default_concurrency = 10  # Klaviyo profile endpoints burst at 75/s: ten in flight stay under
    options_schema = KlaviyoOptions
    secret_fields = frozenset({"api_key"})
    default_base_url = "https://a.klaviyo.com"

    def __init__(self, destination: Destination, http: HttpClient | None = None) -> None:
        super().__init__(destination, http)
        self.properties = resolve_mapping(DEFAULT_PROPERTIES, self.options.get("properties"))
        self.properties.pop("email", None)  # the email always comes from the lead itself
        self.subscribe_events = frozenset(self.options.get("subscribe_events") or ())
        self._headers = {
            "Authorization": f"Klaviyo-API-Key {self.options['api_key']}",
            "revision": self.options.get("revision") or REVISION,
            "Accept": JSON_API,
            "Content-Type": JSON_API,
        }

    def send(self, event: LeadEvent) -> DeliveryResult:
        if event.name == "deleted":
            return DeliveryResult(
                skipped=True,
                detail="deleted events leave Klaviyo profiles (deletion is a privacy request)",
            )
        payload = event.payload
        email = lead_email(payload)
        attributes, notes = self._profile_attributes(payload, email)
        if email is None and "phone_number" not in attributes:
            return DeliveryResult(
                skipped=True, detail="lead has neither an email nor an E.164 phone number"
            )
        response = self._post(
            "/api/profile-import", {"data": {"type": "profile", "attributes": attributes}}
        )
        self._check(response, "profile import")
        data = response.json_object().get("data")
        profile_id = data.get("id") if isinstance(data, dict) else None
        verb = "created" if response.status == 201 else "updated"
        notes.insert(0, f"profile {profile_id or email} {verb}")

        list_id = self.options.get("list_id")
        if event.name == "opted_out":
            notes.append(self._unsubscribe(email, None, list_id, "email"))
        elif event.name == "phone_number_opt_out":
            phone = _e164(payload.get("phone_number"))
            notes.append(self._unsubscribe(None, phone, list_id, "sms"))
        elif event.name in self.subscribe_events and list_id:
            if payload.get("opted_out") is True:
                notes.append("lead opted out: not subscribed")
            elif email is None:
                notes.append("no email: not subscribed")
            else:
                notes.append(self._subscribe(email, list_id))
        return DeliveryResult(status_code=response.status, detail="; ".join(notes))

    def _profile_attributes(
        self, payload: Any, email: str | None
    ) -> tuple[dict[str, Any], list[str]]:
        notes: list[str] = []
        attributes: dict[str, Any] = {}
        custom: dict[str, Any] = {}
        for name, value in apply_mapping(self.properties, payload).items():
            if name == "phone_number":
                phone = _e164(value)
                if phone is None:
                    # Klaviyo refuses the whole profile for a malformed number.
                    notes.append(f"phone number {value!r} is not E.164: left out")
                    continue
                value = phone
            (attributes if name in PROFILE_ATTRIBUTES else custom)[name] = value
        if email is not None:
            attributes["email"] = email
        if custom:
            attributes["properties"] = custom
        return attributes, notes

    def _subscribe(self, email: str, list_id: str) -> str:
        profile = {
            "type": "profile",
            "attributes": {
                "email": email,
                "subscriptions": {"email": {"marketing": {"consent": "SUBSCRIBED"}}},
            },
        }
        body = {
            "data": {
                "type": "profile-subscription-bulk-create-job",
                "attributes": {"custom_source": CUSTOM_SOURCE, "profiles": {"data": [profile]}},
                "relationships": {"list": {"data": {"type": "list", "id": list_id}}},
            }
        }
        self._check(self._post("/api/profile-subscription-bulk-create-jobs", body), "subscribe")
        return f"subscribed to list {list_id}"

    def _unsubscribe(
        self, email: str | None, phone: str | None, list_id: str | None, channel: str
    ) -> str:
        identifier = {"email": email} if channel == "email" else {"phone_number": phone}
        if not next(iter(identifier.values())):
            missing = "email" if channel == "email" else "E.164 phone number"
            return f"no {missing}: {channel} not unsubscribed"
        profile = {
            "type": "profile",
            "attributes": {
                **identifier,
                "subscriptions": {channel: {"marketing": {"consent": "UNSUBSCRIBED"}}},
            },
        }
        data: dict[str, Any] = {
            "type": "profile-subscription-bulk-delete-job",
            "attributes": {"profiles": {"data": [profile]}},
        }
        if list_id:
            data["relationships"] = {"list": {"data": {"type": "list", "id": list_id}}}
        response = self._post("/api/profile-subscription-bulk-delete-jobs", {"data": data})
        self._check(response, "unsubscribe")
        return f"{channel} marketing unsubscribed"

    def _post(self, path: str, body: dict[str, Any]) -> HttpResponse:
        return self.http.request(
            "POST",
            self.base_url + path,
            body=json.dumps(body).encode(),
            headers=self._headers,
            timeout=self.timeout,
        )

    def _check(self, response: HttpResponse, action: str) -> None:
        if 200 <= response.status < 300:
            return
        errors = response.json_object().get("errors")
        described: list[str] = []
        codes: set[str] = set()
        for error in errors if isinstance(errors, list) else []:
            if not isinstance(error, dict):
                continue
            codes.add(str(error.get("code") or ""))
            text = str(error.get("detail") or error.get("title") or "").strip()
            pointer = (error.get("source") or {}).get("pointer")
            described.append(f"{text} ({pointer})" if pointer else text)
        text = "; ".join(part for part in described if part) or response.text(200).strip()
        message = f"Klaviyo {action} answered HTTP {response.status}"
        message += f": {text}" if text else ""
        if response.status == 401 or "not_authenticated" in codes:
            message += " — check api_key: it must be a private API key (pk_…)"
        elif response.status == 403 or "permission_denied" in codes:
            message += " — give the api_key write access to profiles, lists and subscriptions"
        elif response.status == 404 and action in ("subscribe", "unsubscribe"):
            message += " — check list_id"
        raise_vendor_error(response, "Klaviyo", message, retryable=self.retryable_answers)


def _e164(value: Any) -> str | None:
    if not isinstance(value, str | int):
        return None
    phone = _PHONE_PUNCTUATION.sub("", str(value))
    return phone if _E164.match(phone) else None

