"""The operator commands answer from Redis when the YAML does not load, and the ``relay`` group
builds no web app: not for ``--help``, not for an operator command. (That importing the CLI
loads none of the web side is checked in a fresh process: tests/integration/test_cli_light.py.)
"""

from __future__ import annotations

from pathlib import Path

import fakeredis
import pytest
from click.testing import CliRunner, Result

from relay.cli import main
from relay.cli import operator as cli_ops
from relay.config.settings import Settings
from relay.delivery.engine import Engine
from tests.support.helpers import config, make_app, run_queue
from tests.support.history import history_for
from tests.support.loopback import closed_port
from tests.support.samples import sample

BROKEN = """\
sources:
  kickofflabs: {}
destinations:
  - name: crm
    type: webhook
    url: not a url
"""


@pytest.fixture
def redis(monkeypatch: pytest.MonkeyPatch) -> fakeredis.FakeRedis:
    """The relay's Redis, holding one dead letter for ``crm`` (its receiver refused)."""
    client = fakeredis.FakeRedis()
    relay = config([{"name": "crm", "type": "webhook",
                     "url": f"http://127.0.0.1:{closed_port()}/crm",
                     "retry": {"schedule": []}}], sources={"kickofflabs": {}})
    posted = make_app(relay, client).test_client().post(
        "/hooks/kickofflabs", json=sample("new_signup", email="ada@example.com"))
    assert posted.status_code == 202
    run_queue(Engine(Settings(), relay, client), client)
    monkeypatch.setattr(cli_ops, "redis_client", lambda: client)
    monkeypatch.setattr(cli_ops, "history_database", lambda: history_for(client))
    return client


@pytest.fixture
def broken_yaml(tmp_path: Path) -> dict[str, str]:
    """The environment of a relay whose YAML does not validate."""
    path = tmp_path / "relay.yaml"
    path.write_text(BROKEN)
    return {"RELAY_CONFIG": str(path)}


def relay(*args: str, env: dict[str, str]) -> Result:
    return CliRunner().invoke(main, list(args), env=env)


def test_status_answers_from_redis_when_the_yaml_is_broken(
        redis: fakeredis.FakeRedis, broken_yaml: dict[str, str]) -> None:
    result = relay("status", env=broken_yaml)
    assert result.exit_code == 0, result.output
    assert result.exception is None
    lines = result.output.splitlines()
    assert lines[0] == "queue 0   retries waiting 0   dead letters 1"
    # Known from its counters; its type only the YAML could tell.
    [crm] = [line.split() for line in lines if line.startswith("crm ")]
    assert crm[:3] == ["crm", "-", "active"]


def test_dlq_list_answers_from_redis_when_the_yaml_is_broken(
        redis: fakeredis.FakeRedis, broken_yaml: dict[str, str]) -> None:
    result = relay("dlq", "list", env=broken_yaml)
    assert result.exit_code == 0, result.output
    assert result.exception is None
    header, letter = result.output.splitlines()
    assert header.split()[:2] == ["ID", "DEAD"]
    assert letter.split("|")[0].startswith("evt_")
    assert "|crm " in letter and "gave up after 1 attempts" in letter


def test_help_builds_no_app(broken_yaml: dict[str, str]) -> None:
    result = relay("--help", env=broken_yaml)
    assert result.exit_code == 0
    assert "Traceback" not in result.output
    for command in ("check-config", "dev", "dlq", "status", "web", "worker"):
        assert f"  {command} " in result.output
