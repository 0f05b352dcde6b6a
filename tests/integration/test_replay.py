"""Replaying a dead letter is one step: it is either still dead or queued once, whoever else
replays it at the same time and wherever the replaying process dies.

Against a real ``redis-server``: threads that replay one dead letter at once, and a process
killed at its first write to Redis. The single-replay behaviour also runs on fakeredis, which the
unit layer's replays (admin API, console, CLI) run on.
"""

from __future__ import annotations

import collections
import multiprocessing
import os
import threading
import time
from collections.abc import Iterator
from importlib import resources
from typing import Any

import fakeredis
import pytest
import redis

from relay.cli.embedded_redis import EmbeddedRedis
from relay.core.models import LeadEvent
from relay.store import scripts
from relay.store.deliveries import Attempt, Confirmation, DeliveryStore
from relay.store.keys import (
    DEAD_INDEX,
    DEAD_KEY,
    LANES,
    dead_id,
    delivery_key,
    event_key,
    lane_key,
    recent_key,
    stats_key,
)

DESTINATION = "crm"
RETENTION = 3600
CRASHED = 17  # the exit status of a replaying process killed at its first write


def bury(store: DeliveryStore, event_id: str, destination: str = DESTINATION) -> LeadEvent:
    """A dead letter, recorded as a drainer records one (counters, recent list, index)."""
    now = time.time()
    event = LeadEvent(event_id, "kickofflabs", "new_signup",
                      {"email": f"{event_id}@example.com", "campaign_id": 135}, True, now)
    attempt = Attempt(destination, 5, "dead", 500, 12.0, "HTTP 500", None, now)
    store.confirm(destination, "drainer", 30, [Confirmation(event, attempt,
                                                            dead_reason="gave up")])
    return event


def queued(client: redis.Redis, event_id: str, destination: str = DESTINATION) -> int:
    """How many entries of the destination's lane carry the event."""
    return sum(fields[b"e"] == event_id.encode()
               for _, fields in client.xrange(lane_key(destination)))


def is_dead(client: redis.Redis, event_id: str, destination: str = DESTINATION) -> bool:
    return bool(client.hexists(DEAD_KEY, dead_id(event_id, destination)))


def dead_count(client: redis.Redis, destination: str = DESTINATION) -> int:
    return int(client.hget(stats_key(destination), "dead") or 0)


def snapshot(client: redis.Redis) -> dict[bytes, Any]:
    """Every key and its content (the types the store writes)."""
    read = {b"hash": client.hgetall, b"string": client.get, b"set": client.smembers,
            b"list": lambda k: client.lrange(k, 0, -1),
            b"zset": lambda k: client.zrange(k, 0, -1, withscores=True),
            b"stream": client.xrange}
    return {key: read[client.type(key)](key) for key in sorted(client.keys("*"))}


@pytest.fixture(params=["redis-server", "fakeredis"])
def client(request: pytest.FixtureRequest) -> Iterator[redis.Redis]:
    if request.param == "fakeredis":
        yield fakeredis.FakeRedis()
        return
    server: EmbeddedRedis = request.getfixturevalue("redis_server")
    yield redis.Redis.from_url(server.url)


def test_a_replay_queues_a_fresh_delivery_and_settles_the_counts(client: redis.Redis) -> None:
    store = DeliveryStore(client, retention=RETENTION)
    event = bury(store, "evt_replay_1")
    client.delete(event_key(event.event_id))  # the event record expired; the letter has it
    assert dead_count(client) == 1
    assert client.zscore(recent_key(DESTINATION, "dead"), event.event_id) is not None

    assert store.replay(event.event_id, DESTINATION) == event

    assert not is_dead(client, event.event_id)
    assert client.zscore(DEAD_INDEX, dead_id(event.event_id, DESTINATION)) is None
    assert queued(client, event.event_id) == 1
    assert client.smembers(LANES) == {DESTINATION.encode()}
    assert dead_count(client) == 0
    assert client.zscore(recent_key(DESTINATION, "dead"), event.event_id) is None
    state = store.delivery_states(event.event_id)[DESTINATION]
    assert (state["status"], state["attempts"]) == ("pending", 0)
    assert state["replayed_at"] == pytest.approx(time.time(), abs=60)
    assert store.load_event(event.event_id) == event
    assert 0 < client.ttl(event_key(event.event_id)) <= RETENTION
    assert 0 < client.ttl(delivery_key(event.event_id)) <= RETENTION

    before = snapshot(client)
    assert store.replay(event.event_id, DESTINATION) is None  # taken already
    assert store.replay("evt_never_dead", DESTINATION) is None
    assert snapshot(client) == before


def test_concurrent_replays_of_one_dead_letter_queue_it_once(redis_server: EmbeddedRedis,
                                                             ) -> None:
    """Eight replays of each dead letter start at once: one wins, the others change nothing.

    (The replay that read the letter, then wrote in a second transaction, let each loser
    decrement the dead count and reset the delivery again.)"""
    client = redis.Redis.from_url(redis_server.url)
    letters, replayers = 30, 8
    event_ids = [f"evt_race_{n}" for n in range(letters)]
    for event_id in event_ids:
        bury(DeliveryStore(client), event_id)
    assert dead_count(client) == letters

    for event_id in event_ids:
        start = threading.Barrier(replayers)
        won: list[bool] = []

        def replay(event_id: str = event_id, start: threading.Barrier = start,
                   won: list[bool] = won) -> None:
            store = DeliveryStore(redis.Redis.from_url(redis_server.url), retention=RETENTION)
            start.wait()
            won.append(store.replay(event_id, DESTINATION) is not None)

        threads = [threading.Thread(target=replay) for _ in range(replayers)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=30)
        assert sorted(won) == [False] * (replayers - 1) + [True], event_id

    lane = collections.Counter(fields[b"e"].decode()
                               for _, fields in client.xrange(lane_key(DESTINATION)))
    assert lane == {event_id: 1 for event_id in event_ids}
    assert dead_count(client) == 0
    assert client.hlen(DEAD_KEY) == 0
    assert client.zcard(DEAD_INDEX) == 0
    assert client.zcard(recent_key(DESTINATION, "dead")) == 0
    store = DeliveryStore(client)
    for event_id in event_ids:
        state = store.delivery_states(event_id)[DESTINATION]
        assert (state["status"], state["attempts"]) == ("pending", 0)


_READS = {"GET", "HGET", "HGETALL", "HMGET", "HEXISTS", "EXISTS", "TTL", "TYPE", "XLEN",
          "XRANGE", "ZRANGE", "ZSCORE", "ZCARD", "SCRIPT", "PING", "CLIENT", "INFO"}


def _writes(commands: list[tuple[Any, ...]]) -> bool:
    return any(str(args[0]).upper() not in _READS for args in commands)


def _replay_and_die(url: str, event_id: str, when: str) -> None:
    """In a child process: replay, and die (``os._exit``) at the first command that writes to
    Redis, either once it is sent, before its answer is read (``when="sent"``), or once its
    answer is read (``when="answered"``). A single command or a whole pipeline counts as one."""
    armed = False
    execute_command = redis.Redis.execute_command
    execute_pipeline = redis.client.Pipeline.execute
    read_response = redis.connection.AbstractConnection.read_response

    def die() -> None:
        os._exit(CRASHED)

    def command(self: redis.Redis, *args: Any, **options: Any) -> Any:
        nonlocal armed
        if isinstance(self, redis.client.Pipeline):
            return execute_command(self, *args, **options)
        armed = armed or _writes([args])
        answer = execute_command(self, *args, **options)
        if armed:
            die()
        return answer

    def pipeline(self: redis.client.Pipeline, raise_on_error: bool = True) -> Any:
        nonlocal armed
        armed = armed or _writes([args for args, _ in self.command_stack])
        answer = execute_pipeline(self, raise_on_error)
        if armed:
            die()
        return answer

    def response(self: Any, *args: Any, **kwargs: Any) -> Any:
        if armed and when == "sent":
            die()
        return read_response(self, *args, **kwargs)

    redis.Redis.execute_command = command  # type: ignore[method-assign]
    redis.client.Pipeline.execute = pipeline  # type: ignore[method-assign]
    redis.connection.AbstractConnection.read_response = response  # type: ignore[method-assign]
    DeliveryStore(redis.Redis.from_url(url), retention=RETENTION).replay(event_id, DESTINATION)
    os._exit(0)  # never reached when the replay writes anything


@pytest.mark.parametrize("when", ["sent", "answered"])
def test_a_replay_killed_at_its_first_write_leaves_the_letter_dead_or_queued(
        redis_server: EmbeddedRedis, when: str) -> None:
    """The replaying process dies right after its first write to Redis; afterwards the dead
    letter is still there (to replay again) or its delivery is queued, never neither.

    This fails with the replay that wrote in two steps (a MULTI that took the letter out,
    then the lane entry): killed between them, the letter was gone and nothing queued."""
    client = redis.Redis.from_url(redis_server.url)
    client.script_load(scripts.load("replay"))  # the child's first EVALSHA finds it
    store = DeliveryStore(client, retention=RETENTION)
    for n in range(3):
        event = bury(store, f"evt_crash_{when}_{n}")
        child = multiprocessing.get_context("fork").Process(
            target=_replay_and_die, args=(redis_server.url, event.event_id, when))
        child.start()
        child.join(timeout=30)
        assert child.exitcode == CRASHED  # it did write, and died there
        # What the dead process had sent is run before Redis lets its connection go.
        deadline = time.monotonic() + 10
        while len(client.client_list()) > 1 and time.monotonic() < deadline:
            time.sleep(0.01)

        dead, waiting = is_dead(client, event.event_id), queued(client, event.event_id)
        assert (dead, waiting) in {(True, 0), (False, 1)}, (dead, waiting)
        assert dead_count(client) == int(dead)
        if dead:  # still replayable, and replayed once
            assert store.replay(event.event_id, DESTINATION) == event
            assert queued(client, event.event_id) == 1
        assert dead_count(client) == 0
        client.delete(lane_key(DESTINATION))


def test_the_scripts_name_no_key_themselves() -> None:
    """Key names come from relay.store.keys: a script gets its keys, or their prefixes."""
    lua = resources.files("relay.store") / "lua"
    names = [path.name for path in lua.iterdir() if path.name.endswith(".lua")]
    assert "replay.lua" in names
    for name in names:
        assert "relay:" not in scripts.load(name.removesuffix(".lua")), name
