"""The operator commands when Redis does not answer: a clear error, not a traceback. The
commands against a relay on fakeredis delivering to a loopback sink:
tests/integration/test_cli_ops.py."""

from __future__ import annotations

import fakeredis
import pytest
from click.testing import CliRunner

from relay.cli import main
from relay.cli import operator as cli_ops


def test_redis_down_is_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    server = fakeredis.FakeServer()
    server.connected = False
    monkeypatch.setattr(cli_ops, "redis_client", lambda: fakeredis.FakeRedis(server=server))
    result = CliRunner().invoke(main, ["status"])
    assert result.exit_code == 1
    assert "cannot reach Redis" in result.output
