"""The HTTP contract held by an outside fuzzer: Schemathesis generates requests from
``/api/openapi.json`` and checks every answer against the document (status codes, bodies,
headers, content types), that valid requests are accepted and invalid ones refused, that 405s
carry ``Allow`` and that authentication is not ignored.

Deterministic (derandomized, no example database) and bounded (``MAX_EXAMPLES`` per
operation), so it runs in seconds; the same run against a live ``relay web`` (gunicorn, a real
``redis-server``) is the integration test at the end.
"""

from __future__ import annotations

from typing import Any

import fakeredis
import schemathesis
from hypothesis import HealthCheck, settings

from relay.app import create_app
from relay.config import parse_config
from relay.netguard import AddressGuard
from relay.settings import Settings
from relay.subscriptions_api import GUARD_EXTENSION

KEY = "contract-key"
AUTH = {"Authorization": f"Bearer {KEY}"}
MAX_EXAMPLES = 30
LIVE_EXAMPLES = 10
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
