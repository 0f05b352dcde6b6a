"""The relay on fakeredis, as the tests drive and inspect it: a validated config, the app, the
intake and the queue as a worker would see them, a worker played in the test's own process;
and the polling that waits for what other processes do.

::

    from tests.support.helpers import accepted_events, make_app
    from tests.support.samples import sample

    app = make_app()
    app.test_client().post("/hooks/kickofflabs", json=sample("new_signup"))
    [event] = accepted_events(app.extensions["relay"].redis)
    assert event["name"] == "new_signup"
"""

from __future__ import annotations

import base64
import json
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import fakeredis
import redis
from flask import Flask

from relay.app import create_app
from relay.config.relay_yaml import RelayConfig, parse_config
from relay.config.settings import Settings
from relay.delivery.engine import Engine
from relay.delivery.kicks import QUEUE
from relay.store.keys import INTAKE, SCHEDULED
from relay.store.lanes import Lanes
from tests.support.history import flush_history, history_for


def config(
    destinations: list[dict[str, Any]] | None = None,
    sources: Mapping[str, Any] | None = None,
    environ: Mapping[str, str] | None = None,
) -> RelayConfig:
    """A validated config from Python values, as the YAML would give them."""
    raw: dict[str, Any] = {"destinations": destinations or []}
    if sources is not None:
        raw["sources"] = dict(sources)
    return parse_config(raw, environ or {})


def make_app(
    relay_config: RelayConfig | None = None,
    client: redis.Redis | None = None,
    settings: Settings | None = None,
) -> Flask:
    """The real app on fakeredis (or the given client) and an in-memory history database; no
    environment is read."""
    client = client if client is not None else fakeredis.FakeRedis()
    app = create_app(
        {
            "RELAY_SETTINGS": settings or Settings(),
            "RELAY_CONFIG_OBJECT": relay_config or config(sources={"kickofflabs": {}}),
            "RELAY_REDIS": client,
            "RELAY_DATABASE": history_for(client),
        }
    )
    app.config["TESTING"] = True
    return app


@dataclass(frozen=True)
class QueuedTask:
    """One Celery task message as kombu's Redis transport stores it, decoded."""

    name: str
    task_id: str
    args: list[Any]
    kwargs: dict[str, Any]
    envelope: dict[str, Any]


def decode_task(raw: bytes | str) -> QueuedTask:
    envelope = json.loads(raw)
    assert envelope["properties"]["body_encoding"] == "base64"
    assert envelope["content-type"] == "application/json"
    args, kwargs, _embed = json.loads(base64.b64decode(envelope["body"]))
    headers = envelope["headers"]
    return QueuedTask(headers["task"], headers["id"], args, kwargs, envelope)


def queued_tasks(client: redis.Redis, queue: str = QUEUE) -> list[QueuedTask]:
    """Messages on the broker list, oldest first (kombu LPUSHes and BRPOPs)."""
    return [decode_task(raw) for raw in reversed(client.lrange(queue, 0, -1))]


def accepted_events(client: redis.Redis) -> list[dict[str, Any]]:
    """The events in the intake stream (accepted, not yet admitted), oldest first."""
    return [json.loads(fields[b"e"]) for _, fields in client.xrange(INTAKE)]


def parked_deliveries(client: redis.Redis) -> list[tuple[str, str, float]]:
    """Deliveries waiting out a retry delay: (event id, destination, due), soonest first."""
    return [(*member.decode().rsplit("|", 1), score)  # type: ignore[misc]
            for member, score in client.zrange(SCHEDULED, 0, -1, withscores=True)]


def release_parked(client: redis.Redis, now: float | None = None) -> int:
    """Play the scheduler: move parked deliveries due by ``now`` (default: all) into their
    lanes."""
    moved, _ = Lanes(client).release_due(now=now if now is not None else float("inf"))
    return moved


def run_queue(relay: Engine, client: redis.Redis) -> None:
    """Play the worker in this process: admit what the intake holds, drain every lane and
    write the history, until nothing moves any more (parked retries stay parked until
    released, held lanes stay held)."""
    lanes = Lanes(client)
    if relay.database is None:
        relay.database = history_for(client)
    before = None
    for _ in range(1000):
        relay.admit()
        for lane, waiting in lanes.lane_depths().items():
            if waiting:
                relay.drain(lane)
        flush_history(client, relay.database)
        now = (lanes.depth(), lanes.lane_depths())
        if now == before or not (now[0] or any(now[1].values())):
            return
        before = now
    raise AssertionError("the queue never emptied")


def process_alive(pid: int) -> bool:
    """Whether ``pid`` is a live process (not gone, not a zombie), read from /proc."""
    try:
        stat = (Path("/proc") / str(pid) / "stat").read_text()
    except OSError:
        return False
    return stat[stat.rfind(")") + 2:].split()[0] not in ("Z", "X")


def wait_for(condition: Callable[[], Any], timeout: float = 30.0, interval: float = 0.05,
             message: str = "condition") -> Any:
    """Poll until ``condition()`` is truthy; fail the test after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        result = condition()
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {message}")
        time.sleep(interval)
