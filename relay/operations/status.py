"""The relay at a glance: queue depth, parked deliveries, dead letters and one row per
destination. ``relay status`` and the console's overview both call :func:`relay_status`, so when
the queue's internals change this is the one place that reads them for display.

Each destination row is
:func:`relay.operations.destinations.destination_health` plus the p50 / p95 of its
attempt latency, estimated from the ``attempt_latency_seconds`` histogram that
:mod:`relay.observability.metrics` keeps in Redis (counts since the counters began, like the
success rate).
"""

from __future__ import annotations

import json
import math
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import redis

from relay.config.relay_yaml import RelayConfig
from relay.observability.metrics import ATTEMPT_BUCKETS, METRICS_KEY
from relay.operations.budgets import budget_rows
from relay.operations.context import OperatorContext
from relay.operations.destinations import destination_health, known_destinations
from relay.store.lanes import Lanes
from relay.store.subscriptions import NAME_PREFIX

QUANTILES = (0.5, 0.95)


def relay_status(ops: OperatorContext, config: RelayConfig | None) -> dict[str, Any]:
    """``{"queue_depth", "scheduled", "dead_letters", "destinations": [row, ...], "budgets"}``;
    a row has what :func:`~relay.operations.destinations.destination_health` gives,
    ``latency_p50_ms`` / ``latency_p95_ms`` (None before the first timed attempt) and
    ``budget`` (its vendor account's day, :func:`~relay.operations.budgets.budget_rows`, when
    it has a daily cap; else None)."""
    client = ops.redis
    types = {d.name: d.type for d in config.destinations} if config else {}
    names = known_destinations(client, types)
    for name in names:
        if name not in types and name.startswith(NAME_PREFIX):
            types[name] = "webhook"  # an API subscription
    health = destination_health(ops, names, types)
    latency = attempt_latency(client, names)
    for row in health:
        p50, p95 = latency.get(row["name"], (None, None))
        row["latency_p50_ms"], row["latency_p95_ms"] = p50, p95
    budgets = budget_rows(client, config)
    of = {name: b for b in budgets for name in b["destinations"]}
    for row in health:
        row["budget"] = of.get(row["name"])  # its budget's day, when it has a daily cap
    lanes = Lanes(client)
    return {"queue_depth": lanes.depth(),
            "scheduled": lanes.scheduled(),
            "dead_letters": sum(row["dead"] for row in health),
            "destinations": health,
            "budgets": budgets}


def attempt_latency(client: redis.Redis, names: Iterable[str]
                    ) -> dict[str, tuple[float | None, float | None]]:
    """destination -> (p50, p95) in milliseconds, from the attempt-latency buckets."""
    wanted = set(names)
    per_bucket: dict[str, dict[str, float]] = defaultdict(dict)
    for raw_field, raw_value in client.hgetall(METRICS_KEY).items():
        try:
            name, labels = json.loads(raw_field)
        except ValueError:
            continue
        if name != "attempt_latency_seconds_bucket":
            continue
        label = dict(labels)
        if label.get("destination") in wanted:
            per_bucket[label["destination"]][label["le"]] = float(raw_value)
    found: dict[str, tuple[float | None, float | None]] = {}
    for destination, counts in per_bucket.items():
        p50, p95 = (histogram_quantile(q, ATTEMPT_BUCKETS, counts) for q in QUANTILES)
        found[destination] = (_ms(p50), _ms(p95))
    return found


def histogram_quantile(q: float, bounds: Sequence[float], counts: Mapping[str, float]
                       ) -> float | None:
    """Prometheus' ``histogram_quantile`` over per-bucket (not cumulative) counts keyed by the
    bucket's upper bound as text (``"0.1"``, ``"+Inf"``): linear within the bucket that holds
    the rank; the last finite bound when the rank falls in ``+Inf``."""
    per_le = [(b, counts.get(str(b), 0.0)) for b in bounds]
    total = sum(c for _, c in per_le) + counts.get("+Inf", 0.0)
    if total <= 0:
        return None
    rank = q * total
    seen, lower = 0.0, 0.0
    for bound, count in per_le:
        if count and seen + count >= rank:
            return lower + (bound - lower) * (rank - seen) / count
        seen += count
        lower = bound
    return bounds[-1]


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None or math.isnan(seconds) else round(seconds * 1000, 1)
