"""The HTTP contract held by an outside fuzzer: Schemathesis generates requests from
``/api/openapi.json`` and checks every answer against the document (status codes, bodies,
headers, content types), that valid requests are accepted and invalid ones refused, that 405s
carry ``Allow`` and that authentication is not ignored.

Deterministic (derandomized, no example database) and bounded (``MAX_EXAMPLES`` per
operation), so it runs in seconds; the same run against a live ``relay web`` (gunicorn, a real
``redis-server``) is the integration test at the end.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from typing import Any

import fakeredis
import pytest
import schemathesis
import urllib3
from hypothesis import HealthCheck, given, settings
from hypothesis.errors import Unsatisfiable
from schemathesis import GenerationMode

from relay.api.subscriptions import GUARD_EXTENSION
from relay.app import create_app
from relay.cli.embedded_redis import EmbeddedRedis, free_port
from relay.config.relay_yaml import parse_config
from relay.config.settings import Settings
from relay.drivers.ssrf_guard import AddressGuard
from tests.support import ROOT
from tests.support.helpers import wait_for
from tests.support.history import memory_database

KEY = "contract-key"
AUTH = {"Authorization": f"Bearer {KEY}"}
# Raise them by hand for a deeper run:
#   CONTRACT_EXAMPLES=500 pytest tests/integration/test_contract.py
MAX_EXAMPLES = int(os.environ.get("CONTRACT_EXAMPLES", "30"))
LIVE_EXAMPLES = max(10, MAX_EXAMPLES // 3)
PUBLIC_ADDRESS = "93.184.215.14"  # what every generated host name "resolves" to

CONFIG: dict[str, Any] = {
    "generation": {"mode": "all", "deterministic": True, "database": "none"},
    "checks": {
        # A body over RELAY_MAX_BODY_BYTES is refused with 413 before it is parsed.
        "negative_data_rejection": {"expected-statuses": [
            "400", "401", "403", "404", "405", "406", "409", "413", "415", "422", "428"]},
    },
    "operations": [{
        # createWebhook: a URL the schema admits can still be refused by the address guard
        # (no host, an IP literal that is not public): 422 "url refused: ..." is documented.
        "include-operation-id": "createWebhook",
        "checks": {"positive_data_acceptance": {"expected-statuses": [
            "2xx", "401", "404", "409", "422"]}},
    }],
}


def relay_config() -> Any:
    return parse_config({"sources": {"kickofflabs": {}},
                         "destinations": [{"name": "crm", "type": "webhook",
                                           "url": "http://127.0.0.1:9/crm"}]}, {})


def make_app() -> Any:
    app = create_app({
        "RELAY_SETTINGS": Settings(api_keys=(KEY,), allowed_networks=("127.0.0.0/8",)),
        "RELAY_CONFIG_OBJECT": relay_config(),
        "RELAY_REDIS": fakeredis.FakeRedis(),
        "RELAY_DATABASE": memory_database(),
    })
    # No DNS from the test: every host is public.
    app.extensions[GUARD_EXTENSION] = AddressGuard(
        ("127.0.0.0/8",), resolver=lambda host, port: [PUBLIC_ADDRESS])
    return app


schema = schemathesis.openapi.from_wsgi("/api/openapi.json", make_app(),
                                        config=schemathesis.Config.from_dict(CONFIG))


@schema.parametrize()
@settings(max_examples=MAX_EXAMPLES, derandomize=True, deadline=None, database=None,
          suppress_health_check=list(HealthCheck))
def test_the_app_keeps_its_documented_contract(case: schemathesis.Case) -> None:
    case.call_and_validate(headers=AUTH)


# -- the same against a live `relay web` -------------------------------------------------------


@pytest.fixture(scope="module")
def live_schema(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    """`relay web` (gunicorn on 127.0.0.1, one process) on a real redis-server; its document
    loaded from the server itself."""
    tmp = tmp_path_factory.mktemp("live")
    redis_server = EmbeddedRedis(tmp / "redis").start()
    config = tmp / "relay.yaml"
    config.write_text("sources:\n  kickofflabs: {}\ndestinations:\n"
                      "  - {name: crm, type: webhook, url: 'http://127.0.0.1:9/crm'}\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith("RELAY_")}
    env.update({"RELAY_REDIS_URL": redis_server.url, "RELAY_CONFIG": str(config),
                "RELAY_DATABASE_URL": f"sqlite:///{tmp / 'history.sqlite3'}",
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
        yield schemathesis.openapi.from_url(f"http://127.0.0.1:{port}/api/openapi.json",
                                            config=schemathesis.Config.from_dict(CONFIG))
    finally:
        web.terminate()
        try:
            web.wait(10)
        except subprocess.TimeoutExpired:
            web.kill()
            web.wait()
        redis_server.stop()


@pytest.mark.integration
def test_a_live_relay_web_keeps_the_same_contract(live_schema: Any) -> None:
    # One test drives every operation (schemathesis' lazy fixture loader does not run under
    # this pytest), valid and invalid requests alike, with the same checks as above.
    failures: dict[str, str] = {}
    for result in live_schema.get_all_operations():
        operation = result.ok()
        for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):

            @settings(max_examples=LIVE_EXAMPLES, derandomize=True, deadline=None,
                      database=None, suppress_health_check=list(HealthCheck))
            @given(case=operation.as_strategy(generation_mode=mode))
            def exchange(case: schemathesis.Case) -> None:
                case.call_and_validate(headers=AUTH)

            try:
                exchange()
            except Unsatisfiable:
                continue  # nothing to make invalid (an operation without parameters or body)
            except Exception as exc:  # every failing operation is reported, not the first
                failures[f"{operation.label} ({mode.value})"] = str(exc)[:3000]
    assert not failures, "\n\n".join(f"{label}:\n{text}" for label, text in failures.items())
