"""Per-minute counts for the console's chart (fed by the metrics flush, bounded), and the
p50 / p95 attempt latency that ``relay status`` and the console show."""

from __future__ import annotations

import time

import fakeredis
import pytest

from relay.observability import timeseries
from relay.observability.metrics import Metrics
from relay.operations.status import attempt_latency, histogram_quantile


def test_the_metrics_flush_counts_each_minute() -> None:
    client = fakeredis.FakeRedis()
    metrics = Metrics(client, flush_interval=60)
    for _ in range(3):
        metrics.inc("events_accepted")
    metrics.inc("events_rejected", {"reason": "invalid"})
    for outcome in ("delivered", "skipped", "retrying", "dead", "dead"):
        metrics.inc("deliveries", {"destination": "crm", "outcome": outcome})
    metrics.flush()
    *earlier, now = timeseries.last_minutes(client, 60)
    assert len(earlier) == 59 and all(not any(m.counts.values()) for m in earlier)
    assert now.counts == {"accepted": 3, "delivered": 2, "retrying": 1, "dead": 2}
    assert now.start == int(time.time() // 60) * 60
    [key] = [k for k in client.scan_iter("relay:minute:*")]
    assert 0 < client.ttl(key) <= timeseries.KEEP


def test_a_flush_without_those_counters_writes_no_minute() -> None:
    client = fakeredis.FakeRedis()
    metrics = Metrics(client, flush_interval=60)
    metrics.observe("ingress_latency_seconds", 0.002)
    metrics.flush()
    assert list(client.scan_iter("relay:minute:*")) == []


def test_quantiles_interpolate_within_the_bucket_like_prometheus() -> None:
    bounds = (0.1, 0.5, 1.0)
    assert histogram_quantile(0.5, bounds, {}) is None
    assert histogram_quantile(0.5, bounds, {"0.1": 10}) == pytest.approx(0.05)
    assert histogram_quantile(0.5, bounds, {"0.1": 5, "0.5": 5}) == pytest.approx(0.1)
    assert histogram_quantile(0.95, bounds, {"0.1": 5, "0.5": 5}) == pytest.approx(0.46)
    assert histogram_quantile(0.95, bounds, {"0.1": 1, "+Inf": 9}) == 1.0


def test_attempt_latency_per_destination_in_ms() -> None:
    client = fakeredis.FakeRedis()
    metrics = Metrics(client, flush_interval=0)
    for _ in range(9):
        metrics.observe("attempt_latency_seconds", 0.02, {"destination": "crm"})
    metrics.observe("attempt_latency_seconds", 4.0, {"destination": "crm"})
    latency = attempt_latency(client, ["crm", "backend"])
    p50, p95 = latency["crm"]
    assert p50 is not None and 10 <= p50 <= 25
    assert p95 is not None and 2500 <= p95 <= 5000
    assert "backend" not in latency
