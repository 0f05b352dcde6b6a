"""Mailchimp driver against a local server speaking Marketing API 3.0 list members."""

from __future__ import annotations

import base64
import hashlib
from typing import Any

import pytest
from marshmallow import ValidationError

from relay.core.errors import PermanentDeliveryError, RetryableDeliveryError
from relay.core.models import Destination, LeadEvent
from relay.drivers.http import HttpClient
from relay.drivers.mailchimp import MailchimpDriver
from tests.support.samples import sample as sample_payload
from tests.support.vendor_server import VendorServer

API_KEY = "0123456789abcdef0123456789abcdef-us21"
LIST_ID = "a1b2c3d4e5"
ADA_HASH = hashlib.md5(b"ada@example.com").hexdigest()
MEMBER = f"/3.0/lists/{LIST_ID}/members/{ADA_HASH}"
BASIC = "Basic " + base64.b64encode(f"leadrelay:{API_KEY}".encode()).decode()


def sample(name: str, **changes: Any) -> LeadEvent:
    payload = sample_payload(name, **changes)
    return LeadEvent(event_id=f"evt-{name}", source="kickofflabs", name=name, payload=payload)


def make_driver(vendor: VendorServer | None, **options: Any) -> MailchimpDriver:
    loaded = MailchimpDriver.options_schema().load(
        {"api_key": API_KEY, "list_id": LIST_ID, **options}
    )
    destination = Destination(
        name="newsletter",
        type="mailchimp",
        base_url=vendor.url if vendor else None,
        options=loaded,
    )
    return MailchimpDriver(destination, http=HttpClient())


def member(status: str = "subscribed") -> dict[str, Any]:
    return {
        "id": ADA_HASH,
        "email_address": "ada@example.com",
        "unique_email_id": "882e9bec19",
        "status": status,
        "merge_fields": {"FNAME": "Ada", "LNAME": "Lovelace"},
        "list_id": LIST_ID,
    }


def problem(status: int, title: str, detail: str, **extra: Any) -> dict[str, Any]:
    return {
        "type": "https://mailchimp.com/developer/marketing/docs/errors/",
        "title": title,
        "status": status,
        "detail": detail,
        "instance": "995c5cb0-3280-4a6e-808b-3b096d0bb219",
        **extra,
    }


def test_new_signup_puts_member_by_md5_of_lowercased_email(vendor: VendorServer) -> None:
    vendor.reply(200, member(), method="PUT", path=MEMBER)
    result = make_driver(vendor).send(sample("new_signup", email="Ada@Example.com"))

    assert result.status_code == 200
    assert result.detail == "member Ada@Example.com subscribed"
    [request] = vendor.requests
    assert (request.method, request.path) == ("PUT", MEMBER)
    assert request.header("Authorization") == BASIC
    assert request.header("Content-Type") == "application/json"
    assert request.json() == {
        "email_address": "Ada@Example.com",
        "status_if_new": "subscribed",
        "merge_fields": {"FNAME": "Ada", "LNAME": "Lovelace"},
    }


def test_double_opt_in_and_merge_field_mapping(vendor: VendorServer) -> None:
    vendor.reply(200, member("pending"))
    driver = make_driver(
        vendor,
        status_if_new="pending",
        merge_fields={"COMPANY": "custom_fields.company", "LNAME": None, "RANK": "rank"},
    )
    result = driver.send(sample("referral", phone_number="+15555550123"))

    assert result.detail == "member ada@example.com pending"
    assert vendor.requests[0].json() == {
        "email_address": "ada@example.com",
        "status_if_new": "pending",
        "merge_fields": {
            "FNAME": "Ada",
            "PHONE": "+15555550123",
            "COMPANY": "Analytical Engines Ltd",
            "RANK": 268,
        },
    }


def test_opted_out_unsubscribes_new_and_existing_members(vendor: VendorServer) -> None:
    vendor.reply(200, member("unsubscribed"))
    result = make_driver(vendor).send(sample("opted_out"))

    assert result.detail == "member ada@example.com unsubscribed"
    body = vendor.requests[0].json()
    assert body["status"] == "unsubscribed"
    assert body["status_if_new"] == "unsubscribed"


def test_tagged_upserts_then_activates_the_tag(vendor: VendorServer) -> None:
    vendor.reply(200, member(), method="PUT", path=MEMBER)
    vendor.reply(204, method="POST", path=f"{MEMBER}/tags")
    result = make_driver(vendor).send(sample("tagged"))

    assert result.detail == "member ada@example.com subscribed; tag 'vip' active"
    put, tags = vendor.requests
    assert (put.method, put.path) == ("PUT", MEMBER)
    assert (tags.method, tags.path) == ("POST", f"{MEMBER}/tags")
    assert tags.header("Authorization") == BASIC
    assert tags.json() == {"tags": [{"name": "vip", "status": "active"}]}


def test_deleted_archives_the_member(vendor: VendorServer) -> None:
    vendor.reply(204, method="DELETE", path=MEMBER)
    result = make_driver(vendor).send(sample("deleted"))

    assert (result.status_code, result.detail) == (204, "member archived")
    [request] = vendor.requests
    assert (request.method, request.path, request.body) == ("DELETE", MEMBER, b"")
    assert request.header("Authorization") == BASIC


def test_deleting_an_absent_member_is_nothing_to_do(vendor: VendorServer) -> None:
    vendor.reply(
        404, problem(404, "Resource Not Found", "The requested resource could not be found.")
    )
    result = make_driver(vendor).send(sample("deleted"))
    assert result.skipped
    assert "nothing to archive" in result.detail


def test_lead_without_email_is_skipped(vendor: VendorServer) -> None:
    result = make_driver(vendor).send(sample("new_signup", email=""))
    assert result.skipped
    assert "no email" in result.detail
    assert vendor.requests == []


def test_default_base_url_is_the_keys_data_centre() -> None:
    assert make_driver(None).base_url == "https://us21.api.mailchimp.com"


def test_options_are_validated() -> None:
    schema = MailchimpDriver.options_schema()
    with pytest.raises(ValidationError) as no_dc:
        schema.load({"api_key": "0123456789abcdef", "list_id": LIST_ID})
    assert "api_key" in no_dc.value.messages
    with pytest.raises(ValidationError) as bad_status:
        schema.load({"api_key": API_KEY, "list_id": LIST_ID, "status_if_new": "cleaned"})
    assert "status_if_new" in bad_status.value.messages
    with pytest.raises(ValidationError) as no_list:
        schema.load({"api_key": API_KEY})
    assert "list_id" in no_list.value.messages
    assert "api_key" in MailchimpDriver.secret_fields


@pytest.mark.parametrize(
    ("status", "title", "detail", "expected"),
    [
        (
            400,
            "Member In Compliance State",
            "ada@example.com is already a list member in compliance state due to unsubscribe, "
            "bounce, or compliance review.",
            "only they can re-subscribe",
        ),
        (
            400,
            "Forgotten Email Not Subscribed",
            "ada@example.com was permanently deleted and cannot be re-imported. The contact "
            "must re-subscribe to get back on the list.",
            "forgotten",
        ),
        (404, "Resource Not Found", "The requested resource could not be found.", "list_id"),
        (
            401,
            "API Key Invalid",
            "Your API key may be invalid, or you've attempted to access the wrong datacenter.",
            "api_key",
        ),
        (403, "Forbidden", "You don't have permission to access this resource.", "api_key"),
    ],
)
def test_known_permanent_errors_carry_title_and_detail(
    vendor: VendorServer, status: int, title: str, detail: str, expected: str
) -> None:
    vendor.reply(status, problem(status, title, detail), content_type="application/problem+json")
    with pytest.raises(PermanentDeliveryError) as caught:
        make_driver(vendor).send(sample("new_signup"))
    message = caught.value.message
    assert caught.value.status_code == status
    assert title in message and detail in message
    assert expected in message
    assert API_KEY not in message


def test_invalid_resource_lists_the_field_errors(vendor: VendorServer) -> None:
    vendor.reply(
        400,
        problem(
            400,
            "Invalid Resource",
            "The resource submitted could not be validated. For field-specific details, "
            "see the 'errors' array.",
            errors=[{"field": "merge_fields.PHONE", "message": "Please enter a phone number"}],
        ),
    )
    with pytest.raises(PermanentDeliveryError) as caught:
        make_driver(vendor).send(sample("new_signup", phone_number="nope"))
    assert "merge_fields.PHONE: Please enter a phone number" in caught.value.message
    assert "merge_fields" in caught.value.message


def test_tag_failure_after_upsert_is_raised(vendor: VendorServer) -> None:
    vendor.reply(200, member(), method="PUT")
    vendor.reply(
        429,
        problem(
            429, "Too Many Requests", "You have exceeded the limit of 10 simultaneous connections."
        ),
        headers={"Retry-After": "3"},
        method="POST",
    )
    with pytest.raises(RetryableDeliveryError) as caught:
        make_driver(vendor).send(sample("tagged"))
    assert caught.value.status_code == 429
    assert caught.value.retry_after == 3
    assert "Too Many Requests" in caught.value.message


def test_429_and_5xx_are_retryable(vendor: VendorServer) -> None:
    vendor.reply(429, problem(429, "Too Many Requests", "You have exceeded the limit."))
    vendor.reply(503, "Service Unavailable", content_type="text/plain")
    driver = make_driver(vendor)
    for expected in (429, 503):
        with pytest.raises(RetryableDeliveryError) as caught:
            driver.send(sample("new_signup"))
        assert caught.value.status_code == expected
