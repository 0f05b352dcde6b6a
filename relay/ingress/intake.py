"""The intake write: an accepted event goes into the intake stream (:mod:`relay.store.lanes`)
with one script, which also marks its id as received; when it finds no admit task queued, the
ingress queues one (:mod:`relay.delivery.kicks`). So the ingress pays one Redis round trip per
event, and the message build and a second round trip once per admit task."""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Callable
from typing import Any

import redis

from relay.core.errors import QueueUnavailable
from relay.delivery.kicks import QUEUE, Kicks
from relay.store.lanes import Lanes

log = logging.getLogger("relay.taskqueue")
_encode = json.JSONEncoder(separators=(",", ":")).encode  # json.dumps builds one per call


class MemoryGauge:
    """Whether Redis is past the ingress's high-water mark, looked up at most once a second
    (``INFO memory``: managed Redis often disables ``CONFIG``).

    ``high_water`` is a fraction of Redis's ``maxmemory`` (``0.8``), or bytes (above 1). The
    room above the mark is for what must go on when the ingress refuses: Celery's bookkeeping,
    the history of deliveries in flight, and the admission of what was accepted. A Redis
    without ``maxmemory`` is never full, unless the mark is given in bytes."""

    def __init__(self, client: redis.Redis, high_water: float, interval: float = 1.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.redis = client
        self.high_water = high_water
        self.interval = interval
        self.clock = clock
        self._checked_at = -math.inf
        self._full = False

    def full(self) -> bool:
        now = self.clock()
        if now - self._checked_at >= self.interval:
            self._checked_at = now
            try:
                memory = self.redis.info("memory")
            except redis.ResponseError as exc:  # a Redis-like server without INFO
                # (Documented: the mark needs INFO; fakeredis, for one, has none.)
                log.debug("cannot read Redis's memory use, so no high-water mark: %s", exc)
                self.interval = math.inf
                return False
            used, limit = int(memory.get("used_memory", 0)), int(memory.get("maxmemory", 0))
            mark = self.high_water if self.high_water > 1 else self.high_water * limit
            self._full = mark > 0 and used >= mark
        return self._full


class Intake:
    """The ingress's way in: store an accepted event, and make sure an admit task is queued."""

    def __init__(self, client: redis.Redis, queue: str = QUEUE,
                 high_water: float = 0.8) -> None:
        self.redis = client
        self.lanes = Lanes(client)
        self.kicks = Kicks(client, queue)
        self.memory = MemoryGauge(client, high_water)

    def publish(self, event: dict[str, Any], dedupe_window: float) -> str:
        """Store the event (``event_id`` among its keys); the intake entry id. Refused (503)
        when Redis is past the high-water mark: every event already accepted keeps the room
        it needs to be delivered, and the ingress accepts again once the backlog drains."""
        try:
            if self.memory.full():
                raise QueueUnavailable("Redis is near its memory limit: the relay accepts "
                                       "events again once its backlog has drained")
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
