"""Klaviyo driver against a local server speaking Klaviyo's JSON:API (pinned revision): one
profile at a time (scripted answers), and batches in bulk import jobs against the stand-in of
``tests/support/vendor_server.py`` (``KlaviyoAccount``), which checks every request against
Klaviyo's published OpenAPI description and plays its asynchronous jobs."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import fakeredis
import pytest
from click.testing import CliRunner
from marshmallow import ValidationError

from relay.cli import main
from relay.cli import operator as cli_ops
from relay.config.settings import Settings
from relay.core.errors import PermanentDeliveryError, RetryableDeliveryError
from relay.core.models import DeliveryResult, Destination, LeadEvent
from relay.delivery.engine import Engine
from relay.drivers.http import HttpClient
from relay.drivers.klaviyo import REVISION, KlaviyoDriver
from tests.support.helpers import config, make_app, run_queue
from tests.support.history import history_for
from tests.support.samples import sample as sample_payload
from tests.support.vendor_server import KlaviyoAccount, RecordedRequest, VendorServer

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
    assert result.detail == (f"profile {PROFILE_ID} created; subscribed to list {LIST_ID} "
                             "(job accepted; Klaviyo does not report on subscription jobs)")
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
    result = make_driver(vendor, list_id=LIST_ID, unsubscribe="list").send(sample("opted_out"))

    assert result.detail == (f"profile {PROFILE_ID} updated; email marketing unsubscribed from "
                             f"list {LIST_ID} (job accepted; Klaviyo does not report on "
                             "subscription jobs)")
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
    result = make_driver(vendor, unsubscribe="global").send(sample("phone_number_opt_out"))

    assert "sms marketing unsubscribed from the whole account (job accepted" in result.detail
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
    assert f"profile {PROFILE_ID} created" in caught.value.message  # the import did apply


# -- batches: bulk import jobs, followed to their end -------------------------------------------

JOBS = "/api/profile-bulk-import-jobs"


@pytest.fixture
def account() -> Iterator[KlaviyoAccount]:
    """Klaviyo's profile endpoints: jobs complete 0.2 s after they are created."""
    yield KlaviyoAccount(api_key=API_KEY, job_delay=0.2)


@pytest.fixture
def klaviyo(account: KlaviyoAccount) -> Iterator[VendorServer]:
    server = VendorServer(klaviyo=account).start()
    try:
        yield server
    finally:
        server.stop()


def batch_driver(server: VendorServer, timeout: float = 30.0, **options: Any) -> KlaviyoDriver:
    loaded = KlaviyoDriver.options_schema().load({"api_key": API_KEY, **options})
    destination = Destination(name="klaviyo", type="klaviyo", base_url=server.url,
                              options=loaded, timeout=timeout)
    driver = KlaviyoDriver(destination, http=HttpClient())
    driver.first_poll = 0.05  # the stand-in's jobs take 0.2 s, not minutes
    return driver


def signups(count: int, **changes: Any) -> list[LeadEvent]:
    return [LeadEvent(event_id=f"evt-{n}", source="kickofflabs", name="new_signup",
                      payload=sample_payload("new_signup", email=f"lead{n}@example.com",
                                             id=4700 + n, social_id=f"s{n}", **changes))
            for n in range(count)]


def paths(server: VendorServer) -> list[str]:
    return [f"{r.method} {r.path.split('?')[0]}" for r in server.requests]


def test_a_batch_is_one_import_job_followed_until_applied(
    klaviyo: VendorServer, account: KlaviyoAccount
) -> None:
    answers = batch_driver(klaviyo).send_batch(signups(6))

    assert account.problems == []  # every request matched Klaviyo's published schema
    create = klaviyo.requests[0]
    assert (create.method, create.path) == ("POST", JOBS)
    assert_klaviyo_headers(create)
    body = create.json()
    assert body["data"]["type"] == "profile-bulk-import-job"
    assert "relationships" not in body["data"]  # consent is the subscribe job's business
    profiles = body["data"]["attributes"]["profiles"]["data"]
    assert profiles[0] == {"type": "profile", "attributes": {
        "email": "lead0@example.com", "first_name": "Ada", "last_name": "Lovelace",
        "properties": {"kickofflabs_rank": 268,
                       "kickofflabs_referral_link": "https://www.example.com/?kid=36N38P",
                       "kickofflabs_score": 0, "kickofflabs_verified": False}}}
    assert len(profiles) == 6
    [job_id] = account.jobs
    followed = [p for p in paths(klaviyo) if p == f"GET {JOBS}/{job_id}"]
    assert followed, "the job is looked at until it is complete"
    assert f"GET {JOBS}/{job_id}/import-errors" not in paths(klaviyo)  # failed_count 0
    assert [a.detail for a in answers] == [f"applied by Klaviyo import job {job_id}"] * 6
    assert answers.requests == len(klaviyo.requests)  # the follow-ups are charged too
    assert len(account.profiles) == 6


def test_numeric_standard_attributes_go_out_as_strings(
    klaviyo: VendorServer, account: KlaviyoAccount
) -> None:
    # KickoffLabs' lead id is a number; Klaviyo's external_id is a string and a number is
    # refused (the whole request, in a bulk job).
    driver = batch_driver(klaviyo, properties={"external_id": "id", "title": "rank",
                                               "location.zip": "custom_fields.zip"})
    events = signups(5, custom_fields={"zip": 10017})
    events.append(LeadEvent(event_id="one", source="kickofflabs", name="verified",
                            payload=sample_payload("verified", id=4711)))
    driver.send_batch(events)  # a bulk job
    driver.send_batch(events[-1:])  # one profile: /api/profile-import

    assert account.problems == []
    job = klaviyo.requests[0].json()["data"]["attributes"]["profiles"]["data"]
    assert job[0]["attributes"]["external_id"] == "4700"
    assert job[0]["attributes"]["title"] == "268"
    assert job[0]["attributes"]["location"] == {"zip": "10017"}
    [single] = [r for r in klaviyo.requests if r.path == IMPORT]
    assert single.json()["data"]["attributes"]["external_id"] == "4711"
    assert account.profiles["ada@example.com"]["external_id"] == "4711"


def test_import_errors_fail_only_their_own_profiles(
    klaviyo: VendorServer, account: KlaviyoAccount
) -> None:
    events = signups(6)
    events[2].payload["email"] = "ada@nowhere"  # Klaviyo refuses it in the job
    answers = batch_driver(klaviyo).send_batch(events)

    [job_id] = account.jobs
    assert f"GET {JOBS}/{job_id}/import-errors" in paths(klaviyo)
    refused = answers[2]
    assert isinstance(refused, PermanentDeliveryError)
    assert refused.message == (
        f"Klaviyo's import job {job_id} refused this profile: Invalid email address: "
        "ada@nowhere (/data/attributes/profiles/data/2/attributes/email)")
    assert all(isinstance(a, DeliveryResult) and a.detail.startswith("applied")
               for i, a in enumerate(answers) if i != 2)
    assert "ada@nowhere" not in account.profiles and len(account.profiles) == 5


def test_without_original_payload_errors_are_tied_by_their_pointer(klaviyo: VendorServer,
                                                                  ) -> None:
    klaviyo.klaviyo.error_payloads = False  # type: ignore[union-attr]
    events = signups(7)
    events[4].payload["email"] = "bob@nowhere"
    answers = batch_driver(klaviyo).send_batch(events)
    assert isinstance(answers[4], PermanentDeliveryError)
    assert [i for i, a in enumerate(answers) if isinstance(a, DeliveryResult)] == [
        0, 1, 2, 3, 5, 6]


def test_every_page_of_import_errors_is_read(
    klaviyo: VendorServer, account: KlaviyoAccount
) -> None:
    events = signups(130)
    for event in events[:105]:
        event.payload["email"] = event.payload["email"].replace("example.com", "nowhere")
    answers = batch_driver(klaviyo).send_batch(events)

    [job_id] = account.jobs
    pages = [r for r in klaviyo.requests if r.path.startswith(f"{JOBS}/{job_id}/import-errors")]
    assert len(pages) == 2  # 100 a page
    assert all(isinstance(a, PermanentDeliveryError) for a in answers[:105])
    assert all(isinstance(a, DeliveryResult) for a in answers[105:])
    assert account.problems == []


def test_errors_klaviyo_does_not_tie_to_a_profile_send_the_others_again(
    klaviyo: VendorServer, account: KlaviyoAccount
) -> None:
    events = signups(5)
    events[1].payload["email"] = "ada@nowhere"
    driver = batch_driver(klaviyo)
    original = account._job_errors  # noqa: SLF001

    def unplaced(job_id: Any, request: Any, query: Any) -> Any:  # errors that name nothing
        answer = original(job_id, request, query)
        page = json.loads(answer.body)
        for error in page["data"]:
            error["attributes"].pop("original_payload", None)
            error["attributes"]["source"] = {"pointer": "/data"}
        answer.body = json.dumps(page).encode()
        return answer

    account._job_errors = unplaced  # type: ignore[method-assign]  # noqa: SLF001
    answers = driver.send_batch(events)
    assert all(isinstance(a, RetryableDeliveryError) for a in answers)
    assert "did not tie to a profile" in answers[0].message


def test_a_job_that_never_completes_is_sent_again(
    klaviyo: VendorServer, account: KlaviyoAccount
) -> None:
    account.stuck = {"lead3@example.com"}
    driver = batch_driver(klaviyo, timeout=5.0, job_timeout="1s")
    driver.first_poll = 0.2
    answers = driver.send_batch(signups(5))

    [job_id] = account.jobs
    assert all(isinstance(a, RetryableDeliveryError) for a in answers)
    assert answers[0].message == (f"Klaviyo's import job {job_id} was not complete after 1s; "
                                  "the profile is imported again")
    assert account.profiles == {}
    assert 2 <= len(klaviyo.requests) <= 6  # the create, and a few looks within the second


def test_polls_wait_longer_each_time_up_to_ten_seconds(
    klaviyo: VendorServer, account: KlaviyoAccount
) -> None:
    # A clock that moves only when the driver sleeps: the waits between looks are exact.
    account.stuck = {"lead0@example.com"}
    now = [0.0]
    waits: list[float] = []

    def sleep(seconds: float) -> None:
        waits.append(round(seconds, 3))
        now[0] += seconds

    loaded = KlaviyoDriver.options_schema().load({"api_key": API_KEY})
    destination = Destination(name="klaviyo", type="klaviyo", base_url=klaviyo.url,
                              options=loaded, timeout=90.0)
    driver = KlaviyoDriver(destination, http=HttpClient(), sleep=sleep, clock=lambda: now[0])
    answers = driver.send_batch(signups(5))

    assert waits == [0.5, 1, 2, 4, 8, 10, 10, 10, 10, 4.5]  # 60 s: the default job_timeout
    assert paths(klaviyo).count(f"GET {JOBS}/{next(iter(account.jobs))}") == 10
    assert all(isinstance(a, RetryableDeliveryError) for a in answers)


def test_a_throttled_look_waits_what_klaviyo_says(
    klaviyo: VendorServer, account: KlaviyoAccount
) -> None:
    klaviyo.reply(429, klaviyo_error(429, "throttled", "Request was throttled.",
                                     "Request was throttled. Expected available in 1 seconds."),
                  headers={"Retry-After": "1"}, method="GET")
    answers = batch_driver(klaviyo).send_batch(signups(5))
    assert all(isinstance(a, DeliveryResult) for a in answers)
    statuses = [r.method for r in klaviyo.requests]
    assert statuses.count("GET") >= 2


def test_a_job_klaviyo_refuses_for_some_profiles_goes_again_without_them(
    klaviyo: VendorServer, account: KlaviyoAccount
) -> None:
    klaviyo.reply(400, klaviyo_error(400, "invalid", "Invalid input.",
                                     "Invalid email address",
                                     source={"pointer": "/data/attributes/profiles/data/3/"
                                                        "attributes/email"}),
                  method="POST", path=JOBS)
    answers = batch_driver(klaviyo).send_batch(signups(6))

    creates = [r for r in klaviyo.requests if (r.method, r.path) == ("POST", JOBS)]
    assert len(creates) == 2
    assert len(creates[1].json()["data"]["attributes"]["profiles"]["data"]) == 5
    assert isinstance(answers[3], PermanentDeliveryError)
    assert "Invalid email address (/data/attributes/profiles/data/3/attributes/email)" in (
        answers[3].message)
    assert sum(isinstance(a, DeliveryResult) for a in answers) == 5


def test_events_of_one_lead_are_one_profile_newest_values_last(
    klaviyo: VendorServer, account: KlaviyoAccount
) -> None:
    events = signups(5)
    later = LeadEvent(event_id="evt-score", source="kickofflabs", name="score_change",
                      payload=sample_payload("score_change", email="LEAD1@example.com",
                                             contest_score=42))
    answers = batch_driver(klaviyo).send_batch([*events, later])
    profiles = klaviyo.requests[0].json()["data"]["attributes"]["profiles"]["data"]
    assert len(profiles) == 5
    merged = next(p for p in profiles if p["attributes"]["email"].lower() == "lead1@example.com")
    assert merged["attributes"]["properties"]["kickofflabs_score"] == 42
    assert answers[1] == answers[5]
    assert "with 1 other event(s) of this lead, merged into one profile" in answers[5].detail


def test_subscriptions_and_unsubscriptions_go_in_bulk_jobs_of_their_size(
    klaviyo: VendorServer, account: KlaviyoAccount
) -> None:
    opt_outs = [LeadEvent(event_id=f"out-{n}", source="kickofflabs", name="opted_out",
                          payload=sample_payload("opted_out", email=f"gone{n}@example.com",
                                                 social_id=f"g{n}"))
                for n in range(150)]
    driver = batch_driver(klaviyo, list_id=LIST_ID, unsubscribe="global")
    answers = driver.send_batch([*signups(1100), *opt_outs])

    assert account.problems == []
    assert paths(klaviyo).count(f"POST {SUBSCRIBE}") == 2  # 1,000 a job
    assert paths(klaviyo).count(f"POST {UNSUBSCRIBE}") == 2  # 100 a job
    unsubscribe = next(r for r in klaviyo.requests if r.path == UNSUBSCRIBE).json()
    assert "relationships" not in unsubscribe["data"]  # global: no list
    assert account.email_consent["gone7@example.com"] == "UNSUBSCRIBED"
    assert len(account.list_members[LIST_ID]) == 1100
    assert answers[0].detail == (
        f"applied by Klaviyo import job {next(iter(account.jobs))}; subscribed to list "
        f"{LIST_ID} (job accepted; Klaviyo does not report on subscription jobs)")
    assert answers[1100].detail.endswith(
        "email marketing unsubscribed from the whole account (job accepted; Klaviyo does not "
        "report on subscription jobs)")


def test_unsubscribe_list_names_the_list_and_none_sends_nothing(
    klaviyo: VendorServer, account: KlaviyoAccount
) -> None:
    event = LeadEvent(event_id="out", source="kickofflabs", name="opted_out",
                      payload=sample_payload("opted_out"))
    batch_driver(klaviyo, list_id=LIST_ID, unsubscribe="list").send_batch([event])
    body = next(r for r in klaviyo.requests if r.path == UNSUBSCRIBE).json()
    assert body["data"]["relationships"] == {"list": {"data": {"type": "list", "id": LIST_ID}}}

    klaviyo.requests.clear()
    [answer] = batch_driver(klaviyo, list_id=LIST_ID, unsubscribe="none").send_batch([event])
    assert paths(klaviyo) == [f"POST {IMPORT}"]
    assert "Klaviyo consent left as it is (unsubscribe: none)" in answer.detail


def test_an_opt_out_is_sent_even_when_the_profile_is_refused(
    klaviyo: VendorServer, account: KlaviyoAccount
) -> None:
    event = LeadEvent(event_id="out", source="kickofflabs", name="opted_out",
                      payload=sample_payload("opted_out", email="ada@nowhere"))
    [answer] = batch_driver(klaviyo, unsubscribe="global").send_batch([event])
    assert isinstance(answer, PermanentDeliveryError)
    assert "Invalid email address" in answer.message
    assert "email marketing unsubscribed from the whole account" in answer.message
    assert account.email_consent["ada@nowhere"] == "UNSUBSCRIBED"


def test_the_history_says_applied_or_klaviyos_reason(
    klaviyo: VendorServer, account: KlaviyoAccount, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Through the engine: what ``relay events show`` (and the console, from the same
    attempts) says of each delivery of a job."""
    redis = fakeredis.FakeRedis()
    relay_config = config([{"name": "flows", "type": "klaviyo", "api_key": API_KEY,
                            "base_url": klaviyo.url, "unsubscribe": "global",
                            "retry": {"schedule": []}}], sources={"kickofflabs": {}})
    client = make_app(relay_config, redis).test_client()
    ids = []
    for n in range(6):
        email = "ada@nowhere" if n == 4 else f"lead{n}@example.com"
        response = client.post("/hooks/kickofflabs", json=sample_payload(
            "new_signup", email=email, social_id=f"s{n}", id=n))
        ids.append(response.get_json()["event_id"])
    run_queue(Engine(Settings(), relay_config, redis), redis)
    monkeypatch.setattr(cli_ops, "redis_client", lambda: redis)
    monkeypatch.setattr(cli_ops, "history_database", lambda: history_for(redis))
    monkeypatch.setattr(cli_ops, "relay_config", lambda: relay_config)

    def shown(event_id: str) -> str:
        result = CliRunner().invoke(main, ["events", "show", event_id], catch_exceptions=False)
        assert result.exit_code == 0, result.output
        return result.output

    [job_id] = account.jobs  # the six went in one job
    applied = shown(ids[0])
    assert "flows: delivered after 1 attempt(s)" in applied
    assert "delivered HTTP 202" in applied
    assert applied.rstrip().endswith(f" ms applied by Klaviyo import job {job_id}")
    refused = shown(ids[4])
    assert "flows: dead after 1 attempt(s)" in refused
    assert (f"Klaviyo's import job {job_id} refused this profile: Invalid email address: "
            "ada@nowhere (/data/attributes/profiles/data/4/attributes/email)") in refused
