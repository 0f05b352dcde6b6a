"""Small helpers shared by the fast unit layer (fakeredis, Flask test client, loopback servers).

::

    from helpers import make_app, queued_tasks, sample

    app = make_app()
    app.test_client().post("/hooks/kickofflabs", json=sample("new_signup"))
    [task] = queued_tasks(app.extensions["relay"].redis)
    assert task.name == "relay.process_event"
"""

from __future__ import annotations

import base64
import json
import socket
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import fakeredis
import redis
from flask import Flask

from relay.app import create_app
from relay.config import RelayConfig, parse_config
from relay.events import EVENTS
from relay.delivery.engine import Relay
from relay.settings import Settings
from relay.taskqueue import PROCESS_EVENT, QUEUE, SCHEDULED_KEY

SAMPLES = Path(__file__).resolve().parents[1] / "relay" / "samples"
SAMPLE_EVENTS: tuple[str, ...] = EVENTS


def sample(name: str, **changes: Any) -> dict[str, Any]:
    """A fresh copy of a KickoffLabs sample payload (``relay/samples/<name>.json``)."""
    payload: dict[str, Any] = json.loads((SAMPLES / f"{name}.json").read_text())
    payload.update(changes)
    return payload


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
    """The real app on fakeredis (or the given client); no environment is read."""
    app = create_app(
        {
            "RELAY_SETTINGS": settings or Settings(),
            "RELAY_CONFIG_OBJECT": relay_config or config(sources={"kickofflabs": {}}),
            "RELAY_REDIS": client if client is not None else fakeredis.FakeRedis(),
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


def parked_tasks(client: redis.Redis) -> list[tuple[QueuedTask, float]]:
    """Parked (delayed) task messages with their due times, soonest first."""
    return [
        (decode_task(raw), score)
        for raw, score in client.zrange(SCHEDULED_KEY, 0, -1, withscores=True)
    ]


def closed_port() -> int:
    """A loopback port nothing listens on (bound then closed: connections are refused)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port


@contextmanager
def silent_server() -> Iterator[str]:
    """A loopback URL whose server accepts the connection (kernel backlog) but never answers,
    so a client's read times out."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    sock.listen(16)
    try:
        host, port = sock.getsockname()
        yield f"http://{host}:{port}"
    finally:
        sock.close()


def run_queue(relay: Relay, client: redis.Redis) -> None:
    """Play the worker in this process: run every queued task until the queue is empty."""
    while (raw := client.rpop(QUEUE)) is not None:
        task = decode_task(raw)
        if task.name == PROCESS_EVENT:
            relay.process_event(task.args[0], task.task_id)  # type: ignore[arg-type]
        else:
            relay.deliver(*task.args, task.task_id)  # type: ignore[arg-type]
