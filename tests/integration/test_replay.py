"""Replaying a dead letter is one step: it is either still dead or queued once, whoever else
replays it at the same time and wherever the replaying process dies.

The dead letter is in the history database; the replay is one script in Redis, which queues the
delivery only if Redis does not know it as queued, in flight or delivered. Against a real
``redis-server``: threads that replay one dead letter at once (while Redis still holds the dead
delivery's state, and after it let it go), and a process killed at its first write to Redis.
The single-replay behaviour also runs on fakeredis, which the unit layer's replays (admin API,
console, CLI) run on.
"""

from __future__ import annotations

import collections
import json
import multiprocessing
import os
import threading
import time
from collections.abc import Iterator
from importlib import resources
from pathlib import Path
from typing import Any

import fakeredis
import pytest
import redis
from sqlalchemy import Engine

from relay.cli.embedded_redis import EmbeddedRedis
from relay.core.models import LeadEvent
from relay.history.database import open_database, upgrade
from relay.operations import dead_letters
from relay.operations.context import OperatorContext
from relay.store import scripts
from relay.store.deliveries import Attempt, Confirmation
from relay.store.keys import HISTORY, LANES, delivery_key, lane_key
from tests.support.history import flush_history

DESTINATION = "crm"
RETENTION = 3600
CRASHED = 17  # the exit status of a replaying process killed at its first write


def bury(ops: OperatorContext, event_id: str, destination: str = DESTINATION) -> LeadEvent:
    """A dead letter, recorded as a drainer records one, and written to the history."""
    now = time.time()
    event = LeadEvent(event_id, "kickofflabs", "new_signup",
                      {"email": f"{event_id}@example.com", "campaign_id": 135}, True, now)
    attempt = Attempt(destination, 5, "dead", 500, 12.0, "HTTP 500", None, now)
    admitted = {"k": "event", "id": event_id, "name": event.name, "source": event.source,
                "campaign_id": "135", "received_at": now, "admitted_at": now,
                "event": json.dumps(event.to_json()),
                "leads": [], "destinations": [destination]}
    ops.redis.xadd(HISTORY, {"v": "1", "r": json.dumps([admitted])})
    ops.store.confirm(destination, "drainer", 30, [Confirmation(
        event, attempt, dead_reason="gave up", attempt_id=f"{event_id}/5")])
    flush_history(ops.redis, ops.database)
    return event


def replay(ops: OperatorContext, event_id: str) -> bool:
    return dead_letters.replay_dead_letters(
        ops, [dead_letters.ReplayTarget(event_id, DESTINATION)]) == 1


def queued(client: redis.Redis, event_id: str, destination: str = DESTINATION) -> int:
    """How many entries of the destination's lane carry the event."""
    return sum(fields[b"e"] == event_id.encode()
               for _, fields in client.xrange(lane_key(destination)))


def is_dead(ops: OperatorContext, event_id: str) -> bool:
    """Dead as the next replay sees it: a dead letter in the database, and Redis knows the
    delivery as nothing else."""
    state = ops.store.delivery_states(event_id).get(DESTINATION)
    letters = [d["destination"] for d in dead_letters.dead_letters_of(ops, event_id)]
    return DESTINATION in letters and (state is None or state["status"] == "dead")


def snapshot(client: redis.Redis) -> dict[bytes, Any]:
    """Every key and its content (the types the store writes)."""
    read = {b"hash": client.hgetall, b"string": client.get, b"set": client.smembers,
            b"list": lambda k: client.lrange(k, 0, -1),
            b"zset": lambda k: client.zrange(k, 0, -1, withscores=True),
            b"stream": client.xrange}
    return {key: read[client.type(key)](key) for key in sorted(client.keys("*"))}


@pytest.fixture
def database(tmp_path: Path) -> Iterator[Engine]:
    url = f"sqlite:///{tmp_path / 'history.sqlite3'}"
    upgrade(url)
    engine = open_database(url)
    yield engine
    engine.dispose()


@pytest.fixture(params=["redis-server", "fakeredis"])
def ops(request: pytest.FixtureRequest, database: Engine) -> Iterator[OperatorContext]:
    if request.param == "fakeredis":
        yield OperatorContext(fakeredis.FakeRedis(), database, RETENTION)
        return
    server: EmbeddedRedis = request.getfixturevalue("redis_server")
    yield OperatorContext(redis.Redis.from_url(server.url), database, RETENTION)


def test_a_replay_queues_a_fresh_delivery(ops: OperatorContext) -> None:
    client = ops.redis
    event = bury(ops, "evt_replay_1")
    assert is_dead(ops, event.event_id)

    assert replay(ops, event.event_id)

    assert queued(client, event.event_id) == 1
    assert client.smembers(LANES) == {DESTINATION.encode()}
    state = ops.store.delivery_states(event.event_id)[DESTINATION]
    assert (state["status"], state["attempts"]) == ("pending", 0)
    assert state["replayed_at"] == pytest.approx(time.time(), abs=60)
    assert 0 < client.ttl(delivery_key(event.event_id)) <= RETENTION
    flush_history(client, ops.database)
    assert dead_letters.dead_letters_of(ops, event.event_id) == []  # pending again

    before = snapshot(client)
    assert not replay(ops, event.event_id)  # taken already
    assert not replay(ops, "evt_never_dead")
    assert snapshot(client) == before


@pytest.mark.parametrize("released", [False, True])
def test_concurrent_replays_of_one_dead_letter_queue_it_once(
        redis_server: EmbeddedRedis, database: Engine, released: bool) -> None:
    """Eight replays of each dead letter start at once: one wins, the others change nothing,
    whether Redis still holds the dead delivery's state or has let it go (``released``).

    (The replay that read the letter, then wrote in a second transaction, let each loser
    decrement the dead count and reset the delivery again.)"""
    ops = OperatorContext(redis.Redis.from_url(redis_server.url), database, RETENTION)
    letters, replayers = 30, 8
    event_ids = [f"evt_race_{released}_{n}" for n in range(letters)]
    for event_id in event_ids:
        bury(ops, event_id)
        if released:
            ops.redis.delete(delivery_key(event_id))

    for event_id in event_ids:
        start = threading.Barrier(replayers)
        won: list[bool] = []

        def run(event_id: str = event_id, start: threading.Barrier = start,
                won: list[bool] = won) -> None:
            mine = OperatorContext(redis.Redis.from_url(redis_server.url), database, RETENTION)
            start.wait()
            won.append(replay(mine, event_id))

        threads = [threading.Thread(target=run) for _ in range(replayers)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=30)
        assert sorted(won) == [False] * (replayers - 1) + [True], event_id

    lane = collections.Counter(fields[b"e"].decode()
                               for _, fields in ops.redis.xrange(lane_key(DESTINATION)))
    assert lane == {event_id: 1 for event_id in event_ids}
    for event_id in event_ids:
        state = ops.store.delivery_states(event_id)[DESTINATION]
        assert (state["status"], state["attempts"]) == ("pending", 0)
    ops.redis.delete(lane_key(DESTINATION))


_READS = {"GET", "HGET", "HGETALL", "HMGET", "HEXISTS", "EXISTS", "TTL", "TYPE", "XLEN",
          "XRANGE", "ZRANGE", "ZSCORE", "ZCARD", "SCRIPT", "PING", "CLIENT", "INFO"}


def _writes(commands: list[tuple[Any, ...]]) -> bool:
    return any(str(args[0]).upper() not in _READS for args in commands)


def _replay_and_die(url: str, database_url: str, event_id: str, when: str) -> None:
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
    replay(OperatorContext(redis.Redis.from_url(url), open_database(database_url), RETENTION),
           event_id)
    os._exit(0)  # never reached when the replay writes anything


@pytest.mark.parametrize("when", ["sent", "answered"])
def test_a_replay_killed_at_its_first_write_leaves_the_letter_dead_or_queued(
        redis_server: EmbeddedRedis, database: Engine, when: str) -> None:
    """The replaying process dies right after its first write to Redis; afterwards the dead
    letter is still there (to replay again) or its delivery is queued, never neither.

    This fails with the replay that wrote in two steps (a MULTI that took the letter out,
    then the lane entry): killed between them, the letter was gone and nothing queued."""
    client = redis.Redis.from_url(redis_server.url)
    client.script_load(scripts.load("replay"))  # the child's first EVALSHA finds it
    ops = OperatorContext(client, database, RETENTION)
    for n in range(3):
        event = bury(ops, f"evt_crash_{when}_{n}")
        child = multiprocessing.get_context("fork").Process(
            target=_replay_and_die,
            args=(redis_server.url, str(database.url), event.event_id, when))
        child.start()
        child.join(timeout=30)
        assert child.exitcode == CRASHED  # it did write, and died there
        # What the dead process had sent is run before Redis lets its connection go.
        deadline = time.monotonic() + 10
        while len(client.client_list()) > 1 and time.monotonic() < deadline:
            time.sleep(0.01)

        dead, waiting = is_dead(ops, event.event_id), queued(client, event.event_id)
        assert (dead, waiting) in {(True, 0), (False, 1)}, (dead, waiting)
        if dead:  # still replayable, and replayed once
            assert replay(ops, event.event_id)
            assert queued(client, event.event_id) == 1
        client.delete(lane_key(DESTINATION))


def test_the_scripts_name_no_key_themselves() -> None:
    """Key names come from relay.store.keys: a script gets its keys, or their prefixes."""
    lua = resources.files("relay.store") / "lua"
    names = [path.name for path in lua.iterdir() if path.name.endswith(".lua")]
    assert "replay.lua" in names
    for name in names:
        assert "relay:" not in scripts.load(name.removesuffix(".lua")), name
