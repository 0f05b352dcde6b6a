"""HubSpot driver against a local server speaking HubSpot's CRM v3 batch upsert."""

from __future__ import annotations

from typing import Any

import pytest

from relay.core.errors import PermanentDeliveryError, RetryableDeliveryError
from relay.core.models import Destination, LeadEvent
from relay.drivers.http import HttpClient
from relay.drivers.hubspot import HubSpotDriver
from tests.support.samples import sample as sample_payload
from tests.support.vendor_server import VendorServer

UPSERT = "/crm/v3/objects/contacts/batch/upsert"
TOKEN = "pat-na1-11111111-2222-3333-4444-555555555555"


def sample(name: str, **changes: Any) -> LeadEvent:
    payload = sample_payload(name, **changes)
    return LeadEvent(event_id=f"evt-{name}", source="kickofflabs", name=name, payload=payload)


def make_driver(vendor: VendorServer, **options: Any) -> HubSpotDriver:
    loaded = HubSpotDriver.options_schema().load({"access_token": TOKEN, **options})
    destination = Destination(name="crm", type="hubspot", base_url=vendor.url, options=loaded)
    return HubSpotDriver(destination, http=HttpClient())


def upsert_answer(new: bool = True) -> dict[str, Any]:
    return {
        "status": "COMPLETE",
        "results": [
            {
                "id": "512",
                "properties": {"email": "ada@example.com"},
                "createdAt": "2026-07-15T18:29:23.000Z",
                "updatedAt": "2026-07-15T18:29:23.000Z",
                "archived": False,
                "new": new,
            }
        ],
        "startedAt": "2026-07-15T18:29:23.000Z",
        "completedAt": "2026-07-15T18:29:23.100Z",
    }


def test_upserts_contact_by_email_with_default_properties(vendor: VendorServer) -> None:
    vendor.reply(200, upsert_answer(new=True), method="POST", path=UPSERT)
    result = make_driver(vendor).send(sample("new_signup"))

    assert result.status_code == 200
    assert not result.skipped
    assert result.detail == "contact 512 created"
    [request] = vendor.requests
    assert (request.method, request.path) == ("POST", UPSERT)
    assert request.header("Authorization") == f"Bearer {TOKEN}"
    assert request.header("Content-Type") == "application/json"
    assert request.json() == {
        "inputs": [
            {
                "idProperty": "email",
                "id": "ada@example.com",
                "properties": {
                    "email": "ada@example.com",
                    "firstname": "Ada",
                    "lastname": "Lovelace",
                    "kickofflabs_rank": "268",
                    "kickofflabs_referral_link": "https://www.example.com/?kid=36N38P",
                    "kickofflabs_score": "0",
                    "kickofflabs_verified": "false",
                    "kickofflabs_opted_out": "false",
                },
            }
        ]
    }


def test_properties_mapping_adds_fields_and_turns_defaults_off(vendor: VendorServer) -> None:
    vendor.reply(200, upsert_answer(new=False))
    driver = make_driver(
        vendor,
        properties={
            "company": "custom_fields.company",
            "jobtitle": "custom_fields.role",
            "firstname": "given_name",
            "kickofflabs_rank": None,
            "kickofflabs_referral_link": False,
            "kickofflabs_score": None,
            "kickofflabs_verified": None,
            "kickofflabs_opted_out": None,
            "utm_source": "utm.utm_source",
            "missing": "custom_fields.nope",
        },
    )
    result = driver.send(sample("referral", phone_number="+15555550123"))

    assert result.detail == "contact 512 updated"
    assert vendor.requests[0].json()["inputs"][0]["properties"] == {
        "email": "ada@example.com",
        "firstname": "Ada",
        "lastname": "Lovelace",
        "phone": "+15555550123",
        "company": "Analytical Engines Ltd",
        "jobtitle": "engineer",
        "utm_source": "newsletter",
    }


def test_options_schema_refuses_bad_mapping_and_missing_token() -> None:
    from marshmallow import ValidationError

    schema = HubSpotDriver.options_schema()
    with pytest.raises(ValidationError) as missing:
        schema.load({})
    assert "access_token" in missing.value.messages
    with pytest.raises(ValidationError) as bad_path:
        schema.load({"access_token": "x", "properties": {"company": 3}})
    assert "properties" in bad_path.value.messages
    assert "access_token" in HubSpotDriver.secret_fields


def test_lead_without_email_is_skipped_without_a_request(vendor: VendorServer) -> None:
    result = make_driver(vendor).send(sample("new_signup", email=None, phone_number="+1555"))

    assert result.skipped
    assert "no email" in result.detail
    assert vendor.requests == []


def test_deleted_event_does_not_touch_the_contact(vendor: VendorServer) -> None:
    result = make_driver(vendor).send(sample("deleted"))
    assert result.skipped
    assert vendor.requests == []


def test_429_with_retry_after_is_retryable(vendor: VendorServer) -> None:
    vendor.reply(
        429,
        {
            "status": "error",
            "message": "You have reached your ten_secondly_rolling limit.",
            "errorType": "RATE_LIMIT",
            "correlationId": "c8d9a1b2-0000-4000-8000-000000000001",
            "policyName": "TEN_SECONDLY_ROLLING",
        },
        headers={"Retry-After": "7"},
    )
    with pytest.raises(RetryableDeliveryError) as caught:
        make_driver(vendor).send(sample("new_signup"))
    assert caught.value.status_code == 429
    assert caught.value.retry_after == 7
    assert "rate limit" in caught.value.message


def test_429_without_retry_after_uses_hubspot_rate_limit_headers(vendor: VendorServer) -> None:
    vendor.reply(
        429,
        {
            "status": "error",
            "message": "You have reached your ten_secondly_rolling limit.",
            "errorType": "RATE_LIMIT",
            "policyName": "TEN_SECONDLY_ROLLING",
        },
        headers={
            "X-HubSpot-RateLimit-Interval-Milliseconds": "10000",
            "X-HubSpot-RateLimit-Max": "100",
            "X-HubSpot-RateLimit-Remaining": "0",
        },
    )
    with pytest.raises(RetryableDeliveryError) as caught:
        make_driver(vendor).send(sample("new_signup"))
    assert caught.value.retry_after == 10


def test_daily_limit_waits_an_hour(vendor: VendorServer) -> None:
    vendor.reply(
        429,
        {
            "status": "error",
            "message": "You have reached your daily limit.",
            "errorType": "RATE_LIMIT",
            "policyName": "DAILY",
        },
        headers={"X-HubSpot-RateLimit-Daily": "250000", "X-HubSpot-RateLimit-Daily-Remaining": "0"},
    )
    with pytest.raises(RetryableDeliveryError) as caught:
        make_driver(vendor).send(sample("new_signup"))
    assert caught.value.retry_after == 3600


@pytest.mark.parametrize("status", [401, 403])
def test_auth_failures_are_permanent_and_name_the_token(vendor: VendorServer, status: int) -> None:
    vendor.reply(
        status,
        {
            "status": "error",
            "message": "Authentication credentials not found.",
            "correlationId": "c8d9a1b2-0000-4000-8000-000000000002",
            "category": "INVALID_AUTHENTICATION",
        },
    )
    with pytest.raises(PermanentDeliveryError) as caught:
        make_driver(vendor).send(sample("new_signup"))
    assert caught.value.status_code == status
    assert "access_token" in caught.value.message
    assert "Authentication credentials not found" in caught.value.message
    assert TOKEN not in caught.value.message


def test_unknown_property_is_permanent_with_a_fix(vendor: VendorServer) -> None:
    vendor.reply(
        400,
        {
            "status": "error",
            "message": 'Property values were not valid: [{"isValid":false,"message":"Property '
            '\\"kickofflabs_rank\\" does not exist","error":"PROPERTY_DOESNT_EXIST",'
            '"name":"kickofflabs_rank"}]',
            "correlationId": "c8d9a1b2-0000-4000-8000-000000000003",
            "category": "VALIDATION_ERROR",
        },
    )
    with pytest.raises(PermanentDeliveryError) as caught:
        make_driver(vendor).send(sample("new_signup"))
    assert caught.value.status_code == 400
    assert "kickofflabs_rank" in caught.value.message
    assert "properties:" in caught.value.message


def test_multi_status_error_is_permanent(vendor: VendorServer) -> None:
    vendor.reply(
        207,
        {
            "status": "COMPLETE",
            "results": [],
            "numErrors": 1,
            "errors": [
                {
                    "status": "error",
                    "category": "VALIDATION_ERROR",
                    "message": "Email address ada@example is invalid",
                    "context": {"ids": ["ada@example"]},
                }
            ],
        },
    )
    with pytest.raises(PermanentDeliveryError) as caught:
        make_driver(vendor).send(sample("new_signup"))
    assert caught.value.status_code == 207
    assert "Email address ada@example is invalid" in caught.value.message


def test_server_error_is_retryable(vendor: VendorServer) -> None:
    vendor.reply(502, "<html>Bad Gateway</html>", content_type="text/html")
    with pytest.raises(RetryableDeliveryError) as caught:
        make_driver(vendor).send(sample("new_signup"))
    assert caught.value.status_code == 502


def test_423_locked_is_retryable_after_at_least_two_seconds(vendor: VendorServer) -> None:
    # HubSpot: locks from a burst of writes last 2 s; wait at least that before the next call.
    vendor.reply(423, {"status": "error", "message": "Resource is locked", "category": "LOCKED"})
    with pytest.raises(RetryableDeliveryError) as caught:
        make_driver(vendor).send(sample("new_signup"))
    assert caught.value.status_code == 423
    assert caught.value.retry_after is not None and caught.value.retry_after >= 2.0
    assert "locked" in caught.value.message


def test_423_keeps_a_longer_retry_after(vendor: VendorServer) -> None:
    vendor.reply(423, {"status": "error", "message": "locked"}, headers={"Retry-After": "5"})
    with pytest.raises(RetryableDeliveryError) as caught:
        make_driver(vendor).send(sample("new_signup"))
    assert caught.value.retry_after == 5.0


def test_477_migration_in_progress_waits_its_retry_after(vendor: VendorServer) -> None:
    # HubSpot: the account is moving between data-hosting locations; Retry-After says how long.
    vendor.reply(477, {"status": "error", "message": "Migration in progress"},
                 headers={"Retry-After": "3600"})
    with pytest.raises(RetryableDeliveryError) as caught:
        make_driver(vendor).send(sample("new_signup"))
    assert caught.value.status_code == 477
    assert caught.value.retry_after == 3600.0
    assert "migrating" in caught.value.message
