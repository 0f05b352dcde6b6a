"""Process supervision: ``relay dev``'s process tree that stops as one, and ``relay worker
--processes N``'s copies of one Celery worker, kept running (:class:`Replicas`).

``relay dev`` starts gunicorn, a Celery worker, maybe Flower, and an embedded redis-server, and
each of those starts processes of its own (gunicorn and Celery workers). Stopping ``relay dev``
with SIGTERM (a process manager, ``timeout``, ``docker stop``), SIGINT (Ctrl-C) or SIGHUP (its
terminal closed) must stop all of them, and ``relay dev`` must not exit before they are gone::

    tree = ProcessTree(children, last=[redis])   # signal handlers installed here
    why = tree.wait()                             # a signal, or a child that exited by itself
    tree.stop()                                   # SIGTERM, wait, SIGKILL what is left

Stopping sends SIGTERM to the children first (each stops its own workers: gunicorn's and
Celery's warm shutdowns), then to the ``last`` ones (Redis, so the workers can still
acknowledge their tasks while they finish), and waits ``grace`` seconds for each. Any process of
the tree still alive after that, a grandchild included, is killed. The tree is read from
``/proc`` just before the SIGTERMs (on systems without ``/proc`` only the children themselves
are followed).
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from types import FrameType

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)
_PROC = Path("/proc")


class ProcessTree:
    def __init__(self, children: Sequence[subprocess.Popen[bytes]],
                 last: Iterable[subprocess.Popen[bytes] | None] = (),
                 poll_interval: float = 0.2) -> None:
        self.children = list(children)
        self.last = [p for p in last if p is not None]
        self.poll_interval = poll_interval
        self.received: int | None = None
        for signum in STOP_SIGNALS:
            signal.signal(signum, self._on_signal)

    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        if self.received is None:
            self.received = signum

    def wait(self) -> str:
        """Block until a stop signal arrives (``"signal"``) or a child exits (``"exited"``)."""
        while self.received is None:
            if any(p.poll() is not None for p in (*self.children, *self.last)):
                return "exited"
            time.sleep(self.poll_interval)
        return "signal"

    def stop(self, grace: float = 30.0) -> None:
        """Stop every process of the tree; return only when none is left."""
        for signum in STOP_SIGNALS:  # a second Ctrl-C must not cut the shutdown short
            signal.signal(signum, self._on_signal)
        everyone = [p for p in (*self.children, *self.last) if p.poll() is None]
        descendants = _descendants([p.pid for p in everyone])
        for group in (self.children, self.last):
            running = [p for p in group if p.poll() is None]
            for process in running:
                with contextlib.suppress(ProcessLookupError):
                    process.send_signal(signal.SIGTERM)
            deadline = time.monotonic() + grace
            for process in running:
                try:
                    process.wait(max(0.0, deadline - time.monotonic()))
                except subprocess.TimeoutExpired:
                    process.kill()
                    process.wait()
        # Grandchildren of a child that was killed (or that left them behind) are orphans now.
        for pid, started in descendants.items():
            if _start_time(pid) == started:
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.kill(pid, signal.SIGKILL)
        deadline = time.monotonic() + 5.0
        while any(_start_time(pid) == started for pid, started in descendants.items()):
            if time.monotonic() > deadline:
                break
            time.sleep(0.05)


class Replicas:
    """``count`` copies of one command (``argv_for(i)``, i = 1 … count), kept running.

    The children stay in this process's group, so a kill of the group takes them all, and each
    is sent SIGTERM should this process die without stopping them (Linux's parent-death
    signal). A stop signal (SIGTERM, SIGINT, SIGHUP) is passed on once, as SIGTERM, to every
    child (Celery's warm shutdown: finish and confirm what is in flight); :meth:`run` returns
    when all have exited. A child that exits by itself is started again, as Celery's prefork
    pool replaces a dead child, unless it exited within ``startup`` seconds of its start (a bad
    config, Redis refusing): then the others are stopped and its exit status is returned.
    """

    def __init__(self, argv_for: Callable[[int], list[str]], count: int,
                 startup: float = 10.0, restart_pause: float = 1.0,
                 poll_interval: float = 0.2, say: Callable[[str], None] | None = None) -> None:
        self.argv_for = argv_for
        self.count = count
        self.startup = startup
        self.restart_pause = restart_pause
        self.poll_interval = poll_interval
        self.say = say or (lambda text: print(text, file=sys.stderr, flush=True))
        self.received: int | None = None
        self.children: dict[int, tuple[subprocess.Popen[bytes], float]] = {}

    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        if self.received is None:
            self.received = signum

    def _start(self, i: int) -> None:
        process = subprocess.Popen(self.argv_for(i), preexec_fn=_die_with_parent(os.getpid()))
        self.children[i] = (process, time.monotonic())

    def run(self) -> int:
        for signum in STOP_SIGNALS:
            signal.signal(signum, self._on_signal)
        for i in range(1, self.count + 1):
            self._start(i)
        status = 0
        while self.received is None and not status:
            time.sleep(self.poll_interval)
            status = self._restart_exited()
        # A Ctrl-C at a terminal reached the children too: SIGINT then SIGTERM is still one
        # warm shutdown for Celery (a second SIGINT would be its cold one).
        for process, _ in self.children.values():
            if process.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    process.send_signal(signal.SIGTERM)
        for process, _ in self.children.values():
            process.wait()
        return status

    def _restart_exited(self) -> int:
        """Start again each child that exited; the status to exit with when one failed at
        start-up (0: none did)."""
        for i, (process, started) in list(self.children.items()):
            code = process.poll()
            if code is None:
                continue
            if time.monotonic() - started < self.startup:
                self.say(f"worker process {i} exited with {code} at start-up; stopping")
                return code if code > 0 else 1
            self.say(f"worker process {i} exited with {code}; starting it again")
            time.sleep(self.restart_pause)
            self._start(i)
        return 0


def _die_with_parent(parent: int) -> Callable[[], None]:
    """A ``preexec_fn``: the child is sent SIGTERM when ``parent`` dies (Linux only)."""
    def preexec() -> None:
        if sys.platform.startswith("linux"):
            with contextlib.suppress(OSError, AttributeError):
                ctypes.CDLL(None).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
            if os.getppid() != parent:  # it died before the prctl
                os.kill(os.getpid(), signal.SIGTERM)
    return preexec


def _descendants(roots: Iterable[int]) -> dict[int, str]:
    """Every process below ``roots`` (not the roots), with its start time to tell a reused pid
    from the same process; empty where there is no ``/proc``."""
    children: dict[int, list[int]] = {}
    try:
        entries = list(_PROC.iterdir())
    except OSError:
        return {}
    for entry in entries:
        if entry.name.isdigit():
            fields = _stat(int(entry.name))
            if fields is not None:
                children.setdefault(int(fields[1]), []).append(int(entry.name))
    found: dict[int, str] = {}
    pending = list(roots)
    while pending:
        for pid in children.get(pending.pop(), []):
            started = _start_time(pid)
            if started is not None and pid not in found:
                found[pid] = started
                pending.append(pid)
    return found


def _stat(pid: int) -> list[str] | None:
    """``/proc/<pid>/stat`` after the command name: state, ppid, …; None when gone or a
    zombie (already dead, waiting for its parent to read its status)."""
    try:
        text = (_PROC / str(pid) / "stat").read_text()
    except OSError:
        return None
    fields = text[text.rfind(")") + 2:].split()
    return None if fields[0] in ("Z", "X") else fields


def _start_time(pid: int) -> str | None:
    fields = _stat(pid)
    return fields[19] if fields is not None else None
