"""Handing work to the workers: the intake stream, and Celery task messages built by name.

The web side never imports the Celery app (``relay`` never imports ``workers``). An accepted
event goes into the intake stream (:mod:`relay.delivery.lanes`) with one script; when it finds
no admit task queued, the ingress queues one by writing the exact message kombu's Redis
transport writes for ``send_task`` (Celery protocol 2, JSON, base64 body) onto the broker's
list. So the ingress pays one Redis round trip per event, and the message build and a second
round trip once per admit task.
"""

from __future__ import annotations

import base64
import functools
import json
import logging
import os
import socket
import uuid
from collections.abc import Sequence
from typing import Any

import redis

from relay.delivery.lanes import Lanes
from relay.errors import QueueUnavailable

QUEUE = "relay"
ADMIT = "relay.admit"
DRAIN = "relay.drain"

log = logging.getLogger("relay.taskqueue")
_ORIGIN = f"leadrelay@{socket.gethostname()}"
_EMBED = {"callbacks": None, "errbacks": None, "chain": None, "chord": None}
_encode = json.JSONEncoder(separators=(",", ":")).encode  # json.dumps builds one per call


def task_message(name: str, args: Sequence[Any], argsrepr: str, task_id: str | None = None,
                 queue: str = QUEUE) -> tuple[str, str]:
    """The kombu/Redis envelope of one Celery task call, and its task id."""
    task_id = task_id or str(uuid.uuid4())
    body = _encode([list(args), {}, _EMBED])
    message = _template(name, queue) % {
        "body": base64.b64encode(body.encode()).decode(),
        "id": task_id,
        "argsrepr": _encode(argsrepr)[1:-1],
        "tag": str(uuid.uuid4()),
    }
    return message, task_id


@functools.lru_cache(maxsize=16)
def _template(name: str, queue: str) -> str:
    """The envelope as a %-format string: only four values change from call to call, and
    encoding the rest once saves a third of the ingress's message building (one ``%`` fills
    them in a single pass, where a ``str.replace`` per value rescanned the whole message)."""
    envelope = {
        "body": "@@body@@",
        "content-encoding": "utf-8",
        "content-type": "application/json",
        "headers": {
            "lang": "py", "task": name, "id": "@@id@@", "shadow": None, "eta": None,
            "expires": None, "group": None, "group_index": None, "retries": 0,
            "timelimit": [None, None], "root_id": "@@id@@", "parent_id": None,
            # Flower shows argsrepr: the event id and destination, never the whole payload.
            "argsrepr": "@@argsrepr@@", "kwargsrepr": "{}", "origin": _ORIGIN,
            "ignore_result": True, "replaced_task_nesting": 0, "stamped_headers": None,
            "stamps": {},
        },
        "properties": {
            "correlation_id": "@@id@@", "reply_to": "", "delivery_mode": 2,
            "delivery_info": {"exchange": "", "routing_key": queue}, "priority": 0,
            "body_encoding": "base64", "delivery_tag": "@@tag@@",
        },
    }
    template = _encode(envelope).replace("%", "%%")
    for field in ("body", "id", "argsrepr", "tag"):
        template = template.replace(f"@@{field}@@", f"%({field})s")
    return template


class Intake:
    """The ingress's way in: store an accepted event, and make sure an admit task is queued."""

    def __init__(self, client: redis.Redis, queue: str = QUEUE) -> None:
        self.redis = client
        self.lanes = Lanes(client)
        self.kicks = Kicks(client, queue)

    def publish(self, event: dict[str, Any], dedupe_window: float) -> str:
        """Store the event (``event_id`` among its keys); the intake entry id."""
        try:
            entry, kick = self.lanes.publish(_encode(event), event["event_id"], dedupe_window)
        except redis.RedisError as exc:  # down, timed out, or OOM under noeviction
            raise QueueUnavailable(f"the queue is unavailable: {exc}") from exc
        if kick:
            try:
                self.kicks.send("")
            except redis.RedisError as exc:
                # The event is stored: its 202 stands. Every worker's sweep queues the admit
                # task once the kick key (set above, a few seconds) has run out.
                log.warning("stored the event but could not queue an admit task: %s", exc)
        return entry

    def depth(self) -> int:
        return self.lanes.depth()


class Kicks:
    """Queue ``relay.admit`` and ``relay.drain`` tasks by name (Flower shows their arguments:
    a destination and a batch size, never lead data)."""

    def __init__(self, client: redis.Redis, queue: str = QUEUE) -> None:
        self.redis = client
        self.queue = queue

    def send(self, lane: str, batch: int = 0) -> None:
        """Queue the task for a lane (``""``: the intake)."""
        if lane == "":
            message, _ = task_message(ADMIT, [], "()", queue=self.queue)
        else:
            message, _ = task_message(DRAIN, [lane, batch], f"({lane!r}, {batch})",
                                      queue=self.queue)
        self.redis.lpush(self.queue, message)


def connect(url: str, *, timeout: float = 1.0, max_connections: int | None = None) -> redis.Redis:
    """A pooled client that fails fast: a down Redis must become a 503 within about a second,
    so connection and socket timeouts are short and redis-py's own retries are off."""
    from redis.backoff import NoBackoff
    from redis.retry import Retry

    return redis.Redis.from_url(
        url,
        socket_timeout=timeout,
        socket_connect_timeout=timeout,
        retry=Retry(NoBackoff(), 0),
        max_connections=max_connections or int(os.environ.get("RELAY_REDIS_POOL", "50")),
        health_check_interval=30,
    )
