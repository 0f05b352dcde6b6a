"""Prometheus metrics at ``/metrics``, counted across every web and worker process.

Choice: **counters kept in Redis, rendered by a custom collector** (not prometheus-client's
multiprocess mode). The relay already runs several gunicorn processes and worker
processes on possibly several machines; multiprocess mode needs one shared directory and only
sees the processes of its own machine, while Redis is shared by all of them already. So:

- each process adds to an in-memory buffer (no Redis round trip on the ingress hot path) and a
  daemon thread flushes the buffer every ``RELAY_METRICS_FLUSH_INTERVAL`` seconds (1 s) with
  ``HINCRBY``/``HINCRBYFLOAT`` into the hash ``relay:metrics``; with an interval of 0 every
  increment is written at once (tests). A failed flush keeps the deltas for the next one;
  at most the last interval's counts are lost when a process is killed.
- histograms are stored as per-bucket counts plus ``_sum`` and ``_count``; the collector makes
  the buckets cumulative.
- gauges (queue depth, parked tasks, dead letters, circuit state) are read from Redis at scrape
  time; nothing is stored for them.

Exposed (all prefixed ``relay_``): ``events_accepted_total``, ``events_rejected_total{reason}``,
``events_duplicate_total``, ``ingress_latency_seconds`` (histogram),
``deliveries_total{destination,outcome}`` (delivered / retrying / dead),
``deliveries_held_total{destination,gate}``, ``attempt_latency_seconds{destination}``
(histogram), ``queue_depth``, ``scheduled_tasks`` (the retry set), ``dead_letters{destination}``,
``circuit_state{destination}`` (0 closed, 1 half-open, 2 open, 3 slowed),
``destination_paused{destination}``, ``history_backlog`` and ``history_lag_seconds`` (the
history writer's lag).
"""

from __future__ import annotations

import functools
import json
import logging
import os
import threading
import time
import weakref
from collections import defaultdict
from collections.abc import Callable, Iterable, Iterator, Mapping

import redis
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector

from relay.observability import timeseries
from relay.store.history import HistoryOutbox
from relay.store.keys import (
    INTAKE,
    LANES,
    METRICS_KEY,
    PAUSED_KEY,
    SCHEDULED,
    circuit_key,
    lane_key,
)
from relay.store.subscriptions import SubscriptionStore

log = logging.getLogger("relay.metrics")

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

INGRESS_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0)
ATTEMPT_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)

COUNTERS = {
    "events_accepted": ("Lead events stored by the ingress (202)", ()),
    "events_rejected": ("Ingress requests refused, by reason", ("reason",)),
    "events_duplicate": ("Events dropped by the workers as duplicates", ()),
    "deliveries": ("Delivery attempts by destination and outcome", ("destination", "outcome")),
    "deliveries_held": ("Deliveries parked by a gate (pause, circuit, rate)",
                        ("destination", "gate")),
}
HISTOGRAMS = {
    "ingress_latency_seconds": ("Time to accept or refuse one ingress request", (),
                                INGRESS_BUCKETS),
    "attempt_latency_seconds": ("Time of one delivery attempt", ("destination",),
                                ATTEMPT_BUCKETS),
}
CIRCUIT_VALUES = {"closed": 0, "half-open": 1, "open": 2, "slowed": 3}

Labels = tuple[tuple[str, str], ...]


def _field(name: str, labels: Mapping[str, str] | None = None, suffix: str = "") -> str:
    return _field_of(name + suffix, tuple(sorted((labels or {}).items())))


@functools.lru_cache(maxsize=4096)
def _field_of(name: str, labels: tuple[tuple[str, str], ...]) -> str:
    # The same few series are counted on every request: encode each name once.
    return json.dumps([name, labels], separators=(",", ":"))


class Metrics:
    """The process's buffer of counter deltas for one Redis."""

    def __init__(self, client: redis.Redis, flush_interval: float | None = None) -> None:
        self.redis = client
        if flush_interval is None:
            flush_interval = _flush_interval
        self.flush_interval = flush_interval
        self._ints: dict[str, int] = defaultdict(int)
        self._floats: dict[str, float] = defaultdict(float)
        self._lock = threading.Lock()
        self._thread_pid: int | None = None
        self._failing = False

    # -- recording ----------------------------------------------------------------------------

    def inc(self, name: str, labels: Mapping[str, str] | None = None, amount: int = 1) -> None:
        with self._lock:
            self._ints[_field(name, labels, "_total")] += amount
        self._after_record()

    def observe(self, name: str, value: float, labels: Mapping[str, str] | None = None) -> None:
        buckets = HISTOGRAMS[name][2]
        le = next((str(b) for b in buckets if value <= b), "+Inf")
        with self._lock:
            self._ints[_field(name, {**(labels or {}), "le": le}, "_bucket")] += 1
            self._ints[_field(name, labels, "_count")] += 1
            self._floats[_field(name, labels, "_sum")] += value
        self._after_record()

    def _after_record(self) -> None:
        if self.flush_interval <= 0:
            self.flush()
        elif self._thread_pid != os.getpid():  # first use in this process (or after a fork)
            self._start_flusher()

    # -- flushing -----------------------------------------------------------------------------

    def flush(self) -> None:
        with self._lock:
            ints, floats = dict(self._ints), dict(self._floats)
            self._ints.clear()
            self._floats.clear()
        if not ints and not floats:
            return
        pipe = self.redis.pipeline(transaction=False)
        for field, amount in ints.items():
            pipe.hincrby(METRICS_KEY, field, amount)
        for field, value in floats.items():
            pipe.hincrbyfloat(METRICS_KEY, field, value)
        timeseries.add_counts(pipe, ints)  # the console's per-minute chart
        try:
            pipe.execute()
        except redis.RedisError as exc:
            with self._lock:  # keep them for the next flush
                for field, amount in ints.items():
                    self._ints[field] += amount
                for field, value in floats.items():
                    self._floats[field] += value
            if not self._failing:
                log.warning("cannot write metrics to Redis: %s", exc)
            self._failing = True
            return
        self._failing = False

    def _start_flusher(self) -> None:
        with self._lock:
            if self._thread_pid == os.getpid():
                return
            self._thread_pid = os.getpid()
        ref = weakref.ref(self)
        interval = self.flush_interval

        def loop() -> None:
            while True:
                time.sleep(interval)
                metrics = ref()
                if metrics is None:
                    return
                metrics.flush()
                del metrics

        threading.Thread(target=loop, name="relay-metrics", daemon=True).start()


_flush_interval = 1.0  # RELAY_METRICS_FLUSH_INTERVAL, set by configure()


def configure(flush_interval: float) -> None:
    """The flush interval of the buffers this process creates from now on (0: every
    increment is written at once)."""
    global _flush_interval
    _flush_interval = flush_interval


_recorders: weakref.WeakKeyDictionary[redis.Redis, Metrics] = weakref.WeakKeyDictionary()
_recorders_lock = threading.Lock()


def metrics_for(client: redis.Redis) -> Metrics:
    """One buffer per Redis client object (store, gates and app of a process share it)."""
    with _recorders_lock:
        recorder = _recorders.get(client)
        if recorder is None:
            recorder = _recorders[client] = Metrics(client)
        return recorder


# -- rendering --------------------------------------------------------------------------------


class RedisCollector(Collector):
    """Renders the counters of ``relay:metrics`` and reads the gauges live."""

    def __init__(self, client: redis.Redis, destinations: Callable[[], Iterable[str]],
                 dead_letters: Callable[[], Mapping[str, int]] | None = None) -> None:
        self.redis = client
        self.destinations = destinations
        #: destination -> dead letters waiting for replay (the history database's count)
        self.dead_letters = dead_letters or dict

    def collect(self) -> Iterator[Metric]:
        stored = self._stored()
        yield from self._counters(stored)
        yield from self._histograms(stored)
        yield from self._gauges()

    def _stored(self) -> dict[str, dict[Labels, float]]:
        series: dict[str, dict[Labels, float]] = defaultdict(dict)
        for raw_field, raw_value in self.redis.hgetall(METRICS_KEY).items():
            try:
                name, labels = json.loads(raw_field)
            except ValueError:
                continue
            series[name][tuple((k, v) for k, v in labels)] = float(raw_value)
        return series

    def _counters(self, stored: dict[str, dict[Labels, float]]) -> Iterator[Metric]:
        for name, (doc, label_names) in COUNTERS.items():
            family = CounterMetricFamily(f"relay_{name}", doc, labels=label_names)
            for labels, value in sorted(stored.get(name + "_total", {}).items()):
                family.add_metric([dict(labels).get(n, "") for n in label_names], value)
            if not label_names and not stored.get(name + "_total"):
                family.add_metric([], 0.0)
            yield family

    def _histograms(self, stored: dict[str, dict[Labels, float]]) -> Iterator[Metric]:
        for name, (doc, label_names, buckets) in HISTOGRAMS.items():
            family = HistogramMetricFamily(f"relay_{name}", doc, labels=label_names)
            counts = stored.get(name + "_count", {})
            sums = stored.get(name + "_sum", {})
            raw_buckets = stored.get(name + "_bucket", {})
            for labels in sorted(counts):
                per_le = {dict(k)["le"]: v for k, v in raw_buckets.items()
                          if tuple(p for p in k if p[0] != "le") == labels}
                running = 0.0
                cumulative = []
                for bound in [*map(str, buckets), "+Inf"]:
                    running += per_le.get(bound, 0.0)
                    cumulative.append((bound, running))
                family.add_metric([dict(labels).get(n, "") for n in label_names],
                                  cumulative, sums.get(labels, 0.0))
            yield family

    def _gauges(self) -> Iterator[Metric]:

        pipe = self.redis.pipeline(transaction=False)
        pipe.xlen(INTAKE)
        pipe.zcard(SCHEDULED)
        pipe.hkeys(PAUSED_KEY)
        pipe.smembers(LANES)
        depth, scheduled, paused_raw, lanes_raw = pipe.execute()
        yield GaugeMetricFamily("relay_queue_depth", "Events accepted and not yet admitted",
                                value=depth)
        yield GaugeMetricFamily("relay_scheduled_tasks",
                                "Deliveries waiting out a retry delay", value=scheduled)
        lanes = sorted(m.decode() for m in lanes_raw)
        pipe = self.redis.pipeline(transaction=False)
        for lane in lanes:
            pipe.xlen(lane_key(lane))
        lane_depth = GaugeMetricFamily("relay_lane_depth",
                                       "Deliveries waiting in a destination's lane or in flight",
                                       labels=["destination"])
        for lane, n in zip(lanes, pipe.execute(), strict=True):
            lane_depth.add_metric([lane], n)
        yield lane_depth
        dead_by_destination = self.dead_letters()
        length, oldest = HistoryOutbox(self.redis).lag()
        yield GaugeMetricFamily("relay_history_backlog",
                                "History records waiting to be written to the database",
                                value=length)
        yield GaugeMetricFamily("relay_history_lag_seconds",
                                "Age of the oldest history record not yet in the database",
                                value=max(0.0, time.time() - oldest) if oldest else 0.0)
        paused_names = {p.decode() for p in paused_raw}
        # Every destination in every gauge: YAML, API subscriptions (which the config does not
        # list), and any name that has dead letters or is paused.
        names = sorted(set(self.destinations()) | set(SubscriptionStore(self.redis).active_names())
                       | set(dead_by_destination) | paused_names)
        dead = GaugeMetricFamily("relay_dead_letters", "Dead letters waiting for replay",
                                 labels=["destination"])
        circuit = GaugeMetricFamily("relay_circuit_state",
                                    "Circuit breaker: 0 closed, 1 half-open, 2 open, 3 slowed",
                                    labels=["destination"])
        paused = GaugeMetricFamily("relay_destination_paused", "1 while paused",
                                   labels=["destination"])
        for name in names:
            dead.add_metric([name], dead_by_destination.get(name, 0))
            circuit.add_metric([name], CIRCUIT_VALUES[self._circuit_state(name)])
            paused.add_metric([name], 1 if name in paused_names else 0)
        yield dead
        yield circuit
        yield paused

    def _circuit_state(self, destination: str) -> str:
        # What relay.delivery.gates.CircuitBreaker.state answers, read here so that the
        # metrics (below the delivery side) import nothing of it.
        state, reopen_at = self.redis.hmget(circuit_key(destination), "state", "reopen_at")
        if state == b"slowed":
            return "slowed"
        if state != b"open":
            return "closed"
        return "open" if time.time() < float(reopen_at or 0) else "half-open"


def render(client: redis.Redis, destinations: Callable[[], Iterable[str]],
           dead_letters: Callable[[], Mapping[str, int]] | None = None) -> bytes:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(RedisCollector(client, destinations, dead_letters))
    return generate_latest(registry)
