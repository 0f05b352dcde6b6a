"""Per-lead ordering (``ordering: per_lead``): a lead's events reach the destination in the
order the ingress received them, one at a time per lead; a later event waits while an earlier
one is in flight or waiting for a retry; other leads never wait for it.

On fakeredis. Most tests play the drainer's round trips themselves (:meth:`DeliveryStore.step`,
the one script that decides), so each rule of ``lua/step.lua`` is seen alone; the last ones
drive the engine with a recording driver. A real worker and a real receiver are in
tests/integration/test_ordering.py.
"""

from __future__ import annotations

import threading
import time
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import fakeredis
import pytest

from relay.config.settings import Settings
from relay.core.errors import ConfigError, RetryableDeliveryError
from relay.core.models import DeliveryResult, Destination, LeadEvent
from relay.delivery.attempt import DriverCache
from relay.delivery.engine import Engine, Report
from relay.drivers import Driver
from relay.drivers.base import Answer
from relay.history.leads import lead_keys
from relay.store.deliveries import Attempt, Claim, Confirmation, Taken
from relay.store.erase import erase_lead
from relay.store.keys import ORDER_PREFIX, lane_key, order_key, order_lead, stats_key
from tests.support.helpers import config, make_app, release_parked
from tests.support.samples import sample

API_KEY = "ordering-key"


def lead_of(lead: str) -> str:
    return order_lead("email", f"{lead}@example.com")


class World:
    """The ingress and the worker-side engine on one fakeredis, delivering to ``crm`` (a
    webhook with ``ordering: per_lead`` unless told otherwise)."""

    def __init__(self, driver: Driver | None = None, **keys: Any) -> None:
        self.redis = fakeredis.FakeRedis()
        kind = {"type": "webhook", "url": "https://crm.example.com/hook"}
        if keys.get("type", "webhook") != "webhook":
            kind = {}
        self.config = config([{"name": "crm", **kind, "ordering": "per_lead",
                               "retry": {"schedule": ["1h", "1h"]}, **keys}],
                             sources={"kickofflabs": {}})
        self.app = make_app(self.config, self.redis, Settings(api_keys=(API_KEY,)))
        self.client = self.app.test_client()
        drivers = OneDriver(driver) if driver is not None else None
        self.relay = Engine(Settings(), self.config, self.redis, drivers=drivers)
        self.store = self.relay.store

    def post(self, lead: str, step: int, name: str = "score_change") -> str:
        """Event ``step`` of ``lead`` (its own id: the sender's ``Idempotency-Key``)."""
        response = self.client.post(
            "/hooks/kickofflabs", headers={"Idempotency-Key": f"{lead}-{step}"},
            json=sample(name, email=f"{lead}@example.com", social_id=f"s-{lead}", id=None,
                        step=step))
        assert response.status_code == 202, response.get_json()
        event_id: str = response.get_json()["event_id"]
        return event_id

    def post_keyless(self, name: str) -> str:
        """An event that names no lead, put in the intake past the ingress's checks."""
        event = LeadEvent(f"evt_{name}", "kickofflabs", "new_signup",
                          {"first_name": name, "step": 0, "__event": "new_signup"},
                          received_at=time.time())
        self.app.extensions["relay"].intake.publish(event.to_json(), 86400.0)
        return event.event_id

    def step(self, done: Sequence[Confirmation] = (), want: int = 50, **kw: Any) -> Taken:
        """One drainer round trip: record ``done``, claim up to ``want``."""
        self.relay.admit()
        return self.store.step("crm", "w", "h", 30.0, done, want, 50, **kw)

    def outcome(self, claim: Claim, outcome: str) -> Confirmation:
        due = time.time() + 3600 if outcome == "retrying" else None
        return Confirmation(claim.event, Attempt("crm", claim.attempt, outcome,  # type: ignore[arg-type]
                                                 at=time.time()),
                            claim.entry_id, retry_at=due)

    def waiting(self) -> int:
        return int(self.redis.hget(stats_key("crm"), "waiting") or 0)

    def order_lists(self) -> list[bytes]:
        return sorted(self.redis.scan_iter(match=ORDER_PREFIX + "*"))

    def state(self, event_id: str) -> dict[str, Any]:
        return self.store.delivery_states(event_id)["crm"]


def steps(taken: Taken) -> list[tuple[str, int]]:
    """What was claimed: (lead, step) in claim order."""
    return [(c.event.payload["email"].split("@")[0] if "email" in c.event.payload
             else c.event.payload["first_name"], c.event.payload["step"]) for c in taken.claims]


# -- the configuration -----------------------------------------------------------------------------


def test_ordering_is_off_by_default_and_per_lead_on_request() -> None:
    [plain] = config([{"name": "hook", "type": "webhook", "url": "https://e.com/h"}]).destinations
    assert plain.ordering == "none" and not plain.ordered
    [ordered] = config([{"name": "hook", "type": "webhook", "url": "https://e.com/h",
                         "ordering": "per_lead"}]).destinations
    assert ordered.ordered
    [batched] = config([{"name": "crm", "type": "hubspot", "access_token": "t",
                         "ordering": "per_lead"}]).destinations
    assert batched.ordered and batched.per_request == 100  # one event per lead per request
    with pytest.raises(ConfigError) as refused:
        config([{"name": "hook", "type": "webhook", "url": "https://e.com/h",
                 "ordering": "per_email"}])
    assert refused.value.problems[0].startswith("destinations[0] (hook): ordering: Must be one of")


def test_the_lead_is_its_first_key_as_a_digest_never_the_address() -> None:
    digest = lead_of("ada")
    assert len(digest) == 16 and "ada" not in digest
    # The first key decides: the email when there is one (normalised), then social_id, ...
    assert order_lead(*lead_keys({"email": " Ada@Example.com ", "social_id": "x"})[0]) == digest
    world = World()
    world.post("ada", 0)
    world.post("bob", 0)
    world.relay.admit()
    first, second = world.redis.xrange(lane_key("crm"))
    assert first[1][b"l"] == digest.encode() and second[1][b"l"] == lead_of("bob").encode()


# -- the rules of the claim ------------------------------------------------------------------------


def test_a_leads_later_events_wait_until_the_earlier_one_is_delivered() -> None:
    world = World()
    for n in range(3):
        world.post("ada", n)
    first = world.step()
    assert steps(first) == [("ada", 0)]
    assert first.waiting == 2 and world.waiting() == 2
    assert world.redis.xlen(lane_key("crm")) == 1  # the one in flight: the others left it
    assert world.redis.llen(order_key("crm", lead_of("ada"))) == 3
    assert steps(world.step()) == []  # nothing more while the first is in flight
    second = world.step([world.outcome(first.claims[0], "delivered")])
    assert steps(second) == [("ada", 1)] and world.waiting() == 1
    third = world.step([world.outcome(second.claims[0], "delivered")])
    assert steps(third) == [("ada", 2)] and world.waiting() == 0
    assert steps(world.step([world.outcome(third.claims[0], "skipped")])) == []
    assert world.order_lists() == []  # nothing is left behind once the lead is done


def test_other_leads_are_not_held_back() -> None:
    world = World()
    for lead, n in [("ada", 0), ("ada", 1), ("bob", 0), ("ada", 2), ("bob", 1), ("cy", 0)]:
        world.post(lead, n)
    first = world.step()
    assert steps(first) == [("ada", 0), ("bob", 0), ("cy", 0)]
    assert first.waiting == 3
    ada, bob, cy = first.claims
    # Ada's first event fails and waits an hour for its retry; Bob and Cy go on.
    after = world.step([world.outcome(ada, "retrying"), world.outcome(bob, "delivered"),
                        world.outcome(cy, "delivered")])
    assert steps(after) == [("bob", 1)]
    assert world.waiting() == 2  # Ada's two


def test_a_retry_keeps_the_lead_held_and_the_state_names_its_lead() -> None:
    world = World()
    world.post("ada", 0)
    later = world.post("ada", 1)
    [first] = world.step().claims
    assert world.state(first.event.event_id)["order"] == lead_of("ada")
    assert steps(world.step([world.outcome(first, "retrying")])) == []
    state = world.state(first.event.event_id)
    assert state["status"] == "retrying" and state["order"] == lead_of("ada")
    assert later not in world.store.delivery_states(later) and world.waiting() == 1
    assert release_parked(world.redis) == 1  # the retry is due (the scheduler's part)
    [retry] = world.step().claims
    assert (retry.event.event_id, retry.attempt) == (first.event.event_id, 2)
    assert steps(world.step([world.outcome(retry, "delivered")])) == [("ada", 1)]


def test_a_dead_letter_releases_the_leads_next_event() -> None:
    world = World()
    world.post("ada", 0)
    world.post("ada", 1)
    [first] = world.step().claims
    assert steps(world.step([world.outcome(first, "dead")])) == [("ada", 1)]
    assert world.state(first.event.event_id)["status"] == "dead"


def test_an_event_gone_meanwhile_releases_the_leads_next_event() -> None:
    world = World()
    world.post("ada", 0)
    world.post("ada", 1)
    [first] = world.step().claims
    assert steps(world.step([world.outcome(first, "gone")])) == [("ada", 1)]


def test_a_stale_head_is_dropped_when_the_leads_next_event_comes() -> None:
    world = World()
    erased = world.post("ada", 0)
    world.post("ada", 1)
    assert steps(world.step()) == [("ada", 0)]
    # Its state vanishes without an outcome (erased, say): the head is stale.
    world.redis.delete(f"relay:delivery:{erased}")
    world.post("ada", 2)
    taken = world.step()  # the new event finds the stale head, drops it, promotes the next
    assert steps(taken) == [] and taken.waiting == 1
    assert steps(world.step()) == [("ada", 1)]
    assert world.waiting() == 1  # step 2, behind step 1


def test_a_second_entry_of_a_waiting_event_adds_nothing() -> None:
    world = World()
    world.post("ada", 0)
    waiting = world.post("ada", 1)
    world.step()
    world.redis.xadd(lane_key("crm"), {"e": waiting, "l": lead_of("ada")})  # a stray copy
    taken = world.step()
    assert steps(taken) == [] and taken.waiting == 1
    assert world.redis.llen(order_key("crm", lead_of("ada"))) == 2
    assert world.waiting() == 1


def test_an_event_without_a_lead_key_is_not_ordered() -> None:
    world = World()
    world.post_keyless("x")
    world.post_keyless("y")
    world.post("ada", 0)
    world.post("ada", 1)
    taken = world.step()
    assert steps(taken) == [("x", 0), ("y", 0), ("ada", 0)]
    assert taken.waiting == 1


def test_an_unordered_destination_claims_every_event_at_once() -> None:
    world = World(ordering="none")
    for n in range(3):
        world.post("ada", n)
    taken = world.step()
    assert steps(taken) == [("ada", 0), ("ada", 1), ("ada", 2)]
    assert world.order_lists() == [] and b"l" not in world.redis.xrange(
        lane_key("crm"))[0][1]


def test_a_lead_with_too_many_waiting_is_sent_out_of_order_and_counted() -> None:
    world = World()
    for n in range(5):
        world.post("ada", n)
    taken = world.step(most_waiting=2)
    assert steps(taken) == [("ada", 0), ("ada", 3), ("ada", 4)]
    assert (taken.waiting, taken.unordered) == (2, 2)
    first, over, _ = taken.claims
    assert "order" not in world.state(over.event.event_id)
    # Out of order, its outcome releases nothing; the head's does.
    assert steps(world.step([world.outcome(over, "delivered")])) == []
    assert steps(world.step([world.outcome(first, "delivered")])) == [("ada", 1)]


def test_a_replayed_dead_letter_is_sent_out_of_order() -> None:
    world = World()
    dead = world.post("ada", 0)
    world.post("ada", 1)
    [first] = world.step().claims
    assert steps(world.step([world.outcome(first, "dead")])) == [("ada", 1)]  # in flight
    assert world.store.replay(dead, "crm", time.time())
    assert steps(world.step()) == [("ada", 0)]  # at once, beside the lead's next event


def test_the_queued_count_includes_the_events_waiting_behind_their_lead() -> None:
    world = World()
    for n in range(4):
        world.post("ada", n)
    world.step()
    [crm] = world.client.get("/api/destinations", headers={
        "Authorization": f"Bearer {API_KEY}"}).get_json()["destinations"]
    assert crm["queued"] == 4  # one in flight, three behind it
    assert crm["waiting"] == 3
    metrics = world.client.get("/metrics").text
    assert 'relay_lead_waiting{destination="crm"} 3.0' in metrics


def test_erasing_a_lead_drops_its_order_lists() -> None:
    world = World()
    for n in range(3):
        world.post("ada", n)
    world.post("bob", 0)
    world.post("bob", 1)
    world.step()
    assert world.waiting() == 3
    report = erase_lead(world.redis, "Ada@example.com")
    assert world.order_lists() == [order_key("crm", lead_of("bob")).encode()]
    assert world.waiting() == 1 and report.removed["order_lists"] == 1


# -- admission keeps the order received ------------------------------------------------------------


def test_a_batch_for_an_ordered_lane_waits_for_an_earlier_batch_being_admitted() -> None:
    world = World()
    first = world.post("ada", 0)
    second = world.post("ada", 1)
    slow = Engine(Settings(), world.config, world.redis, consumer="worker-1")
    earlier = slow.lanes.read_intake(1)  # worker 1 has read step 0, and is still at it
    admitted = threading.Event()
    later = threading.Thread(target=lambda: (world.relay.admit(), admitted.set()))
    later.start()  # another worker reads step 1: it must not reach the lane first
    assert not admitted.wait(0.3)
    assert world.redis.xlen(lane_key("crm")) == 0
    slow._admit_batch(earlier, Report())
    assert admitted.wait(10)
    later.join(10)
    assert [fields[b"e"].decode() for _, fields in world.redis.xrange(lane_key("crm"))] == [
        first, second]


def test_a_batch_for_unordered_lanes_never_waits() -> None:
    world = World(ordering="none")
    world.post("ada", 0)
    second = world.post("ada", 1)
    Engine(Settings(), world.config, world.redis, consumer="worker-1").lanes.read_intake(1)
    world.relay.admit()
    assert [fields[b"e"].decode() for _, fields in world.redis.xrange(lane_key("crm"))] == [
        second]


# -- the engine ------------------------------------------------------------------------------------


@dataclass
class RecordingDriver(Driver):
    """Records each call's (lead, step); fails the first attempt of the steps in ``fail``."""

    fail: set[tuple[str, int]] = field(default_factory=set)
    calls: list[list[tuple[str, int]]] = field(default_factory=list)
    in_flight: dict[str, int] = field(default_factory=lambda: defaultdict(int))
    most_in_flight: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)

    def __post_init__(self) -> None:
        pass

    def send_batch(self, events: Sequence[LeadEvent]) -> Sequence[Answer]:
        sent = [(e.payload["email"].split("@")[0], e.payload["step"]) for e in events]
        with self.lock:
            self.calls.append(sent)
            for lead, _ in sent:
                self.in_flight[lead] += 1
                self.most_in_flight = max(self.most_in_flight, self.in_flight[lead])
        time.sleep(0.01)
        answers: list[Answer] = []
        with self.lock:
            for item in sent:
                self.in_flight[item[0]] -= 1
                if item in self.fail:
                    self.fail.discard(item)
                    answers.append(RetryableDeliveryError("503 from the receiver", 503))
                else:
                    answers.append(DeliveryResult(200, "ok"))
        return answers


class OneDriver(DriverCache):
    def __init__(self, driver: Driver) -> None:
        super().__init__()
        self.driver = driver

    def get(self, destination: Destination) -> Driver:
        return self.driver


def test_the_engine_sends_each_leads_events_in_order_through_failed_first_attempts() -> None:
    leads = [f"lead{n}" for n in range(10)]
    failing = {(lead, 1) for lead in leads[::3]} | {(leads[1], 0)}
    driver = RecordingDriver(fail=set(failing))
    world = World(driver, retry={"schedule": ["0s", "0s"]})
    for n in range(4):
        for lead in leads:
            world.post(lead, n)
    for _ in range(20):  # a worker's drains, and its scheduler putting due retries back
        world.relay.admit()
        world.relay.drain("crm")
        release_parked(world.redis)
        if not world.redis.xlen(lane_key("crm")) and not world.waiting():
            break
    sent: dict[str, list[int]] = defaultdict(list)
    for call in driver.calls:
        for lead, n in call:
            sent[lead].append(n)
    for lead in leads:  # a failed step is sent again before the next step goes
        assert sent[lead] == sorted([0, 1, 2, 3] + [n for x, n in failing if x == lead]), lead
    assert driver.most_in_flight == 1  # never two events of one lead at once
    assert world.order_lists() == []


def test_a_batch_carries_one_event_per_lead() -> None:
    driver = RecordingDriver()
    world = World(driver, type="hubspot", access_token="t", batch={"max": 10, "wait": 0})
    for lead, n in [("ada", 0), ("ada", 1), ("bob", 0), ("ada", 2), ("bob", 1)]:
        world.post(lead, n)
    world.relay.admit()
    assert world.relay.drain("crm").as_dict() == {"delivered": 5, "waiting": 3}
    assert driver.calls == [[("ada", 0), ("bob", 0)], [("ada", 1), ("bob", 1)], [("ada", 2)]]


def test_a_drain_reads_on_past_entries_that_only_wait_behind_their_lead() -> None:
    driver = RecordingDriver(fail={("ada", 0)})
    world = World(driver, concurrency=2)
    world.post("ada", 0)
    world.relay.admit()
    assert world.relay.drain("crm").as_dict() == {"retrying": 1}  # back in an hour
    for lead, n in [("ada", 1), ("ada", 2), ("bob", 0)]:
        world.post(lead, n)
    world.relay.admit()
    # The first read (two entries, the concurrency) finds only Ada's, which wait: Bob's
    # event is not left in the lane for the sweep to find.
    assert world.relay.drain("crm").as_dict() == {"waiting": 2, "delivered": 1}
    assert driver.calls[-1] == [("bob", 0)]
