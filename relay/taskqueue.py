"""Publishing Celery tasks by name, straight onto the broker's Redis list.

The web side never imports the Celery app (``relay`` never imports ``workers``). It writes the
exact message kombu's Redis transport writes for ``send_task`` (Celery protocol 2, JSON, base64
body) with one ``LPUSH`` on a pooled connection: about a fifth of what ``send_task`` costs per
call (see ``bench/``), which the ingress needs to stay near a bare ``LPUSH``.

Delayed tasks (retries, rate-limited or paused deliveries) are not held as countdowns in a
worker: the ready-made message is parked in a sorted set scored by due time, and
:meth:`TaskQueue.release_due` moves due messages onto the queue in one Lua script, so with
several workers each parked message is queued exactly once and none is lost in between.

Celery's Redis transport has one window where a message can vanish: a worker takes it with
``BRPOP`` and records it among its unacknowledged messages a moment later, so a ``kill -9`` in
between loses it (kombu issue 305 and others). So every message queued here is also kept in
``relay:unstarted`` (a hash by task id) with a due time in ``relay:unstarted:due`` until the
task starts (:meth:`TaskQueue.started`, or the admit script of ``relay.process_event``). The
scheduler's :meth:`TaskQueue.requeue_lost` puts back a message whose task has not started
within ``grace`` (the broker's visibility timeout), but only while the queue is empty: then the
message is certainly not waiting in it, and a backlog is never duplicated. A message that was
merely slow (prefetched, or restored by kombu itself) runs twice at worst, which the delivery
state absorbs.
"""

from __future__ import annotations

import base64
import functools
import json
import os
import socket
import time
import uuid
from collections.abc import Sequence
from typing import Any

import redis

from relay.errors import QueueUnavailable

QUEUE = "relay"
SCHEDULED_KEY = "relay:scheduled"
PROCESS_EVENT = "relay.process_event"
DELIVER = "relay.deliver"

_ORIGIN = f"leadrelay@{socket.gethostname()}"
_EMBED = {"callbacks": None, "errbacks": None, "chain": None, "chord": None}
_encode = json.JSONEncoder(separators=(",", ":")).encode  # json.dumps builds one per call

NOT_STARTED_KEY = "relay:unstarted"
NOT_STARTED_DUE_KEY = "relay:unstarted:due"

# KEYS: scheduled zset, queue list, not-started hash, not-started due zset;
# ARGV: now, limit, grace s
_RELEASE_DUE = """
local due = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', ARGV[1], 'LIMIT', 0, tonumber(ARGV[2]))
for _, message in ipairs(due) do
  local id = cjson.decode(message)['headers']['id']
  redis.call('HSET', KEYS[3], id, message)
  redis.call('ZADD', KEYS[4], tonumber(ARGV[1]) + tonumber(ARGV[3]), id)
end
if #due > 0 then
  redis.call('ZREM', KEYS[1], unpack(due))
  redis.call('LPUSH', KEYS[2], unpack(due))
end
return #due
"""

# KEYS: queue list, not-started hash, not-started due zset; ARGV: message, task id, due
# (a script rather than MULTI: the message crosses the wire once and one reply comes back)
_PUBLISH = """
redis.call('LPUSH', KEYS[1], ARGV[1])
redis.call('HSET', KEYS[2], ARGV[2], ARGV[1])
redis.call('ZADD', KEYS[3], ARGV[3], ARGV[2])
return 1
"""

# KEYS: queue list, not-started hash, not-started due zset; ARGV: now, grace s, limit
_REQUEUE_LOST = """
if redis.call('LLEN', KEYS[1]) > 0 then return 0 end
local ids = redis.call('ZRANGEBYSCORE', KEYS[3], '-inf', ARGV[1], 'LIMIT', 0, tonumber(ARGV[3]))
local requeued = 0
for _, id in ipairs(ids) do
  local message = redis.call('HGET', KEYS[2], id)
  if message then
    redis.call('LPUSH', KEYS[1], message)
    redis.call('ZADD', KEYS[3], tonumber(ARGV[1]) + tonumber(ARGV[2]), id)
    requeued = requeued + 1
  else
    redis.call('ZREM', KEYS[3], id)
  end
end
return requeued
"""


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


class TaskQueue:
    """Send ``relay.*`` tasks by name; park and release delayed ones."""

    def __init__(self, client: redis.Redis, queue: str = QUEUE, grace: float = 300.0) -> None:
        self.redis = client
        self.queue = queue
        self.grace = grace
        self._publish = client.register_script(_PUBLISH)
        self._release = client.register_script(_RELEASE_DUE)
        self._requeue_lost = client.register_script(_REQUEUE_LOST)

    def publish(self, name: str, args: Sequence[Any], argsrepr: str) -> str:
        """Queue a task now, atomically with its not-started record (see above)."""
        message, task_id = task_message(name, args, argsrepr, queue=self.queue)
        try:
            self._publish(keys=[self.queue, NOT_STARTED_KEY, NOT_STARTED_DUE_KEY],
                          args=[message, task_id, time.time() + self.grace])
        except redis.RedisError as exc:  # down, timed out, or OOM under noeviction
            raise QueueUnavailable(f"the queue is unavailable: {exc}") from exc
        return task_id

    def started(self, task_id: str) -> None:
        """The task is running: it can no longer be lost between the queue and a worker."""
        pipe = self.redis.pipeline(transaction=False)
        pipe.hdel(NOT_STARTED_KEY, task_id)
        pipe.zrem(NOT_STARTED_DUE_KEY, task_id)
        pipe.execute()

    def requeue_lost(self, now: float | None = None, limit: int = 500) -> int:
        """Put back tasks that never started within ``grace``, while the queue is empty."""
        return int(self._requeue_lost(
            keys=[self.queue, NOT_STARTED_KEY, NOT_STARTED_DUE_KEY],
            args=[now if now is not None else time.time(), self.grace, limit]))

    def park(self, name: str, args: Sequence[Any], argsrepr: str, due: float) -> str:
        """Queue the task at ``due`` (epoch seconds)."""
        message, task_id = task_message(name, args, argsrepr, queue=self.queue)
        self.redis.zadd(SCHEDULED_KEY, {message: due})
        return task_id

    def release_due(self, now: float | None = None, limit: int = 500) -> int:
        """Move due parked tasks onto the queue; atomic, so safe from every worker at once."""
        moved = self._release(keys=[SCHEDULED_KEY, self.queue, NOT_STARTED_KEY,
                                    NOT_STARTED_DUE_KEY],
                              args=[now if now is not None else time.time(), limit, self.grace])
        return int(moved)

    def depth(self) -> int:
        return int(self.redis.llen(self.queue))

    def scheduled(self) -> int:
        return int(self.redis.zcard(SCHEDULED_KEY))


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
