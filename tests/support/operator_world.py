"""A relay on fakeredis as an operator reads it, in the unit layer: the app (ingress, admin
API, console) and the worker-side core in this process, an in-memory history, and a ``crm``
destination whose port refuses connections, with no retries, so each event routed to it is a
dead letter at once (no HTTP server needed). The CLI's operator commands are pointed at the
same Redis and history.

::

    world = OperatorWorld(monkeypatch)
    event_id = world.post(sample("new_signup"))
    world.process()
    world.api("get", f"/api/events/{event_id}").get_json()
    world.cli("events", "show", event_id).output
"""

from __future__ import annotations

import re
import time
from typing import Any

import fakeredis
import pytest
from click.testing import CliRunner, Result
from flask.testing import FlaskClient
from werkzeug.test import TestResponse

from relay.cli import main
from relay.cli import operator as cli_ops
from relay.config.settings import Settings
from relay.core.events import is_known
from relay.delivery.engine import Engine
from tests.support.helpers import config, make_app, run_queue
from tests.support.history import history_for
from tests.support.loopback import closed_port

API_KEY = "operator-world-key"
SECRET_KEY = "operator-world-session-secret"


class OperatorWorld:
    def __init__(self, monkeypatch: pytest.MonkeyPatch, **settings: Any) -> None:
        self.redis = fakeredis.FakeRedis()
        self.config = config([{
            "name": "crm", "type": "webhook", "url": f"http://127.0.0.1:{closed_port()}/crm",
            "retry": {"schedule": []}, "timeout": "2s",
        }], sources={"kickofflabs": {}})
        self.settings = Settings(api_keys=(API_KEY,), secret_key=SECRET_KEY, **settings)
        self.app = make_app(self.config, self.redis, self.settings)
        self.client = self.app.test_client()
        self.relay = Engine(self.settings, self.config, self.redis)
        monkeypatch.setattr(cli_ops, "redis_client", lambda: self.redis)
        monkeypatch.setattr(cli_ops, "history_database", lambda: history_for(self.redis))
        monkeypatch.setattr(cli_ops, "relay_config", lambda: self.config)
        # The CLI reads its settings from the environment.
        monkeypatch.setenv("RELAY_REDACT_FIELDS", ",".join(settings.get("redact_fields", ())))

    def post(self, payload: dict[str, Any]) -> str:
        response = self.client.post("/hooks/kickofflabs", json=payload)
        assert response.status_code == 202, response.get_json()
        event_id: str = response.get_json()["event_id"]
        return event_id

    def store(self, event_id: str, payload: dict[str, Any]) -> str:
        """Put an event in the intake as the ingress would, past its checks: what an older
        ingress may have let in, still in the history."""
        self.app.extensions["relay"].intake.publish({
            "event_id": event_id, "source": "kickofflabs", "name": payload["__event"],
            "known": is_known(payload["__event"]), "received_at": time.time(),
            "payload": payload}, 86400.0)
        return event_id

    def process(self) -> None:
        run_queue(self.relay, self.redis)

    def api(self, method: str, path: str, **kwargs: Any) -> TestResponse:
        response: TestResponse = getattr(self.client, method)(
            path, headers={"Authorization": f"Bearer {API_KEY}"}, **kwargs)
        return response

    def console(self) -> FlaskClient:
        """A client signed in to the console."""
        client = self.app.test_client()
        token = csrf_of(client.get("/console/login").text)
        response = client.post("/console/login", data={"api_key": API_KEY, "csrf_token": token})
        assert response.status_code == 302, response.text
        return client

    def cli(self, *args: str, code: int = 0, **kwargs: Any) -> Result:
        result = CliRunner().invoke(main, list(args), catch_exceptions=False, **kwargs)
        assert result.exit_code == code, result.output
        return result


def csrf_of(html: str) -> str:
    found = re.search(r'name="csrf_token" value="([^"]+)"', html)
    assert found, "the page has no CSRF token"
    return found.group(1)
