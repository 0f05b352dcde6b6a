"""Process supervision for ``relay dev``: one process tree that stops as one.

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
import os
import signal
import subprocess
import time
from collections.abc import Iterable, Sequence
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
