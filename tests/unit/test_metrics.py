"""The metrics recorder on fakeredis: counts from every process add up in Redis and survive an
outage; one recorder per client; the text log format. ``/metrics`` as events flow to a loopback
sink, and the JSON log lines: tests/integration/test_metrics.py."""

from __future__ import annotations

import logging

import fakeredis
import pytest
import redis
from prometheus_client.parser import text_string_to_metric_families

from relay.config.settings import Settings
from relay.core.errors import ConfigError
from relay.observability.logs import TextFormatter
from relay.observability.metrics import Grouping, Metrics, metrics_for
from tests.support.helpers import make_app


def test_counts_from_every_process_add_up() -> None:
    client = fakeredis.FakeRedis()
    web, worker = Metrics(client, flush_interval=60), Metrics(client, flush_interval=60)
    web.inc("events_accepted", amount=2)
    worker.inc("events_accepted")
    worker.observe("attempt_latency_seconds", 0.3, {"destination": "crm"})
    web.flush()
    worker.flush()
    app = make_app(client=client)
    samples = {(s.name, tuple(sorted(s.labels.items()))): s.value
               for f in text_string_to_metric_families(app.test_client().get("/metrics").text)
               for s in f.samples}
    assert samples[("relay_events_accepted_total", ())] == 3
    bucket = ("relay_attempt_latency_seconds_bucket", (("destination", "crm"), ("le", "0.25")))
    assert samples[bucket] == 0
    assert samples[("relay_attempt_latency_seconds_bucket",
                    (("destination", "crm"), ("le", "0.5")))] == 1


def test_a_redis_outage_keeps_the_counts_for_later() -> None:
    server = fakeredis.FakeServer()
    client = fakeredis.FakeRedis(server=server)
    metrics = Metrics(client, flush_interval=60)
    metrics.inc("events_accepted")
    server.connected = False
    metrics.flush()  # no exception: metrics never break a request
    server.connected = True
    metrics.flush()
    assert int(client.hget("relay:metrics", '["events_accepted_total",[]]') or 0) == 1


def test_one_recorder_per_client() -> None:
    client: redis.Redis = fakeredis.FakeRedis()
    assert metrics_for(client) is metrics_for(client)
    assert metrics_for(client) is not metrics_for(fakeredis.FakeRedis())


def test_text_lines_show_the_extras_and_redact_secrets() -> None:
    record = logging.LogRecord("relay.delivery", logging.INFO, __file__, 1, "sent %s",
                               ("?api_key=abc",), None)
    record.event_id, record.destination, record.api_key = "evt_1", "crm", "abc"
    line = TextFormatter().format(record)
    assert "event_id=evt_1 destination=crm" in line
    assert "abc" not in line and "[redacted]" in line
    bare = TextFormatter().format(logging.LogRecord("x", logging.INFO, __file__, 1, "m", (),
                                                    None))
    assert bare.endswith("m event_id=- destination=-")


def test_the_subscription_series_bound_is_a_setting() -> None:
    assert Settings().metrics_subscriptions == 50
    assert Settings.from_env({"RELAY_METRICS_SUBSCRIPTIONS": "0"}).metrics_subscriptions == 0
    with pytest.raises(ConfigError, match="RELAY_METRICS_SUBSCRIPTIONS"):
        Settings.from_env({"RELAY_METRICS_SUBSCRIPTIONS": "-1"})


def test_subscriptions_are_grouped_within_the_bound() -> None:
    campaigns = {f"sub-{n}": str(n % 3) for n in range(6)}
    alone = Grouping(["crm", "sub-99"], campaigns, ["sub-7"], limit=7)
    assert alone("sub-1") == "sub-1" and alone("sub-7") == "sub-7"
    assert alone("crm") == "crm" and alone("sub-99") == "sub-99"  # a YAML name stays its own
    by_campaign = Grouping(["crm"], campaigns, ["sub-7"], limit=6)
    assert by_campaign("sub-1") == by_campaign("sub-4") == "subscriptions:campaign-1"
    assert by_campaign("sub-7") == "subscriptions:other"  # no longer active
    assert by_campaign("crm") == "crm"
    together = Grouping(["crm"], campaigns, ["sub-7"], limit=3)
    assert {together(name) for name in [*campaigns, "sub-7"]} == {"subscriptions:all"}
