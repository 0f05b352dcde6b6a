"""The worker's Redis transport (workers/broker.py) on a real redis-server: a collected
connection's channel fails as a connection error rather than an AttributeError that ends the
worker. Which transport the worker installs: tests/unit/test_broker.py."""

from __future__ import annotations

import pytest
from kombu import Connection
from redis.exceptions import ConnectionError as RedisConnectionError

from workers import broker


def test_a_channel_of_a_collected_connection_raises_a_connection_error(
    redis_server: object,
) -> None:
    connection = Connection(redis_server.url, transport=broker.Transport)  # type: ignore[attr-defined]
    channel = connection.channel()
    try:
        assert channel._connparams()["host"] == "127.0.0.1"  # a live one builds its pool
        # What Celery 5.7's collect of a lost connection leaves behind when the channel's
        # first close stopped at the dead socket: the channel open, its transport unlinked.
        channel.connection.client = None
        with pytest.raises(RedisConnectionError) as raised:
            channel._connparams()
        assert isinstance(raised.value, tuple(broker.Transport.connection_errors))
    finally:
        connection.release()
