"""``webhook``: any URL, in KickoffLabs' own delivery format (SPEC §2).

JSON with ``User-Agent: KickoffLabs`` by default; form encoding (bracket notation) for
``format: form`` and, as KickoffLabs does, for URLs containing ``klaviyo``. Every attempt carries
the event id as ``webhook-id`` and ``Idempotency-Key`` so receivers can dedupe; with a
``signing_secret`` it is signed the Standard Webhooks way.
"""

from __future__ import annotations

import json
import time
from typing import Any

from marshmallow import Schema, fields, validate

from relay.core import formdata as forms
from relay.core import signing
from relay.core.models import DeliveryResult, LeadEvent
from relay.drivers.base import Driver
from relay.drivers.http import USER_AGENT, raise_for_status


class WebhookOptions(Schema):
    url = fields.Url(required=True, require_tld=False, schemes={"http", "https"})
    format = fields.String(load_default=None, allow_none=True,
                           validate=validate.OneOf(["json", "form"]))
    headers = fields.Dict(keys=fields.String(), values=fields.String(), load_default=dict)
    signing_secret = fields.String(load_default=None, allow_none=True)


def delivery_format(url: str, configured: str | None) -> str:
    if configured:
        return configured
    return "form" if "klaviyo" in url.lower() else "json"


def encode_body(payload: Any, body_format: str) -> tuple[bytes, str]:
    if body_format == "form":
        return forms.encode(payload).encode(), "application/x-www-form-urlencoded"
    return json.dumps(payload, separators=(",", ":")).encode(), "application/json"


class WebhookDriver(Driver):
    type_name = "webhook"
    options_schema = WebhookOptions
    secret_fields = frozenset({"signing_secret"})

    def send(self, event: LeadEvent) -> DeliveryResult:
        url: str = self.options["url"]
        body_format = delivery_format(url, self.options.get("format"))
        if body_format == "json" and event.payload_json is not None:
            body, content_type = event.payload_json, "application/json"  # as stored: the same
        else:
            body, content_type = encode_body(event.payload, body_format)
        headers = {**self.options.get("headers", {})}
        headers.update({
            "Content-Type": content_type,
            "User-Agent": USER_AGENT,
            "webhook-id": event.event_id,
            "Idempotency-Key": event.event_id,
        })
        secret = self.options.get("signing_secret")
        if secret:
            timestamp = int(time.time())
            headers["webhook-timestamp"] = str(timestamp)
            headers["webhook-signature"] = signing.sign(secret, event.event_id, timestamp, body)
        response = self.http.request("POST", url, body=body, headers=headers,
                                     timeout=self.timeout)
        raise_for_status(response, f"webhook {self.destination.name}", self.retryable_answers)
        return DeliveryResult(status_code=response.status)
