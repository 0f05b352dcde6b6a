"""The HTTP contract held by an outside fuzzer: Schemathesis generates requests from
``/api/openapi.json`` and runs *every* check on each answer (server errors, status codes,
bodies, headers, content types, that valid requests are accepted and invalid ones refused,
that 405s carry ``Allow``, that authentication is not ignored; across calls, the stateful
checks along the document's links), with the configuration the repository ships for anyone
who runs Schemathesis against a relay (``schemathesis.toml``), authenticating the way the
document says: through its security schemes.

The relay it fuzzes holds history (deliveries delivered, retrying and dead, dead letters,
attempts), so the answers that list them are checked with content. Each run is reproducible
(a fixed seed, no example database) and bounded (``CONTRACT_EXAMPLES`` per operation), and runs
over several seeds (``CONTRACT_SEEDS``): in process against the app, then with the
``schemathesis`` command against a live ``relay web`` (gunicorn, a real ``redis-server``), where
the HTTP server's own answers (414, 431) are part of the contract too.

Raise them by hand for a deeper run::

    CONTRACT_EXAMPLES=200 CONTRACT_SEEDS=1,2,3,4,5 pytest tests/integration/test_contract.py
"""

from __future__ import annotations

import os
import subprocess
import sys
import tomllib
from collections.abc import Callable, Iterator
from typing import Any

import fakeredis
import hypothesis
import pytest
import redis
import schemathesis
import urllib3
from hypothesis import HealthCheck, settings
from sqlalchemy import Engine as SQLEngine

from relay.api.subscriptions import GUARD_EXTENSION
from relay.app import create_app
from relay.cli.embedded_redis import EmbeddedRedis, free_port
from relay.config.relay_yaml import RelayConfig, parse_config
from relay.config.settings import Settings
from relay.delivery.engine import Engine
from relay.drivers.ssrf_guard import AddressGuard
from relay.history.database import open_database, upgrade
from tests.support import ROOT
from tests.support.helpers import run_queue, wait_for
from tests.support.history import memory_database
from tests.support.loopback import Sink, start_sink
from tests.support.samples import sample

KEY = "contract-key"
SEEDS = tuple(int(s) for s in os.environ.get("CONTRACT_SEEDS", "1,2,3").split(","))
MAX_EXAMPLES = int(os.environ.get("CONTRACT_EXAMPLES", "20"))
STATEFUL_EXAMPLES = max(5, MAX_EXAMPLES // 2)
LIVE_SEEDS = SEEDS[:2]
LIVE_EXAMPLES = max(10, MAX_EXAMPLES // 2)
PUBLIC_ADDRESS = "93.184.215.14"  # what every generated host name "resolves" to
SHIPPED = ROOT / "schemathesis.toml"
SETTINGS = settings(deadline=None, database=None, suppress_health_check=list(HealthCheck))


def project_config(seed: int) -> schemathesis.Config:
    """The shipped configuration, with this test's key and a seed. The examples and the
    boundary values (the coverage phase) do not depend on the seed: the first seed runs them,
    every seed fuzzes."""
    raw = tomllib.loads(SHIPPED.read_text())
    raw["auth"]["openapi"]["apiKeyBearer"]["bearer"] = KEY
    if seed != SEEDS[0]:
        raw["phases"] = {"examples": {"enabled": False}, "coverage": {"enabled": False}}
    return schemathesis.Config.from_dict({**raw, "seed": seed})


# -- a relay with history -----------------------------------------------------------------------


def relay_config(url: str) -> RelayConfig:
    retry_for_an_hour = {"schedule": ["1h"]}
    return parse_config({"sources": {"kickofflabs": {}}, "destinations": [
        {"name": "crm", "type": "webhook", "url": f"{url}/crm", "retry": retry_for_an_hour,
         "concurrency": 1},
        {"name": "backend", "type": "webhook", "url": f"{url}/backend",
         "retry": {"schedule": []}, "concurrency": 1},
    ]}, {})


def with_history(client: redis.Redis, database: SQLEngine,
                 make: Callable[[RelayConfig], Any]) -> tuple[Any, list[str]]:
    """An app on ``client`` and ``database`` (``make(config)``) whose history holds deliveries
    in every listed state, with their attempts and dead letters: three leads delivered by a
    worker to a loopback receiver that answers crm 200, 400 (dead), 503 (retrying for an hour)
    and backend 500 (dead: no retries), 200, 200."""
    sink: Sink = start_sink()
    try:
        config = relay_config(sink.url)
        sink.script("/crm", [200, 400, 503])
        sink.script("/backend", [500, 200, 200])
        app = make(config)
        ids = []
        for n in range(3):
            answer = app.test_client().post("/hooks/kickofflabs", json=sample(
                "new_signup", email=f"lead{n}@example.com", social_id=f"s{n}", id=n))
            assert answer.status_code == 202
            ids.append(answer.get_json()["event_id"])
        worker = Engine(Settings(), config, client, database=database)
        run_queue(worker, client)
        worker.close()
        assert len(sink.requests()) == 6
    finally:
        sink.stop()
    return app, ids


def make_app(config: RelayConfig, client: redis.Redis, database: SQLEngine) -> Any:
    app = create_app({
        "RELAY_SETTINGS": Settings(api_keys=(KEY,), allowed_networks=("127.0.0.0/8",)),
        "RELAY_CONFIG_OBJECT": config,
        "RELAY_REDIS": client,
        "RELAY_DATABASE": database,
    })
    # No DNS from the test: every host is public.
    app.extensions[GUARD_EXTENSION] = AddressGuard(
        ("127.0.0.0/8",), resolver=lambda host, port: [PUBLIC_ADDRESS])
    return app


_redis = fakeredis.FakeRedis()
_database = memory_database()
APP, EVENT_IDS = with_history(_redis, _database,
                              lambda config: make_app(config, _redis, _database))


def schema_for(seed: int) -> Any:
    return schemathesis.openapi.from_wsgi("/api/openapi.json", APP, config=project_config(seed))


# -- in process ---------------------------------------------------------------------------------


def test_answers_with_history_have_their_documented_shapes() -> None:
    """What the relay lists (deliveries in each state, dead letters, events with attempts)
    is what the document says it lists, field for field."""
    schema = schema_for(SEEDS[0])
    client = APP.test_client()
    auth = {"Authorization": f"Bearer {KEY}"}
    answers = {
        "/api/deliveries": [f"/api/deliveries?destination={name}&status={status}"
                            for name in ("crm", "backend")
                            for status in ("delivered", "retrying", "dead")],
        "/api/dead-letters": ["/api/dead-letters"],
        "/api/events/{event_id}": [f"/api/events/{event_id}" for event_id in EVENT_IDS],
        "/api/destinations": ["/api/destinations"],
    }
    seen = set()
    for path, urls in answers.items():
        for url in urls:
            response = client.get(url, headers=auth)
            assert response.status_code == 200, (url, response.get_data(as_text=True))
            schema[path]["GET"].validate_response(response)
            body = response.get_json()
            for listed in body.get("deliveries", []) + body.get("dead_letters", []):
                seen.update(listed)
    # Each field the lists can carry was there to be checked.
    assert {"attempts", "last_status", "last_error", "updated_at", "next_attempt_at",
            "status_code", "dead_at", "reason"} <= seen


def contract_test(seed: int) -> Any:
    """Every operation, valid and invalid requests (examples, boundary values, fuzzing), every
    check."""

    @schema_for(seed).parametrize()
    @settings(SETTINGS, max_examples=MAX_EXAMPLES)
    def test(case: schemathesis.Case) -> None:
        case.call_and_validate()

    return test


for _seed in SEEDS:
    globals()[f"test_the_app_keeps_its_documented_contract_seed_{_seed}"] = contract_test(_seed)


@pytest.mark.parametrize("seed", SEEDS)
def test_the_app_keeps_its_contract_from_call_to_call(seed: int) -> None:
    """Sequences of calls along the document's links (and the ones Schemathesis infers), with
    the stateful checks as well (a deleted subscription is gone, a created one is there)."""
    machine = hypothesis.seed(seed)(schema_for(seed).as_state_machine())
    machine.run(settings=settings(SETTINGS, max_examples=STATEFUL_EXAMPLES,
                                  stateful_step_count=6))


# -- the same against a live `relay web`, by the `schemathesis` command ---------------------------


@pytest.fixture(scope="module")
def live_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """`relay web` (gunicorn on 127.0.0.1, one process) on a real redis-server and an SQLite
    history database that holds the same history as the app above."""
    tmp = tmp_path_factory.mktemp("live")
    redis_server = EmbeddedRedis(tmp / "redis").start()
    database_url = f"sqlite:///{tmp / 'history.sqlite3'}"
    upgrade(database_url)
    client = redis.Redis.from_url(redis_server.url)
    database = open_database(database_url)
    _, _ids = with_history(client, database, lambda config: make_app(config, client, database))
    database.dispose()
    config = tmp / "relay.yaml"
    config.write_text("sources:\n  kickofflabs: {}\ndestinations:\n"
                      "  - {name: crm, type: webhook, url: 'http://127.0.0.1:9/crm'}\n"
                      "  - {name: backend, type: webhook, url: 'http://127.0.0.1:9/backend'}\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith("RELAY_")}
    env.update({"RELAY_REDIS_URL": redis_server.url, "RELAY_CONFIG": str(config),
                "RELAY_DATABASE_URL": database_url,
                "RELAY_API_KEYS": KEY, "RELAY_ALLOWED_NETWORKS": "127.0.0.0/8"})
    port = free_port()
    log = (tmp / "web.log").open("ab")
    web = subprocess.Popen(
        [sys.executable, "-m", "relay", "web", "--host", "127.0.0.1", "--port", str(port),
         "--workers", "1", "--threads", "4"],
        env=env, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT, start_new_session=True)

    def healthy() -> bool:
        if web.poll() is not None:
            raise AssertionError((tmp / "web.log").read_text()[-3000:])
        try:
            return urllib3.request("GET", f"http://127.0.0.1:{port}/healthz", timeout=1,
                                   retries=False).status == 200
        except urllib3.exceptions.HTTPError:
            return False

    try:
        wait_for(healthy, timeout=30, interval=0.1, message="relay web to answer")
        yield f"http://127.0.0.1:{port}"
    finally:
        web.terminate()
        try:
            web.wait(10)
        except subprocess.TimeoutExpired:
            web.kill()
            web.wait()
        client.close()
        redis_server.stop()


@pytest.mark.integration
@pytest.mark.parametrize("seed", LIVE_SEEDS)
def test_a_live_relay_web_keeps_the_same_contract(live_url: str, seed: int,
                                                  tmp_path: Any) -> None:
    """What anyone gets from ``schemathesis run`` with the shipped configuration and a key:
    every phase (examples, boundary values, fuzzing, stateful; the first two for the first
    seed only) and every check pass, and the tool authenticates through the document's
    security schemes alone."""
    env = {**os.environ, "API_KEY": KEY}
    command = [sys.executable, "-m", "schemathesis.cli", "--config-file", str(SHIPPED), "run",
               f"{live_url}/api/openapi.json", "--seed", str(seed),
               "--max-examples", str(LIVE_EXAMPLES), "--workers", "1", "--no-color"]
    if seed != SEEDS[0]:  # the examples and boundary values do not depend on the seed
        command += ["--phases", "fuzzing,stateful"]
    done = subprocess.run(command, env=env, cwd=tmp_path, capture_output=True, text=True,
                          timeout=600, check=False)
    output = done.stdout + done.stderr
    assert done.returncode == 0, output[-6000:]
    assert "Authentication failed" not in output, output[-6000:]


@pytest.mark.integration
@pytest.mark.parametrize(("path", "method", "parts", "status"), [
    # A query string longer than gunicorn reads in a request line.
    ("/api/deliveries", "GET", {"query": {"destination": "crm", "cursor": "1" * 5000}}, 414),
    ("/v2/{campaign_id}/outbound-webhook", "GET",
     {"path_parameters": {"campaign_id": 1}, "query": {"x": "y" * 5000}}, 414),
    # A header field larger than it reads.
    ("/hooks/{source}", "POST", {"path_parameters": {"source": "kickofflabs"},
                                 "headers": {"webhook-id": "w" * 9000},
                                 "body": {"__event": "new_signup", "id": 1},
                                 "media_type": "application/json"}, 431),
    # A body over RELAY_MAX_BODY_BYTES (1 MiB by default): a replay of many ids.
    ("/api/dead-letters/replay", "POST", {"body": {"ids": ["x" * 600] * 2000},
                                          "media_type": "application/json"}, 413),
    ("/api/destinations", "GET", {"body": "x" * 1_100_000, "media_type": "text/plain"}, 413),
])
def test_the_http_servers_own_answers_are_documented(
        live_url: str, path: str, method: str, parts: dict[str, Any], status: int) -> None:
    """What gunicorn answers before the app sees a request (a request line or header fields
    too long), and the app's 413, pass every check."""
    schema = schemathesis.openapi.from_url(f"{live_url}/api/openapi.json",
                                           config=project_config(SEEDS[0]))
    case = schema[path][method].Case(**parts)
    response = case.call_and_validate()
    assert response.status_code == status
