"""Batches in the engine: a destination with ``batch: {max, wait}`` gets its deliveries in
requests of up to ``max``; a lone one waits ``wait`` for company, never longer; each delivery
keeps its own outcome; ``concurrency`` and ``rate_limit`` count requests; a 429 holds the
whole destination.

On fakeredis, with a recording driver in place of the vendor's (the HubSpot driver's own
batches are in tests/integration/test_driver_hubspot.py). The destinations are of type
``hubspot``, the config's batching driver, so the YAML's defaults and checks are the real ones.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import fakeredis
import pytest

from relay.config.relay_yaml import RelayConfig, masked
from relay.config.settings import Settings
from relay.core.errors import ConfigError, PermanentDeliveryError, RetryableDeliveryError
from relay.core.models import BatchPolicy, DeliveryResult, Destination, LeadEvent, RateLimit
from relay.delivery.attempt import DriverCache
from relay.delivery.engine import Engine
from relay.delivery.gates import PauseGate, RateLimitGate
from relay.drivers import Driver
from relay.drivers.base import Answer, Answers
from relay.store.keys import PAUSED_KEY, hold_key, inflight_key, lane_key, rate_key, stats_key
from tests.support.helpers import config, make_app, parked_deliveries, wait_for
from tests.support.samples import sample

Script = Callable[[Sequence[LeadEvent]], Sequence[Answer]]


def delivered(events: Sequence[LeadEvent]) -> Sequence[Answer]:
    return [DeliveryResult(200, "ok") for _ in events]


@dataclass
class RecordingDriver(Driver):
    """Stands in for a bulk API's driver: records each call's events, answers by script."""

    script: Script = delivered
    calls: list[list[str]] = field(default_factory=list)  # the leads' emails, per call
    called_at: list[float] = field(default_factory=list)
    hold: threading.Event | None = None  # set: calls wait for it
    in_call: int = 0
    most_in_call: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)

    def __post_init__(self) -> None:
        pass  # no destination: the engine only calls send_batch

    def send_batch(self, events: Sequence[LeadEvent]) -> Sequence[Answer]:
        with self.lock:
            self.calls.append([e.payload["email"] for e in events])
            self.called_at.append(time.monotonic())
            self.in_call += 1
            self.most_in_call = max(self.most_in_call, self.in_call)
        try:
            if self.hold is not None:
                self.hold.wait(30)
            return self.script(events)
        finally:
            with self.lock:
                self.in_call -= 1


class OneDriver(DriverCache):
    def __init__(self, driver: Driver) -> None:
        super().__init__()
        self.driver = driver

    def get(self, destination: Destination) -> Driver:
        return self.driver


class Clock:
    """The time, until a test sets ``now``."""

    def __init__(self) -> None:
        self.now: float | None = None

    def __call__(self) -> float:
        return time.time() if self.now is None else self.now

    def stop(self) -> None:
        """A quarter into a one-second window, and staying there."""
        self.now = float(int(time.time())) + 0.25


class World:
    """The ingress and one worker-side engine on one fakeredis, delivering to ``crm`` (a
    ``hubspot`` destination) through a :class:`RecordingDriver`."""

    def __init__(self, driver: RecordingDriver | None = None, rate_gate: bool = True,
                 **keys: Any) -> None:
        self.redis = fakeredis.FakeRedis()
        self.clock = Clock()
        self.config = config([{"name": "crm", "type": "hubspot", "access_token": "t",
                               "retry": {"schedule": ["1h", "1h"]}, **keys}],
                             sources={"kickofflabs": {}})
        self.client = make_app(self.config, self.redis).test_client()
        self.driver = driver or RecordingDriver()
        self.rate = RateLimitGate(self.redis, clock=self.clock) if rate_gate else None
        self.relay = self.engine()
        self.posted = 0

    @property
    def crm(self) -> Destination:
        found = self.config.destination("crm")
        assert found is not None
        return found

    def engine(self) -> Engine:
        gates = (PauseGate(self.redis), *([self.rate] if self.rate else []))
        return Engine(Settings(), self.config, self.redis, drivers=OneDriver(self.driver),
                      gates=gates)

    def post(self, n: int = 1) -> None:
        for _ in range(n):
            number = self.posted
            self.posted += 1
            response = self.client.post("/hooks/kickofflabs", json=sample(
                "new_signup", email=f"lead{number}@example.com", social_id=f"s{number}",
                id=number))
            assert response.status_code == 202

    def run(self) -> dict[str, int]:
        self.relay.admit()
        return self.relay.drain("crm").as_dict()

    def waiting(self) -> int:
        return int(self.redis.xlen(lane_key("crm")))

    def stats(self) -> dict[str, int]:
        return {k.decode(): int(float(v)) for k, v in self.redis.hgetall(stats_key("crm")).items()
                if k.decode() in ("delivered", "failed", "dead")}

    def counted(self) -> int:
        """Requests counted in the current rate window (of the destination's budget: its
        access token's)."""
        window = int(self.clock() // self.crm.rate_limit.per_seconds)  # type: ignore[union-attr]
        return int(self.redis.get(rate_key(self.crm.budget_name, window)) or 0)


# -- the configuration --------------------------------------------------------------------------


def hubspot(**keys: Any) -> RelayConfig:
    return config([{"name": "crm", "type": "hubspot", "access_token": "t", **keys}])


def test_a_batching_driver_gets_its_vendor_maximum_and_wait_by_default() -> None:
    [crm] = hubspot().destinations
    assert crm.batch == BatchPolicy(100, 0.2)
    assert crm.per_request == 100
    assert crm.rate_limit == RateLimit(9, 1.0)  # HubSpot's 100 per 10 s, kept clear
    assert crm.concurrency == 4
    # A lone delivery may wait for company before it is sent: its lease covers the wait.
    assert crm.lease_with(10.0) == crm.timeout + 10.0 + 0.2


def test_batch_and_limits_are_overridable_per_destination() -> None:
    [crm] = hubspot(batch={"max": 20, "wait": "1s"}, rate_limit="5/s", concurrency=2).destinations
    assert (crm.batch, crm.rate_limit, crm.concurrency) == (BatchPolicy(20, 1.0),
                                                            RateLimit(5, 1.0), 2)
    [partial] = hubspot(batch={"wait": "50ms"}).destinations
    assert partial.batch == BatchPolicy(100, 0.05)
    [single] = hubspot(batch={"max": 1}).destinations
    assert single.batch is None and single.per_request == 1  # one contact per request
    assert masked(hubspot())["destinations"][0]["batch"] == {"max": 100, "wait": 0.2}


@pytest.mark.parametrize(("keys", "problem"), [
    ({"type": "hubspot", "access_token": "t", "batch": {"max": 101}},
     "destinations[0] (crm): batch.max: hubspot takes at most 100 per request, not 101"),
    ({"type": "hubspot", "access_token": "t", "batch": {"max": 0}},
     "destinations[0] (crm): batch.max:"),
    ({"type": "hubspot", "access_token": "t", "batch": {"wait": "1m"}},
     "destinations[0] (crm): batch.wait: must be at most 10s"),
    ({"type": "webhook", "url": "https://example.com/hook", "batch": {"max": 10}},
     "destinations[0] (crm): batch: a webhook destination sends one event per request"),
])
def test_check_config_refuses_a_batch_the_driver_cannot_send(keys: dict[str, Any],
                                                             problem: str) -> None:
    with pytest.raises(ConfigError) as refused:
        config([{"name": "crm", **keys}])
    assert any(p.startswith(problem) for p in refused.value.problems), refused.value.problems


def test_a_webhook_stays_one_event_per_request() -> None:
    [hook] = config([{"name": "hook", "type": "webhook", "url": "https://e.com/h"}]).destinations
    assert hook.batch is None and hook.per_request == 1 and hook.rate_limit is None


# -- batches -----------------------------------------------------------------------------------


def test_deliveries_in_the_lane_go_out_together_up_to_max() -> None:
    world = World(batch={"max": 5, "wait": 0})
    world.post(12)
    assert world.run() == {"delivered": 12}
    assert sorted(len(call) for call in world.driver.calls) == [2, 5, 5]
    assert sorted(e for call in world.driver.calls for e in call) == sorted(
        f"lead{n}@example.com" for n in range(12))
    assert world.stats()["delivered"] == 12
    assert world.waiting() == 0
    assert not world.redis.hvals(inflight_key("crm")) or all(
        int(v) == 0 for v in world.redis.hvals(inflight_key("crm")))


def test_a_lone_delivery_waits_for_company_then_goes_alone() -> None:
    world = World(batch={"max": 100, "wait": "300ms"})
    world.post(1)
    world.relay.admit()
    started = time.monotonic()
    assert world.relay.drain("crm").as_dict() == {"delivered": 1}
    [call] = world.driver.calls
    assert call == ["lead0@example.com"]
    waited = world.driver.called_at[0] - started
    assert 0.3 <= waited < 10  # it waited for company, and went without it


def test_deliveries_that_come_while_one_waits_join_its_request() -> None:
    world = World(batch={"max": 100, "wait": "2s"})
    world.post(1)
    world.relay.admit()
    report: dict[str, int] = {}
    drainer = threading.Thread(target=lambda: report.update(world.relay.drain("crm").as_dict()))
    drainer.start()
    # The first delivery is claimed and waits (in flight, not sent) ...
    wait_for(lambda: any(int(v) for v in world.redis.hvals(inflight_key("crm"))), 10)
    assert world.driver.calls == []
    world.post(2)  # ... two more come; a finished request or the wait's end reads them
    world.relay.admit()
    drainer.join(30)
    assert not drainer.is_alive()
    assert world.driver.calls == [["lead0@example.com", "lead1@example.com",
                                   "lead2@example.com"]]
    assert report == {"delivered": 3}


def test_each_delivery_of_a_batch_keeps_its_own_outcome() -> None:
    def mixed(events: Sequence[LeadEvent]) -> Sequence[Answer]:
        answers: dict[str, Answer] = {
            "lead0@example.com": DeliveryResult(200, "contact 1 created"),
            "lead1@example.com": RetryableDeliveryError("HubSpot answered 423: locked", 423, 2.0),
            "lead2@example.com": PermanentDeliveryError("INVALID_EMAIL: bad address", 400),
            "lead3@example.com": DeliveryResult(200, "contact 4 updated"),
        }
        return [answers[e.payload["email"]] for e in events]

    world = World(RecordingDriver(script=mixed), batch={"max": 10, "wait": 0})
    world.post(4)
    assert world.run() == {"delivered": 2, "retrying": 1, "dead": 1}
    assert len(world.driver.calls) == 1
    [(_, destination, due)] = parked_deliveries(world.redis)
    assert destination == "crm" and due >= time.time() + 2800  # its own schedule: 1h ± 20 %
    assert world.stats() == {"delivered": 2, "failed": 2, "dead": 1}


def test_a_driver_that_answers_the_wrong_count_retries_every_delivery() -> None:
    world = World(RecordingDriver(script=lambda events: [DeliveryResult(200)]),
                  batch={"max": 10, "wait": 0})
    world.post(3)
    assert world.run() == {"retrying": 3}


# -- concurrency and the rate limit count requests -----------------------------------------------


def test_concurrency_counts_requests_of_a_batching_destination() -> None:
    release = threading.Event()
    driver = RecordingDriver(hold=release)
    world = World(driver, batch={"max": 10, "wait": 0}, concurrency=2)
    world.post(35)
    world.relay.admit()
    report: dict[str, int] = {}
    drainer = threading.Thread(target=lambda: report.update(world.relay.drain("crm").as_dict()))
    drainer.start()
    wait_for(lambda: driver.in_call == 2, 10)
    # Two requests out, twenty deliveries in them: concurrency 2 is two requests.
    assert sum(int(v) for v in world.redis.hvals(inflight_key("crm"))) == 20
    release.set()
    drainer.join(30)
    assert report == {"delivered": 35}
    assert driver.most_in_call == 2
    assert sorted(len(c) for c in driver.calls) == [5, 10, 10, 10]


def test_the_rate_limit_of_a_batching_destination_counts_requests() -> None:
    world = World(batch={"max": 10, "wait": 0}, rate_limit="2/s")
    world.clock.stop()
    world.post(25)
    assert world.run() == {"delivered": 20}  # two requests of ten
    assert world.counted() == 2
    window_end = int(world.clock()) + 1
    assert float(world.redis.get(hold_key("crm"))) == pytest.approx(window_end)
    world.clock.now = window_end + 0.1
    assert world.run() == {"delivered": 5}
    assert world.counted() == 1
    assert [len(c) for c in world.driver.calls] == [10, 10, 5]


def test_requests_granted_but_not_made_are_given_back_to_the_window() -> None:
    # The lane holds one delivery: of the four requests the concurrency asks for, one is made.
    world = World(batch={"max": 1}, rate_limit="4/s")
    world.clock.stop()
    world.post(1)
    assert world.run() == {"delivered": 1}
    assert world.counted() == 1
    world.post(3)
    assert world.run() == {"delivered": 3}  # the window still had room for them
    assert world.counted() == 4


def test_a_split_batchs_extra_requests_are_charged_to_the_window() -> None:
    world = World(RecordingDriver(script=lambda events: Answers(delivered(events), requests=3)),
                  batch={"max": 10, "wait": 0}, rate_limit="5/s")
    world.clock.stop()
    world.post(4)
    assert world.run() == {"delivered": 4}
    assert world.counted() == 3


# -- a 429 slows the whole destination -------------------------------------------------------------


def test_a_429_holds_the_whole_destination_for_every_worker() -> None:
    def limited(events: Sequence[LeadEvent]) -> Sequence[Answer]:
        return [RetryableDeliveryError("HubSpot answered HTTP 429: rate limit reached", 429,
                                       10.0) for _ in events]

    world = World(RecordingDriver(script=limited), batch={"max": 2, "wait": 0},
                  rate_limit="9/s", concurrency=1)
    world.post(5)
    assert world.run() == {"retrying": 2}  # one request; the other three never went
    assert len(world.driver.calls) == 1
    assert world.waiting() == 3
    until = float(world.redis.get(hold_key("crm")))
    assert until == pytest.approx(time.time() + 10, abs=2)
    # Every worker's rate gate refuses the destination too, for the whole wait, and no longer.
    assert RateLimitGate(world.redis).allow(world.crm, 1)[0] == 0
    assert RateLimitGate(world.redis, clock=lambda: until - 0.5).allow(world.crm, 1)[0] == 0
    assert RateLimitGate(world.redis, clock=lambda: until + 1).allow(world.crm, 1)[0] == 1


def test_a_429_without_a_rate_gate_still_stops_the_drainer() -> None:
    def limited(events: Sequence[LeadEvent]) -> Sequence[Answer]:
        return [RetryableDeliveryError("429", 429, None) for _ in events]

    world = World(RecordingDriver(script=limited), rate_gate=False, batch={"max": 1},
                  concurrency=1)
    world.post(4)
    assert world.run() == {"retrying": 1}
    assert len(world.driver.calls) == 1
    assert world.redis.exists(hold_key("crm"))  # the sweep leaves the lane alone meanwhile


def test_a_buffer_waiting_when_a_429_comes_waits_out_the_hold_unsent() -> None:
    release = threading.Event()

    def first_limited(events: Sequence[LeadEvent]) -> Sequence[Answer]:
        if not release.is_set():
            return [RetryableDeliveryError("429", 429, 30.0) for _ in events]
        return delivered(events)

    world = World(RecordingDriver(script=first_limited), batch={"max": 3, "wait": "5s"},
                  concurrency=2)
    world.post(4)  # one full request, and one delivery that waits for company
    assert world.run() == {"retrying": 3, "deferred": 1}
    assert len(world.driver.calls) == 1
    due = {event_id: at for event_id, _, at in parked_deliveries(world.redis)}
    assert len(due) == 4 and min(due.values()) >= time.time() + 25


def test_a_buffer_waiting_when_its_destination_is_paused_is_not_sent() -> None:
    """Deliveries claimed and waiting for company when an operator pauses the destination
    (or its circuit opens) wait out the hold unsent, without an attempt counted."""
    world = World(batch={"max": 100, "wait": "3s"})
    world.post(1)
    world.relay.admit()
    report: dict[str, int] = {}
    drainer = threading.Thread(target=lambda: report.update(world.relay.drain("crm").as_dict()))
    drainer.start()
    wait_for(lambda: any(int(v) for v in world.redis.hvals(inflight_key("crm"))), 10)
    world.redis.hset(PAUSED_KEY, "crm", '{"reason": "CRM maintenance"}')
    world.post(1)  # the drainer reads again, and its pause gate holds the lane
    world.relay.admit()
    drainer.join(30)
    assert not drainer.is_alive()
    assert world.driver.calls == []  # nothing went to the paused destination
    assert set(report) == {"deferred"}  # the waiting one (and the second, if claimed)
    assert len(parked_deliveries(world.redis)) == report["deferred"]
    assert world.stats() == {}
