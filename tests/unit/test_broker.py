"""The worker's Redis transport (workers/broker.py): kombu's, with a collected connection's
channel failing as a connection error rather than an AttributeError that ends the worker."""

from __future__ import annotations

from kombu import Connection
from kombu.transport import TRANSPORT_ALIASES

from workers import broker


def test_the_worker_serves_redis_urls_with_the_fixed_transport() -> None:
    import workers.celery_app  # noqa: F401  (installs the transport at import)

    for scheme in ("redis", "rediss"):
        assert TRANSPORT_ALIASES[scheme] == "workers.broker:Transport"
    assert Connection("redis://127.0.0.1:6379/0").transport_cls == "redis"
    assert type(Connection("redis://127.0.0.1:6379/0").transport) is broker.Transport


