"""Kicks: Celery task messages built by name, that wake the admission of the intake
(``relay.admit``) or the drain of one lane (``relay.drain``).

``relay`` never imports the Celery app (``workers``): a kick writes the exact message kombu's
Redis transport writes for ``send_task`` (Celery protocol 2, JSON, base64 body) onto the
broker's list. Who kicks: the ingress (:mod:`relay.ingress.intake`, once per admit task), the
engine (a lane that got work) and the scheduler in every worker (due retries, lanes with work
and no drainer). Whether a kick is due is decided in Redis (the kick keys of
:mod:`relay.store.keys`); this module only sends it.
"""

from __future__ import annotations

import base64
import functools
import json
import socket
import uuid
from collections.abc import Sequence
from typing import Any

import redis

QUEUE = "relay"
ADMIT = "relay.admit"
DRAIN = "relay.drain"

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
