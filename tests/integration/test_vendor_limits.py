"""Klaviyo's and Mailchimp's limits, held by real ``relay worker`` processes with the drivers'
shipped defaults, against the stand-ins of ``tests/support/vendor_server.py``: Klaviyo's
published rate limits per operation (the bulk import job endpoints: 10/s burst, 150/m steady;
429 with ``Retry-After`` past them) with jobs that complete after a delay, and Mailchimp's 10
simultaneous connections (429 past them)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest

from tests.support.deployment import RelayDeployment
from tests.support.helpers import wait_for
from tests.support.samples import sample
from tests.support.vendor_server import KlaviyoAccount, MailchimpAudience, VendorServer


def post(deployment: RelayDeployment, events: int) -> None:
    client = deployment.web_client()
    for n in range(events):
        response = client.post("/hooks/kickofflabs", json=sample(
            "new_signup", email=f"lead{n}@example.com", social_id=f"s{n}", id=n))
        assert response.status_code == 202


def serve(**stand_ins: Any) -> Iterator[VendorServer]:
    server = VendorServer(**stand_ins).start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def klaviyo() -> Iterator[tuple[VendorServer, KlaviyoAccount]]:
    account = KlaviyoAccount(job_delay=0.3, latency=0.02)
    for server in serve(klaviyo=account):
        yield server, account


@pytest.fixture
def mailchimp() -> Iterator[tuple[VendorServer, MailchimpAudience]]:
    audience = MailchimpAudience(list_id="a1b2c3d4e5", latency=0.2)
    for server in serve(mailchimp=audience):
        yield server, audience


@pytest.mark.timeout(120)
def test_klaviyo_defaults_import_600_signups_in_a_few_jobs_without_a_429(
    deployment: RelayDeployment, klaviyo: tuple[VendorServer, KlaviyoAccount],
) -> None:
    server, account = klaviyo
    deployment.configure({"destinations": [{
        "name": "flows", "type": "klaviyo", "api_key": "pk_test", "base_url": server.url,
        "list_id": "Y6nRLr", "unsubscribe": "list",
        # The test workers' task time limit is 8 s: a send must end well within it.
        "timeout": "5s", "job_timeout": "3s"}]})
    post(deployment, 600)  # waiting in the lane when the workers start
    deployment.start_worker(concurrency=4, processes=2)

    wait_for(lambda: account.counts["profiles_imported"] >= 600, timeout=60, interval=0.2,
             message="600 profiles imported")
    wait_for(lambda: account.counts["bulk_subscribe_profiles_profiles"] >= 600, timeout=30,
             interval=0.2, message="600 profiles subscribed")
    assert account.counts["rate_limited"] == 0
    # Batches of up to 500 (as many as the lane holds when a drainer claims): a few jobs.
    assert sum(account.job_sizes) == 600 and len(account.job_sizes) <= 4
    assert max(account.job_sizes) <= 500
    assert account.problems == []
    assert len(account.list_members["Y6nRLr"]) == 600


@pytest.mark.timeout(120)
def test_mailchimp_defaults_stay_within_its_connections_across_processes(
    deployment: RelayDeployment, mailchimp: tuple[VendorServer, MailchimpAudience],
) -> None:
    server, audience = mailchimp
    deployment.configure({"destinations": [{
        "name": "newsletter", "type": "mailchimp", "api_key": "0123abcd-us21",
        "list_id": "a1b2c3d4e5", "base_url": server.url,
        "batch": {"max": 20}}]})  # small batches: many requests at once, the worst case
    post(deployment, 400)
    deployment.start_worker(concurrency=8, processes=2)

    wait_for(lambda: audience.counts["written"] >= 400, timeout=60, interval=0.2,
             message="400 members written")
    assert audience.counts["rate_limited"] == 0
    print(f"\nmost requests at once: {audience.most_at_once}")
    assert audience.most_at_once <= 5  # the default concurrency, across both processes
    assert audience.problems == []
    assert max(audience.batch_sizes) == 20
