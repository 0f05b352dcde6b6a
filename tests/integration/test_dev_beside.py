"""Operator commands beside a running ``relay dev`` (issue 18, point 10): ``relay status`` or
``relay events show`` in a second terminal, from the same directory and without
``RELAY_REDIS_URL``, reach the Redis ``relay dev`` embedded, not ``localhost:6379``; and stopping
``relay dev`` leaves no ``--- Logging error ---`` behind (gunicorn's "Worker exiting" line)."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import urllib3

from relay.cli.embedded_redis import free_port
from tests.integration.test_dev import tree_of, wait_until_up
from tests.support import ROOT
from tests.support.helpers import wait_for
from tests.support.samples import sample

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(not Path("/proc").is_dir(), reason="reads the process tree from /proc"),
]


def clean_env() -> dict[str, str]:
    """No RELAY_* variable: what a second terminal has."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("RELAY_")}
    env.update({"PYTHONUNBUFFERED": "1", "KICKOFFLABS_TOKEN": "",
                "RELAY_CONFIG": str(ROOT / "config" / "relay.yaml")})
    return env


@pytest.fixture
def dev_here(tmp_path: Path) -> Iterator[tuple[subprocess.Popen[bytes], int, Path]]:
    """``relay dev`` run from ``tmp_path`` with its default state folder (./.relay)."""
    port = free_port()
    env = clean_env()
    env["RELAY_DEV_REDIS_PORT"] = str(free_port())
    log_path = tmp_path / "dev.log"
    with log_path.open("wb") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", "relay", "dev", "--port", str(port), "--concurrency", "2"],
            env=env, cwd=tmp_path, stdout=log, stderr=subprocess.STDOUT,
            start_new_session=True)
    try:
        yield process, port, log_path
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        for pid in tree_of(process.pid):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        process.wait()


def relay_here(cwd: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "relay", *args], cwd=cwd, env=clean_env(),
                          capture_output=True, text=True, timeout=60, check=False)


def test_operator_commands_find_the_redis_relay_dev_embedded(
        dev_here: tuple[subprocess.Popen[bytes], int, Path], tmp_path: Path) -> None:
    process, port, log_path = dev_here
    wait_until_up(process, port)
    answer = urllib3.request("POST", f"http://127.0.0.1:{port}/hooks/kickofflabs",
                             json=sample("new_signup"), timeout=10, retries=False)
    assert answer.status == 202, answer.data
    event_id = answer.json()["event_id"]

    status = relay_here(tmp_path, "status", "--json")
    assert status.returncode == 0, status.stderr
    assert "dev-inbox" in {d["name"] for d in json.loads(status.stdout)["destinations"]}

    def shown() -> bool:
        found = relay_here(tmp_path, "events", "show", event_id, "--json")
        return found.returncode == 0 and event_id in found.stdout
    wait_for(shown, timeout=60, interval=0.5, message=f"relay events show {event_id}")
    state = json.loads((tmp_path / ".relay" / "dev.json").read_text())
    assert state["pid"] == process.pid and state["redis_url"].startswith("redis://127.0.0.1:")

    process.send_signal(signal.SIGTERM)
    assert process.wait(90) == 0
    assert not (tmp_path / ".relay" / "dev.json").exists()
    log = log_path.read_text(errors="replace")
    assert "Worker exiting" in log
    assert "Logging error" not in log, log[-3000:]
