"""Wiring: build the worker-side :class:`~relay.delivery.engine.Engine` from the environment."""

from __future__ import annotations

import functools
import os
import socket

from relay.config.relay_yaml import load_config
from relay.config.settings import Settings, apply_process_settings
from relay.delivery.attempt import DriverCache
from relay.delivery.engine import Engine
from relay.delivery.gates import default_gates
from relay.delivery.kicks import Kicks
from relay.drivers.http import HttpClient
from relay.history.database import shared_database
from relay.store.connection import connect
from relay.store.subscriptions import SubscriptionStore


def build_engine(settings: Settings | None = None, consumer: str | None = None) -> Engine:
    settings = settings or Settings.from_env()
    config = load_config(settings.config_path)
    apply_process_settings(settings)
    client = connect(settings.redis_url, timeout=10)

    @functools.cache
    def guarded_http() -> HttpClient:
        # One SSRF-guarded pool for every API subscription of this (already forked) process.
        from relay.drivers.ssrf_guard import AddressGuard

        return HttpClient(AddressGuard(settings.allowed_networks).pool_manager())

    return Engine(settings, config, client,
                 subscriptions=SubscriptionStore(client, settings.retention),
                 drivers=DriverCache(guarded_http=guarded_http),
                 # No gate round trip per delivery to a healthy destination: a pause, or a
                 # circuit another worker opened, reaches every worker within a second.
                 gates=default_gates(client, snapshot_ttl=1.0,
                                     lease_margin=settings.lease_margin),
                 kick=Kicks(client).send,
                 max_in_flight=settings.max_in_flight,
                 consumer=consumer or f"{socket.gethostname()}:{os.getpid()}",
                 database=shared_database(settings.database_url))
