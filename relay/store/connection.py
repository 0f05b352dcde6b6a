"""The relay's Redis client."""

from __future__ import annotations

import redis


def connect(url: str, *, timeout: float = 1.0, max_connections: int = 50) -> redis.Redis:
    """A pooled client that fails fast: a down Redis must become a 503 within about a second,
    so connection and socket timeouts are short and redis-py's own retries are off."""
    from redis.backoff import NoBackoff
    from redis.retry import Retry

    return redis.Redis.from_url(
        url,
        socket_timeout=timeout,
        socket_connect_timeout=timeout,
        retry=Retry(NoBackoff(), 0),
        max_connections=max_connections,
        health_check_interval=30,
    )
