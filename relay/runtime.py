"""Wiring: build the worker-side :class:`~relay.pipeline.Relay` from the environment."""

from __future__ import annotations

import functools

from relay.config import load_config
from relay.delivery import DriverCache
from relay.gates import default_gates
from relay.http import HttpClient
from relay.pipeline import Relay
from relay.settings import Settings
from relay.subscriptions import SubscriptionStore
from relay.taskqueue import connect


def build_relay(settings: Settings | None = None) -> Relay:
    settings = settings or Settings.from_env()
    config = load_config(settings.config_path)
    client = connect(settings.redis_url, timeout=10)

    @functools.cache
    def guarded_http() -> HttpClient:
        # One SSRF-guarded pool for every API subscription of this (already forked) process.
        from relay.netguard import AddressGuard

        return HttpClient(AddressGuard(settings.allowed_networks).pool_manager())

    return Relay(settings, config, client,
                 subscriptions=SubscriptionStore(client, settings.retention),
                 drivers=DriverCache(guarded_http=guarded_http),
                 # No gate round trip per delivery to a healthy destination: a pause, or a
                 # circuit another worker opened, reaches every worker within a second.
                 gates=default_gates(client, snapshot_ttl=1.0))
