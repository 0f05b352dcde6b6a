"""``/metrics`` follows the events: counters in Redis shared by every process, gauges read live;
parsed with prometheus-client's own text parser."""

from __future__ import annotations

import json
from typing import Any

import fakeredis
import pytest
from prometheus_client.parser import text_string_to_metric_families

from relay.config.settings import Settings
from relay.delivery.engine import Engine
from relay.delivery.gates import CircuitBreaker, PauseGate
from relay.observability.metrics import Metrics
from relay.operations.context import OperatorContext
from relay.operations.destinations import destination_health, known_destinations
from relay.store.subscriptions import SubscriptionStore
from tests.support.helpers import config, make_app, run_queue
from tests.support.history import history_for
from tests.support.loopback import Sink
from tests.support.samples import sample


class World:
    def __init__(self, sink: Sink) -> None:
        self.redis = fakeredis.FakeRedis()
        self.config = config([{"name": "crm", "type": "webhook", "url": f"{sink.url}/crm",
                               "retry": {"schedule": ["1h"]}}], sources={"kickofflabs": {}})
        self.client = make_app(self.config, self.redis).test_client()
        self.relay = Engine(Settings(), self.config, self.redis)

    def post(self, n: int, **changes: Any) -> int:
        return self.client.post("/hooks/kickofflabs", json=sample(
            "new_signup", email=f"l{n}@example.com", social_id=f"s{n}", id=n, **changes)
        ).status_code

    def run_queue(self) -> None:
        run_queue(self.relay, self.redis)

    def scrape(self) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
        response = self.client.get("/metrics")
        assert response.status_code == 200
        assert response.mimetype == "text/plain"
        samples = {}
        for family in text_string_to_metric_families(response.get_data(as_text=True)):
            for s in family.samples:
                samples[(s.name, tuple(sorted(s.labels.items())))] = s.value
        return samples


def test_metrics_change_as_events_flow(sink: Sink) -> None:
    world = World(sink)
    before = world.scrape()
    assert before[("relay_events_accepted_total", ())] == 0
    assert before[("relay_queue_depth", ())] == 0

    sink.script("/crm", [500])
    assert world.post(1) == 202
    assert world.post(2) == 202
    assert world.post(2) == 202  # the same event again: the worker drops it
    assert world.client.post("/hooks/kickofflabs", json={"__event": "new_signup"}
                             ).status_code == 422
    assert world.client.post("/hooks/nowhere", json=sample("new_signup")).status_code == 404
    assert world.client.options("/hooks/kickofflabs").status_code == 200  # not an event
    mid = world.scrape()
    assert mid[("relay_events_accepted_total", ())] == 3
    assert mid[("relay_events_rejected_total", (("reason", "invalid"),))] == 1
    assert mid[("relay_events_rejected_total", (("reason", "unknown_source"),))] == 1
    assert mid[("relay_queue_depth", ())] == 3
    assert mid[("relay_ingress_latency_seconds_count", ())] == 5
    assert mid[("relay_ingress_latency_seconds_bucket", (("le", "+Inf"),))] == 5

    world.run_queue()
    after = world.scrape()
    crm = (("destination", "crm"),)
    assert after[("relay_events_duplicate_total", ())] == 1
    assert after[("relay_deliveries_total", (("destination", "crm"),
                                             ("outcome", "retrying")))] == 1
    assert after[("relay_deliveries_total", (("destination", "crm"),
                                             ("outcome", "delivered")))] == 1
    assert after[("relay_attempt_latency_seconds_count", crm)] == 2
    assert after[("relay_attempt_latency_seconds_sum", crm)] > 0
    assert after[("relay_queue_depth", ())] == 0
    assert after[("relay_scheduled_tasks", ())] == 1  # the retry
    assert after[("relay_dead_letters", crm)] == 0
    assert after[("relay_circuit_state", crm)] == 0


def test_dead_letters_circuit_and_pause_are_gauges(sink: Sink) -> None:
    world = World(sink)
    sink.script("/crm", [400])
    world.post(1)
    world.run_queue()
    PauseGate(world.redis).pause("crm")
    world.redis.hset("relay:circuit:crm", mapping={"state": "open", "reopen_at": 9e12})
    samples = world.scrape()
    crm = (("destination", "crm"),)
    assert samples[("relay_dead_letters", crm)] == 1
    assert samples[("relay_deliveries_total", crm + (("outcome", "dead"),))] == 1
    assert samples[("relay_circuit_state", crm)] == 2
    assert samples[("relay_destination_paused", crm)] == 1
    assert CircuitBreaker(world.redis).state("crm") == "open"


# -- logs: the other half of observability ----------------------------------------------------


def test_one_json_line_per_request_and_attempt_without_secrets(
    sink: Sink, capsys: pytest.CaptureFixture[str]
) -> None:
    client = fakeredis.FakeRedis()
    cfg = config([{"name": "crm", "type": "webhook", "url": f"{sink.url}/crm"}],
                 sources={"kickofflabs": {"token": "s3cret-token"}})
    app = make_app(cfg, client, Settings(log_format="json"))
    relay = Engine(Settings(), cfg, client)
    capsys.readouterr()
    response = app.test_client().post("/hooks/kickofflabs?token=s3cret-token",
                                      json=sample("new_signup"))
    event_id = response.get_json()["event_id"]
    app.test_client().post("/hooks/kickofflabs?token=wrong", json=sample("new_signup"))
    relay.admit()
    relay.drain("crm")
    lines = [json.loads(line) for line in capsys.readouterr().err.splitlines()]
    accepted, refused, delivered = lines
    assert (accepted["message"], accepted["event_id"], accepted["destination"]) == (
        "accepted", event_id, None)
    assert refused["status"] == 401 and refused["event_id"] is None
    assert (delivered["message"], delivered["event_id"], delivered["destination"]) == (
        "delivered", event_id, "crm")
    assert "s3cret" not in json.dumps(lines)


def test_every_destination_yaml_or_api_is_in_every_per_destination_gauge(sink: Sink) -> None:
    world = World(sink)
    store = SubscriptionStore(world.redis)
    first, _ = store.register(135544, f"{sink.url}/a", ["new_signup"])
    second, _ = store.register(135545, f"{sink.url}/b", ["referral"])
    PauseGate(world.redis).pause(second.name)
    samples = world.scrape()
    for name in ("crm", first.name, second.name):
        labels = (("destination", name),)
        for gauge in ("relay_destination_paused", "relay_circuit_state", "relay_dead_letters"):
            assert (gauge, labels) in samples, (gauge, name)
    assert samples[("relay_destination_paused", (("destination", second.name),))] == 1
    assert samples[("relay_destination_paused", (("destination", first.name),))] == 0
    assert samples[("relay_circuit_state", (("destination", first.name),))] == 0
    # The admin API lists the same destinations.
    ops = OperatorContext(world.redis, history_for(world.redis))
    names = {d["name"] for d in destination_health(ops,
                                                   known_destinations(world.redis, ["crm"]))}
    assert names == {"crm", first.name, second.name}


# -- a bounded page, however many API subscriptions ---------------------------------------------


def subscribe(world: World, campaigns: int, each: int) -> list[str]:
    """``campaigns`` × ``each`` API subscriptions, each with deliveries counted (delivered,
    retrying, an attempt's latency)."""
    store = SubscriptionStore(world.redis)
    metrics = Metrics(world.redis, flush_interval=0)
    names = []
    for campaign in range(campaigns):
        for n in range(each):
            subscription, _ = store.register(1000 + campaign, f"https://example.com/{campaign}/{n}",
                                             ["new_signup"])
            names.append(subscription.name)
            labels = {"destination": subscription.name}
            metrics.inc("deliveries", {**labels, "outcome": "delivered"}, 3)
            metrics.inc("deliveries", {**labels, "outcome": "retrying"})
            metrics.observe("attempt_latency_seconds", 0.2, labels)
    return names


def test_a_thousand_subscriptions_keep_metrics_small(sink: Sink) -> None:
    """1,000 subscriptions in ten campaigns used to make a page of 1.2 MB (143 KB before any
    delivery): now ten series per per-destination metric, summed by campaign."""
    world = World(sink)
    names = subscribe(world, campaigns=10, each=100)
    PauseGate(world.redis).pause(names[0])
    world.redis.hset(f"relay:circuit:{names[1]}", mapping={"state": "open", "reopen_at": 9e12})
    page = world.client.get("/metrics").get_data()
    assert len(page) < 25_000, len(page)
    samples = world.scrape()
    assert not [key for key in samples if dict(key[1]).get("destination", "").startswith("sub-")]
    first = (("destination", "subscriptions:campaign-1000"),)
    assert samples[("relay_deliveries_total", first + (("outcome", "delivered"),))] == 300
    assert samples[("relay_deliveries_total", first + (("outcome", "retrying"),))] == 100
    assert samples[("relay_attempt_latency_seconds_count", first)] == 100
    assert samples[("relay_attempt_latency_seconds_bucket", first + (("le", "0.25"),))] == 100
    assert samples[("relay_destination_paused", first)] == 1  # how many of them
    assert samples[("relay_circuit_state", first)] == 2  # the worst of them
    assert samples[("relay_circuit_state", (("destination", "subscriptions:campaign-1001"),))
                   ] == 0
    assert samples[("relay_api_subscriptions", ())] == 1000
    assert samples[("relay_circuit_state", (("destination", "crm"),))] == 0  # YAML: its own


def test_a_few_subscriptions_keep_their_own_series(sink: Sink) -> None:
    world = World(sink)
    names = subscribe(world, campaigns=2, each=3)
    samples = world.scrape()
    for name in names:
        labels = (("destination", name),)
        assert samples[("relay_deliveries_total", labels + (("outcome", "delivered"),))] == 3
        assert samples[("relay_circuit_state", labels)] == 0
    assert samples[("relay_api_subscriptions", ())] == 6


def test_more_campaigns_than_the_limit_make_one_series(sink: Sink) -> None:
    world = World(sink)
    world.client = make_app(world.config, world.redis,
                            Settings(metrics_subscriptions=2)).test_client()
    subscribe(world, campaigns=3, each=2)
    SubscriptionStore(world.redis).delete(1000, "https://example.com/0/0")  # its counts stay
    samples = world.scrape()
    everything = (("destination", "subscriptions:all"),)
    assert samples[("relay_deliveries_total", everything + (("outcome", "delivered"),))] == 18
    assert samples[("relay_api_subscriptions", ())] == 5
    assert not [key for key in samples if dict(key[1]).get("destination", "").startswith("sub-")]
