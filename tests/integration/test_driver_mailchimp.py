"""Mailchimp driver against a local server speaking Marketing API 3.0 list members: scripted
answers, and the stand-in of ``tests/support/vendor_server.py`` (``MailchimpAudience``), which
checks every request against Mailchimp's published OpenAPI description."""

from __future__ import annotations

import base64
import hashlib
from collections.abc import Iterator
from typing import Any

import pytest
from marshmallow import ValidationError

from relay.core.errors import PermanentDeliveryError, RetryableDeliveryError
from relay.core.models import DeliveryResult, Destination, LeadEvent
from relay.drivers.http import HttpClient
from relay.drivers.mailchimp import MailchimpDriver
from tests.support.samples import sample as sample_payload
from tests.support.vendor_server import MailchimpAudience, VendorServer

API_KEY = "0123456789abcdef0123456789abcdef-us21"
LIST_ID = "a1b2c3d4e5"
ADA_HASH = hashlib.md5(b"ada@example.com").hexdigest()
MEMBER = f"/3.0/lists/{LIST_ID}/members/{ADA_HASH}"
BATCH = f"/3.0/lists/{LIST_ID}"
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


def batch_answer(*members: dict[str, Any], new: bool = True,
                 errors: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    return {"new_members": list(members) if new else [],
            "updated_members": [] if new else list(members),
            "errors": errors or [], "total_created": len(members) if new else 0,
            "total_updated": 0 if new else len(members), "error_count": len(errors or [])}


def problem(status: int, title: str, detail: str, **extra: Any) -> dict[str, Any]:
    return {
        "type": "https://mailchimp.com/developer/marketing/docs/errors/",
        "title": title,
        "status": status,
        "detail": detail,
        "instance": "995c5cb0-3280-4a6e-808b-3b096d0bb219",
        **extra,
    }


def test_new_signup_is_a_batch_of_one_member(vendor: VendorServer) -> None:
    vendor.reply(200, batch_answer(member()), method="POST", path=BATCH)
    result = make_driver(vendor).send(sample("new_signup", email="Ada@Example.com"))

    assert result.status_code == 200
    # Mailchimp echoes the address lower-cased: the member is found all the same.
    assert result.detail == "member Ada@Example.com subscribed (added)"
    [request] = vendor.requests
    assert (request.method, request.path) == ("POST", BATCH)
    assert request.header("Authorization") == BASIC
    assert request.header("Content-Type") == "application/json"
    assert request.json() == {
        "members": [{
            "email_address": "Ada@Example.com",
            "status_if_new": "subscribed",
            "merge_fields": {"FNAME": "Ada", "LNAME": "Lovelace"},
        }],
        "update_existing": True,
    }


def test_double_opt_in_and_merge_field_mapping(vendor: VendorServer) -> None:
    vendor.reply(200, batch_answer(member("pending")))
    driver = make_driver(
        vendor,
        status_if_new="pending",
        merge_fields={"COMPANY": "custom_fields.company", "LNAME": None, "RANK": "rank"},
    )
    result = driver.send(sample("referral", phone_number="+15555550123"))

    assert result.detail == "member ada@example.com pending (added)"
    assert vendor.requests[0].json()["members"] == [{
        "email_address": "ada@example.com",
        "status_if_new": "pending",
        "merge_fields": {
            "FNAME": "Ada",
            "PHONE": "+15555550123",
            "COMPANY": "Analytical Engines Ltd",
            "RANK": 268,  # a whole-number lead field: a number merge field by default
        },
    }]


def test_opted_out_unsubscribes_new_and_existing_members(vendor: VendorServer) -> None:
    vendor.reply(200, batch_answer(member("unsubscribed"), new=False))
    result = make_driver(vendor).send(sample("opted_out"))

    assert result.detail == "member ada@example.com unsubscribed (updated)"
    [body] = vendor.requests[0].json()["members"]
    assert body["status"] == "unsubscribed"
    assert body["status_if_new"] == "unsubscribed"


def test_tagged_upserts_then_activates_the_tag(vendor: VendorServer) -> None:
    vendor.reply(200, batch_answer(member(), new=False), method="POST", path=BATCH)
    vendor.reply(204, method="POST", path=f"{MEMBER}/tags")
    result = make_driver(vendor).send(sample("tagged"))

    assert result.detail == "member ada@example.com subscribed (updated); tag 'vip' active"
    put, tags = vendor.requests
    assert (put.method, put.path) == ("POST", BATCH)
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
    vendor.reply(200, batch_answer(member()), method="POST", path=BATCH)
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


# -- batches, against the Mailchimp stand-in ------------------------------------------------------


@pytest.fixture
def audience() -> Iterator[MailchimpAudience]:
    yield MailchimpAudience(list_id=LIST_ID, api_key=API_KEY, merge_fields={
        "FNAME": "text", "LNAME": "text", "PHONE": "phone", "SCORE": "number",
        "SIGNED_UP": "date", "BDAY": "birthday", "ADDRESS": "address", "ZIP": "zip",
        "SITE": "url", "PLAN": "dropdown"})


@pytest.fixture
def mailchimp(audience: MailchimpAudience) -> Iterator[VendorServer]:
    server = VendorServer(mailchimp=audience).start()
    try:
        yield server
    finally:
        server.stop()


def leads(count: int, name: str = "new_signup", **changes: Any) -> list[LeadEvent]:
    return [LeadEvent(event_id=f"evt-{n}", source="kickofflabs", name=name,
                      payload=sample_payload(name, email=f"lead{n}@example.com",
                                             social_id=f"s{n}", id=n, **changes))
            for n in range(count)]


def test_a_batch_is_one_request_and_each_error_fails_its_own_member(
    mailchimp: VendorServer, audience: MailchimpAudience
) -> None:
    events = leads(6)
    events[2].payload["email"] = "ada@nowhere"  # Mailchimp refuses the address
    events[4].payload["first_name"] = {"not": "text"}  # left out here, never sent
    driver = make_driver(mailchimp, merge_fields={"SCORE": "contest_score"})
    answers = driver.send_batch(events)

    assert audience.problems == []  # the request is the one Mailchimp's schema describes
    [request] = mailchimp.requests
    assert (request.method, request.path) == ("POST", BATCH)
    body = request.json()
    assert body["update_existing"] is True
    assert body["members"][0] == {"email_address": "lead0@example.com",
                                  "status_if_new": "subscribed",
                                  "merge_fields": {"FNAME": "Ada", "LNAME": "Lovelace",
                                                   "SCORE": 0}}
    assert answers.requests == 1
    refused = answers[2]
    assert isinstance(refused, PermanentDeliveryError)
    assert refused.message == ("Mailchimp refused member ada@nowhere: Please provide a valid "
                               "email address. (email_address) [ERROR_GENERIC]")
    assert answers[0].detail == "member lead0@example.com subscribed (added)"
    assert answers[4].detail == ("member lead4@example.com subscribed (added); merge field "
                                 "FNAME (text): an object is not text: left out")
    assert sum(isinstance(a, DeliveryResult) for a in answers) == 5
    assert len(audience.members) == 5


def test_a_merge_value_the_audience_refuses_fails_only_that_member(
    mailchimp: VendorServer, audience: MailchimpAudience
) -> None:
    events = leads(3, custom_fields={"plan": "gold"})
    events[1].payload["custom_fields"] = {"plan": 7}  # the audience's PLAN takes text only
    driver = make_driver(mailchimp, merge_fields={
        "PLAN": {"path": "custom_fields.plan", "type": "number"}})
    answers = driver.send_batch(events)
    # "gold" is no number: left out (a note) rather than refused by Mailchimp.
    assert "merge field PLAN (number): 'gold' is not a number: left out" in answers[0].detail
    assert isinstance(answers[1], PermanentDeliveryError)
    assert "merge_fields.PLAN" in answers[1].message
    assert "check merge_fields (and their types)" in answers[1].message
    assert isinstance(answers[2], DeliveryResult)


def test_merge_values_are_converted_to_their_field_types_when_exact(
    mailchimp: VendorServer, audience: MailchimpAudience
) -> None:
    [event] = leads(1, custom_fields={
        "score": "12", "birthday": "1990-12-25", "zip": 10017, "site": "https://ada.example",
        "address": {"addr1": "1 Engine Way", "city": "London", "state": "LDN", "zip": "N1",
                    "country": "GB", "floor": 3}})
    driver = make_driver(mailchimp, merge_fields={
        "SCORE": {"path": "custom_fields.score", "type": "number"},
        "SIGNED_UP": {"path": "when", "type": "date"},
        "BDAY": {"path": "custom_fields.birthday", "type": "birthday"},
        "ZIP": {"path": "custom_fields.zip", "type": "zip"},
        "SITE": {"path": "custom_fields.site", "type": "url"},
        "ADDRESS": {"path": "custom_fields.address", "type": "address"},
    })
    [answer] = driver.send_batch([event])
    assert isinstance(answer, DeliveryResult), answer
    assert audience.problems == []
    assert audience.members["lead0@example.com"]["merge_fields"] == {
        "FNAME": "Ada", "LNAME": "Lovelace", "SCORE": 12, "SIGNED_UP": "2026-07-15",
        "BDAY": "12/25", "ZIP": "10017", "SITE": "https://ada.example",
        "ADDRESS": {"addr1": "1 Engine Way", "city": "London", "state": "LDN", "zip": "N1",
                    "country": "GB"}}


def test_events_of_one_email_are_one_member_and_an_opt_out_wins(
    mailchimp: VendorServer, audience: MailchimpAudience
) -> None:
    first = leads(1)[0]
    score = LeadEvent(event_id="evt-score", source="kickofflabs", name="score_change",
                      payload=sample_payload("score_change", email="LEAD0@example.com"))
    out = LeadEvent(event_id="evt-out", source="kickofflabs", name="opted_out",
                    payload=sample_payload("opted_out", email="lead0@example.com"))
    later = LeadEvent(event_id="evt-verified", source="kickofflabs", name="verified",
                      payload=sample_payload("verified", email="lead0@example.com",
                                             opted_out=False, family_name="Byron"))
    answers = make_driver(mailchimp).send_batch([first, score, out, later])

    [request] = mailchimp.requests
    [member] = request.json()["members"]
    assert member["status"] == "unsubscribed"
    assert member["merge_fields"]["LNAME"] == "Byron"  # the newest value
    assert audience.members["lead0@example.com"]["status"] == "unsubscribed"
    assert len({a.detail for a in answers}) == 1
    assert answers[0].detail.endswith("with 3 other event(s) of this email, merged into one "
                                      "member")


def test_existing_members_keep_their_status(
    mailchimp: VendorServer, audience: MailchimpAudience
) -> None:
    driver = make_driver(mailchimp)
    driver.send_batch(leads(2, name="opted_out"))
    answers = driver.send_batch(leads(2, name="score_change", opted_out=False))
    assert [a.detail for a in answers] == [
        "member lead0@example.com unsubscribed (updated)",
        "member lead1@example.com unsubscribed (updated)"]


def test_tags_and_archives_go_member_by_member_around_the_batch(
    mailchimp: VendorServer, audience: MailchimpAudience
) -> None:
    driver = make_driver(mailchimp)
    driver.send_batch(leads(3))
    mailchimp.requests.clear()
    tagged = leads(2, name="tagged")
    gone = LeadEvent(event_id="gone", source="kickofflabs", name="deleted",
                     payload=sample_payload("deleted", email="lead2@example.com"))
    answers = driver.send_batch([*tagged, gone])

    assert [f"{r.method} {r.path}" for r in mailchimp.requests] == [
        f"DELETE /3.0/lists/{LIST_ID}/members/"
        f"{hashlib.md5(b'lead2@example.com').hexdigest()}",
        f"POST {BATCH}",
        f"POST /3.0/lists/{LIST_ID}/members/{hashlib.md5(b'lead0@example.com').hexdigest()}"
        "/tags",
        f"POST /3.0/lists/{LIST_ID}/members/{hashlib.md5(b'lead1@example.com').hexdigest()}"
        "/tags"]
    assert answers.requests == 4
    assert audience.tags["lead0@example.com"] == {"vip"}
    assert answers[0].detail == "member lead0@example.com subscribed (updated); tag 'vip' active"
    assert answers[2].detail == "member archived"
    assert audience.members["lead2@example.com"]["status"] == "archived"
    assert audience.problems == []


def test_a_whole_batch_refused_fails_every_member_with_mailchimps_words(
    mailchimp: VendorServer,
) -> None:
    loaded = MailchimpDriver.options_schema().load({"api_key": API_KEY, "list_id": "nope"})
    driver = MailchimpDriver(Destination(name="newsletter", type="mailchimp",
                                         base_url=mailchimp.url, options=loaded),
                             http=HttpClient())
    answers = driver.send_batch(leads(3))
    assert all(isinstance(a, PermanentDeliveryError) for a in answers)
    assert "Resource Not Found" in answers[0].message and "check list_id" in answers[0].message


def test_a_bare_403_is_mailchimps_throttle_and_retried(vendor: VendorServer) -> None:
    vendor.reply(403, b"")
    with pytest.raises(RetryableDeliveryError) as caught:
        make_driver(vendor).send(sample("new_signup"))
    assert caught.value.status_code == 403
    vendor.reply(403, problem(403, "Forbidden", "You don't have permission."))
    with pytest.raises(PermanentDeliveryError):
        make_driver(vendor).send(sample("new_signup"))


def test_a_send_ends_within_its_timeout_however_many_tags_it_has(
    mailchimp: VendorServer, audience: MailchimpAudience
) -> None:
    # The lease of a delivery is its destination's timeout (plus a margin): a batch with a tag
    # request per member must not outlive it, or another worker sends it again meanwhile.
    driver = make_driver(mailchimp)
    driver.send_batch(leads(8))
    audience.latency = 0.25
    mailchimp.requests.clear()
    loaded = MailchimpDriver.options_schema().load({"api_key": API_KEY, "list_id": LIST_ID})
    short = MailchimpDriver(Destination(name="newsletter", type="mailchimp", timeout=1.0,
                                        base_url=mailchimp.url, options=loaded),
                            http=HttpClient())
    answers = short.send_batch(leads(8, name="tagged"))

    late = [a for a in answers if isinstance(a, RetryableDeliveryError)]
    assert late, "the tags past the timeout are left for the retry"
    assert "the send took its whole timeout (1s); sent again" in late[-1].message
    assert "member lead7@example.com subscribed (updated)" in late[-1].message
    assert len(mailchimp.requests) < 1 + 8
