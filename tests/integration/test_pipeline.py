"""The worker-side engine on fakeredis with loopback sinks (SPEC §4): admit (dedupe, route into
lanes), drain with claim-then-confirm, park retries in Redis, dead letters, the crash cap.

Events come from the real ingress (Flask test client) so the worker sees exactly what the web
side stored.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from typing import Any

import fakeredis
import pytest

from relay.config.settings import Settings
from relay.delivery.engine import Engine, Report
from relay.store.keys import lane_key
from relay.store.lanes import Admission
from tests.support.helpers import (
    accepted_events,
    config,
    make_app,
    parked_deliveries,
    release_parked,
)
from tests.support.history import HistoryView, history_for
from tests.support.samples import sample
from tests.support.vendor_server import VendorServer

SCHEDULE = ["10s", "1m"]


@pytest.fixture
def sinks() -> Iterator[tuple[VendorServer, VendorServer]]:
    first, second = VendorServer().start(), VendorServer().start()
    try:
        yield first, second
    finally:
        first.stop()
        second.stop()


@pytest.fixture
def sink(sinks: tuple[VendorServer, VendorServer]) -> VendorServer:
    return sinks[0]


class World:
    """One fakeredis shared by the ingress and a worker-side engine."""

    def __init__(self, destinations: list[dict[str, Any]], settings: Settings | None = None,
                 sources: dict[str, Any] | None = None) -> None:
        self.redis = fakeredis.FakeRedis()
        self.config = config(destinations, sources=sources or {"kickofflabs": {}})
        self.settings = settings or Settings()
        self.app = make_app(self.config, self.redis, self.settings)
        self.client = self.app.test_client()
        self.relay = self.engine()
        self.store = HistoryView(self.redis)

    def engine(self, consumer: str = "worker-1") -> Engine:
        return Engine(self.settings, self.config, self.redis, consumer=consumer,
                      database=history_for(self.redis))

    def accept(self, payload: dict[str, Any]) -> dict[str, Any]:
        """POST to the ingress; the event as the intake holds it."""
        response = self.client.post("/hooks/kickofflabs", json=payload)
        assert response.status_code == 202, response.get_data(as_text=True)
        return accepted_events(self.redis)[-1]

    def lane(self, destination: str, event_id: str) -> None:
        """Put (another) delivery of the event into the destination's lane, as a retry or a
        reclaimed entry would."""
        self.redis.xadd(lane_key(destination), {"e": event_id})


def hook(sink: VendorServer, name: str = "backend", **keys: Any) -> dict[str, Any]:
    return {"name": name, "type": "webhook", "url": f"{sink.url}/{name}", "timeout": "5s",
            "retry": {"schedule": SCHEDULE}, **keys}


# -- the happy path and dedupe --------------------------------------------------------------------


def test_event_is_delivered_once(sink: VendorServer) -> None:
    world = World([hook(sink)])
    event = world.accept(sample("new_signup"))
    assert world.relay.admit().as_dict() == {"new": 1}
    assert world.relay.drain("backend").as_dict() == {"delivered": 1}
    [request] = sink.requests
    assert request.path == "/backend"
    assert request.header("webhook-id") == event["event_id"]
    assert request.header("Idempotency-Key") == event["event_id"]
    assert request.json() == event["payload"]
    state = world.store.delivery_states(event["event_id"])["backend"]
    assert state["status"] == "delivered" and state["attempts"] == 1
    [attempt] = world.store.attempts(event["event_id"])
    assert attempt["outcome"] == "delivered" and attempt["status_code"] == 200
    assert world.store.stats("backend")["delivered"] == "1"
    assert world.redis.xlen(lane_key("backend")) == 0  # confirmed entries leave the lane


def test_duplicate_is_dropped_and_counted(sink: VendorServer) -> None:
    world = World([hook(sink)])
    event = world.accept(sample("new_signup"))
    world.relay.admit()
    world.relay.drain("backend")
    # KickoffLabs sends the same event again: another intake entry, the same event id.
    again = world.accept(sample("new_signup"))
    world.accept(sample("new_signup"))
    assert again["event_id"] == event["event_id"]
    assert world.relay.admit().as_dict() == {"duplicate": 2}
    assert world.relay.drain("backend").as_dict() == {}
    assert len(sink.requests) == 1
    record = world.store.event_record(event["event_id"])
    assert record is not None and record["duplicates"] == 2


def test_the_first_event_received_under_an_id_wins(sink: VendorServer) -> None:
    # Two events share a sender's Idempotency-Key; the second is admitted first (another
    # worker's batch got to it sooner): the first one received is still the one delivered.
    world = World([hook(sink)])
    headers = {"Idempotency-Key": "kol-77"}
    for email in ("first@example.com", "second@example.com"):
        response = world.client.post("/hooks/kickofflabs", headers=headers,
                                     json=sample("new_signup", email=email))
        assert response.status_code == 202
    first, second = world.relay.lanes.read_intake(10)
    report = Report()
    world.relay._admit_batch([second], report)
    world.relay._admit_batch([first], report)
    assert report.as_dict() == {"duplicate": 1, "new": 1}
    world.relay.drain("backend")
    [request] = sink.requests
    assert request.json()["email"] == "first@example.com"
    record = world.store.event_record(request.header("webhook-id"))
    assert record is not None and record["duplicates"] == 1


def test_an_intake_entry_is_admitted_once(sink: VendorServer) -> None:
    world = World([hook(sink)])
    world.accept(sample("new_signup"))
    [entry] = world.relay.lanes.read_intake(10)
    event_id = entry.event["event_id"]  # type: ignore[index]
    items = [Admission(entry.entry_id, event_id, 86400, entry.raw.decode(), ["backend"],
                       json.dumps({"k": "event"}), json.dumps({"k": "duplicate"}))]
    assert world.relay.lanes.admit("relay:nothing", b"", time.time(), 3600, items) == ["new"]
    # The same entry again (a second worker took it over before the first acknowledged it).
    assert world.relay.lanes.admit("relay:nothing", b"", time.time(), 3600, items) == ["done"]
    assert world.redis.xlen(lane_key("backend")) == 1


def test_a_second_entry_for_a_delivered_destination_does_not_resend(sink: VendorServer) -> None:
    world = World([hook(sink)])
    event = world.accept(sample("new_signup"))
    world.relay.admit()
    world.relay.drain("backend")
    world.lane("backend", event["event_id"])  # e.g. a worker died before acknowledging it
    assert world.relay.drain("backend").as_dict() == {"already-done": 1}
    assert len(sink.requests) == 1
    assert world.redis.xlen(lane_key("backend")) == 0


def test_each_destination_has_its_own_lane(sinks: tuple[VendorServer, VendorServer]) -> None:
    first, second = sinks
    world = World([hook(first, "a"), hook(second, "b")])
    world.accept(sample("new_signup"))
    world.relay.admit()
    # "a" is drained; "b" waits in its own lane, untouched by what happens to "a".
    assert world.relay.drain("a").as_dict() == {"delivered": 1}
    assert world.redis.xlen(lane_key("b")) == 1 and second.requests == []
    assert world.relay.drain("b").as_dict() == {"delivered": 1}
    assert len(first.requests) == 1 and len(second.requests) == 1


def test_routing_decides_the_destinations(sinks: tuple[VendorServer, VendorServer]) -> None:
    everything, signups = sinks
    world = World([hook(everything, "all", events=["*"]),
                   hook(signups, "signups", events=["new_signup"])])
    world.accept(sample("tagged"))
    unknown = world.accept({**sample("new_signup"), "__event": "lead_exploded"})
    assert unknown["known"] is False
    assert world.relay.admit().as_dict() == {"new": 2}
    assert world.relay.drain("all").as_dict() == {"delivered": 2}
    assert world.relay.drain("signups").as_dict() == {}
    assert len(everything.requests) == 2 and signups.requests == []


def test_event_with_no_destination_is_admitted(sink: VendorServer) -> None:
    world = World([hook(sink, events=["deleted"])])
    event = world.accept(sample("new_signup"))
    assert world.relay.admit().as_dict() == {"new": 1}
    assert world.store.event_record(event["event_id"]) is not None
    assert world.relay.lanes.lane_depths() == {}
    assert sink.requests == []


# -- retries are parked in Redis ------------------------------------------------------------------


def test_failure_is_parked_and_comes_back_when_due(sink: VendorServer) -> None:
    world = World([hook(sink)])
    event_id = world.accept(sample("new_signup"))["event_id"]
    world.relay.admit()
    sink.reply(500, {"error": "down for maintenance"})
    before = time.time()
    assert world.relay.drain("backend").as_dict() == {"retrying": 1}
    after = time.time()

    [(parked_id, destination, due)] = parked_deliveries(world.redis)
    assert (parked_id, destination) == (event_id, "backend")
    assert before + 10 * 0.8 <= due <= after + 10 * 1.2  # schedule[0] with ±20% jitter
    state = world.store.delivery_states(event_id)["backend"]
    assert state["status"] == "retrying" and state["last_status"] == 500
    assert world.redis.xlen(lane_key("backend")) == 0, "nothing waits in the lane before it is due"

    assert release_parked(world.redis, now=due - 1) == 0
    assert release_parked(world.redis, now=due + 1) == 1
    assert parked_deliveries(world.redis) == []
    assert world.relay.drain("backend").as_dict() == {"delivered": 1}
    assert len(sink.requests) == 2  # one failure, one success
    assert world.store.delivery_states(event_id)["backend"]["status"] == "delivered"
    assert [a["outcome"] for a in world.store.attempts(event_id)] == ["retrying", "delivered"]
    # A stray duplicate of the retry does not send again.
    world.lane("backend", event_id)
    assert world.relay.drain("backend").as_dict() == {"already-done": 1}
    assert len(sink.requests) == 2


def test_retry_after_is_a_floor_for_the_parked_time(sink: VendorServer) -> None:
    world = World([hook(sink)])
    world.accept(sample("new_signup"))
    world.relay.admit()
    sink.reply(429, headers={"Retry-After": "3600"})
    before = time.time()
    world.relay.drain("backend")
    [(_, _, due)] = parked_deliveries(world.redis)
    assert due >= before + 3600


def test_permanent_error_is_a_dead_letter_with_its_reason(sink: VendorServer) -> None:
    world = World([hook(sink)])
    event = world.accept(sample("new_signup"))
    world.relay.admit()
    sink.reply(400, {"error": "email rejected"})
    assert world.relay.drain("backend").as_dict() == {"dead": 1}
    [dead] = world.store.dead_letters()
    assert dead["event_id"] == event["event_id"] and dead["destination"] == "backend"
    assert dead["status_code"] == 400
    assert "400" in dead["reason"] and "email rejected" in dead["reason"]
    assert dead["event"]["payload"] == event["payload"]
    assert parked_deliveries(world.redis) == []
    assert world.store.stats("backend")["dead"] == "1"
    # A dead delivery is final: another entry for it does not send.
    world.lane("backend", event["event_id"])
    assert world.relay.drain("backend").as_dict() == {"already-done": 1}
    assert len(sink.requests) == 1


def test_exhausted_schedule_is_a_dead_letter(sink: VendorServer) -> None:
    world = World([hook(sink, retry={"schedule": ["1s"]})])  # two attempts in all
    world.accept(sample("new_signup"))
    world.relay.admit()
    sink.reply(503)
    sink.reply(503)
    assert world.relay.drain("backend").as_dict() == {"retrying": 1}
    release_parked(world.redis)
    assert world.relay.drain("backend").as_dict() == {"dead": 1}
    assert parked_deliveries(world.redis) == []
    [dead] = world.store.dead_letters("backend")
    assert dead["attempts"] == 2 and "2 attempts" in dead["reason"]
    assert len(sink.requests) == 2


def test_busy_claim_parks_the_second_claimant(sink: VendorServer) -> None:
    world = World([hook(sink)])
    event_id = world.accept(sample("new_signup"))["event_id"]
    world.relay.admit()
    # A first worker claimed the delivery and is sending it right now when a second entry
    # for the same delivery reaches another worker.
    held = world.store.take("backend", "worker-0", "other", 1, 50, lease=60)
    assert [c.event.event_id for c in held.claims] == [event_id]
    world.lane("backend", event_id)
    assert world.relay.drain("backend").as_dict() == {"busy": 1}
    assert sink.requests == []
    [(parked_id, _, due)] = parked_deliveries(world.redis)
    assert parked_id == event_id
    assert due >= time.time() + 50  # after the holder's lease


def test_a_batch_is_claimed_in_one_round_trip_each_delivery_on_its_own_terms(
    sink: VendorServer,
) -> None:
    world = World([hook(sink)])
    ids = [world.accept(sample("new_signup", social_id=f"lead{n}"))["event_id"]
           for n in range(3)]
    world.relay.admit()
    # Lead 0 is delivered already, lead 1 is being sent by another worker, lead 2 is free.
    first = world.store.take("backend", "w0", "h0", 2, 50, lease=60)
    assert [c.event.event_id for c in first.claims] == ids[:2]
    world.relay.store.confirm("backend", "h0", 60, [
        world.relay.decider.decide(world.config.destinations[0], _ok(first.claims[0]))])
    world.lane("backend", ids[0])
    world.lane("backend", ids[1])
    taken = world.store.take("backend", "w1", "h1", 10, 50, lease=60)
    assert [c.event.event_id for c in taken.claims] == [ids[2]]
    assert (taken.done, taken.busy, taken.gone) == (1, 1, 0)


def _ok(claim: Any) -> Any:
    from relay.core.models import DeliveryResult
    from relay.delivery.attempt import Sent

    return Sent(claim, DeliveryResult(200), 1.0)


def test_a_delivery_that_keeps_crashing_its_worker_becomes_a_dead_letter(
    sinks: tuple[VendorServer, VendorServer],
) -> None:
    first, second = sinks
    world = World([hook(first, "a"), hook(second, "b")], Settings(max_task_runs=3))
    event_id = world.accept(sample("new_signup"))["event_id"]
    world.relay.admit()
    for _ in range(3):  # three workers claimed it and died: their leases ran out
        taken = world.store.take("a", "dead-worker", "h", 1, 50, lease=0)
        assert taken.claims
        world.lane("a", event_id)
    assert world.relay.drain("a").as_dict() == {"dead": 1}
    assert first.requests == []
    [letter] = world.store.dead_letters()
    assert letter["destination"] == "a" and "crashed its worker 3 times" in letter["reason"]
    # The other destination's delivery is not touched by a's crashes.
    assert world.relay.drain("b").as_dict() == {"delivered": 1}


def test_deliveries_for_a_removed_destination_or_an_erased_event_are_dropped(
    sink: VendorServer,
) -> None:
    world = World([hook(sink)])
    event_id = world.accept(sample("new_signup"))["event_id"]
    world.relay.admit()
    world.relay.drain("backend")
    world.lane("no-longer-there", event_id)
    assert world.relay.drain("no-longer-there").as_dict() == {"gone": 1}
    world.lane("backend", "evt_unknown")
    assert world.relay.drain("backend").as_dict() == {"gone": 1}
    assert world.redis.xlen(lane_key("backend")) == 0


# -- concurrency ----------------------------------------------------------------------------------


def _together(n: int, work: Any) -> list[Any]:
    barrier = threading.Barrier(n)
    results: list[Any] = []
    errors: list[BaseException] = []
    lock = threading.Lock()

    def run(index: int) -> None:
        try:
            barrier.wait(timeout=10)
            result = work(index)
            with lock:
                results.append(result)
        except BaseException as exc:  # surfaced below, not lost in the thread
            with lock:
                errors.append(exc)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(n)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=30)
    assert errors == []
    assert len(results) == n
    return results


def test_fifty_copies_admitted_by_five_workers_deliver_once_per_destination(
    sinks: tuple[VendorServer, VendorServer],
) -> None:
    first, second = sinks
    world = World([hook(first, "a"), hook(second, "b")])
    for _ in range(50):
        event = world.accept(sample("referral"))
    engines = [world.engine(f"worker-{i}") for i in range(5)]

    def admit(index: int) -> dict[str, int]:
        return engines[index].admit(batch=3).as_dict()

    outcomes = _together(5, admit)
    assert sum(o.get("new", 0) for o in outcomes) == 1
    assert sum(o.get("duplicate", 0) for o in outcomes) == 49
    _together(5, lambda i: engines[i].drain("a"))
    _together(5, lambda i: engines[i].drain("b"))
    assert len(first.requests) == 1 and len(second.requests) == 1
    record = world.store.event_record(event["event_id"])
    assert record is not None and record["duplicates"] == 49


def test_concurrent_claims_of_one_delivery_give_exactly_one_owner(sink: VendorServer) -> None:
    world = World([hook(sink)])
    event_id = world.accept(sample("new_signup"))["event_id"]
    world.relay.admit()
    for _ in range(19):
        world.lane("backend", event_id)

    def take(index: int) -> tuple[int, int]:
        taken = world.store.take("backend", f"w{index}", f"h{index}", 1, 50, lease=60)
        return len(taken.claims), taken.busy

    results = _together(20, take)
    assert sorted(results) == [(0, 1)] * 19 + [(1, 0)]


def test_expired_claim_of_a_lost_worker_is_taken_over(sink: VendorServer) -> None:
    world = World([hook(sink)])
    event_id = world.accept(sample("new_signup"))["event_id"]
    world.relay.admit()
    # A worker claimed the delivery and died; its lease (0 s here) has run out and its entry
    # comes back (here: by hand; in a worker: XAUTOCLAIM once it has been idle that long).
    assert world.store.take("backend", "lost", "h", 1, 50, lease=0).claims
    world.lane("backend", event_id)
    assert world.relay.drain("backend").as_dict() == {"delivered": 1}
    assert len(sink.requests) == 1
    state = world.store.delivery_states(event_id)["backend"]
    assert state["attempts"] == 2 and state["crashes"] == 1


def test_a_dead_workers_pending_entries_are_reclaimed(sink: VendorServer) -> None:
    world = World([hook(sink, timeout="1s")])
    world.accept(sample("new_signup"))
    world.relay.admit()
    # The dead worker read and claimed the entry (lease 0: already over) and never
    # acknowledged it: it is pending in the group under that worker's name.
    assert world.store.take("backend", "dead-worker", "h", 1, 50, lease=0).claims
    assert world.redis.xlen(lane_key("backend")) == 1
    time.sleep(0.01)  # idle for longer than the 1 ms asked below, however fast the machine
    taken = world.store.take("backend", "worker-1", "h1", 5, 50, lease=60, reclaim_idle=0.001)
    assert len(taken.claims) == 1 and taken.claims[0].crashes == 1


def test_many_workers_draining_one_lane_deliver_each_event_once(sink: VendorServer) -> None:
    world = World([hook(sink, concurrency=8)])
    ids = {world.accept(sample("new_signup", social_id=f"lead{n}"))["event_id"]
           for n in range(40)}
    world.relay.admit()
    for event_id in list(ids)[:10]:
        world.lane("backend", event_id)  # stray second entries: must not double-send
    engines = [world.engine(f"worker-{i}") for i in range(4)]
    _together(4, lambda i: engines[i].drain("backend"))
    release_parked(world.redis)
    world.relay.drain("backend")
    assert sorted(r.header("webhook-id") for r in sink.requests) == sorted(ids)


def test_the_destinations_concurrency_bounds_its_deliveries_in_flight(
    sink: VendorServer,
) -> None:
    world = World([hook(sink, concurrency=3)])
    for n in range(6):
        world.accept(sample("new_signup", social_id=f"lead{n}"))
    world.relay.admit()
    # Another worker holds 2 of the 3 slots: this one may take one delivery only.
    assert len(world.store.take("backend", "w0", "h0", 2, 3, lease=60).claims) == 2
    assert len(world.store.take("backend", "w1", "h1", 5, 3, lease=60).claims) == 1
    assert world.store.take("backend", "w1", "h1", 5, 3, lease=60).claims == []
