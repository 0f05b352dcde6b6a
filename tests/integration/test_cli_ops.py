"""``relay status``, ``events show``, ``dlq list|replay``, ``pause``/``resume`` and ``erase``
through click's CliRunner against fakeredis (``relay.cli.operator.redis_client`` replaced)."""

from __future__ import annotations

from collections import Counter
from typing import Any

import fakeredis
import pytest
from click.testing import CliRunner, Result

from relay.cli import main
from relay.cli import operator as cli_ops
from relay.config.settings import Settings
from relay.delivery.engine import Engine
from tests.support.helpers import config, make_app, run_queue
from tests.support.history import HistoryView, history_for
from tests.support.loopback import Sink
from tests.support.samples import sample


class World:
    def __init__(self, sink: Sink, monkeypatch: pytest.MonkeyPatch) -> None:
        self.redis = fakeredis.FakeRedis()
        self.config = config([
            {"name": "crm", "type": "webhook", "url": f"{sink.url}/crm",
             "retry": {"schedule": []}},
            {"name": "backend", "type": "webhook", "url": f"{sink.url}/backend"},
        ], sources={"kickofflabs": {}})
        self.client = make_app(self.config, self.redis).test_client()
        self.relay = Engine(Settings(), self.config, self.redis)
        self.store = HistoryView(self.redis)  # what the relay knows: Redis and the history
        self.sink = sink
        monkeypatch.setattr(cli_ops, "redis_client", lambda: self.redis)
        monkeypatch.setattr(cli_ops, "history_database", lambda: history_for(self.redis))
        monkeypatch.setattr(cli_ops, "relay_config", lambda: self.config)

    def post(self, n: int) -> str:
        response = self.client.post("/hooks/kickofflabs", json=sample(
            "new_signup", email=f"lead{n}@example.com", social_id=f"s{n}", id=n))
        event_id: str = response.get_json()["event_id"]
        return event_id

    def run_queue(self) -> None:
        run_queue(self.relay, self.redis)

    def relay_cli(self, *args: str, code: int = 0, **kwargs: Any) -> Result:
        result = CliRunner().invoke(main, list(args), catch_exceptions=False, **kwargs)
        assert result.exit_code == code, result.output
        return result


@pytest.fixture
def world(sink: Sink, monkeypatch: pytest.MonkeyPatch) -> World:
    return World(sink, monkeypatch)


def test_status_shows_queue_and_destinations(world: World) -> None:
    world.sink.script("/crm", [500])
    world.post(1)
    world.post(2)
    world.run_queue()
    world.post(3)  # left on the queue
    world.relay_cli("pause", "backend", "--reason", "maintenance")
    out = world.relay_cli("status").output
    assert "queue 1" in out and "dead letters 1" in out
    lines = {line.split()[0]: line for line in out.splitlines()[3:]}
    assert lines["crm"].split()[1:5] == ["webhook", "active", "50.0%", "1"]
    assert "500" in lines["crm"]
    assert lines["backend"].split()[2] == "paused"
    as_json = world.relay_cli("status", "--json").output
    assert '"queue_depth": 1' in as_json


def test_status_says_why_a_destination_is_paused(world: World) -> None:
    world.relay_cli("pause", "backend", "--reason", "HubSpot maintenance window")
    world.relay_cli("pause", "crm")
    out = world.relay_cli("status").output
    paused = [line for line in out.splitlines() if line.startswith("paused: ")]
    assert len(paused) == 2
    assert paused[0].startswith("paused: backend since ")
    assert paused[0].endswith(", reason: HubSpot maintenance window")
    assert paused[1].startswith("paused: crm since ") and paused[1].endswith("no reason given")
    assert '"paused_reason": "HubSpot maintenance window"' in world.relay_cli(
        "status", "--json").output
    world.relay_cli("resume", "backend")
    world.relay_cli("resume", "crm")
    assert "paused:" not in world.relay_cli("status").output


def test_events_show_answers_did_it_reach_the_crm_and_why_not(world: World) -> None:
    world.sink.script("/crm", [422])
    event_id = world.post(1)
    world.run_queue()
    out = world.relay_cli("events", "show", event_id).output
    assert "lead1@example.com" in out
    assert "crm: dead after 1 attempt(s)" in out
    assert "HTTP 422" in out and "dead letter:" in out
    assert "backend: delivered after 1 attempt(s)" in out
    assert '"event_id"' in world.relay_cli("events", "show", event_id, "--json").output
    missing = world.relay_cli("events", "show", "nope", code=1)
    assert "no event nope" in missing.output


def test_dlq_list_and_replay_deliver_each_once(world: World) -> None:
    world.sink.script("/crm", [503] * 3)
    ids = [world.post(n) for n in range(3)]
    world.run_queue()
    listing = world.relay_cli("dlq", "list").output
    assert all(f"{i}|crm" in listing for i in ids)
    assert "no dead letters" in world.relay_cli("dlq", "list", "--destination", "backend").output

    one = world.relay_cli("dlq", "replay", f"{ids[0]}|crm").output
    assert "queued 1 dead letter(s)" in one
    rest = world.relay_cli("dlq", "replay", "--destination", "crm").output
    assert "queued 2 dead letter(s)" in rest
    assert "queued 0" in world.relay_cli("dlq", "replay", "--all").output
    world.run_queue()
    delivered = Counter(r.headers["webhook-id"] for r in world.sink.requests("/crm")[3:])
    assert sorted(delivered) == sorted(ids) and set(delivered.values()) == {1}
    assert "no dead letters" in world.relay_cli("dlq", "list").output


def test_dlq_replay_needs_one_choice(world: World) -> None:
    assert world.relay_cli("dlq", "replay", code=2)
    assert world.relay_cli("dlq", "replay", "--all", "--destination", "crm", code=2)
    assert "no such dead letter" in world.relay_cli("dlq", "replay", "nope", code=1).output


def test_pause_and_resume(world: World) -> None:
    world.relay_cli("pause", "backend")
    world.post(1)
    world.run_queue()  # no gates in this Relay: the pause is only recorded here
    out = world.relay_cli("resume", "backend").output
    assert out.startswith("backend: active")
    assert "unknown destination" in world.relay_cli("pause", "bakcend", code=1).output


def test_erase_asks_first(world: World) -> None:
    event_id = world.post(1)
    world.run_queue()
    aborted = world.relay_cli("erase", "--email", "lead1@example.com", input="n\n", code=1)
    assert "Aborted" in aborted.output
    assert world.store.load_event(event_id) is not None
    done = world.relay_cli("erase", "--email", "lead1@example.com", "--yes").output
    assert done.startswith("1 event(s) of lead1@example.com")
    assert world.store.load_event(event_id) is None




def test_a_pause_reason_cannot_drive_the_terminal(world: World) -> None:
    # Set through the admin API or the console by anyone with a key; printed to an operator.
    world.relay_cli("pause", "backend", "--reason", "window\x1b]0;pwned\x07\x1b[2J")
    out = world.relay_cli("status").output
    assert "\x1b" not in out and "\x07" not in out
    assert "reason: window\\x1b]0;pwned\\x07\\x1b[2J" in out
    world.relay_cli("resume", "backend")
