"""kombu's Redis transport with one fix, registered for ``redis://`` and ``rediss://`` URLs.

Celery 5.7's consumer handles a lost broker connection by collecting the connection and then
closing it once more. When the loss caught the consumer in the middle of a ``BRPOP``, the first
close stops at the dead socket before it marks the channel closed, the collect then clears the
transport's link to its connection, and the second close tries to restore the unacknowledged
messages through a new pool built from that cleared link: ``AttributeError: 'NoneType' object
has no attribute 'hostname'``, which Celery treats as unrecoverable, so the worker exits instead
of reconnecting (seen in the Redis-down fault tests, one run in three). Here that case raises the
connection error it is, which Celery's cleanup ignores like the first one; the messages stay in
the broker's unacknowledged set and come back through its visibility-timeout sweep, as they
would after any lost connection.

Remove when kombu's ``Channel.close`` survives a second call after ``Connection.collect``.
"""

from __future__ import annotations

from typing import Any

from kombu.transport import TRANSPORT_ALIASES
from kombu.transport import redis as kombu_redis
from redis.exceptions import ConnectionError as RedisConnectionError


class Channel(kombu_redis.Channel):
    def _connparams(self, asynchronous: bool = False) -> dict[str, Any]:
        if self.connection is None or self.connection.client is None:
            raise RedisConnectionError("the broker connection was already collected")
        params: dict[str, Any] = super()._connparams(asynchronous)
        return params


class Transport(kombu_redis.Transport):
    Channel = Channel


def install() -> None:
    """Serve ``redis://`` and ``rediss://`` broker URLs with this transport (the worker side
    only: the web side never imports ``workers``)."""
    for scheme in ("redis", "rediss"):
        TRANSPORT_ALIASES[scheme] = f"{__name__}:Transport"
