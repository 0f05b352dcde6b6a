"""What an operation works on: Redis (the work in flight) and the history database."""

from __future__ import annotations

import functools
from dataclasses import dataclass

import redis
from sqlalchemy import Engine as Database

from relay.store.deliveries import DeliveryStore


@dataclass(frozen=True)
class OperatorContext:
    redis: redis.Redis
    database: Database
    retention: float = 7 * 86400.0

    @functools.cached_property
    def store(self) -> DeliveryStore:
        return DeliveryStore(self.redis, self.retention)
