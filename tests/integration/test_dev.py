"""``relay dev`` stops as one process tree: a signal to it stops the embedded redis-server,
gunicorn (master and workers) and the Celery worker (main process and pool), and it exits only
after they are gone (SPEC §3: dev is "everything in one process tree")."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import urllib3

from relay.cli.embedded_redis import free_port
from tests.support import ROOT
from tests.support.helpers import process_alive, wait_for

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(not Path("/proc").is_dir(), reason="reads the process tree from /proc"),
]


def tree_of(pid: int) -> dict[int, str]:
    """Every live process below ``pid``: its command line, read from /proc."""
    parents: dict[int, int] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        fields = stat[stat.rfind(")") + 2:].split()
        if fields[0] not in ("Z", "X"):
            parents[int(entry.name)] = int(fields[1])
    found: dict[int, str] = {}
    pending = [pid]
    while pending:
        parent = pending.pop()
        for child, its_parent in parents.items():
            if its_parent == parent and child not in found:
                with contextlib.suppress(OSError):
                    found[child] = (Path("/proc") / str(child) / "cmdline").read_bytes() \
                        .replace(b"\0", b" ").decode(errors="replace")
                pending.append(child)
    return found


@pytest.fixture
def dev(tmp_path: Path) -> Iterator[tuple[subprocess.Popen[bytes], int]]:
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("RELAY_")}
    env.update({"RELAY_CONFIG": str(ROOT / "config" / "relay.yaml"),
                "RELAY_DEV_REDIS_PORT": str(free_port()), "PYTHONUNBUFFERED": "1",
                "KICKOFFLABS_TOKEN": ""})
    log = (tmp_path / "dev.log").open("wb")
    process = subprocess.Popen(
        [sys.executable, "-m", "relay", "dev", "--port", str(port), "--concurrency", "2",
         "--data-dir", str(tmp_path / "data")],
        env=env, cwd=tmp_path, stdout=log, stderr=subprocess.STDOUT,
        start_new_session=True,  # so the test can clean up whatever a failure leaves
    )
    try:
        yield process, port
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        for pid in tree_of(process.pid):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        process.wait()


def wait_until_up(process: subprocess.Popen[bytes], port: int) -> dict[int, str]:
    def ready() -> bool:
        assert process.poll() is None, "relay dev exited during start-up"
        try:
            answer = urllib3.request("GET", f"http://127.0.0.1:{port}/readyz", timeout=1,
                                     retries=False)
        except urllib3.exceptions.HTTPError:
            return False
        commands = " ".join(tree_of(process.pid).values())
        return answer.status == 200 and "celery" in commands and "redis-server" in commands
    wait_for(ready, timeout=60, interval=0.2, message="relay dev to be up")
    # Celery's pool and gunicorn's workers are forked a moment after their parents start.
    time.sleep(2)
    return tree_of(process.pid)


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_to_relay_dev_stops_its_whole_process_tree(
    dev: tuple[subprocess.Popen[bytes], int], signum: int
) -> None:
    process, port = dev
    tree = wait_until_up(process, port)
    commands = " ".join(tree.values())
    assert "redis-server" in commands and "gunicorn" in commands and "celery" in commands
    assert len(tree) >= 4, tree  # redis, gunicorn master + worker, the celery worker (threads)

    process.send_signal(signum)  # to relay dev alone, as `kill`, `timeout` or docker stop do
    assert process.wait(90) == 0
    survivors = {pid: command for pid, command in tree.items() if process_alive(pid)}
    assert survivors == {}, "relay dev exited while these were still running"


# Leaves a grandchild that ignores SIGTERM behind when it gets SIGTERM itself.
_LEAVES_AN_ORPHAN = """
import signal, subprocess, sys, time
subprocess.Popen([sys.executable, "-c",
                  "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); "
                  "print('ready', flush=True); time.sleep(300)"])
time.sleep(300)
"""


def test_the_tree_is_stopped_even_when_a_grandchild_ignores_sigterm() -> None:
    from relay.cli.processes import ProcessTree

    previous = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)}
    child = subprocess.Popen([sys.executable, "-c", _LEAVES_AN_ORPHAN])
    stubborn = subprocess.Popen([sys.executable, "-c",
                                 "import signal, time; signal.signal(signal.SIGTERM, "
                                 "signal.SIG_IGN); time.sleep(300)"])
    try:
        tree = ProcessTree([child, stubborn])
        wait_for(lambda: len(tree_of(child.pid)) == 1, timeout=10, message="the grandchild")
        [grandchild] = tree_of(child.pid)
        os.kill(os.getpid(), signal.SIGTERM)  # handled: recorded, not fatal
        assert tree.wait() == "signal"
        tree.stop(grace=1.0)
        assert child.poll() is not None and stubborn.poll() is not None
        assert not process_alive(grandchild)
    finally:
        for process in (child, stubborn):
            if process.poll() is None:
                process.kill()
                process.wait()
        for signum, handler in previous.items():
            signal.signal(signum, handler)
