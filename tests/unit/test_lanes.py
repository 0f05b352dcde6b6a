"""The intake and the lanes on fakeredis (relay.store.lanes): what the streams keep when a
worker dies between reading and recording, and how kicks and the sweep start work."""

from __future__ import annotations

import time

import fakeredis

from relay.config.settings import Settings
from relay.delivery.engine import MAX_DRAINERS, Engine
from relay.store.keys import INTAKE, hold_key, kick_key, lane_key
from relay.store.lanes import Lanes
from tests.support.helpers import accepted_events, config, make_app, queued_tasks
from tests.support.samples import sample


class World:
    def __init__(self) -> None:
        self.redis = fakeredis.FakeRedis()
        self.config = config([{"name": "crm", "type": "webhook",
                               "url": "http://127.0.0.1:9/crm"}],
                             sources={"kickofflabs": {}})
        self.client = make_app(self.config, self.redis).test_client()
        self.lanes = Lanes(self.redis, consumer="worker-1")

    def post(self, n: int) -> None:
        response = self.client.post("/hooks/kickofflabs",
                                    json=sample("new_signup", social_id=f"s{n}"))
        assert response.status_code == 202

    def engine(self, consumer: str) -> Engine:
        return Engine(Settings(), self.config, self.redis, consumer=consumer)


def test_an_event_read_by_a_worker_that_died_is_taken_over_not_lost() -> None:
    world = World()
    world.post(1)
    # A worker read the entry (it is pending under its name) and was killed before admitting.
    [entry] = Lanes(world.redis, consumer="dead-worker").read_intake(10)
    assert world.lanes.read_intake(10) == []  # not handed to anyone else meanwhile...
    assert world.redis.xlen(INTAKE) == 1  # ...and still there: the stream is the only copy
    # Once it has been idle long enough, the next admit task takes it over.
    world.redis.xclaim(INTAKE, "relay", "dead-worker", 0, [entry.entry_id], idle=60_000)
    assert world.engine("worker-1").admit().as_dict() == {"new": 1}
    assert world.redis.xlen(INTAKE) == 0
    assert world.redis.xlen(lane_key("crm")) == 1


def test_one_admit_task_is_queued_however_many_events_arrive() -> None:
    world = World()
    for n in range(5):
        world.post(n)
    assert [t.name for t in queued_tasks(world.redis)] == ["relay.admit"]
    assert len(accepted_events(world.redis)) == 5
    world.lanes.kicked("")  # the admit task starts: the next event needs a kick of its own
    world.post(9)
    assert [t.name for t in queued_tasks(world.redis)] == ["relay.admit"] * 2


def test_the_sweep_kicks_lanes_with_work_and_no_drainer() -> None:
    world = World()
    world.redis.xgroup_create(lane_key("crm"), "relay", id="0", mkstream=True)
    world.redis.xadd(lane_key("crm"), {"e": "evt_1"})
    world.redis.sadd("relay:lanes", "crm", "idle")
    assert world.lanes.sweep(MAX_DRAINERS) == ["crm"]
    assert world.lanes.sweep(MAX_DRAINERS) == []  # its kick is queued already
    world.lanes.kicked("crm")
    world.lanes.hold("crm", time.time() + 60)
    assert world.lanes.sweep(MAX_DRAINERS) == []  # held: paused, circuit open, rate
    world.lanes.unhold("crm")
    assert world.lanes.join("crm", "drainer-1", lease=60, max_drainers=MAX_DRAINERS)
    # A live drainer has read nothing yet: the unread entry still gets a kick (room for more).
    assert world.lanes.sweep(MAX_DRAINERS) == ["crm"]
    assert not world.redis.sismember("relay:lanes", "idle")  # a lane with no stream is dropped


def test_a_dead_drainers_slots_and_place_are_given_back() -> None:
    world = World()
    assert world.lanes.join("crm", "dead", lease=0, max_drainers=1)  # its lease is over
    assert world.lanes.join("crm", "alive", lease=60, max_drainers=1)
    assert not world.lanes.join("crm", "third", lease=60, max_drainers=1)


def test_due_retries_go_back_into_their_lanes() -> None:
    world = World()
    world.lanes.park("evt_1", "crm", due=100)
    world.lanes.park("evt_2", "crm", due=10**12)
    assert world.lanes.release_due(now=1000) == (1, ["crm"])
    assert world.lanes.lane_entries("crm")[0][1] == "evt_1"
    assert world.lanes.scheduled() == 1


def test_claimed_kicks_are_set_once() -> None:
    world = World()
    assert world.lanes.claim_kicks(["crm", "crm", "backend"]) == ["backend", "crm"]
    assert world.lanes.claim_kicks(["crm"]) == []
    assert world.redis.exists(kick_key("crm")) and not world.redis.exists(hold_key("crm"))


def test_a_lease_is_the_destination_timeout_plus_the_configured_margin() -> None:
    world = World()
    crm = world.config.destination("crm")
    assert crm is not None
    assert world.engine("w").lease(crm) == crm.timeout + 10 == crm.lease
    settings = Settings.from_env({"RELAY_LEASE_MARGIN": "3s"})
    assert Engine(settings, world.config, world.redis).lease(crm) == crm.timeout + 3
