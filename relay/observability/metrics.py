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
``destination_paused{destination}``, ``lead_waiting{destination}`` (deliveries waiting behind
an earlier event of their lead, ``ordering: per_lead``), ``deliveries_unordered_total{destination}``
(sent out of order: their lead had too many waiting), ``history_backlog`` and
``history_lag_seconds`` (the history writer's lag), ``api_subscriptions``, and for each budget
with a daily cap (or that the vendor said is spent) ``budget_remaining{budget}`` and
``budget_resets_at{budget}``.

The page is bounded: every YAML destination has its per-destination series, API subscriptions
only up to ``RELAY_METRICS_SUBSCRIPTIONS``, beyond which they are summed by campaign
(:class:`Grouping`).
"""

from __future__ import annotations

import functools
import json
import logging
import os
import re
import threading
import time
import weakref
from collections import defaultdict
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence

import redis
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector

from relay.core.models import Budget
from relay.observability import timeseries
from relay.store.budgets import budgets_left
from relay.store.history import HistoryOutbox
from relay.store.keys import (
    INTAKE,
    LANES,
    METRICS_KEY,
    PAUSED_KEY,
    SCHEDULED,
    circuit_key,
    lane_key,
    stats_key,
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
    "deliveries_unordered": ("Deliveries of an ordered destination sent out of order: their "
                             "lead had too many events waiting", ("destination",)),
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


#: How many API subscriptions ``/metrics`` lists one by one (RELAY_METRICS_SUBSCRIPTIONS).
SUBSCRIPTION_SERIES = 50
#: Circuit states, worst first: a group of subscriptions shows its worst.
_SEVERITY = ("open", "half-open", "slowed", "closed")


class Grouping:
    """Which ``destination`` label each name is shown under. YAML destinations keep their own
    series; API subscriptions (``sub-<referenceId>``) too while there are at most ``limit`` of
    them, else they are summed by campaign (``subscriptions:campaign-<id>``; one no longer
    active: ``subscriptions:other``), and when even the campaigns are more than ``limit``,
    into one (``subscriptions:all``). The labels of groups hold a colon, which no destination
    name can: they never meet a YAML destination's."""

    def __init__(self, configured: Iterable[str], campaigns: Mapping[str, str],
                 seen: Iterable[str], limit: int) -> None:
        self.configured = set(configured)
        subscriptions = {name for name in [*campaigns, *seen]
                         if name not in self.configured and _SUBSCRIPTION.match(name)}
        self.names: dict[str, str] = {name: name for name in subscriptions}
        if len(subscriptions) > limit:
            self.names = {name: (f"subscriptions:campaign-{campaigns[name]}"
                                 if name in campaigns else "subscriptions:other")
                          for name in subscriptions}
            if len(set(self.names.values())) > limit:
                self.names = dict.fromkeys(subscriptions, "subscriptions:all")

    def __call__(self, name: str) -> str:
        return self.names.get(name, name)

    def labels(self, labels: Labels) -> Labels:
        return tuple((k, self(v) if k == "destination" else v) for k, v in labels)


_SUBSCRIPTION = re.compile(r"^sub-[0-9]+$")


class RedisCollector(Collector):
    """Renders the counters of ``relay:metrics`` and reads the gauges live, with a series per
    destination (as :class:`Grouping` bounds them)."""

    def __init__(self, client: redis.Redis, destinations: Callable[[], Iterable[str]],
                 dead_letters: Callable[[], Mapping[str, int]] | None = None,
                 subscription_series: int = SUBSCRIPTION_SERIES,
                 budgets: Callable[[], Mapping[Budget, Sequence[str]]] | None = None) -> None:
        self.redis = client
        self.destinations = destinations
        #: the YAML's budgets -> their destinations (RelayConfig.budgets)
        self.budgets = budgets or dict
        #: destination -> dead letters waiting for replay (the history database's count)
        self.dead_letters = dead_letters or dict
        self.subscription_series = subscription_series

    def collect(self) -> Iterator[Metric]:
        stored = self._stored()
        pipe = self.redis.pipeline(transaction=False)
        pipe.xlen(INTAKE)
        pipe.zcard(SCHEDULED)
        pipe.hkeys(PAUSED_KEY)
        pipe.smembers(LANES)
        depth, scheduled, paused_raw, lanes_raw = pipe.execute()
        lanes = sorted(m.decode() for m in lanes_raw)
        paused = {p.decode() for p in paused_raw}
        dead = self.dead_letters()
        configured = list(self.destinations())
        campaigns = SubscriptionStore(self.redis).active_campaigns()
        seen = {value for series in stored.values() for labels in series
                for key, value in labels if key == "destination"}
        group = Grouping(configured, campaigns, [*seen, *lanes, *paused, *dead],
                         self.subscription_series)
        yield from self._counters(stored, group)
        yield from self._histograms(stored, group)
        yield GaugeMetricFamily("relay_queue_depth", "Events accepted and not yet admitted",
                                value=depth)
        yield GaugeMetricFamily("relay_scheduled_tasks",
                                "Deliveries waiting out a retry delay", value=scheduled)
        yield GaugeMetricFamily("relay_api_subscriptions",
                                "Active subscriptions registered through the API",
                                value=len(campaigns))
        yield from self._gauges(lanes, paused, dead, configured, campaigns, group)
        yield from self._budgets()

    def _stored(self) -> dict[str, dict[Labels, float]]:
        series: dict[str, dict[Labels, float]] = defaultdict(dict)
        for raw_field, raw_value in self.redis.hgetall(METRICS_KEY).items():
            try:
                name, labels = json.loads(raw_field)
            except ValueError:
                continue
            series[name][tuple((k, v) for k, v in labels)] = float(raw_value)
        return series

    @staticmethod
    def _summed(series: Mapping[Labels, float], group: Grouping) -> dict[Labels, float]:
        summed: dict[Labels, float] = defaultdict(float)
        for labels, value in series.items():
            summed[group.labels(labels)] += value
        return summed

    def _counters(self, stored: dict[str, dict[Labels, float]], group: Grouping
                  ) -> Iterator[Metric]:
        for name, (doc, label_names) in COUNTERS.items():
            family = CounterMetricFamily(f"relay_{name}", doc, labels=label_names)
            for labels, value in sorted(self._summed(stored.get(name + "_total", {}),
                                                     group).items()):
                family.add_metric([dict(labels).get(n, "") for n in label_names], value)
            if not label_names and not stored.get(name + "_total"):
                family.add_metric([], 0.0)
            yield family

    def _histograms(self, stored: dict[str, dict[Labels, float]], group: Grouping
                    ) -> Iterator[Metric]:
        for name, (doc, label_names, buckets) in HISTOGRAMS.items():
            family = HistogramMetricFamily(f"relay_{name}", doc, labels=label_names)
            counts = self._summed(stored.get(name + "_count", {}), group)
            sums = self._summed(stored.get(name + "_sum", {}), group)
            per_le: dict[Labels, dict[str, float]] = defaultdict(lambda: defaultdict(float))
            for labels, value in stored.get(name + "_bucket", {}).items():
                le = dict(labels)["le"]
                per_le[group.labels(tuple(p for p in labels if p[0] != "le"))][le] += value
            for labels in sorted(counts):
                running = 0.0
                cumulative = []
                for bound in [*map(str, buckets), "+Inf"]:
                    running += per_le[labels].get(bound, 0.0)
                    cumulative.append((bound, running))
                family.add_metric([dict(labels).get(n, "") for n in label_names],
                                  cumulative, sums.get(labels, 0.0))
            yield family

    def _gauges(self, lanes: list[str], paused_names: set[str], dead_by_destination:
                Mapping[str, int], configured: list[str], campaigns: Mapping[str, str],
                group: Grouping) -> Iterator[Metric]:
        pipe = self.redis.pipeline(transaction=False)
        for lane in lanes:
            pipe.xlen(lane_key(lane))
            pipe.hget(stats_key(lane), "waiting")
        answers = pipe.execute()
        depths: dict[str, float] = defaultdict(float)
        behind: dict[str, float] = defaultdict(float)
        for lane, n, waiting in zip(lanes, answers[::2], answers[1::2], strict=True):
            depths[group(lane)] += n
            behind[group(lane)] += max(0, int(waiting or 0))
        lane_depth = GaugeMetricFamily("relay_lane_depth",
                                       "Deliveries waiting in a destination's lane or in flight",
                                       labels=["destination"])
        for name, n in sorted(depths.items()):
            lane_depth.add_metric([name], n)
        yield lane_depth
        lead_waiting = GaugeMetricFamily(
            "relay_lead_waiting", "Deliveries of a destination with ordering: per_lead waiting "
            "behind an earlier event of their lead", labels=["destination"])
        for name, n in sorted(behind.items()):
            if n:
                lead_waiting.add_metric([name], n)
        yield lead_waiting
        length, oldest = HistoryOutbox(self.redis).lag()
        yield GaugeMetricFamily("relay_history_backlog",
                                "History records waiting to be written to the database",
                                value=length)
        yield GaugeMetricFamily("relay_history_lag_seconds",
                                "Age of the oldest history record not yet in the database",
                                value=max(0.0, time.time() - oldest) if oldest else 0.0)
        # Every destination in every gauge: YAML, API subscriptions (which the config does not
        # list), and any name that has dead letters or is paused.
        names = sorted(set(configured) | set(campaigns) | set(dead_by_destination)
                       | paused_names)
        states = self._circuit_states(names)
        dead: dict[str, float] = defaultdict(float)
        worst: dict[str, str] = {}
        paused: dict[str, float] = defaultdict(float)
        for name in names:
            shown = group(name)
            dead[shown] += dead_by_destination.get(name, 0)
            state, before = states[name], worst.get(shown)
            if before is None or _SEVERITY.index(state) < _SEVERITY.index(before):
                worst[shown] = state
            paused[shown] += 1 if name in paused_names else 0
        dead_family = GaugeMetricFamily("relay_dead_letters", "Dead letters waiting for replay",
                                        labels=["destination"])
        circuit = GaugeMetricFamily("relay_circuit_state",
                                    "Circuit breaker: 0 closed, 1 half-open, 2 open, 3 slowed "
                                    "(a group of subscriptions: its worst)",
                                    labels=["destination"])
        paused_family = GaugeMetricFamily("relay_destination_paused",
                                          "1 while paused (a group of subscriptions: how many)",
                                          labels=["destination"])
        for shown in sorted(dead):
            dead_family.add_metric([shown], dead[shown])
            circuit.add_metric([shown], CIRCUIT_VALUES[worst[shown]])
            paused_family.add_metric([shown], paused[shown])
        yield dead_family
        yield circuit
        yield paused_family

    def _budgets(self) -> Iterator[Metric]:
        remaining = GaugeMetricFamily(
            "relay_budget_remaining",
            "Requests left today of a vendor account's daily cap (0 while the vendor says it "
            "is spent)", labels=["budget"])
        resets = GaugeMetricFamily(
            "relay_budget_resets_at",
            "When the account's day ends, or the vendor's hold (Unix time)", labels=["budget"])
        for left in budgets_left(self.redis, self.budgets()):
            if left.remaining is None and left.spent_until is None:
                continue  # no daily cap, not spent: nothing to show
            remaining.add_metric([left.name], float(left.remaining or 0))
            resets.add_metric([left.name], left.resets_at)
        yield remaining
        yield resets

    def _circuit_states(self, names: list[str]) -> dict[str, str]:
        # What relay.delivery.gates.CircuitBreaker.state answers, read here so that the
        # metrics (below the delivery side) import nothing of it; one round trip for all.
        pipe = self.redis.pipeline(transaction=False)
        for name in names:
            pipe.hmget(circuit_key(name), "state", "reopen_at")
        now = time.time()
        states = {}
        for name, (state, reopen_at) in zip(names, pipe.execute(), strict=True):
            if state == b"slowed":
                states[name] = "slowed"
            elif state != b"open":
                states[name] = "closed"
            else:
                states[name] = "open" if now < float(reopen_at or 0) else "half-open"
        return states


def render(client: redis.Redis, destinations: Callable[[], Iterable[str]],
           dead_letters: Callable[[], Mapping[str, int]] | None = None,
           subscription_series: int = SUBSCRIPTION_SERIES,
           budgets: Callable[[], Mapping[Budget, Sequence[str]]] | None = None) -> bytes:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(RedisCollector(client, destinations, dead_letters, subscription_series,
                                     budgets))
    return generate_latest(registry)
