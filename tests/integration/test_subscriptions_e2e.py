"""Subscriptions end to end: registered through the API, routed and delivered by a real
``relay worker`` from a real redis-server to loopback sinks; kept across restarts; removed by a
410."""

from __future__ import annotations

from typing import Any

import pytest
import redis

from relay.cli.embedded_redis import EmbeddedRedis
from relay.history.database import shared_database
from tests.support.deployment import RelayDeployment
from tests.support.helpers import wait_for
from tests.support.history import HistoryView
from tests.support.loopback import Sink
from tests.support.samples import sample

pytestmark = pytest.mark.integration

KEY = "e2e-api-key"
AUTH = {"Authorization": f"Bearer {KEY}"}
CAMPAIGN = 135544
OTHER_CAMPAIGN = 777
PATH = f"/v2/{CAMPAIGN}/outbound-webhook"


def prepare(deployment: RelayDeployment, sink: Sink) -> None:
    deployment.env["RELAY_API_KEYS"] = KEY
    deployment.env["RELAY_ALLOWED_NETWORKS"] = "127.0.0.0/8"
    # The catch-all YAML destination shows when each event has been routed: with one worker
    # process, an event's deliveries are all attempted before the next event is taken.
    deployment.configure({"sources": {"kickofflabs": {}}, "destinations": [
        {"name": "all", "type": "webhook", "url": f"{sink.url}/all", "events": ["*"],
         "retry": {"schedule": ["0.3s"]}},
    ]})


def subscribe(client: Any, url: str, events: list[str], path: str = PATH) -> int:
    response = client.post(path, json={"url": url, "events": events}, headers=AUTH)
    assert response.status_code == 200, response.get_json()
    reference_id: int = response.get_json()["referenceId"]
    return reference_id


def post(client: Any, payload: dict[str, Any]) -> str:
    response = client.post("/hooks/kickofflabs", json=payload)
    assert response.status_code == 202, response.get_json()
    event_id: str = response.get_json()["event_id"]
    return event_id


def webhooks(client: Any) -> list[dict[str, Any]]:
    response = client.get(PATH, headers=AUTH)
    assert response.status_code == 200
    found: list[dict[str, Any]] = response.get_json()["webhooks"]
    return found


def ids_at(sink: Sink, path: str) -> list[str]:
    return [r.headers["webhook-id"] for r in sink.requests(path)]


def test_a_subscription_receives_its_campaigns_events_only(
    deployment: RelayDeployment, sink: Sink
) -> None:
    prepare(deployment, sink)
    deployment.start_worker(concurrency=1)
    client = deployment.web_client()
    subscribe(client, f"{sink.url}/kol", ["referral"])

    elsewhere = post(client, sample("referral", campaign_id=OTHER_CAMPAIGN,
                                    list_id=OTHER_CAMPAIGN))
    not_subscribed = post(client, sample("new_signup"))
    # No campaign_id: the list_id names the campaign.
    by_list = sample("referral", list_id=CAMPAIGN, social_id="BYLIST")
    del by_list["campaign_id"]
    wanted = post(client, sample("referral"))
    via_list = post(client, by_list)

    wait_for(lambda: len(ids_at(sink, "/all")) == 4, message="the catch-all to see 4 events")
    wait_for(lambda: len(ids_at(sink, "/kol")) == 2, message="the subscription's 2 events")
    assert sorted(ids_at(sink, "/kol")) == sorted([wanted, via_list])
    assert elsewhere not in ids_at(sink, "/kol") and not_subscribed not in ids_at(sink, "/kol")
    # Several deliveries are in flight at once: find the one of `wanted`, not the first.
    [delivered] = [r for r in sink.requests("/kol") if r.headers["webhook-id"] == wanted]
    assert delivered.headers["User-Agent"] == "KickoffLabs"
    assert delivered.headers["Content-Type"] == "application/json"
    assert delivered.json() == sample("referral")


def test_subscriptions_survive_restarts_of_web_worker_and_redis(
    deployment: RelayDeployment, sink: Sink, redis_server: EmbeddedRedis
) -> None:
    prepare(deployment, sink)
    worker = deployment.start_worker(concurrency=1)
    reference_id = subscribe(deployment.web_client(), f"{sink.url}/kol", ["new_signup"])

    worker.terminate()
    redis_server.stop()
    redis_server.start()
    deployment.start_worker(concurrency=1)
    client = deployment.web_client()  # a new app: nothing kept in memory

    [webhook] = webhooks(client)
    assert webhook["referenceId"] == reference_id and webhook["state"] == "active"
    event_id = post(client, sample("new_signup"))
    wait_for(lambda: ids_at(sink, "/kol") == [event_id], message="delivery after restart")
    # And the next registration does not reuse the id.
    assert subscribe(client, f"{sink.url}/two", ["referral"]) == reference_id + 1


def test_a_410_removes_the_subscription(deployment: RelayDeployment, sink: Sink) -> None:
    prepare(deployment, sink)
    deployment.start_worker(concurrency=1)
    client = deployment.web_client()
    reference_id = subscribe(client, f"{sink.url}/kol", ["referral", "verified"])
    sink.script("/kol", [410])

    first = post(client, sample("referral"))
    wait_for(lambda: webhooks(client)[0]["state"] == "removed",
             message="the subscription to be removed")
    [webhook] = webhooks(client)
    assert webhook["referenceId"] == reference_id
    assert "410" in webhook["removed_reason"]
    assert ids_at(sink, "/kol") == [first]  # one attempt: a 410 is not retried

    # The delivery log has the 410 as a dead letter of that subscription.
    store = HistoryView(redis.Redis.from_url(deployment.redis_url),
                        shared_database(deployment.env["RELAY_DATABASE_URL"]))
    state = store.delivery_states(first)[f"sub-{reference_id}"]
    assert state["status"] == "dead" and state["last_status"] == 410
    [dead] = [d for d in store.dead_letters() if d["destination"] == f"sub-{reference_id}"]
    assert dead["status_code"] == 410

    second = post(client, sample("verified"))
    wait_for(lambda: second in ids_at(sink, "/all"), message="the next event to be routed")
    assert ids_at(sink, "/kol") == [first]
