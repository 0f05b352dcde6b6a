"""Klaviyo driver against a local server speaking Klaviyo's JSON:API (pinned revision)."""

from __future__ import annotations

from typing import Any

import pytest
from marshmallow import ValidationError

from relay.core.errors import PermanentDeliveryError, RetryableDeliveryError
from relay.core.models import Destination, LeadEvent
from relay.drivers.http import HttpClient
from relay.drivers.klaviyo import REVISION, KlaviyoDriver
from tests.support.samples import sample as sample_payload
from tests.support.vendor_server import RecordedRequest, VendorServer

API_KEY = "pk_0123456789abcdef0123456789abcdef01"
LIST_ID = "Y6nRLr"
IMPORT = "/api/profile-import"
SUBSCRIBE = "/api/profile-subscription-bulk-create-jobs"
UNSUBSCRIBE = "/api/profile-subscription-bulk-delete-jobs"
PROFILE_ID = "01GDDKASAP8TKDDA2GRZDSVP4H"


def sample(name: str, **changes: Any) -> LeadEvent:
    payload = sample_payload(name, **changes)
    return LeadEvent(event_id=f"evt-{name}", source="kickofflabs", name=name, payload=payload)


def make_driver(vendor: VendorServer, **options: Any) -> KlaviyoDriver:
    loaded = KlaviyoDriver.options_schema().load({"api_key": API_KEY, **options})
    destination = Destination(name="klaviyo", type="klaviyo", base_url=vendor.url, options=loaded)
    return KlaviyoDriver(destination, http=HttpClient())


def profile_answer() -> dict[str, Any]:
    return {
        "data": {
            "type": "profile",
            "id": PROFILE_ID,
            "attributes": {"email": "ada@example.com", "first_name": "Ada"},
            "links": {"self": f"https://a.klaviyo.com/api/profiles/{PROFILE_ID}/"},
        }
    }


def klaviyo_error(status: int, code: str, title: str, detail: str, **extra: Any) -> dict:
    return {
        "errors": [
            {
                "id": "7f5ea1d2-9d6a-4f61-b1c1-0d5c6c1c8a11",
                "status": status,
                "code": code,
                "title": title,
                "detail": detail,
                **extra,
            }
        ]
    }


def assert_klaviyo_headers(request: RecordedRequest) -> None:
    assert request.header("Authorization") == f"Klaviyo-API-Key {API_KEY}"
    assert request.header("revision") == REVISION
    assert request.header("Content-Type") == "application/vnd.api+json"
    assert request.header("Accept") == "application/vnd.api+json"


def test_new_signup_upserts_profile_and_subscribes_to_list(vendor: VendorServer) -> None:
    vendor.reply(201, profile_answer(), method="POST", path=IMPORT)
    vendor.reply(202, method="POST", path=SUBSCRIBE)
    result = make_driver(vendor, list_id=LIST_ID).send(sample("new_signup"))

    assert result.status_code == 201
    assert result.detail == f"profile {PROFILE_ID} created; subscribed to list {LIST_ID}"
    upsert, subscribe = vendor.requests
    assert (upsert.method, upsert.path) == ("POST", IMPORT)
    assert_klaviyo_headers(upsert)
    assert upsert.json() == {
        "data": {
            "type": "profile",
            "attributes": {
                "email": "ada@example.com",
                "first_name": "Ada",
                "last_name": "Lovelace",
                "properties": {
                    "kickofflabs_rank": 268,
                    "kickofflabs_referral_link": "https://www.example.com/?kid=36N38P",
                    "kickofflabs_score": 0,
                    "kickofflabs_verified": False,
                },
            },
        }
    }
    assert (subscribe.method, subscribe.path) == ("POST", SUBSCRIBE)
    assert_klaviyo_headers(subscribe)
    assert subscribe.json() == {
        "data": {
            "type": "profile-subscription-bulk-create-job",
            "attributes": {
                "custom_source": "leadrelay (KickoffLabs)",
                "profiles": {
                    "data": [
                        {
                            "type": "profile",
                            "attributes": {
                                "email": "ada@example.com",
                                "subscriptions": {
                                    "email": {"marketing": {"consent": "SUBSCRIBED"}}
                                },
                            },
                        }
                    ]
                },
            },
            "relationships": {"list": {"data": {"type": "list", "id": LIST_ID}}},
        }
    }


def test_properties_mapping_splits_standard_and_custom_fields(vendor: VendorServer) -> None:
    vendor.reply(200, profile_answer())
    driver = make_driver(
        vendor,
        properties={
            "organization": "custom_fields.company",
            "title": "custom_fields.role",
            "utm_source": "utm.utm_source",
            "kickofflabs_rank": None,
            "kickofflabs_score": False,
            "kickofflabs_verified": None,
            "kickofflabs_referral_link": None,
        },
    )
    result = driver.send(sample("score_change", phone_number="+1 (555) 555-0123"))

    assert result.detail == f"profile {PROFILE_ID} updated"
    [upsert] = vendor.requests  # no list_id, not a signup: nothing else
    assert upsert.json()["data"]["attributes"] == {
        "email": "ada@example.com",
        "first_name": "Ada",
        "last_name": "Lovelace",
        "phone_number": "+15555550123",
        "organization": "Analytical Engines Ltd",
        "title": "engineer",
        "properties": {"utm_source": "newsletter"},
    }


def test_malformed_phone_is_left_out_not_fatal(vendor: VendorServer) -> None:
    vendor.reply(200, profile_answer())
    result = make_driver(vendor).send(sample("verified", phone_number="555-0123"))
    assert "not E.164" in result.detail
    assert "phone_number" not in vendor.requests[0].json()["data"]["attributes"]


def test_phone_only_lead_is_upserted_but_not_subscribed(vendor: VendorServer) -> None:
    vendor.reply(201, profile_answer())
    driver = make_driver(vendor, list_id=LIST_ID)
    result = driver.send(sample("new_signup", email=None, phone_number="+15555550123"))

    assert "no email: not subscribed" in result.detail
    [upsert] = vendor.requests
    attributes = upsert.json()["data"]["attributes"]
    assert attributes["phone_number"] == "+15555550123"
    assert "email" not in attributes


def test_lead_without_email_or_phone_is_skipped(vendor: VendorServer) -> None:
    result = make_driver(vendor).send(sample("new_signup", email=None))
    assert result.skipped
    assert vendor.requests == []


def test_opted_out_unsubscribes_email_marketing(vendor: VendorServer) -> None:
    vendor.reply(200, profile_answer(), path=IMPORT)
    vendor.reply(202, path=UNSUBSCRIBE)
    result = make_driver(vendor, list_id=LIST_ID).send(sample("opted_out"))

    assert result.detail == f"profile {PROFILE_ID} updated; email marketing unsubscribed"
    upsert, unsubscribe = vendor.requests
    assert upsert.path == IMPORT
    assert (unsubscribe.method, unsubscribe.path) == ("POST", UNSUBSCRIBE)
    assert_klaviyo_headers(unsubscribe)
    assert unsubscribe.json() == {
        "data": {
            "type": "profile-subscription-bulk-delete-job",
            "attributes": {
                "profiles": {
                    "data": [
                        {
                            "type": "profile",
                            "attributes": {
                                "email": "ada@example.com",
                                "subscriptions": {
                                    "email": {"marketing": {"consent": "UNSUBSCRIBED"}}
                                },
                            },
                        }
                    ]
                }
            },
            "relationships": {"list": {"data": {"type": "list", "id": LIST_ID}}},
        }
    }


def test_phone_number_opt_out_unsubscribes_sms(vendor: VendorServer) -> None:
    vendor.reply(200, profile_answer(), path=IMPORT)
    vendor.reply(202, path=UNSUBSCRIBE)
    result = make_driver(vendor).send(sample("phone_number_opt_out"))

    assert result.detail.endswith("sms marketing unsubscribed")
    body = vendor.requests[1].json()["data"]
    assert "relationships" not in body  # no list configured
    assert body["attributes"]["profiles"]["data"][0]["attributes"] == {
        "phone_number": "+15555550123",
        "subscriptions": {"sms": {"marketing": {"consent": "UNSUBSCRIBED"}}},
    }


def test_signup_of_an_opted_out_lead_is_not_subscribed(vendor: VendorServer) -> None:
    vendor.reply(201, profile_answer())
    result = make_driver(vendor, list_id=LIST_ID).send(sample("new_signup", opted_out=True))
    assert "not subscribed" in result.detail
    assert [request.path for request in vendor.requests] == [IMPORT]


def test_subscribe_events_and_revision_are_configurable(vendor: VendorServer) -> None:
    vendor.reply(200, profile_answer(), path=IMPORT)
    vendor.reply(202, path=SUBSCRIBE)
    driver = make_driver(
        vendor, list_id=LIST_ID, subscribe_events=["verified"], revision="2025-10-15"
    )
    driver.send(sample("new_signup"))
    driver.send(sample("verified"))
    assert [request.path for request in vendor.requests] == [IMPORT, IMPORT, SUBSCRIBE]
    assert {request.header("revision") for request in vendor.requests} == {"2025-10-15"}


def test_deleted_is_skipped(vendor: VendorServer) -> None:
    result = make_driver(vendor).send(sample("deleted"))
    assert result.skipped
    assert vendor.requests == []


def test_options_are_validated() -> None:
    schema = KlaviyoDriver.options_schema()
    with pytest.raises(ValidationError) as missing:
        schema.load({})
    assert "api_key" in missing.value.messages
    with pytest.raises(ValidationError) as bad_revision:
        schema.load({"api_key": API_KEY, "revision": "latest"})
    assert "revision" in bad_revision.value.messages
    assert "api_key" in KlaviyoDriver.secret_fields


def test_429_with_retry_after_is_retryable(vendor: VendorServer) -> None:
    vendor.reply(
        429,
        klaviyo_error(
            429,
            "throttled",
            "Request was throttled.",
            "Request was throttled. Expected available in 12 seconds.",
        ),
        headers={"Retry-After": "12"},
        content_type="application/vnd.api+json",
    )
    with pytest.raises(RetryableDeliveryError) as caught:
        make_driver(vendor).send(sample("new_signup"))
    assert caught.value.status_code == 429
    assert caught.value.retry_after == 12
    assert "Expected available in 12 seconds" in caught.value.message


def test_subscription_throttled_after_upsert_is_retryable(vendor: VendorServer) -> None:
    vendor.reply(201, profile_answer(), path=IMPORT)
    vendor.reply(
        429,
        klaviyo_error(429, "throttled", "Request was throttled.", "Request was throttled."),
        headers={"Retry-After": "2"},
        path=SUBSCRIBE,
    )
    with pytest.raises(RetryableDeliveryError) as caught:
        make_driver(vendor, list_id=LIST_ID).send(sample("new_signup"))
    assert caught.value.retry_after == 2
    assert "subscribe" in caught.value.message


@pytest.mark.parametrize(
    ("status", "code", "expected"),
    [(401, "not_authenticated", "api_key"), (403, "permission_denied", "write access")],
)
def test_auth_failures_are_permanent(
    vendor: VendorServer, status: int, code: str, expected: str
) -> None:
    vendor.reply(
        status,
        klaviyo_error(status, code, "Authentication failed.", "Incorrect authentication."),
    )
    with pytest.raises(PermanentDeliveryError) as caught:
        make_driver(vendor).send(sample("new_signup"))
    assert caught.value.status_code == status
    assert expected in caught.value.message
    assert API_KEY not in caught.value.message


def test_invalid_input_names_the_attribute(vendor: VendorServer) -> None:
    vendor.reply(
        400,
        klaviyo_error(
            400,
            "invalid",
            "Invalid input.",
            "Invalid email address",
            source={"pointer": "/data/attributes/email"},
        ),
    )
    with pytest.raises(PermanentDeliveryError) as caught:
        make_driver(vendor).send(sample("new_signup", email="ada@"))
    assert caught.value.status_code == 400
    assert "Invalid email address (/data/attributes/email)" in caught.value.message


def test_unknown_list_is_permanent_and_names_list_id(vendor: VendorServer) -> None:
    vendor.reply(201, profile_answer(), path=IMPORT)
    vendor.reply(
        404,
        klaviyo_error(404, "not_found", "Not found.", "A list with id NOPE was not found."),
        path=SUBSCRIBE,
    )
    with pytest.raises(PermanentDeliveryError) as caught:
        make_driver(vendor, list_id="NOPE").send(sample("new_signup"))
    assert "list_id" in caught.value.message
