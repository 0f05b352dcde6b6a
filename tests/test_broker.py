"""The worker's Redis transport (workers/broker.py): kombu's, with a collected connection's
channel failing as a connection error rather than an AttributeError that ends the worker."""

from __future__ import annotations

import pytest
from kombu import Connection
from kombu.transport import TRANSPORT_ALIASES
from redis.exceptions import ConnectionError as RedisConnectionError

from workers import broker


def test_the_worker_serves_redis_urls_with_the_fixed_transport() -> None:
    import workers.celery_app  # noqa: F401  (installs the transport at import)

    for scheme in ("redis", "rediss"):
        assert TRANSPORT_ALIASES[scheme] == "workers.broker:Transport"
    assert Connection("redis://127.0.0.1:6379/0").transport_cls == "redis"
    assert type(Connection("redis://127.0.0.1:6379/0").transport) is broker.Transport


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
