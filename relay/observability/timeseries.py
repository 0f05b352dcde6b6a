"""Per-minute counts of events accepted and deliveries delivered / retrying / dead, for the
console's chart of the last hour.

Fed by the metrics flush (:meth:`relay.observability.metrics.Metrics.flush` hands
:func:`add_counts` the counter deltas it is about to write, in the same pipeline), so it costs
no round trip of its own and counts exactly what ``relay_events_accepted_total`` and
``relay_deliveries_total``
count. Keys (under ``relay:``): ``minute:<epoch minute>``, a hash of series -> count, expiring
after :data:`KEEP` (two hours), so the chart's data never grows.
"""

from __future__ import annotations

import functools
import json
import time
from collections.abc import Mapping
from dataclasses import dataclass

import redis

from relay.core.models import SUCCESSES
from relay.store.keys import minute_key

SERIES = ("accepted", "delivered", "retrying", "dead")
KEEP = 2 * 3600  # seconds a minute's counts are kept
# Metric fields as relay.observability.metrics encodes them (JSON
# ``[name, [[label, value], ...]]``) -> series.
_OUTCOMES = {"retrying": "retrying", "dead": "dead",
             **{success: "delivered" for success in SUCCESSES}}


@functools.lru_cache(maxsize=4096)
def series_of(field: str) -> str | None:
    """The series a metrics field counts into, or None."""
    try:
        name, labels = json.loads(field)
    except (ValueError, TypeError):
        return None
    if name == "events_accepted_total":
        return "accepted"
    if name == "deliveries_total":
        return _OUTCOMES.get(dict(labels).get("outcome", ""))
    return None


def add_counts(pipe: redis.client.Pipeline, deltas: Mapping[str, int],
               now: float | None = None) -> None:
    """Queue this flush's counts onto ``pipe`` under the current minute."""
    sums: dict[str, int] = {}
    for field, amount in deltas.items():
        series = series_of(field)
        if series is not None:
            sums[series] = sums.get(series, 0) + amount
    if not sums:
        return
    key = minute_key(int((now if now is not None else time.time()) // 60))
    for series, amount in sums.items():
        pipe.hincrby(key, series, amount)
    pipe.expire(key, KEEP)


@dataclass(frozen=True)
class Minute:
    start: int  # epoch seconds of the minute's start
    counts: dict[str, int]


def last_minutes(client: redis.Redis, minutes: int = 60, now: float | None = None
                 ) -> list[Minute]:
    """The last ``minutes`` minutes, oldest first, the current (partial) one last."""
    current = int((now if now is not None else time.time()) // 60)
    wanted = range(current - minutes + 1, current + 1)
    pipe = client.pipeline(transaction=False)
    for minute in wanted:
        pipe.hgetall(minute_key(minute))
    found = []
    for minute, raw in zip(wanted, pipe.execute(), strict=True):
        counts = {s: 0 for s in SERIES}
        counts.update({k.decode(): int(v) for k, v in raw.items() if k.decode() in counts})
        found.append(Minute(minute * 60, counts))
    return found
