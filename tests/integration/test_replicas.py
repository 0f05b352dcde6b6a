"""``relay worker --processes N`` keeps N copies of the Celery worker running
(:class:`relay.cli.processes.Replicas`), checked here with small stand-in children: a stop signal
reaches every child, a child that dies is started again, one that fails at start-up stops the
rest, and the children do not outlive a supervisor killed with -9."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from tests.support.helpers import process_alive, wait_for

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"),
                                reason="reads /proc and uses the parent-death signal")

# A stand-in worker: writes its pid to DIR/<i>.<pid>, then waits for SIGTERM, which it notes.
CHILD = textwrap.dedent("""
    import os, signal, sys, time
    out = sys.argv[1]
    open(f"{out}/{sys.argv[2]}.{os.getpid()}", "w").close()
    def stop(signum, frame):
        open(f"{out}/{sys.argv[2]}.{os.getpid()}.term", "w").close()
        sys.exit(0)
    signal.signal(signal.SIGTERM, stop)
    while True:
        time.sleep(0.05)
""")

SUPERVISOR = textwrap.dedent("""
    import sys
    from relay.cli.processes import Replicas
    child, out, count, startup = sys.argv[1], sys.argv[2], int(sys.argv[3]), float(sys.argv[4])
    replicas = Replicas(lambda i: [sys.executable, "-c", child, out, str(i)], count,
                        startup=startup, restart_pause=0.1, poll_interval=0.05)
    sys.exit(replicas.run())
""")


def started(out: Path) -> list[Path]:
    return sorted(p for p in out.iterdir() if not p.name.endswith(".term"))


def supervise(out: Path, count: int, child: str = CHILD, startup: float = 0.0
              ) -> subprocess.Popen[bytes]:
    return subprocess.Popen([sys.executable, "-c", SUPERVISOR, child, str(out), str(count),
                             str(startup)], start_new_session=True)


def test_a_stop_signal_reaches_every_child_and_a_dead_one_is_started_again(
        tmp_path: Path) -> None:
    supervisor = supervise(tmp_path, 2)
    try:
        wait_for(lambda: len(started(tmp_path)) == 2, timeout=20, message="two children")
        first = started(tmp_path)[0]
        os.kill(int(first.suffix[1:]), signal.SIGKILL)
        wait_for(lambda: len(started(tmp_path)) == 3, timeout=20,
                 message="the killed child started again")
        assert sorted(p.stem for p in started(tmp_path)) == ["1", "1", "2"]
        supervisor.send_signal(signal.SIGTERM)
        assert supervisor.wait(20) == 0
        # Both live children got SIGTERM and were waited for before the supervisor exited.
        assert len(list(tmp_path.glob("*.term"))) == 2
        assert not any(process_alive(int(p.suffix[1:])) for p in started(tmp_path))
    finally:
        if supervisor.poll() is None:
            os.killpg(supervisor.pid, signal.SIGKILL)


def test_a_child_failing_at_start_up_stops_the_others_with_its_status(tmp_path: Path) -> None:
    failing = "import sys, time; time.sleep(0.2) if sys.argv[2] == '1' else None; " \
              "sys.exit(3) if sys.argv[2] == '2' else time.sleep(60)"
    supervisor = supervise(tmp_path, 2, child=failing, startup=30.0)
    try:
        assert supervisor.wait(20) == 3
    finally:
        if supervisor.poll() is None:
            os.killpg(supervisor.pid, signal.SIGKILL)


def test_children_do_not_outlive_a_supervisor_killed_with_9(tmp_path: Path) -> None:
    supervisor = supervise(tmp_path, 2)
    try:
        wait_for(lambda: len(started(tmp_path)) == 2, timeout=20, message="two children")
        os.kill(supervisor.pid, signal.SIGKILL)  # the supervisor alone, not its group
        supervisor.wait()
        wait_for(lambda: len(list(tmp_path.glob("*.term"))) == 2, timeout=20,
                 message="each child told to stop by the parent-death signal")
        deadline = time.monotonic() + 20
        while any(process_alive(int(p.suffix[1:])) for p in started(tmp_path)):
            assert time.monotonic() < deadline, "a child outlived its supervisor"
            time.sleep(0.05)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(supervisor.pid, signal.SIGKILL)


class _Exec(Exception):
    pass


def test_relay_worker_runs_one_celery_node_per_process(monkeypatch: pytest.MonkeyPatch) -> None:
    from relay import cli
    from relay.cli import processes as supervise

    execs: list[list[str]] = []
    runs: list[list[list[str]]] = []

    def fake_execv(path: str, argv: list[str]) -> None:
        execs.append(list(argv))
        raise _Exec

    def fake_run(self: supervise.Replicas) -> int:
        runs.append([self.argv_for(i) for i in range(1, self.count + 1)])
        return 0

    monkeypatch.setattr(cli.os, "execv", fake_execv)
    monkeypatch.setattr(supervise.Replicas, "run", fake_run)
    monkeypatch.setattr(cli, "usable_cores", lambda: 3)
    with pytest.raises(_Exec):  # one process: relay worker becomes the Celery worker
        cli.main.main(args=["worker", "--processes", "1"], standalone_mode=False)
    assert execs[0][1:6] == ["-m", "celery", "-A", "workers.celery_app", "worker"]
    assert "--hostname" not in execs[0]
    with pytest.raises(SystemExit) as exited:  # the default: one per usable core
        cli.main.main(args=["worker", "--concurrency", "4"], standalone_mode=False)
    assert exited.value.code == 0
    (argvs,) = runs
    assert [argv[argv.index("--hostname") + 1] for argv in argvs] == [
        "relay1@%h", "relay2@%h", "relay3@%h"]
    for argv in argvs:
        assert argv[argv.index("--pool") + 1] == "threads"
        assert argv[argv.index("--concurrency") + 1] == "4"
