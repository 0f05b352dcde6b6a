"""Standard Webhooks signatures, and the ``webhook`` driver that sends them: KickoffLabs' own
delivery format (SPEC §2) against a loopback sink."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import time
from typing import Any
from urllib.parse import parse_qsl

import pytest

from relay.core import formdata as forms
from relay.core import signing
from relay.core.errors import PermanentDeliveryError, RetryableDeliveryError
from relay.core.events import derive_event_id
from relay.core.models import LeadEvent
from relay.drivers.http import HttpClient
from relay.drivers.webhook import WebhookDriver
from relay.ingress.lead_schema import LeadSchema
from tests.support.helpers import config
from tests.support.samples import sample
from tests.support.vendor_server import VendorServer

# The published Standard Webhooks test vector (reference implementations use it).
VECTOR_SECRET = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"
VECTOR_ID = "msg_p5jXN8AQM9LWM0D4loKWxJek"
VECTOR_TIMESTAMP = 1614265330
VECTOR_BODY = b'{"test": 2432232314}'
VECTOR_SIGNATURE = "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE="


def reference_signature(secret: str, message_id: str, timestamp: int | str, body: bytes) -> str:
    """The algorithm as the specification states it, written out independently."""
    key = base64.b64decode(secret.split("_", 1)[1]) if secret.startswith("whsec_") else (
        secret.encode()
    )
    signed = message_id.encode() + b"." + str(timestamp).encode() + b"." + body
    return "v1," + base64.b64encode(hmac.new(key, signed, hashlib.sha256).digest()).decode()


# -- signing ------------------------------------------------------------------------------------


def test_reference_vector() -> None:
    assert reference_signature(VECTOR_SECRET, VECTOR_ID, VECTOR_TIMESTAMP, VECTOR_BODY) == (
        VECTOR_SIGNATURE
    )
    assert signing.sign(VECTOR_SECRET, VECTOR_ID, VECTOR_TIMESTAMP, VECTOR_BODY) == (
        VECTOR_SIGNATURE
    )


def test_sign_matches_the_algorithm_for_other_inputs() -> None:
    for secret in ("whsec_" + base64.b64encode(b"\x00\x01key bytes").decode(), "plain-secret"):
        body = json.dumps(sample("new_signup")).encode()
        assert signing.sign(secret, "evt_1", 1700000000, body) == reference_signature(
            secret, "evt_1", 1700000000, body
        )


def test_verify_accepts_the_vector_and_any_of_several_signatures() -> None:
    assert signing.verify(VECTOR_SECRET, VECTOR_ID, VECTOR_TIMESTAMP, VECTOR_BODY,
                          VECTOR_SIGNATURE)
    header = f"v1,bm9wZQ== {VECTOR_SIGNATURE}"
    assert signing.verify(VECTOR_SECRET, VECTOR_ID, VECTOR_TIMESTAMP, VECTOR_BODY, header)


@pytest.mark.parametrize(
    ("message_id", "timestamp", "body", "secret"),
    [
        (VECTOR_ID, VECTOR_TIMESTAMP, b'{"test": 2432232315}', VECTOR_SECRET),  # tampered body
        (VECTOR_ID, VECTOR_TIMESTAMP, VECTOR_BODY + b" ", VECTOR_SECRET),
        ("msg_other", VECTOR_TIMESTAMP, VECTOR_BODY, VECTOR_SECRET),
        (VECTOR_ID, VECTOR_TIMESTAMP + 1, VECTOR_BODY, VECTOR_SECRET),
        (VECTOR_ID, VECTOR_TIMESTAMP, VECTOR_BODY, "whsec_" + base64.b64encode(b"x").decode()),
    ],
)
def test_verify_rejects_anything_changed(message_id: str, timestamp: int, body: bytes,
                                         secret: str) -> None:
    assert not signing.verify(secret, message_id, timestamp, body, VECTOR_SIGNATURE)


def test_verify_rejects_garbage_headers() -> None:
    for header in ("", "v1,", "v2,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE=", "nonsense"):
        assert not signing.verify(VECTOR_SECRET, VECTOR_ID, VECTOR_TIMESTAMP, VECTOR_BODY, header)


# -- the webhook driver -------------------------------------------------------------------------


def driver(url: str, **keys: Any) -> WebhookDriver:
    [destination] = config([{"name": "backend", "type": "webhook", "url": url, "timeout": "5s",
                             **keys}]).destinations
    return WebhookDriver(destination, http=HttpClient())


def lead_event(name: str = "tagged") -> LeadEvent:
    payload = LeadSchema().load(sample(name))
    return LeadEvent(derive_event_id("kickofflabs", name, payload), "kickofflabs", name, payload)


def test_json_by_default_in_kickofflabs_format(vendor: VendorServer) -> None:
    event = lead_event()
    result = driver(vendor.url + "/leads").send(event)
    assert result.status_code == 200
    [request] = vendor.requests
    assert request.method == "POST" and request.path == "/leads"
    assert request.header("Content-Type") == "application/json"
    assert request.header("User-Agent") == "KickoffLabs"
    assert request.header("webhook-id") == event.event_id
    assert request.header("Idempotency-Key") == event.event_id
    assert request.json() == json.loads(json.dumps(event.payload))
    assert request.json()["__event"] == "tagged"
    assert request.header("webhook-signature") is None


def test_form_format_is_bracket_encoded(vendor: VendorServer) -> None:
    event = lead_event()
    driver(vendor.url + "/legacy", format="form").send(event)
    [request] = vendor.requests
    assert request.header("Content-Type") == "application/x-www-form-urlencoded"
    assert request.header("User-Agent") == "KickoffLabs"
    pairs = parse_qsl(request.body.decode(), keep_blank_values=True)
    assert ("custom_fields[company]", "Analytical Engines Ltd") in pairs
    assert ("tags[][name]", "vip") in pairs
    assert ("__tagged[name]", "vip") in pairs
    assert ("__event", "tagged") in pairs
    # A receiver decoding the form gets the same event (and so the same event id).
    decoded = LeadSchema().load(forms.decode(pairs))
    assert derive_event_id("kickofflabs", "tagged", decoded) == event.event_id


@pytest.mark.parametrize("path", ["/klaviyo/hook", "/hooks/KLAVIYO"])
def test_klaviyo_urls_default_to_form(vendor: VendorServer, path: str) -> None:
    driver(vendor.url + path).send(lead_event())
    assert vendor.requests[0].header("Content-Type") == "application/x-www-form-urlencoded"


def test_explicit_json_wins_over_the_klaviyo_default(vendor: VendorServer) -> None:
    driver(vendor.url + "/klaviyo/hook", format="json").send(lead_event())
    assert vendor.requests[0].header("Content-Type") == "application/json"


def test_custom_headers_are_sent(vendor: VendorServer) -> None:
    driver(vendor.url + "/leads",
           headers={"X-Api-Key": "k-123", "Authorization": "Bearer abc"}).send(lead_event())
    [request] = vendor.requests
    assert request.header("X-Api-Key") == "k-123"
    assert request.header("Authorization") == "Bearer abc"
    assert request.header("User-Agent") == "KickoffLabs"


@pytest.mark.parametrize("body_format", ["json", "form"])
def test_signature_headers_verify(vendor: VendorServer, body_format: str) -> None:
    secret = "whsec_" + base64.b64encode(b"backend signing key 0123456789").decode()
    event = lead_event()
    before = int(time.time())
    driver(vendor.url + "/leads", signing_secret=secret, format=body_format).send(event)
    [request] = vendor.requests
    webhook_id = request.header("webhook-id")
    timestamp = request.header("webhook-timestamp")
    signature = request.header("webhook-signature")
    assert webhook_id == event.event_id
    assert timestamp is not None and signature is not None
    assert before - 1 <= int(timestamp) <= int(time.time()) + 1
    assert signature == reference_signature(secret, webhook_id, timestamp, request.body)
    assert signing.verify(secret, webhook_id, int(timestamp), request.body, signature)
    assert not signing.verify(secret, webhook_id, int(timestamp), request.body + b"x", signature)


def test_redirects_are_not_followed(vendor: VendorServer) -> None:
    vendor.reply(302, headers={"Location": vendor.url + "/elsewhere"})
    with pytest.raises(PermanentDeliveryError) as caught:
        driver(vendor.url + "/leads").send(lead_event())
    assert caught.value.status_code == 302
    assert [r.path for r in vendor.requests] == ["/leads"]


def test_failures_are_classified_not_swallowed(vendor: VendorServer) -> None:
    vendor.reply(503, headers={"Retry-After": "30"})
    vendor.reply(400, {"error": "bad lead"})
    vendor.reply(410)
    send = driver(vendor.url + "/leads").send
    with pytest.raises(RetryableDeliveryError) as retry:
        send(lead_event())
    assert retry.value.retry_after == 30
    with pytest.raises(PermanentDeliveryError) as bad:
        send(lead_event())
    assert "backend" in bad.value.message and "bad lead" in bad.value.message
    with pytest.raises(PermanentDeliveryError) as gone:
        send(lead_event())
    assert gone.value.gone
