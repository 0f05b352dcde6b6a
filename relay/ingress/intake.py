"""The intake write: an accepted event goes into the intake stream (:mod:`relay.store.lanes`)
with one script, which also marks its id as received; when it finds no admit task queued, the
ingress queues one (:mod:`relay.delivery.kicks`). So the ingress pays one Redis round trip per
event, and the message build and a second round trip once per admit task."""

from __future__ import annotations

import json
import logging
from typing import Any

import redis

from relay.core.errors import QueueUnavailable
from relay.delivery.kicks import QUEUE, Kicks
from relay.store.lanes import Lanes

log = logging.getLogger("relay.taskqueue")
_encode = json.JSONEncoder(separators=(",", ":")).encode  # json.dumps builds one per call


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
