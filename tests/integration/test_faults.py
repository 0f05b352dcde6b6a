"""Fault injection (issue 6) with real parts: a real redis-server that we kill, stop, fill and
restart; real `relay worker` processes that we kill -9 and SIGTERM; loopback sinks that are slow
or never answer. Each test asserts SPEC §4: every event that got a 202 is delivered, at most once
per destination except for the crash-between-send-and-confirm window, whose duplicates are
counted and printed."""

from __future__ import annotations

import contextlib
import os
import select
import socket
import threading
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler
from typing import Any

import pytest
import redis

from relay.cli.embedded_redis import EmbeddedRedis
from relay.delivery.gates import PauseGate
from relay.delivery.kicks import QUEUE
from tests.support.deployment import RelayDeployment
from tests.support.helpers import wait_for
from tests.support.history import HistoryView
from tests.support.loopback import LoopbackHTTPServer, Sink, start_sink
from tests.support.samples import sample

pytestmark = pytest.mark.integration

FAST_RETRY = {"schedule": ["0.3s", "0.3s", "0.3s", "0.3s"]}


def webhook(name: str, url: str, **extra: object) -> dict[str, object]:
    return {"name": name, "type": "webhook", "url": url, "retry": FAST_RETRY, "timeout": "3s",
            **extra}


def lead(n: int, event: str = "new_signup") -> dict[str, Any]:
    payload = sample(event)
    payload["social_id"] = f"lead{n}"
    return payload


def post(client: Any, payload: dict[str, Any]) -> Any:
    return client.post("/hooks/kickofflabs", json=payload)


def accepted(client: Any, payload: dict[str, Any]) -> str:
    response = post(client, payload)
    assert response.status_code == 202, response.get_json()
    return str(response.get_json()["event_id"])


def delivered(sink: Sink, path: str | None = None) -> set[str]:
    return {r.headers["webhook-id"] for r in sink.requests(path)}


def duplicates(sink: Sink) -> int:
    counts = Counter((r.path, r.headers["webhook-id"]) for r in sink.requests())
    return sum(n - 1 for n in counts.values())


def post_with_deadline(client: Any, payload: dict[str, Any], seconds: float = 3.0) -> Any:
    """Post from a thread: the call must return within ``seconds`` (a hung ingress fails the
    test here instead of at the global timeout)."""
    result: dict[str, Any] = {}
    thread = threading.Thread(target=lambda: result.update(r=post(client, payload)),
                              daemon=True)
    thread.start()
    thread.join(seconds)
    assert not thread.is_alive(), f"the ingress did not answer within {seconds} s"
    return result["r"]


# -- a sink that holds requests open -------------------------------------------------------


@dataclass
class Held:
    webhook_id: str
    start: float
    end: float = 0.0


@dataclass
class HoldingSink:
    """Answers nothing for ``hold`` seconds, and notes when each request started and when the
    client gave up on it (closed its connection): the attempt's real span, as the destination
    sees it."""

    hold: float = 30.0
    server: LoopbackHTTPServer | None = None
    attempts: list[Held] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)
    closing: threading.Event = field(default_factory=threading.Event)

    @property
    def url(self) -> str:
        assert self.server is not None
        return self.server.url

    def spans(self) -> list[Held]:
        with self.lock:
            return list(self.attempts)


def _client_gone(connection: socket.socket) -> bool:
    readable, _, _ = select.select([connection], [], [], 0.05)
    if not readable:
        return False
    try:
        return connection.recv(1, socket.MSG_PEEK) == b""
    except OSError:
        return True


@pytest.fixture
def holding_sink() -> Iterator[HoldingSink]:
    sink = HoldingSink()

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def do_POST(self) -> None:  # noqa: N802
            self.rfile.read(int(self.headers.get("Content-Length") or 0))
            held = Held(self.headers.get("webhook-id", ""), time.time())
            with sink.lock:
                sink.attempts.append(held)
            deadline = time.monotonic() + sink.hold
            while time.monotonic() < deadline and not sink.closing.is_set():
                if _client_gone(self.connection):
                    break
            held.end = time.time()
            self.close_connection = True
            with contextlib.suppress(OSError):
                self.send_response(200)
                self.send_header("Content-Length", "0")
                self.end_headers()

        def log_message(self, *args: Any) -> None:
            pass

    sink.server = LoopbackHTTPServer(Handler).start()
    yield sink
    sink.closing.set()
    sink.server.stop()


# -- 1. kill -9 of a worker ----------------------------------------------------------------


@pytest.mark.timeout(120)
def test_kill_9_of_a_worker_with_1000_events_to_2_sinks_loses_none(
    deployment: RelayDeployment, sink: Sink
) -> None:
    deployment.configure({"destinations": [webhook("a", f"{sink.url}/a"),
                                           webhook("b", f"{sink.url}/b")]})
    # The shipped shape on 2 cores: `relay worker` runs one Celery worker process per core.
    worker = deployment.start_worker(concurrency=4, processes=2)
    client = deployment.web_client()
    ids = {accepted(client, lead(n)) for n in range(1000)}

    wait_for(lambda: len(sink.requests()) >= 400, message="deliveries under way")
    worker.kill()
    killed_at = time.monotonic()
    deployment.start_worker(concurrency=4, processes=2)

    # The killed worker's deliveries stay pending in their lanes and are taken over once their
    # lease (timeout + 10 s) has run out: well within the minute the issue sets.
    wait_for(lambda: delivered(sink, "/a") == ids and delivered(sink, "/b") == ids,
             timeout=70, interval=0.5, message="every event at both sinks after kill -9")
    recovered = time.monotonic() - killed_at
    extra = duplicates(sink)
    print(f"\nkill -9, 1000 events x 2 sinks: recovered in {recovered:.1f} s, "
          f"{extra} duplicate deliveries")
    assert recovered <= 60
    # Only sends not yet confirmed when the worker died may repeat: at most 1 % (issue 11).
    assert extra <= 20


# -- 2. kill -9 of Redis -------------------------------------------------------------------


@pytest.mark.timeout(120)
def test_kill_9_of_redis_under_load_loses_no_accepted_event(
    deployment: RelayDeployment, sink: Sink, redis_server: EmbeddedRedis
) -> None:
    """Redis runs AOF with ``appendfsync everysec``: a write acknowledged within the last second
    before a kill -9 of redis-server may be lost; that is the documented durability window. So
    the test leaves 1.5 s between the last 202 and the kill; the worker keeps working through
    the window, which is the load."""
    deployment.configure({"destinations": [webhook("a", f"{sink.url}/a")]})
    sink.delay = 0.03  # a backlog outlives the kill
    deployment.start_worker()
    client = deployment.web_client()
    ids = {accepted(client, lead(n)) for n in range(300)}
    time.sleep(1.5)  # past the everysec window
    in_flight = 300 - len(delivered(sink))
    redis_server.kill()

    refused = [post_with_deadline(client, lead(1000 + n)).status_code for n in range(10)]
    assert refused == [503] * 10

    redis_server.start()  # same data dir (AOF) and port
    later_503 = 0
    for n in range(2000, 2100):
        for _ in range(20):  # pooled connections to the dead server fail once each
            response = post(client, lead(n))
            if response.status_code == 202:
                ids.add(response.get_json()["event_id"])
                break
            assert response.status_code == 503
            later_503 += 1
            time.sleep(0.05)
        else:
            raise AssertionError("the ingress did not recover after Redis came back")

    wait_for(lambda: delivered(sink) >= ids, timeout=60, interval=0.5,
             message="every accepted event delivered after Redis restarted")
    print(f"\nkill -9 of Redis with {in_flight} events undelivered: 0 lost, "
          f"{duplicates(sink)} duplicates, {later_503} 503s after the restart")


# -- 3. Redis full ---------------------------------------------------------------------------


@pytest.mark.timeout(60)
def test_full_redis_answers_503_never_202_and_recovers(
    deployment: RelayDeployment, sink: Sink, redis_client: redis.Redis
) -> None:
    deployment.configure({"destinations": [webhook("a", f"{sink.url}/a")]})
    deployment.start_worker()
    client = deployment.web_client()
    before = accepted(client, lead(0))
    wait_for(lambda: before in delivered(sink), message="the first event")

    # Fill well past the limit we then set, so nothing the ingress frees or allocates brings
    # Redis back under it by chance.
    junk = b"x" * 65536
    n = 48
    for i in range(n):
        redis_client.set(f"junk:{i}", junk)
    used = int(redis_client.info("memory")["used_memory"])
    redis_client.config_set("maxmemory", used - 1024 * 1024)
    with pytest.raises(redis.ResponseError, match="maxmemory"):
        redis_client.lpush("probe", b"x")
    depth = redis_client.llen(QUEUE)

    for i in range(20):
        response = post_with_deadline(client, lead(100 + i))
        assert response.status_code == 503, response.get_json()
        assert response.headers.get("Retry-After")
    assert redis_client.llen(QUEUE) == depth  # nothing half-stored

    redis_client.delete(*[f"junk:{i}" for i in range(n)])
    after = {accepted(client, lead(200 + i)) for i in range(5)}
    wait_for(lambda: delivered(sink) >= after | {before}, message="events after recovery")


@pytest.mark.timeout(240)
def test_a_full_redis_never_stops_deliveries(
    deployment: RelayDeployment, sink: Sink, redis_client: redis.Redis
) -> None:
    """Issue 19: with a destination paused, events are posted until the ingress refuses at its
    high-water mark; once the destination is resumed every acknowledged event is delivered, no
    worker met an OOM refusal, and the ingress accepts again without help. (Before, Redis
    filled up with history and the workers failed to record outcomes, so acknowledged events
    stayed undelivered.)"""
    deployment.configure({"destinations": [webhook("a", f"{sink.url}/a")]})
    used = int(redis_client.info("memory")["used_memory"])
    # A small backlog keeps the test short: the mark 1.5 MB above what an idle relay uses,
    # maxmemory well above it, as a 1 GB Redis with the shipped 80 % mark has in bytes.
    deployment.env["RELAY_REDIS_HIGH_WATER"] = str(used + 1536 * 1024)
    redis_client.config_set("maxmemory", used + 32 * 1024 * 1024)
    worker = deployment.start_worker()
    client = deployment.web_client()
    first = accepted(client, lead(0))
    wait_for(lambda: first in delivered(sink), message="the first event")
    PauseGate(redis_client).pause("a")

    acknowledged: set[str] = set()
    refused = 0
    deadline = time.monotonic() + 60
    n = 1
    while refused < 20 and time.monotonic() < deadline:
        response = post_with_deadline(client, lead(n))
        n += 1
        if response.status_code == 202:
            acknowledged.add(response.get_json()["event_id"])
        else:
            assert response.status_code == 503, response.get_json()
            refused += 1
    assert refused == 20, f"never refused after {len(acknowledged)} events"

    PauseGate(redis_client).resume("a")
    try:
        wait_for(lambda: delivered(sink, "/a") >= acknowledged, timeout=90, interval=0.5,
                 message=f"all {len(acknowledged)} acknowledged events delivered")
    except AssertionError as exc:
        memory = redis_client.info("memory")
        raise AssertionError(
            f"{exc}: {len(acknowledged - delivered(sink, '/a'))} missing; used "
            f"{memory['used_memory']} of {memory['maxmemory']}; intake "
            f"{redis_client.xlen('relay:intake')}, lane {redis_client.xlen('relay:lane:a')}, "
            f"history {redis_client.xlen('relay:history')}, hold "
            f"{redis_client.get('relay:hold:a')}, queue {redis_client.llen(QUEUE)}, "
            f"kick {redis_client.get('relay:kick:a')}, drainers "
            f"{redis_client.zrange('relay:drainers:a', 0, -1, withscores=True)}; "
            f"worker log: {worker.log()[-2000:]}") from None
    wait_for(lambda: post_with_deadline(client, lead(n)).status_code == 202, timeout=30,
             message="the ingress to accept again by itself")
    assert "OOM" not in worker.log()


# -- 4. Redis unreachable ------------------------------------------------------------------


@pytest.mark.timeout(90)
def test_unreachable_redis_gives_fast_503_and_workers_reconnect(
    deployment: RelayDeployment, sink: Sink, redis_server: EmbeddedRedis
) -> None:
    deployment.configure({"destinations": [webhook("a", f"{sink.url}/a")]})
    sink.delay = 0.02
    deployment.start_worker()
    client = deployment.web_client()
    ids = {accepted(client, lead(n)) for n in range(100)}
    redis_server.stop()  # clean shutdown: the AOF is flushed, nothing is in the window

    for n in range(5):
        response = post_with_deadline(client, lead(500 + n), seconds=3.0)
        assert response.status_code == 503
        assert response.get_json()["error"]
        assert response.headers["Retry-After"]
    time.sleep(2)  # the worker notices and starts reconnecting

    redis_server.start()
    for n in range(50):
        for _ in range(20):
            response = post(client, lead(1000 + n))
            if response.status_code == 202:
                ids.add(response.get_json()["event_id"])
                break
            time.sleep(0.05)
        else:
            raise AssertionError("the ingress did not recover after Redis came back")

    wait_for(lambda: delivered(sink) >= ids, timeout=60, interval=0.5,
             message="every accepted event delivered by the reconnected worker")
    print(f"\nRedis stopped and restarted: 0 lost of {len(ids)}, {duplicates(sink)} duplicates")


# -- 5. a destination that answers after 30 s ----------------------------------------------


@pytest.mark.timeout(60)
def test_slow_destination_times_out_and_retries_never_overlap(
    deployment: RelayDeployment, holding_sink: HoldingSink, history: HistoryView
) -> None:
    deployment.configure({"destinations": [{
        "name": "slow", "type": "webhook", "url": f"{holding_sink.url}/slow", "timeout": "1s",
        "retry": {"schedule": ["1s", "1s", "1s", "1s", "1s"]}}]})
    deployment.start_worker(concurrency=4)
    client = deployment.web_client()
    ids = [accepted(client, lead(n)) for n in range(3)]

    def finished_attempts() -> dict[str, list[Held]]:
        by_id: dict[str, list[Held]] = {i: [] for i in ids}
        for held in holding_sink.spans():
            if held.end:
                by_id[held.webhook_id].append(held)
        return by_id

    wait_for(lambda: all(len(spans) >= 3 for spans in finished_attempts().values()),
             timeout=40, interval=0.2, message="three timed-out attempts per event")
    for event_id, spans in finished_attempts().items():
        spans.sort(key=lambda h: h.start)
        for first, second in zip(spans, spans[1:], strict=False):
            assert second.start >= first.end, f"attempts of {event_id} overlap"
            # The client gave up after its 1 s timeout, not the sink's 30 s.
            assert first.end - first.start < 5
            # Next attempt on schedule: 1 s ± 20 %, plus the scheduler's tick.
            assert second.start - first.end >= 0.8 - 0.1
        log = history.attempts(event_id)
        assert [entry["outcome"] for entry in log[:3]] == ["retrying"] * 3
        assert "time" in log[0]["error"].lower()


# -- 6. concurrent copies of one event -----------------------------------------------------


@pytest.mark.timeout(60)
def test_50_concurrent_copies_of_one_event_deliver_once_per_destination(
    deployment: RelayDeployment, sink: Sink, history: HistoryView
) -> None:
    deployment.configure({"destinations": [webhook("a", f"{sink.url}/a"),
                                           webhook("b", f"{sink.url}/b")]})
    deployment.start_worker(concurrency=4)
    clients = [deployment.web_client() for _ in range(50)]
    start = threading.Barrier(50)
    answers: list[tuple[int, str]] = []

    def send(client: Any) -> None:
        start.wait()
        response = post(client, sample("new_signup"))
        answers.append((response.status_code, response.get_json().get("event_id", "")))

    threads = [threading.Thread(target=send, args=(c,)) for c in clients]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(10)
    assert len(answers) == 50
    assert {status for status, _ in answers} == {202}
    (event_id,) = {event_id for _, event_id in answers}

    wait_for(lambda: (history.event_record(event_id) or {}).get("duplicates") == 49,
             message="49 duplicates dropped")
    wait_for(lambda: delivered(sink, "/a") and delivered(sink, "/b"), message="deliveries")
    marker = accepted(clients[0], lead(1))  # queued after the 50 copies: a settled point
    wait_for(lambda: marker in delivered(sink, "/a") and marker in delivered(sink, "/b"))
    assert len([r for r in sink.requests() if r.headers["webhook-id"] == event_id]) == 2


# -- 7. SIGTERM: warm shutdown hands unfinished work back at once -------------------------


@pytest.mark.timeout(90)
def test_sigterm_hands_back_unfinished_deliveries_at_once(
    deployment: RelayDeployment, sink: Sink
) -> None:
    # With a 120 s visibility timeout, only an immediate requeue brings the reserved messages
    # back within the test's bound; the sweep would need two minutes.
    deployment.env["RELAY_VISIBILITY_TIMEOUT"] = "120"
    deployment.env["RELAY_TASK_TIME_LIMIT"] = "60"
    deployment.configure({"destinations": [webhook("a", f"{sink.url}/a")]})
    sink.delay = 0.5
    # Two worker processes under `relay worker`: the SIGTERM to it reaches both.
    first = deployment.start_worker(concurrency=2, processes=2)
    client = deployment.web_client()
    ids = {accepted(client, lead(n)) for n in range(30)}

    wait_for(lambda: len(sink.requests()) >= 4, message="a batch under way")
    first.terminate()
    stopped_at = time.monotonic()
    assert not first.alive()
    assert first.process is not None
    with pytest.raises(ProcessLookupError):  # relay worker waited for every process it ran
        os.killpg(first.process.pid, 0)
    assert len(delivered(sink)) < 30
    deployment.start_worker(concurrency=2)

    wait_for(lambda: delivered(sink) == ids, timeout=45, interval=0.2,
             message="every event after the warm shutdown, long before the visibility timeout")
    print(f"\nSIGTERM mid-batch: all 30 delivered {time.monotonic() - stopped_at:.1f} s after "
          f"the stop, {duplicates(sink)} duplicates")
    assert duplicates(sink) == 0  # a warm shutdown finishes what it started


# -- 8. a task that kills its worker every time --------------------------------------------


@pytest.mark.timeout(60)
def test_a_delivery_that_kills_its_worker_becomes_a_dead_letter(
    deployment: RelayDeployment, sink: Sink, holding_sink: HoldingSink,
    history: HistoryView
) -> None:
    # A 1 s task time limit below the destination's 3 s timeout: the drain gives up on the
    # never-answered request at the limit, as a killed pool process did with prefork, and
    # leaves it unconfirmed. Its lease (3 + 3 s: RELAY_LEASE_MARGIN) runs out, another drain
    # takes the entry over and counts the crash on the delivery: with RELAY_MAX_TASK_RUNS=1,
    # a dead letter.
    deployment.env["RELAY_LEASE_MARGIN"] = "3"
    deployment.env["RELAY_TASK_TIME_LIMIT"] = "1"
    deployment.env["RELAY_MAX_TASK_RUNS"] = "1"
    deployment.configure({"destinations": [
        {"name": "killer", "type": "webhook", "url": f"{holding_sink.url}/never",
         "timeout": "3s", "events": ["tagged"], "retry": FAST_RETRY},
        webhook("ok", f"{sink.url}/ok", events=["new_signup"]),
    ]})
    worker = deployment.start_worker(concurrency=2)
    client = deployment.web_client()

    def dead_letter(event_id: str) -> dict[str, Any] | None:
        found = [d for d in history.dead_letters("killer") if d["event_id"] == event_id]
        return found[0] if found else None

    poison = accepted(client, sample("tagged"))
    ids = set()
    for n in range(20):
        ids.add(accepted(client, lead(n)))
        time.sleep(0.1)

    wait_for(lambda: delivered(sink, "/ok") == ids, timeout=30, message="the other events")
    try:
        wait_for(lambda: dead_letter(poison), timeout=30,
                 interval=0.2, message="the worker-killing delivery as a dead letter")
    except AssertionError as exc:
        state = history.delivery_states(poison)
        attempts = history.attempts(poison)
        dead = history.dead_letters("killer")
        stats = history.stats("killer")
        raise AssertionError(f"{exc}; delivery state {state}, attempts {attempts}, "
                             f"dead {dead}, stats {stats}") from None
    letter = dead_letter(poison)
    assert "crashed its worker" in letter["reason"]
    assert worker.alive()  # only pool processes died
    kills = len(holding_sink.spans())
    assert 1 <= kills <= 3
    print(f"\nworker-killing delivery: dead letter after {kills} attempts")


# -- 9. a slow destination beside a fast one ------------------------------------------------


@pytest.mark.timeout(120)
def test_a_slow_destination_never_holds_back_a_fast_one(
    deployment: RelayDeployment, sink: Sink
) -> None:
    """Issue 11: with one task per event, a CRM answering in 2 s held a fast webhook to one
    event a second (121 of 300 after 120 s). Each destination now has its own lane."""
    slow = start_sink()
    slow.delay = 2.0
    try:
        deployment.configure({"destinations": [
            webhook("fast", f"{sink.url}/fast"),
            webhook("crm", f"{slow.url}/crm", timeout="10s"),
        ]})
        deployment.start_worker()
        client = deployment.web_client()
        ids = {accepted(client, lead(n)) for n in range(300)}
        started = time.monotonic()
        # Alone, the fast destination takes about a second; the bound is generous so that a
        # loaded machine never flakes, and still far below what one slow lane used to cost.
        wait_for(lambda: delivered(sink, "/fast") == ids, timeout=45, interval=0.1,
                 message="every event at the fast destination while the slow one crawls")
        fast_done = time.monotonic() - started
        slow_so_far = len(delivered(slow, "/crm"))
        print(f"\nfast destination: 300 in {fast_done:.1f} s beside one answering in 2 s "
              f"({slow_so_far} delivered there meanwhile)")
        assert slow_so_far < 300  # the slow one really was still busy
        # The slow lane keeps many requests in flight, not one at a time.
        wait_for(lambda: len(slow.requests("/crm")) >= 40, timeout=30,
                 message="the slow destination's window filling")
    finally:
        assert slow.server is not None
        slow.server.shutdown()
        slow.server.server_close()
