"""HubSpot driver against a local server speaking HubSpot's CRM v3 batch upsert."""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import pytest

from relay.core.errors import BudgetSpentError, PermanentDeliveryError, RetryableDeliveryError
from relay.core.models import Budget, DeliveryResult, Destination, LeadEvent, account_day
from relay.drivers.http import HttpClient
from relay.drivers.hubspot import MAX_SPLIT_REQUESTS, HubSpotDriver
from tests.support.samples import sample as sample_payload
from tests.support.vendor_server import HubSpotContacts, VendorServer

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
                "objectWriteTraceId": "evt-new_signup",  # unique per input: ties errors back
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


DAILY_429 = {"status": "error", "message": "You have reached your daily limit.",
             "errorType": "RATE_LIMIT", "policyName": "DAILY",
             "correlationId": "c033cdaa-2c40-4a64-ae48-b4cec88dad48"}


def test_daily_limit_waits_an_hour_at_most_without_the_accounts_time_zone(
        vendor: VendorServer) -> None:
    # HubSpot's day ends at midnight in the account's time zone, which its API does not tell:
    # without account_timezone the budget is held an hour (less if UTC's midnight is nearer).
    vendor.reply(
        429, DAILY_429,
        headers={"X-HubSpot-RateLimit-Daily": "250000", "X-HubSpot-RateLimit-Daily-Remaining": "0"},
    )
    before = time.time()
    with pytest.raises(BudgetSpentError) as caught:
        make_driver(vendor).send(sample("new_signup"))
    spent = caught.value
    assert isinstance(spent, RetryableDeliveryError) and spent.status_code == 429
    assert spent.until == pytest.approx(min(before + 3600, account_day(before)[1]), abs=2)
    assert spent.retry_after == pytest.approx(spent.until - before, abs=2)
    assert "daily limit is spent" in spent.message


def test_daily_limit_holds_until_midnight_in_the_accounts_time_zone(
        vendor: VendorServer) -> None:
    vendor.reply(429, DAILY_429)  # the policy alone says it: no Daily-Remaining header
    loaded = HubSpotDriver.options_schema().load({"access_token": TOKEN})
    destination = Destination(name="crm", type="hubspot", base_url=vendor.url, options=loaded,
                              budget=Budget("hubspot:acme", 250_000, "Asia/Tokyo"))
    driver = HubSpotDriver(destination, http=HttpClient())
    before = time.time()
    with pytest.raises(BudgetSpentError) as caught:
        driver.send(sample("new_signup"))
    assert caught.value.until == account_day(before, "Asia/Tokyo")[1] > before


def test_a_daily_429_answers_every_event_of_the_batch_with_one_budget_spent_error(
        vendor: VendorServer) -> None:
    vendor.reply(429, DAILY_429)
    answers = make_driver(vendor).send_batch(
        [sample("new_signup"), sample("verified", email="bob@example.com")])
    assert len(answers) == 2 and answers[0] is answers[1]
    assert isinstance(answers[0], BudgetSpentError)


def test_a_ten_secondly_429_is_not_the_daily_limit(vendor: VendorServer) -> None:
    vendor.reply(429, {**DAILY_429, "policyName": "TEN_SECONDLY_ROLLING",
                       "message": "You have reached your ten_secondly_rolling limit."},
                 headers={"X-HubSpot-RateLimit-Interval-Milliseconds": "10000",
                          "X-HubSpot-RateLimit-Daily-Remaining": "1200"})
    with pytest.raises(RetryableDeliveryError) as caught:
        make_driver(vendor).send(sample("new_signup"))
    assert not isinstance(caught.value, BudgetSpentError)
    assert caught.value.retry_after == 10


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


# -- batches: one request, an answer per event ------------------------------------------------


def lead(n: int, name: str = "new_signup", at: float | None = None, **changes: Any) -> LeadEvent:
    payload = sample_payload(name, **{"email": f"lead{n}@example.com", "social_id": f"s{n}",
                                      "id": n, **changes})
    return LeadEvent(event_id=f"evt-{name}-{n}-{at}", source="kickofflabs", name=name,
                     payload=payload, received_at=at if at is not None else float(n))


@pytest.fixture
def hubspot() -> Iterator[tuple[VendorServer, HubSpotContacts]]:
    contacts = HubSpotContacts(token=TOKEN)
    server = VendorServer(hubspot=contacts).start()
    try:
        yield server, contacts
    finally:
        server.stop()


def test_a_batch_is_one_request_exactly_as_hubspot_publishes_it(
    hubspot: tuple[VendorServer, HubSpotContacts],
) -> None:
    vendor, contacts = hubspot
    events = [lead(n) for n in range(3)]
    answers = make_driver(vendor).send_batch(events)

    assert answers.requests == 1
    assert [a.detail for a in answers] == [  # type: ignore[union-attr]
        "contact 1001 created", "contact 1002 created", "contact 1003 created"]
    [request] = vendor.requests
    assert (request.method, request.path) == ("POST", UPSERT)
    assert request.header("Authorization") == f"Bearer {TOKEN}"
    inputs = request.json()["inputs"]
    assert [i["id"] for i in inputs] == [f"lead{n}@example.com" for n in range(3)]
    assert all(i["idProperty"] == "email" for i in inputs)
    assert len({i["objectWriteTraceId"] for i in inputs}) == 3
    assert all(isinstance(v, str) for i in inputs for v in i["properties"].values())
    assert contacts.problems == []  # the request (and the answer) match HubSpot's schema
    assert set(contacts.contacts) == {f"lead{n}@example.com" for n in range(3)}


def test_events_of_one_email_are_merged_newest_value_winning(
    hubspot: tuple[VendorServer, HubSpotContacts],
) -> None:
    vendor, contacts = hubspot
    signup = lead(1, at=1.0, first_name="Ada", contest_score=0)
    verified = lead(1, "verified", at=2.0, verified=True, contest_score=5)
    # The newest, but without a first name: Ada's stays.
    score = lead(1, "score_change", at=3.0, email="Lead1@Example.com", contest_score=15,
                 first_name=None, given_name=None, verified=None)
    other = lead(2)
    answers = make_driver(vendor).send_batch([score, other, signup, verified])

    [request] = vendor.requests  # a duplicate email would be a 400 for the whole batch
    [merged, single] = sorted(request.json()["inputs"], key=lambda i: i["id"])
    assert merged["id"] == "Lead1@Example.com"  # the newest spelling
    assert merged["objectWriteTraceId"] == score.event_id
    assert merged["properties"]["firstname"] == "Ada"
    assert merged["properties"]["kickofflabs_score"] == "15"
    assert merged["properties"]["kickofflabs_verified"] == "true"
    assert single["id"] == "lead2@example.com"
    # Every event of the merged input is answered by that request.
    assert all(isinstance(a, DeliveryResult) for a in answers)
    assert [a.detail for a in answers] == [  # type: ignore[union-attr]
        "contact 1001 created (with 2 other event(s) of this email, merged into one input)",
        "contact 1002 created",
        "contact 1001 created (with 2 other event(s) of this email, merged into one input)",
        "contact 1001 created (with 2 other event(s) of this email, merged into one input)"]
    assert contacts.contacts["lead1@example.com"]["kickofflabs_score"] == "15"
    assert contacts.problems == []


def test_a_207_fails_only_its_own_inputs_tied_by_trace_id(
    hubspot: tuple[VendorServer, HubSpotContacts],
) -> None:
    vendor, contacts = hubspot
    events = [lead(0), lead(1, email="ada@example"), lead(2), lead(3)]
    answers = make_driver(vendor).send_batch(events)

    assert answers.requests == 1
    assert [type(a).__name__ for a in answers] == [
        "DeliveryResult", "PermanentDeliveryError", "DeliveryResult", "DeliveryResult"]
    refused = answers[1]
    assert isinstance(refused, PermanentDeliveryError)
    assert refused.status_code == 207
    assert "Email address ada@example is invalid" in refused.message
    assert set(contacts.contacts) == {"lead0@example.com", "lead2@example.com",
                                      "lead3@example.com"}
    assert contacts.counts["status_207"] == 1
    assert contacts.problems == []


def test_a_207_error_worth_retrying_retries_its_input_alone(vendor: VendorServer) -> None:
    events = [lead(0), lead(1), lead(2)]
    vendor.reply(207, {
        "status": "COMPLETE", "startedAt": "2026-12-05T10:00:00.100Z",
        "completedAt": "2026-12-05T10:00:00.400Z", "numErrors": 2,
        "results": [  # not in input order, and one without its trace id: matched by email
            {"id": "3", "new": False, "objectWriteTraceId": events[2].event_id,
             "properties": {"email": "lead2@example.com"}, "archived": False,
             "createdAt": "2026-12-05T10:00:00.300Z", "updatedAt": "2026-12-05T10:00:00.300Z"}],
        "errors": [
            {"status": "423", "category": "LOCKED", "message": "contact locked",
             "context": {"objectWriteTraceId": [events[1].event_id]}, "errors": [], "links": {}},
            {"status": "error", "category": "RATE_LIMITS", "message": "secondly limit",
             "context": {"objectWriteTraceId": [events[0].event_id]}, "errors": [],
             "links": {}}]})
    answers = make_driver(vendor).send_batch(events)

    first, second, third = answers
    assert isinstance(first, RetryableDeliveryError) and first.status_code == 207
    assert isinstance(second, RetryableDeliveryError) and second.status_code == 423
    assert second.retry_after == 2.0  # HubSpot's locks last 2 s
    assert isinstance(third, DeliveryResult) and third.detail == "contact 3 updated"


def test_an_error_tied_to_no_input_retries_the_inputs_it_may_be_about(
    vendor: VendorServer,
) -> None:
    events = [lead(0), lead(1), lead(2)]
    vendor.reply(207, {"status": "COMPLETE", "results": [
        {"id": "1", "new": True, "objectWriteTraceId": events[0].event_id,
         "properties": {"email": "lead0@example.com"}}],
        "numErrors": 1, "errors": [{"status": "error", "category": "VALIDATION_ERROR",
                                    "message": "something", "context": {}}]})
    answers = make_driver(vendor).send_batch(events)
    assert isinstance(answers[0], DeliveryResult)
    assert all(isinstance(a, RetryableDeliveryError) for a in answers[1:])


def test_a_whole_batch_400_pulls_the_input_it_quotes_and_sends_the_rest(
    vendor: VendorServer,
) -> None:
    contacts = HubSpotContacts(multi_status=False)  # the dated API: no 207
    vendor.hubspot = contacts
    events = [lead(n) for n in range(5)]
    events[3] = lead(3, email="bcooper@example")
    answers = make_driver(vendor).send_batch(events)

    assert answers.requests == 2
    assert [r.json()["inputs"].__len__() for r in vendor.requests] == [5, 4]
    bad = answers[3]
    assert isinstance(bad, PermanentDeliveryError) and bad.status_code == 400
    assert "Email address bcooper@example is invalid" in bad.message
    assert all(isinstance(a, DeliveryResult) for i, a in enumerate(answers) if i != 3)
    assert len(contacts.contacts) == 4
    assert contacts.problems == []


def test_a_whole_batch_400_that_names_nothing_is_halved(vendor: VendorServer) -> None:
    contacts = HubSpotContacts(multi_status=False)
    vendor.hubspot = contacts
    vendor.reply(400, {"status": "error", "category": "VALIDATION_ERROR",
                       "message": "Some of the inputs are not valid", "correlationId": "c1"})
    events = [lead(n) for n in range(8)]
    events[6] = lead(6, email="x@bad")
    answers = make_driver(vendor).send_batch(events)

    # 8 refused -> halves of 4: the good half goes, the other quotes its bad input.
    assert [len(r.json()["inputs"]) for r in vendor.requests] == [8, 4, 4, 3]
    assert answers.requests == 4
    assert [type(a).__name__ for a in answers].count("DeliveryResult") == 7
    assert isinstance(answers[6], PermanentDeliveryError)
    assert len(contacts.contacts) == 7


def test_a_property_that_does_not_exist_fails_the_batch_without_splitting(
    vendor: VendorServer,
) -> None:
    known = {"email", "firstname", "lastname", "phone", "kickofflabs_referral_link",
             "kickofflabs_score", "kickofflabs_verified", "kickofflabs_opted_out"}
    vendor.hubspot = HubSpotContacts(multi_status=False, known_properties=known)
    answers = make_driver(vendor).send_batch([lead(n) for n in range(4)])

    assert answers.requests == 1
    for answer in answers:
        assert isinstance(answer, PermanentDeliveryError)
        assert "kickofflabs_rank" in answer.message and "properties:" in answer.message


def test_a_duplicate_hubspot_sees_is_sent_alone(vendor: VendorServer) -> None:
    events = [lead(0), lead(1), lead(2)]
    vendor.reply(400, {"status": "error", "category": "VALIDATION_ERROR",
                       "message": "Duplicate IDs found in batch input: [lead1@example.com]. "
                                  "IDs must be unique",
                       "context": {"ids": ["lead1@example.com"]}, "correlationId": "c2"})
    vendor.hubspot = HubSpotContacts()
    answers = make_driver(vendor).send_batch(events)
    assert [[i["id"] for i in r.json()["inputs"]] for r in vendor.requests] == [
        ["lead0@example.com", "lead1@example.com", "lead2@example.com"],
        ["lead0@example.com", "lead2@example.com"], ["lead1@example.com"]]
    assert all(isinstance(a, DeliveryResult) for a in answers)


def test_splitting_stops_at_its_request_budget_and_retries_the_rest(vendor: VendorServer) -> None:
    for _ in range(40):
        vendor.reply(400, {"status": "error", "category": "VALIDATION_ERROR",
                           "message": "Bad batch", "correlationId": "c3"})
    answers = make_driver(vendor).send_batch([lead(n) for n in range(40)])

    assert answers.requests == len(vendor.requests) == MAX_SPLIT_REQUESTS
    kinds = {type(a).__name__ for a in answers}
    assert kinds == {"PermanentDeliveryError", "RetryableDeliveryError"}
    assert all("not split further" in a.message for a in answers
               if isinstance(a, RetryableDeliveryError))


def test_past_the_rolling_limit_hubspot_answers_429_and_the_driver_waits_its_window(
    vendor: VendorServer,
) -> None:
    contacts = HubSpotContacts(limit=2, interval=10.0)
    vendor.hubspot = contacts
    driver = make_driver(vendor)
    driver.send_batch([lead(0)])
    driver.send_batch([lead(1)])
    answers = driver.send_batch([lead(2), lead(3)])

    assert all(isinstance(a, RetryableDeliveryError) for a in answers)
    refused = answers[0]
    assert isinstance(refused, RetryableDeliveryError)
    assert (refused.status_code, refused.retry_after) == (429, 10.0)
    last = vendor.requests[-1]
    assert last.path == UPSERT
    assert contacts.counts["rate_limited"] == 1
    assert contacts.problems == []


@pytest.mark.parametrize(("status", "floor"), [(423, 2.0), (477, 30.0)])
def test_423_and_477_retry_every_delivery_of_the_batch(vendor: VendorServer, status: int,
                                                        floor: float) -> None:
    vendor.reply(status, {"status": "error", "message": "busy", "category": "LOCKED"},
                 headers={"Retry-After": "30"} if status == 477 else None)
    answers = make_driver(vendor).send_batch([lead(n) for n in range(3)])
    for answer in answers:
        assert isinstance(answer, RetryableDeliveryError)
        assert answer.status_code == status and (answer.retry_after or 0) >= floor


def test_skipped_and_local_refusals_cost_no_request(vendor: VendorServer) -> None:
    answers = make_driver(vendor).send_batch(
        [lead(0, "deleted"), lead(1, email=None, phone_number="+1555"), lead(2, email="nope")])
    assert answers.requests == 0 and vendor.requests == []
    assert [getattr(a, "skipped", None) for a in answers[:2]] == [True, True]
    assert isinstance(answers[2], PermanentDeliveryError)


def test_the_engine_records_every_event_of_a_merged_batch_as_delivered(
    hubspot: tuple[VendorServer, HubSpotContacts],
) -> None:
    import fakeredis

    from relay.config.settings import Settings
    from relay.delivery.engine import Engine
    from relay.delivery.gates import RateLimitGate
    from tests.support.helpers import config, make_app

    vendor, contacts = hubspot
    relay_config = config([{"name": "crm", "type": "hubspot", "access_token": TOKEN,
                            "base_url": vendor.url, "batch": {"wait": "50ms"}}],
                          sources={"kickofflabs": {}})
    client = fakeredis.FakeRedis()
    app = make_app(relay_config, client).test_client()
    posted: list[tuple[str, str]] = []  # (event id, email)

    def post(name: str, n: int, **changes: Any) -> None:
        payload = sample_payload(name, **{"email": f"lead{n}@example.com", "social_id": f"s{n}",
                                          "id": n, **changes})
        response = app.post("/hooks/kickofflabs", json=payload)
        assert response.status_code == 202
        posted.append((response.get_json()["event_id"], payload["email"]))

    for n in range(20):
        post("new_signup", n)
    for n in range(5):  # five leads verify while their signups still wait: merged
        post("verified", n, verified=True)
    post("new_signup", 99, email="lead99@example")  # HubSpot refuses this one (a 207)
    engine = Engine(Settings(), relay_config, client, gates=(RateLimitGate(client),))
    engine.admit()
    report = engine.drain("crm").as_dict()

    assert report == {"delivered": 25, "dead": 1}
    assert contacts.counts["requests"] == 1 and contacts.batch_sizes == [21]
    for event_id, email in posted:
        [state] = engine.store.delivery_states(event_id).values()
        assert state["status"] == ("dead" if email == "lead99@example" else "delivered")
    assert {contacts.contacts[f"lead{n}@example.com"]["kickofflabs_verified"]
            for n in range(5)} == {"true"}
    assert contacts.problems == []
