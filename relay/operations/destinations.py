"""Destinations as an operator sees them: which exist, their health, pause and resume."""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Callable, Iterable
from typing import Any

import redis

from relay.config.relay_yaml import RelayConfig
from relay.delivery.gates import PauseGate, destination_state
from relay.history import reader
from relay.history.database import reading
from relay.operations.context import OperatorContext
from relay.store.keys import PAUSED_KEY, STATS_PREFIX, stats_key
from relay.store.lanes import Lanes, parked
from relay.store.subscriptions import SubscriptionStore


def known_destinations(client: redis.Redis, configured: Iterable[str]) -> list[str]:
    """Configured destinations, every active API subscription, and any with counters (a
    subscription since removed) or paused."""
    names = set(configured) | set(SubscriptionStore(client).active_names())
    for key in client.scan_iter(match=STATS_PREFIX + "*", count=1000):
        names.add(key.decode()[len(STATS_PREFIX):])
    names.update(k.decode() for k in client.hkeys(PAUSED_KEY))
    return sorted(names)


def destination_known(client: redis.Redis, config: RelayConfig, name: str) -> bool:
    """Whether ``name`` is a destination pause / resume may act on: configured, an API
    subscription, or one Redis has counters for."""
    if config.destination(name) is not None:
        return True
    return SubscriptionStore(client).get(name) is not None or name in known_destinations(
        client, ())


def destination_health(ops: OperatorContext, names: Iterable[str],
                       types: dict[str, str] | None = None,
                       clock: Callable[[], float] = time.time) -> list[dict[str, Any]]:
    """State (active / paused / open / half-open / slowed), success rate, last error, when and
    why it was paused (``paused_at``, ``paused_reason``: None unless paused) and the counts of
    queued (waiting in the lane, in flight, or behind an earlier event of their lead: the
    ``waiting`` of ``ordering: per_lead``), parked (retry delays), retrying and dead
    deliveries of each destination."""
    names = list(names)
    client = ops.redis
    queued = Lanes(client).lane_depths()
    waiting = Counter(destination for _, destination, _ in parked(client))
    with reading(ops.database) as connection:
        dead = reader.status_counts(connection, "dead")
        retrying = reader.status_counts(connection, "retrying")
    pipe = client.pipeline(transaction=False)
    for name in names:
        pipe.hgetall(stats_key(name))
    answers = pipe.execute()
    pauses = PauseGate(client).paused()
    health = []
    for i, name in enumerate(names):
        stats = {k.decode(): v.decode() for k, v in answers[i].items()}
        delivered, failed = int(stats.get("delivered", 0)), int(stats.get("failed", 0))
        behind = max(0, int(stats.get("waiting", 0)))
        health.append({
            "name": name,
            "type": (types or {}).get(name),
            "state": destination_state(client, name, clock),
            "success_rate": round(delivered / (delivered + failed), 4)
            if delivered + failed else None,
            "delivered": delivered,
            "failed": failed,
            "consecutive_failures": int(stats.get("consecutive_failures", 0)),
            "last_error": stats.get("last_error") or None,
            "last_error_at": float(stats["last_error_at"]) if "last_error_at" in stats else None,
            "last_success_at": float(stats["last_success_at"])
            if "last_success_at" in stats else None,
            "queued": queued.get(name, 0) + behind,
            "waiting": behind,
            "parked": waiting[name],
            "retrying": retrying[name],
            "dead": dead[name],
            "paused_at": pauses.get(name, {}).get("paused_at"),
            "paused_reason": pauses.get(name, {}).get("reason"),
        })
    return health


def pause(client: redis.Redis, name: str, reason: str = "") -> None:
    """Hold the destination's lane: nothing is sent until :func:`resume`."""
    PauseGate(client).pause(name, reason)


def resume(client: redis.Redis, name: str) -> dict[str, Any]:
    """Lift a pause; the state the destination is in now and how many deliveries it released."""
    released = PauseGate(client).resume(name)
    return {"destination": name, "state": destination_state(client, name),
            "released": released}
