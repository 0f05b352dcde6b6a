"""Slow and stalled clients against the real `relay web` (gunicorn as it ships, real sockets).

A client that sends its body a byte a second, or its headers a line a second, must cost the
server a connection, not a turn of the app: others' events are still acknowledged, the health
check still answers, and the stalled ones are dropped in the end (408 for a body that never
arrives, the connection closed for headers that never end). Issue 18, point 1: four slow-body
connections or sixteen slow-header ones used to stop the ingress of `relay web`'s threads.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from relay.cli.embedded_redis import free_port
from tests.support import ROOT
from tests.support.deployment import RelayDeployment
from tests.support.helpers import wait_for
from tests.support.samples import sample

pytestmark = pytest.mark.integration

TOKEN = "slow-clients-token-0123456789"
HOOK = f"/hooks/kickofflabs?token={TOKEN}"
SLOW_BODY = (b"POST /hooks/kickofflabs HTTP/1.1\r\nHost: 127.0.0.1\r\n"
             b"Content-Type: application/json\r\nContent-Length: 1000\r\n\r\n{\"email\": ")
SLOW_HEADER = b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n"


class WebProcess:
    def __init__(self, process: subprocess.Popen[bytes], port: int, log: Path) -> None:
        self.process, self.port, self.log_path = process, port, log

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def request(self, method: str, path: str, body: bytes | None = None,
                timeout: float = 15.0) -> tuple[int, bytes]:
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=timeout)
        try:
            conn.request(method, path, body=body,
                         headers={"Content-Type": "application/json"} if body else {})
            response = conn.getresponse()
            return response.status, response.read()
        finally:
            conn.close()


@pytest.fixture
def start_web(deployment: RelayDeployment) -> Iterator[Callable[..., WebProcess]]:
    """Start `relay web` with the given options (none: as it ships)."""
    deployment.configure({
        "sources": {"kickofflabs": {"token": TOKEN}},
        "destinations": [{"name": "all", "type": "webhook", "url": "http://127.0.0.1:9/never",
                          "events": ["*"]}],
    })
    started: list[subprocess.Popen[bytes]] = []

    def start(*options: str) -> WebProcess:
        port = free_port()
        log = deployment.tmp / f"web-{len(started)}.log"
        with log.open("ab") as out:
            process = subprocess.Popen(
                [sys.executable, "-m", "relay", "web", "--host", "127.0.0.1", "--port",
                 str(port), *options],
                env=deployment.env, stdout=out, stderr=subprocess.STDOUT, cwd=ROOT,
                start_new_session=True)
        started.append(process)
        web = WebProcess(process, port, log)

        def healthy() -> bool:
            if process.poll() is not None:
                raise AssertionError(web.log()[-3000:])
            with contextlib.suppress(OSError):
                return web.request("GET", "/healthz", timeout=1)[0] == 200
            return False

        wait_for(healthy, timeout=30, interval=0.1, message="relay web to answer")
        return web

    yield start
    for process in started:
        if process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                process.send_signal(signal.SIGKILL)  # the master; its workers follow it
            process.wait(30)


class SlowClients:
    """``count`` connections trickling a body and ``count`` trickling header lines, a byte or
    a line a second, until the ``with`` block ends."""

    def __init__(self, port: int, count: int) -> None:
        self.sockets: list[tuple[str, socket.socket]] = []
        for kind, head in (("body", SLOW_BODY), ("header", SLOW_HEADER)):
            for _ in range(count):
                sock = socket.create_connection(("127.0.0.1", port), timeout=5)
                sock.sendall(head)
                self.sockets.append((kind, sock))
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self.trickle, daemon=True)

    def trickle(self) -> None:
        line = 0
        while not self.stop.wait(1.0):
            line += 1
            for kind, sock in self.sockets:
                with contextlib.suppress(OSError):  # the server may have closed it
                    sock.send(b" " if kind == "body" else f"X-Slow-{line}: a\r\n".encode())

    def __enter__(self) -> SlowClients:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        self.thread.join(10)
        for _, sock in self.sockets:
            sock.close()


def test_slow_and_stalled_clients_do_not_stop_the_ingress(
        start_web: Callable[..., WebProcess], deployment: RelayDeployment) -> None:
    web = start_web()  # as it ships: cores + 1 processes, its default concurrency
    body = json.dumps(sample("new_signup")).encode()
    with SlowClients(web.port, 32):
        time.sleep(2.0)  # all of them past their first bytes, waiting on the server
        for _ in range(3):
            started = time.monotonic()
            status, answer = web.request("POST", HOOK, body, timeout=15)
            assert status == 202, answer
            assert web.request("GET", "/healthz", timeout=15)[0] == 200
            assert time.monotonic() - started < 15


def read_until_closed(sock: socket.socket, piece: Callable[[int], bytes],
                      bound: float) -> tuple[bytes, float]:
    """Keep trickling (``piece(n)`` every half second) and read until the server closes the
    connection; what it answered, and after how long."""
    sock.settimeout(0.5)
    started = time.monotonic()
    received = b""
    step = 0
    while time.monotonic() - started < bound:
        step += 1
        with contextlib.suppress(OSError):
            sock.send(piece(step))
        try:
            chunk = sock.recv(65536)
        except TimeoutError:
            continue
        except OSError:
            break
        if not chunk:
            break
        received += chunk
    return received, time.monotonic() - started


def test_a_stalled_body_is_answered_408_and_stalled_headers_are_dropped(
        start_web: Callable[..., WebProcess]) -> None:
    web = start_web("--workers", "1", "--timeout", "2")
    body = socket.create_connection(("127.0.0.1", web.port), timeout=5)
    header = socket.create_connection(("127.0.0.1", web.port), timeout=5)
    with body, header:
        body.sendall(SLOW_BODY.replace(b"/hooks/kickofflabs", HOOK.encode()))  # a sender's
        header.sendall(SLOW_HEADER)
        answered: dict[str, tuple[bytes, float]] = {}
        pieces: dict[str, tuple[socket.socket, Callable[[int], bytes]]] = {
            "body": (body, lambda step: b" "),
            "header": (header, lambda step: f"X-Slow-{step}: a\r\n".encode())}

        def trickle(kind: str) -> None:
            answered[kind] = read_until_closed(*pieces[kind], bound=60)

        threads = [threading.Thread(target=trickle, args=(kind,)) for kind in pieces]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(90)
    reply, after = answered["body"]
    assert reply.startswith(b"HTTP/1.1 408 "), reply  # the app's answer, in its JSON
    assert after < 60, "the connection of a stalled body was never closed"
    reply, after = answered["header"]
    assert reply == b"" and after < 60, (reply, after)
    # The server is still there for everyone else.
    assert web.request("GET", "/healthz")[0] == 200


def test_the_body_limit_holds_while_bodies_are_read_whole(
        start_web: Callable[..., WebProcess]) -> None:
    web = start_web("--workers", "1")
    limit = 1024 * 1024
    lead = sample("new_signup")
    lead["padding"] = "x" * (limit - len(json.dumps(lead)) - len(', "padding": ""'))
    at_limit = json.dumps(lead).encode()
    assert len(at_limit) <= limit
    assert web.request("POST", HOOK, at_limit)[0] == 202
    # Declared over the limit: 413 before the body is sent (the server does not wait for it).
    with socket.create_connection(("127.0.0.1", web.port), timeout=15) as sock:
        sock.sendall(f"POST {HOOK} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     f"Content-Length: {limit + 1}\r\n\r\n".encode())
        assert sock.recv(65536).startswith(b"HTTP/1.1 413 ")


def test_stopping_relay_web_logs_no_logging_error(
        start_web: Callable[..., WebProcess]) -> None:
    """gunicorn's own lines show the pid (``%(process)d``): the app's lean log records must
    keep it, or "Worker exiting" becomes a ``--- Logging error ---`` traceback at every stop."""
    web = start_web("--workers", "2")
    web.process.send_signal(signal.SIGTERM)
    assert web.process.wait(60) == 0
    log = web.log()
    assert "Worker exiting" in log
    assert "Logging error" not in log and "Traceback" not in log, log[-3000:]
