"""``relay dev``'s edges (issue 18, point 10): ``--flower`` without Flower is refused before
anything starts, and the state file through which operator commands find the Redis and
history of a running ``relay dev`` (its real use: tests/integration/test_dev_beside.py)."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import IO, Any

import pytest
from click.testing import CliRunner

import relay.cli
from relay.cli import DEV_STATE, hold_dev_state, main, use_running_dev
from relay.cli import operator as cli_ops
from relay.cli.embedded_redis import EmbeddedRedis
from relay.config.settings import Settings


def test_dev_with_flower_missing_refuses_before_starting_anything(
        monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "flower" else real_find_spec(name, *a))

    def started(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("relay dev started something")

    monkeypatch.setattr(subprocess, "Popen", started)
    monkeypatch.setattr(EmbeddedRedis, "start", started)
    monkeypatch.setattr("relay.history.database.upgrade", started)
    result = CliRunner().invoke(main, ["dev", "--flower", "--data-dir", str(tmp_path / "d")])
    assert result.exit_code != 0
    assert "--flower needs Flower" in result.output
    assert "leadrelay[flower]" in result.output
    assert not (tmp_path / "d").exists()


@pytest.fixture
def clean(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    """A directory to run from, and no RELAY_REDIS_URL / RELAY_DATABASE_URL."""
    monkeypatch.chdir(tmp_path)
    for variable in ("RELAY_REDIS_URL", "RELAY_DATABASE_URL"):
        monkeypatch.setenv(variable, "")  # remembered, so what the test sets is undone too
        monkeypatch.delenv(variable)
    return tmp_path


def write_state(directory: Path, pid: int, running: bool = True) -> IO[bytes] | None:
    """relay dev's state file; ``running``: held as a running relay dev holds it (keep the
    returned file open), else left as a killed one leaves it."""
    state = {"pid": pid, "redis_url": "redis://127.0.0.1:45678/0",
             "database_url": f"sqlite:///{directory}/.relay/history.sqlite3"}
    if running:
        return hold_dev_state(directory / ".relay" / DEV_STATE, state)
    (directory / ".relay").mkdir(exist_ok=True)
    (directory / ".relay" / DEV_STATE).write_text(json.dumps(state))
    return None


def test_a_running_dev_s_redis_and_history_are_used(clean: Path,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    _held = write_state(clean, os.getpid())  # this process stands for a running relay dev
    assert use_running_dev() is not None
    settings = Settings.from_env()
    assert settings.redis_url == "redis://127.0.0.1:45678/0"
    assert settings.database_url == f"sqlite:///{clean}/.relay/history.sqlite3"


def test_the_environment_wins_over_a_running_dev(clean: Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    _held = write_state(clean, os.getpid())
    monkeypatch.setenv("RELAY_REDIS_URL", "redis://elsewhere:6379/0")
    use_running_dev()
    assert Settings.from_env().redis_url == "redis://elsewhere:6379/0"


def test_the_file_of_a_dev_that_is_gone_is_ignored(clean: Path) -> None:
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True)
    write_state(clean, int(gone.stdout), running=False)
    assert use_running_dev() is None
    assert "RELAY_REDIS_URL" not in os.environ


def test_the_file_of_a_killed_dev_is_ignored_when_its_pid_is_taken_again(clean: Path) -> None:
    # kill -9 left the file; its pid now belongs to another process (here: this one).
    write_state(clean, os.getpid(), running=False)
    assert use_running_dev() is None
    assert "RELAY_REDIS_URL" not in os.environ


def test_web_and_worker_never_join_a_running_dev(clean: Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    _held = write_state(clean, os.getpid())
    joined: list[str] = []
    monkeypatch.setattr(relay.cli, "use_running_dev", lambda: joined.append("joined"))
    for command in ("web", "worker"):
        CliRunner().invoke(relay.cli.main, [command, "--help"])
    assert joined == []
    CliRunner().invoke(relay.cli.main, ["status", "--help"])
    assert joined == ["joined"]
    assert _held is not None


def test_operator_commands_run_beside_relay_dev_use_its_redis(
        clean: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _held = write_state(clean, os.getpid())
    seen: list[str] = []

    def client() -> Any:
        seen.append(Settings.from_env().redis_url)
        raise cli_ops.ConfigError("stop here")

    monkeypatch.setattr(cli_ops, "redis_client", client)
    # CliRunner's env= is applied (and undone) around the command: what a second terminal has.
    result = CliRunner().invoke(relay.cli.main, ["status"], env={"RELAY_REDIS_URL": None})
    assert seen == ["redis://127.0.0.1:45678/0"], result.output


class _ExitedChild:
    """A child process that has exited by itself (status 1)."""

    pid = 2**22 + 12345  # no such process

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self.returncode = 1

    def poll(self) -> int:
        return 1

    def wait(self, timeout: float | None = None) -> int:
        return 1


def test_dev_exits_non_zero_when_a_child_stops_by_itself(
        monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    import signal

    monkeypatch.setattr(subprocess, "Popen", _ExitedChild)
    monkeypatch.setattr("relay.history.database.upgrade", lambda url: None)
    monkeypatch.setenv("RELAY_REDIS_URL", "redis://127.0.0.1:1/0")  # no embedded Redis
    monkeypatch.setenv("RELAY_CONFIG", str(Path(relay.cli.__file__).parents[2] / "config"
                                           / "relay.yaml"))
    previous = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)}
    try:
        result = CliRunner().invoke(main, ["dev", "--data-dir", str(tmp_path / "d")])
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
    assert "a child process exited; stopping" in result.output
    assert result.exit_code == 1
    assert not (tmp_path / "d" / DEV_STATE).exists()  # removed on the way out
