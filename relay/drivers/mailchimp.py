"""Mailchimp Marketing API 3.0: keep the lead as a member of one audience (list).

YAML::

    - name: newsletter
      type: mailchimp
      api_key: ${MAILCHIMP_API_KEY}        # ends in -usNN, the data centre of the account
      list_id: a1b2c3d4e5                  # the audience ID
      status_if_new: pending               # double opt-in; default subscribed
      merge_fields: {COMPANY: custom_fields.company, PHONE: null}

What each event does (the member is addressed by the MD5 of the lower-cased email):

- every event: ``PUT /3.0/lists/{list_id}/members/{hash}`` upserts the member and its merge
  fields. Only ``status_if_new`` is sent, so an existing member's status is never changed
  (someone who unsubscribed is not subscribed again by a score change) ...
- ... except for an opted-out lead (``opted_out`` event, or ``opted_out: true`` in the
  payload): ``status`` becomes ``unsubscribed``, for new and existing members alike.
- ``tagged``: after the upsert, ``POST .../members/{hash}/tags`` makes the tag active.
- ``deleted``: ``DELETE .../members/{hash}`` archives the member (Mailchimp's DELETE is an
  archive, not a permanent delete); a member that is not there is nothing to archive.
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
from typing import Any
from urllib.parse import quote

from marshmallow import Schema, ValidationError, fields, validate, validates

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

DEFAULT_MERGE_FIELDS: dict[str, str] = {
    "FNAME": "first_name",
    "LNAME": "family_name",
    "PHONE": "phone_number",
}

_DATA_CENTRE = re.compile(r"-([a-z]{2,4}\d{1,3})$")

# Problem-detail titles whose cause is in the data or the account, not in the moment.
_HINTS: dict[str, str] = {
    "Member In Compliance State": (
        "the member unsubscribed, bounced or was cleaned; only they can re-subscribe "
        "(e.g. through a Mailchimp signup form)"
    ),
    "Forgotten Email Not Subscribed": (
        "the member asked to be forgotten (GDPR); Mailchimp will not add this address again"
    ),
    "API Key Invalid": "check api_key: it must be a current Mailchimp API key ending in -usNN",
    "API Key Missing": "set api_key",
    "Resource Not Found": "check list_id: it must be the audience ID of this account",
    "Invalid Resource": "check merge_fields against the audience's merge tags",
}


class MailchimpOptions(Schema):
    api_key = fields.String(required=True)
    list_id = fields.String(required=True, validate=validate.Length(min=1))
    status_if_new = fields.String(
        load_default="subscribed", validate=validate.OneOf(["subscribed", "pending"])
    )
    merge_fields = mapping_field()

    @validates("api_key")
    def _has_data_centre(self, value: str, **_: Any) -> None:
        if not _DATA_CENTRE.search(value.strip()):
            raise ValidationError(
                "must be a Mailchimp API key ending in its data centre, e.g. …-us21"
            )


class MailchimpDriver(Driver):
    type_name = "mailchimp"
    default_concurrency = 10  # Mailchimp allows 10 simultaneous connections per API key
    options_schema = MailchimpOptions
    secret_fields = frozenset({"api_key"})
    # No fixed host: see base_url, which derives it from the api_key's data-centre suffix.
    default_base_url = None

    def __init__(self, destination: Destination, http: HttpClient | None = None) -> None:
        super().__init__(destination, http)
        self.merge_fields = resolve_mapping(DEFAULT_MERGE_FIELDS, self.options.get("merge_fields"))
        api_key = str(self.options["api_key"]).strip()
        # Mailchimp ignores the user name of basic auth; the key is the password.
        token = base64.b64encode(f"leadrelay:{api_key}".encode()).decode()
        self._headers = {
            "Authorization": f"Basic {token}",
            "Content-Type": "application/json",
            "Accept": "application/json",
        }
        match = _DATA_CENTRE.search(api_key)
        self._data_centre = match.group(1) if match else None

    @property
    def base_url(self) -> str:
        # The API host is the account's data centre, named by the key's suffix.
        if self.destination.base_url:
            return self.destination.base_url.rstrip("/")
        return f"https://{self._data_centre}.api.mailchimp.com"

    def send(self, event: LeadEvent) -> DeliveryResult:
        email = lead_email(event.payload)
        if email is None:
            return DeliveryResult(
                skipped=True, detail="lead has no email; Mailchimp members are keyed by email"
            )
        member_url = self._member_url(email)
        if event.name == "deleted":
            return self._archive(member_url)

        unsubscribe = event.name == "opted_out" or event.payload.get("opted_out") is True
        body: dict[str, Any] = {
            "email_address": email,
            "status_if_new": "unsubscribed" if unsubscribe else self.options["status_if_new"],
        }
        if unsubscribe:
            body["status"] = "unsubscribed"
        merge_fields = apply_mapping(self.merge_fields, event.payload)
        if merge_fields:
            body["merge_fields"] = merge_fields
        response = self._request("PUT", member_url, body)
        self._check(response, "member upsert")
        member = response.json_object()
        status = member.get("status", body.get("status", body["status_if_new"]))
        detail = f"member {email} {status}"

        if event.name == "tagged":
            detail += self._add_tag(member_url, event)
        return DeliveryResult(status_code=response.status, detail=detail)

    def _archive(self, member_url: str) -> DeliveryResult:
        response = self.http.request(
            "DELETE", member_url, headers=self._headers, timeout=self.timeout
        )
        if response.status == 404:
            return DeliveryResult(
                status_code=404,
                skipped=True,
                detail="member not in the audience; nothing to archive",
            )
        self._check(response, "member archive")
        return DeliveryResult(status_code=response.status, detail="member archived")

    def _add_tag(self, member_url: str, event: LeadEvent) -> str:
        tagged = event.payload.get("__tagged")
        name = tagged.get("name") if isinstance(tagged, dict) else None
        if not isinstance(name, str) or not name.strip():
            return "; no tag name in __tagged, no tag added"
        body = {"tags": [{"name": name.strip(), "status": "active"}]}
        response = self._request("POST", member_url + "/tags", body)
        self._check(response, "member tags")
        return f"; tag {name.strip()!r} active"

    def _member_url(self, email: str) -> str:
        subscriber_hash = hashlib.md5(email.lower().encode(), usedforsecurity=False).hexdigest()
        list_id = quote(str(self.options["list_id"]), safe="")
        return f"{self.base_url}/3.0/lists/{list_id}/members/{subscriber_hash}"

    def _request(self, method: str, url: str, body: dict[str, Any]) -> HttpResponse:
        return self.http.request(
            method, url, body=json.dumps(body).encode(), headers=self._headers, timeout=self.timeout
        )

    def _check(self, response: HttpResponse, action: str) -> None:
        if 200 <= response.status < 300:
            return
        problem = response.json_object()
        title = str(problem.get("title") or "").strip()
        detail = str(problem.get("detail") or "").strip()
        text = ": ".join(part for part in (title, detail) if part) or response.text(200).strip()
        field_errors = problem.get("errors")
        if isinstance(field_errors, list) and field_errors:
            text += (
                " ("
                + "; ".join(
                    f"{item.get('field') or '?'}: {item.get('message') or ''}".strip()
                    for item in field_errors
                    if isinstance(item, dict)
                )
                + ")"
            )
        message = f"Mailchimp {action} answered HTTP {response.status}"
        message += f": {text}" if text else ""
        hint = _HINTS.get(title)
        if hint is None and response.status in (401, 403):
            hint = "check api_key and that the key's user may change this audience"
        if hint:
            message += f" — {hint}"
        raise_vendor_error(response, "Mailchimp", message, retryable=self.retryable_answers)

