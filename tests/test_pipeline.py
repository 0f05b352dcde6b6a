"""The worker-side core on fakeredis with loopback sinks (SPEC §4): admit (dedupe), route,
deliver with claim-then-confirm, park retries in Redis, dead letters, the task-run cap.

Events come from the real ingress (Flask test client) so the worker sees exactly the message
the web side queued.
"""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Iterator
from typing import Any

import fakeredis
import pytest
from helpers import config, decode_task, make_app, parked_tasks, queued_tasks, sample
from vendor_server import VendorServer

from relay.models import LeadEvent
from relay.delivery.engine import Relay
from relay.settings import Settings
from relay.taskqueue import DELIVER, PROCESS_EVENT, QUEUE

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
    """One fakeredis shared by the ingress and a worker-side Relay."""

    def __init__(self, destinations: list[dict[str, Any]], settings: Settings | None = None,
                 sources: dict[str, Any] | None = None) -> None:
        self.redis = fakeredis.FakeRedis()
        self.config = config(destinations, sources=sources or {"kickofflabs": {}})
        self.settings = settings or Settings()
        self.app = make_app(self.config, self.redis, self.settings)
        self.client = self.app.test_client()
        self.relay = Relay(self.settings, self.config, self.redis)
        self.store = self.relay.delivery.state

    def accept(self, payload: dict[str, Any]) -> tuple[dict[str, Any], str]:
        """POST to the ingress and take the queued message off the broker list."""
        response = self.client.post("/hooks/kickofflabs", json=payload)
        assert response.status_code == 202, response.get_data(as_text=True)
        raw = self.redis.rpop(QUEUE)
        assert raw is not None
        task = decode_task(raw)
        assert task.name == PROCESS_EVENT
        return task.args[0], task.task_id


def hook(sink: VendorServer, name: str = "backend", **keys: Any) -> dict[str, Any]:
    return {"name": name, "type": "webhook", "url": f"{sink.url}/{name}", "timeout": "5s",
            "retry": {"schedule": SCHEDULE}, **keys}


# -- the happy path and dedupe --------------------------------------------------------------------


def test_event_is_delivered_once(sink: VendorServer) -> None:
    world = World([hook(sink)])
    message, task_id = world.accept(sample("new_signup"))
    outcomes = world.relay.process_event(message, task_id)
    assert outcomes == {"_event": "new", "backend": "delivered"}
    [request] = sink.requests
    assert request.path == "/backend"
    assert request.header("webhook-id") == message["event_id"]
    assert request.header("Idempotency-Key") == message["event_id"]
    assert request.json() == message["payload"]
    state = world.store.delivery_states(message["event_id"])["backend"]
    assert state["status"] == "delivered" and state["attempts"] == 1
    [attempt] = world.store.attempts(message["event_id"])
    assert attempt["outcome"] == "delivered" and attempt["status_code"] == 200
    assert world.store.stats("backend")["delivered"] == "1"


def test_duplicate_is_dropped_and_counted(sink: VendorServer) -> None:
    world = World([hook(sink)])
    message, task_id = world.accept(sample("new_signup"))
    world.relay.process_event(message, task_id)
    # KickoffLabs sends the same event again: a new task, the same event id.
    again, second_task = world.accept(sample("new_signup"))
    assert again["event_id"] == message["event_id"] and second_task != task_id
    assert world.relay.process_event(again, second_task) == {"_event": "duplicate"}
    assert world.relay.process_event(again, str(uuid.uuid4())) == {"_event": "duplicate"}
    assert len(sink.requests) == 1
    record = world.store.event_record(message["event_id"])
    assert record is not None and record["duplicates"] == 2


def test_redelivered_task_does_not_resend_a_delivered_destination(sink: VendorServer) -> None:
    world = World([hook(sink)])
    message, task_id = world.accept(sample("new_signup"))
    world.relay.process_event(message, task_id)
    # The broker hands the same task out again (worker lost before the ack).
    outcomes = world.relay.process_event(message, task_id)
    assert outcomes == {"_event": "redelivered", "backend": "already-delivered"}
    assert len(sink.requests) == 1


def test_redelivered_task_finishes_what_a_crash_left_undone(
    sinks: tuple[VendorServer, VendorServer],
) -> None:
    first, second = sinks
    world = World([hook(first, "a"), hook(second, "b")])
    message, task_id = world.accept(sample("new_signup"))
    # The first run delivered to "a" and died before reaching "b".
    destination_a = world.config.destination("a")
    assert destination_a is not None
    event = LeadEvent.from_json(message)
    world.store.admit(event, task_id, 86400)
    world.relay.deliverer.deliver(event, destination_a)
    outcomes = world.relay.process_event(message, task_id)
    assert outcomes == {"_event": "redelivered", "a": "already-delivered", "b": "delivered"}
    assert len(first.requests) == 1 and len(second.requests) == 1


def test_routing_decides_the_destinations(sinks: tuple[VendorServer, VendorServer]) -> None:
    everything, signups = sinks
    world = World([hook(everything, "all", events=["*"]),
                   hook(signups, "signups", events=["new_signup"])])
    tagged, tagged_task = world.accept(sample("tagged"))
    assert world.relay.process_event(tagged, tagged_task) == {"_event": "new", "all": "delivered"}
    unknown, unknown_task = world.accept({**sample("new_signup"), "__event": "lead_exploded"})
    assert unknown["known"] is False
    assert world.relay.process_event(unknown, unknown_task) == {"_event": "new",
                                                                "all": "delivered"}
    assert len(everything.requests) == 2 and signups.requests == []


def test_event_with_no_destination_is_admitted(sink: VendorServer) -> None:
    world = World([hook(sink, events=["deleted"])])
    message, task_id = world.accept(sample("new_signup"))
    assert world.relay.process_event(message, task_id) == {"_event": "new"}
    assert sink.requests == []


# -- retries are parked in Redis ------------------------------------------------------------------


def test_failure_is_parked_and_comes_back_when_due(sink: VendorServer) -> None:
    world = World([hook(sink)])
    message, task_id = world.accept(sample("new_signup"))
    event_id = message["event_id"]
    sink.reply(500, {"error": "down for maintenance"})
    before = time.time()
    assert world.relay.process_event(message, task_id)["backend"] == "retrying"
    after = time.time()

    [(parked, due)] = parked_tasks(world.redis)
    assert parked.name == DELIVER and parked.args == [event_id, "backend"]
    assert before + 10 * 0.8 <= due <= after + 10 * 1.2  # schedule[0] with ±20% jitter
    state = world.store.delivery_states(event_id)["backend"]
    assert state["status"] == "retrying" and state["last_status"] == 500
    assert world.redis.llen(QUEUE) == 0, "nothing is queued before it is due"

    assert world.relay.queue.release_due(now=due - 1) == 0
    assert world.relay.queue.release_due(now=due + 1) == 1
    assert parked_tasks(world.redis) == []
    [released] = queued_tasks(world.redis)
    assert released.name == DELIVER and released.args == [event_id, "backend"]

    assert world.relay.deliver(event_id, "backend", released.task_id) == "delivered"
    assert len(sink.requests) == 2  # one failure, one success
    assert world.store.delivery_states(event_id)["backend"]["status"] == "delivered"
    assert [a["outcome"] for a in world.store.attempts(event_id)] == ["retrying", "delivered"]
    # A stray duplicate of the retry task does not send again.
    assert world.relay.deliver(event_id, "backend", str(uuid.uuid4())) == "already-delivered"
    assert len(sink.requests) == 2


def test_retry_after_is_a_floor_for_the_parked_time(sink: VendorServer) -> None:
    world = World([hook(sink)])
    message, task_id = world.accept(sample("new_signup"))
    sink.reply(429, headers={"Retry-After": "3600"})
    before = time.time()
    world.relay.process_event(message, task_id)
    [(_, due)] = parked_tasks(world.redis)
    assert due >= before + 3600


def test_permanent_error_is_a_dead_letter_with_its_reason(sink: VendorServer) -> None:
    world = World([hook(sink)])
    message, task_id = world.accept(sample("new_signup"))
    sink.reply(400, {"error": "email rejected"})
    assert world.relay.process_event(message, task_id)["backend"] == "dead"
    [dead] = world.store.dead_letters()
    assert dead["event_id"] == message["event_id"] and dead["destination"] == "backend"
    assert dead["status_code"] == 400
    assert "400" in dead["reason"] and "email rejected" in dead["reason"]
    assert dead["event"]["payload"] == message["payload"]
    assert parked_tasks(world.redis) == []
    assert world.store.stats("backend")["dead"] == "1"
    # A dead delivery is final: the same task again does not send.
    assert world.relay.process_event(message, task_id)["backend"] == "already-dead"
    assert len(sink.requests) == 1


def test_exhausted_schedule_is_a_dead_letter(sink: VendorServer) -> None:
    world = World([hook(sink, retry={"schedule": ["1s"]})])  # two attempts in all
    message, task_id = world.accept(sample("new_signup"))
    event_id = message["event_id"]
    sink.reply(503)
    sink.reply(503)
    assert world.relay.process_event(message, task_id)["backend"] == "retrying"
    [(parked, due)] = parked_tasks(world.redis)
    world.relay.queue.release_due(now=due + 1)
    assert world.relay.deliver(event_id, "backend", parked.task_id) == "dead"
    assert parked_tasks(world.redis) == []
    [dead] = world.store.dead_letters("backend")
    assert dead["attempts"] == 2 and "2 attempts" in dead["reason"]
    assert len(sink.requests) == 2


def test_busy_claim_parks_the_second_claimant(sink: VendorServer) -> None:
    world = World([hook(sink)])
    message, task_id = world.accept(sample("new_signup"))
    event_id = message["event_id"]
    # A first worker admitted the event and is sending it right now (its claim is held) when
    # the broker hands the same task to a second worker.
    assert world.store.admit(LeadEvent.from_json(message), task_id, 86400).outcome == "new"
    held = world.store.claim(event_id, "backend", lease=60)
    assert held.status == "claimed"
    assert world.store.claim(event_id, "backend", lease=60).status == "busy"
    outcomes = world.relay.process_event(message, task_id)
    assert outcomes == {"_event": "redelivered", "backend": "busy"}
    assert sink.requests == []
    [(parked, due)] = parked_tasks(world.redis)
    assert parked.name == DELIVER and parked.args == [event_id, "backend"]
    assert due >= time.time() + 50  # after the holder's lease


def test_the_fan_out_is_claimed_in_one_go_each_lease_covering_the_attempts_before_it(
    sinks: tuple[VendorServer, VendorServer],
) -> None:
    first, second = sinks
    world = World([hook(first, "a", timeout="5s"), hook(second, "b", timeout="20s")])
    message, task_id = world.accept(sample("new_signup"))
    claimed: list[list[tuple[str, float]]] = []
    claim_many = world.store.claim_many

    def spy(event_id: str, leases: list[tuple[str, float]]) -> Any:
        claimed.append(list(leases))
        return claim_many(event_id, leases)

    world.store.claim_many = spy  # type: ignore[method-assign]
    outcomes = world.relay.process_event(message, task_id)
    assert outcomes == {"_event": "new", "a": "delivered", "b": "delivered"}
    # a's lease is 2 x 5 s + 10 s; b waits for a's attempt, then has 2 x 20 s + 10 s
    assert claimed == [[("a", 20.0), ("b", 70.0)]]

    # Each claim is decided on its own: a done one, a held one and a free one in one call.
    event_id = message["event_id"]
    world.store.redis.hdel(f"relay:delivery:{event_id}", "b")
    [a, b, c] = claim_many(event_id, [("a", 10), ("b", 10), ("c", 10)])
    assert (a.status, a.final_status) == ("done", "delivered")
    assert (b.status, b.attempt, c.status) == ("claimed", 1, "claimed")
    assert claim_many(event_id, [("b", 10)])[0].status == "busy"


def test_task_that_keeps_crashing_its_worker_becomes_dead_letters(
    sinks: tuple[VendorServer, VendorServer],
) -> None:
    first, second = sinks
    world = World([hook(first, "a"), hook(second, "b")], Settings(max_task_runs=3))
    message, task_id = world.accept(sample("new_signup"))
    for _ in range(3):  # three runs that each killed their worker
        world.store.count_task_run(task_id)
    assert world.relay.process_event(message, task_id) == {"_event": "dead"}
    assert first.requests == [] and second.requests == []
    letters = world.store.dead_letters()
    assert {d["destination"] for d in letters} == {"a", "b"}
    assert all("crashed" in d["reason"] for d in letters)


def test_parked_delivery_that_keeps_crashing_becomes_a_dead_letter(sink: VendorServer) -> None:
    world = World([hook(sink)], Settings(max_task_runs=2))
    message, task_id = world.accept(sample("new_signup"))
    sink.reply(500)
    world.relay.process_event(message, task_id)
    [(parked, _)] = parked_tasks(world.redis)
    for _ in range(2):
        world.store.count_task_run(parked.task_id)
    assert world.relay.deliver(message["event_id"], "backend", parked.task_id) == "dead"
    assert len(sink.requests) == 1
    [dead] = world.store.dead_letters()
    assert "crashed" in dead["reason"]


def test_delivery_for_a_removed_destination_is_dropped(sink: VendorServer) -> None:
    world = World([hook(sink)])
    message, task_id = world.accept(sample("new_signup"))
    world.relay.process_event(message, task_id)
    assert world.relay.deliver(message["event_id"], "no-longer-there", "t1") == "gone"
    assert world.relay.deliver("evt_unknown", "backend", "t2") == "gone"


# -- concurrency ----------------------------------------------------------------------------------


def test_fifty_concurrent_copies_deliver_once_per_destination(
    sinks: tuple[VendorServer, VendorServer],
) -> None:
    first, second = sinks
    world = World([hook(first, "a"), hook(second, "b")])
    message, _ = world.accept(sample("referral"))
    barrier = threading.Barrier(50)
    outcomes: list[dict[str, str]] = []
    errors: list[BaseException] = []
    lock = threading.Lock()

    def work(index: int) -> None:
        try:
            barrier.wait(timeout=10)
            result = world.relay.process_event(dict(message), f"task-{index}")
            with lock:
                outcomes.append(result)
        except BaseException as exc:  # surfaced below, not lost in the thread
            with lock:
                errors.append(exc)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(50)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=30)
    assert errors == []
    assert len(outcomes) == 50
    assert len(first.requests) == 1 and len(second.requests) == 1
    assert sorted(o["_event"] for o in outcomes) == ["duplicate"] * 49 + ["new"]
    record = world.store.event_record(message["event_id"])
    assert record is not None and record["duplicates"] == 49


def test_concurrent_claims_give_exactly_one_owner(sink: VendorServer) -> None:
    world = World([hook(sink)])
    barrier = threading.Barrier(20)
    results: list[str] = []
    lock = threading.Lock()

    def claim() -> None:
        barrier.wait(timeout=10)
        status = world.store.claim("evt_x", "backend", lease=60).status
        with lock:
            results.append(status)

    threads = [threading.Thread(target=claim) for _ in range(20)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=30)
    assert sorted(results) == ["busy"] * 19 + ["claimed"]


def test_expired_claim_of_a_lost_worker_is_taken_over(sink: VendorServer) -> None:
    world = World([hook(sink)])
    message, task_id = world.accept(sample("new_signup"))
    world.store.admit(LeadEvent.from_json(message), task_id, 86400)
    # A worker claimed the delivery and died; its lease (0 s here) has run out.
    assert world.store.claim(message["event_id"], "backend", lease=0).status == "claimed"
    assert world.relay.process_event(message, task_id)["backend"] == "delivered"
    assert len(sink.requests) == 1
    assert world.store.delivery_states(message["event_id"])["backend"]["attempts"] == 2


def test_fifty_concurrent_redeliveries_of_one_task_deliver_once(sink: VendorServer) -> None:
    # Dedupe cannot help here (same task id): the per-destination claim must. The run cap
    # is raised so that 50 starts of one task are not taken for 50 worker crashes.
    world = World([hook(sink)], Settings(max_task_runs=1000))
    message, task_id = world.accept(sample("new_signup"))
    barrier = threading.Barrier(50)
    outcomes: list[str] = []
    lock = threading.Lock()

    def work() -> None:
        barrier.wait(timeout=10)
        result = world.relay.process_event(dict(message), task_id)
        with lock:
            outcomes.append(result["backend"])

    threads = [threading.Thread(target=work) for _ in range(50)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=30)
    assert len(outcomes) == 50
    assert outcomes.count("delivered") == 1
    assert set(outcomes) <= {"delivered", "busy", "already-delivered"}
    assert len(sink.requests) == 1
    # The busy ones were parked and find the delivery done when they come back.
    for parked, due in parked_tasks(world.redis):
        world.relay.queue.release_due(now=due + 1)
        assert world.relay.deliver(*parked.args, str(uuid.uuid4())) == "already-delivered"
    assert len(sink.requests) == 1


def test_burying_never_overrides_a_delivery_another_worker_holds(sink: VendorServer) -> None:
    # The run cap buries a parked delivery while another worker is sending it right now:
    # that worker's outcome decides; a dead letter here would be replayed into a second send.
    world = World([hook(sink)], Settings(max_task_runs=1))
    message, task_id = world.accept(sample("new_signup"))
    event_id = message["event_id"]
    world.store.admit(LeadEvent.from_json(message), task_id, 86400)
    assert world.store.claim(event_id, "backend", lease=60).status == "claimed"
    retry_task = str(uuid.uuid4())
    world.store.count_task_run(retry_task)  # it already ran once and killed its worker
    world.relay.deliver(event_id, "backend", retry_task)
    assert world.store.dead_letters() == []
    assert world.store.delivery_states(event_id)["backend"]["status"] == "inflight"
