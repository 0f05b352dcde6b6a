"""HubSpot's limits, held by real ``relay worker`` processes against the HubSpot stand-in.

The stand-in counts requests in a rolling window and answers 429 with HubSpot's headers past
it (``tests/support/vendor_server.py``). The relay's shipped defaults (``rate_limit: 9/s``,
``concurrency: 4``, ``batch: {max: 100, wait: 200ms}``) must keep it clear of them across
worker processes, and a 429 that still comes must hold the whole destination, not only the
delivery that met it.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import pytest
import redis

from relay.store.keys import BUDGETS_SPENT, SCHEDULED, lane_key, stats_key
from tests.support.deployment import RelayDeployment
from tests.support.helpers import wait_for
from tests.support.samples import sample
from tests.support.vendor_server import HubSpotContacts, VendorServer


def hubspot(url: str, **keys: Any) -> dict[str, Any]:
    return {"name": "crm", "type": "hubspot", "access_token": "pat-test", "base_url": url,
            "events": ["*"], **keys}


def post(deployment: RelayDeployment, events: int) -> None:
    client = deployment.web_client()
    for n in range(events):
        response = client.post("/hooks/kickofflabs", json=sample(
            "new_signup", email=f"lead{n}@example.com", social_id=f"s{n}", id=n))
        assert response.status_code == 202


def stand_in(contacts: HubSpotContacts) -> Iterator[VendorServer]:
    server = VendorServer(hubspot=contacts).start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def limited() -> Iterator[tuple[VendorServer, HubSpotContacts]]:
    """A stand-in allowing 30 requests per rolling 2 s: the default 9/s (fixed one-second
    windows, so at most 27 in any 2 s) stays under it, a burst does not."""
    contacts = HubSpotContacts(limit=30, interval=2.0, latency=0.02)
    for server in stand_in(contacts):
        yield server, contacts


@pytest.mark.timeout(120)
def test_the_default_rate_limit_holds_across_worker_processes(
    deployment: RelayDeployment, limited: tuple[VendorServer, HubSpotContacts],
) -> None:
    server, contacts = limited
    # One contact per request, the worst case for the limit: 60 requests at 9/s.
    deployment.configure({"destinations": [hubspot(server.url, batch={"max": 1})]})
    deployment.start_worker(concurrency=4, processes=2)
    post(deployment, 60)

    wait_for(lambda: contacts.counts["upserted"] >= 60, timeout=60, interval=0.2,
             message="60 contacts upserted")
    assert contacts.counts["rate_limited"] == 0
    assert contacts.counts["requests"] == 60
    assert len(contacts.contacts) == 60


@pytest.mark.timeout(120)
def test_with_the_defaults_500_signups_go_in_a_few_batches(
    deployment: RelayDeployment, limited: tuple[VendorServer, HubSpotContacts],
) -> None:
    server, contacts = limited
    deployment.configure({"destinations": [hubspot(server.url)]})
    post(deployment, 500)  # waiting in the lane when the workers start
    deployment.start_worker(concurrency=4, processes=2)

    wait_for(lambda: contacts.counts["upserted"] >= 500, timeout=60, interval=0.2,
             message="500 contacts upserted")
    assert contacts.counts["rate_limited"] == 0
    assert contacts.counts["requests"] <= 10  # 100 a request, some less
    assert max(contacts.batch_sizes) == 100
    assert contacts.problems == []


@pytest.mark.timeout(120)
def test_a_429_holds_the_whole_destination_not_one_delivery(
    deployment: RelayDeployment,
) -> None:
    # The limit set far above what the account takes: the stand-in answers 429 past 10
    # requests per rolling 3 s, with HubSpot's X-HubSpot-RateLimit-Interval-Milliseconds.
    contacts = HubSpotContacts(limit=10, interval=3.0)
    for server in stand_in(contacts):
        deployment.configure({"destinations": [hubspot(
            server.url, batch={"max": 1}, rate_limit="1000/s", concurrency=2,
            retry={"schedule": ["1s"] * 20})]})
        post(deployment, 40)
        deployment.start_worker(concurrency=4, processes=2)
        wait_for(lambda: contacts.counts["upserted"] >= 40, timeout=90, interval=0.2,
                 message="40 contacts upserted")
    # Sent as fast as the concurrency allows, 30 of the first 40 requests would meet a 429.
    # Each 429 holds the destination for the window HubSpot names (3 s), in every worker
    # process: only the requests already out meet one too.
    print(f"\n40 contacts, 10 per 3 s: {contacts.counts['requests']} requests, "
          f"{contacts.counts['rate_limited']} answered 429")
    assert contacts.counts["rate_limited"] <= 12
    assert len(contacts.contacts) == 40


# -- budgets: the destinations of one account share its limits ----------------------------------


@pytest.mark.timeout(120)
@pytest.mark.parametrize("shared", ["the same token", "account:"])
def test_two_destinations_of_one_account_share_its_limit_across_worker_processes(
    deployment: RelayDeployment, limited: tuple[VendorServer, HubSpotContacts], shared: str,
) -> None:
    server, contacts = limited
    # Two destinations, every event to both, one contact per request: 9/s each would put up to
    # 54 requests in a rolling 2 s, past the stand-in's 30. Sharing the account's 9/s, 27.
    keys: dict[str, Any] = {"batch": {"max": 1}}
    if shared == "account:":
        keys["account"] = "acme"
    deployment.configure({"destinations": [
        hubspot(server.url, **keys),
        hubspot(server.url, **keys, name="crm-scores",
                **({"access_token": "pat-other-app"} if shared == "account:" else {})),
    ]})
    deployment.start_worker(concurrency=4, processes=2)
    post(deployment, 40)

    wait_for(lambda: contacts.counts["upserted"] >= 80, timeout=60, interval=0.2,
             message="40 contacts upserted by each destination")
    assert contacts.counts["rate_limited"] == 0
    assert contacts.counts["requests"] == 80
    assert contacts.problems == []


@pytest.mark.timeout(120)
def test_a_spent_daily_cap_holds_the_account_until_its_reset_without_attempts(
    deployment: RelayDeployment, limited: tuple[VendorServer, HubSpotContacts],
) -> None:
    server, contacts = limited
    deployment.configure({"destinations": [
        hubspot(server.url, batch={"max": 1}, daily_limit=12),
        hubspot(server.url, batch={"max": 1}, name="crm-scores"),
    ]})
    deployment.start_worker(concurrency=4, processes=2)
    post(deployment, 10)

    wait_for(lambda: contacts.counts["requests"] >= 12, timeout=60, interval=0.2,
             message="the day's 12 requests")
    time.sleep(2.0)  # a few windows more of both lanes being read
    assert contacts.counts["requests"] == 12  # the account's day: no more, no 429
    assert contacts.counts["rate_limited"] == 0
    client = deployment.web_client()
    metrics = client.get("/metrics").get_data(as_text=True)
    [remaining] = [line for line in metrics.splitlines()
                   if line.startswith("relay_budget_remaining{")]
    assert remaining.endswith(" 0.0")
    store = redis.Redis.from_url(deployment.redis_url)
    # The other 8 deliveries wait in the lanes, unattempted: no failure, no retry, no dead letter.
    assert store.xlen(lane_key("crm")) + store.xlen(lane_key("crm-scores")) == 8
    for name in ("crm", "crm-scores"):
        assert store.hget(stats_key(name), "failed") is None
    assert store.zcard(SCHEDULED) == 0


@pytest.mark.timeout(120)
def test_a_daily_429_holds_every_destination_of_the_account_without_attempts(
    deployment: RelayDeployment,
) -> None:
    # HubSpot counts every app of the account: the stand-in's day is spent after 6 requests,
    # long before the relay's own count (250,000) says so.
    contacts = HubSpotContacts(daily=6)
    for server in stand_in(contacts):
        deployment.configure({"destinations": [
            hubspot(server.url, batch={"max": 1}, retry={"schedule": []}),  # one attempt each
            hubspot(server.url, batch={"max": 1}, retry={"schedule": []}, name="crm-scores"),
        ]})
        deployment.start_worker(concurrency=4, processes=2)
        post(deployment, 20)
        wait_for(lambda: contacts.counts["daily_limited"] >= 1, timeout=60, interval=0.2,
                 message="HubSpot's DAILY 429")
        time.sleep(2.0)  # both lanes read a few more times
        refused = contacts.counts["daily_limited"]
        store = redis.Redis.from_url(deployment.redis_url)
        # Only the requests already in flight met the 429 too (4 per destination at most).
        assert refused <= 8, refused
        assert contacts.counts["upserted"] == 6
        # The deliveries that met it wait for the reset, no attempt counted (with one attempt
        # each, a counted one would be a dead letter); the others wait in their lanes.
        for name in ("crm", "crm-scores"):
            stats = {k.decode(): v.decode() for k, v in store.hgetall(stats_key(name)).items()}
            assert "failed" not in stats and "dead" not in stats, stats
        waiting = (store.zcard(SCHEDULED) + store.xlen(lane_key("crm"))
                   + store.xlen(lane_key("crm-scores")))
        assert waiting == 40 - 6
        assert store.zcard(SCHEDULED) == refused
        [(budget, until)] = store.zrange(BUDGETS_SPENT, 0, -1, withscores=True)
        assert budget.decode().startswith("hubspot:")
        assert time.time() < until <= time.time() + 3600  # an hour at most: no time zone
        time.sleep(1.0)
        assert contacts.counts["requests"] == 6 + refused  # held: nothing more was sent
