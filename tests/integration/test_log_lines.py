"""A request cannot forge a log line of ``relay web`` (issue 18, point 5): the real server with
its access log on (``RELAY_ACCESS_LOG``), raw HTTP on a socket, the log read back from the
process's output. tests/unit/test_printable_output.py has the formatter's own table."""

from __future__ import annotations

import contextlib
import http.client
import os
import signal
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from relay.cli.embedded_redis import free_port
from tests.support import ROOT
from tests.support.deployment import RelayDeployment
from tests.support.helpers import wait_for

pytestmark = pytest.mark.integration

FORGED = "1999-12-31 23:59:59,000 INFO relay.delivery: delivered event_id=evt_forged"


@pytest.fixture
def web(deployment: RelayDeployment) -> Iterator[tuple[int, Path]]:
    """``relay web`` (one process) with its access log on: its port and its output."""
    deployment.configure({"sources": {"kickofflabs": {}}, "destinations": []})
    port, log = free_port(), deployment.tmp / "web.log"
    env = {**deployment.env, "RELAY_ACCESS_LOG": "1"}
    with log.open("ab") as output:
        process = subprocess.Popen(
            [sys.executable, "-m", "relay", "web", "--host", "127.0.0.1", "--port", str(port),
             "--workers", "1"],
            env=env, stdout=output, stderr=subprocess.STDOUT, cwd=ROOT, start_new_session=True)

    def healthy() -> bool:
        if process.poll() is not None:
            raise AssertionError(log.read_text(errors="replace")[-3000:])
        with contextlib.suppress(OSError):
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=1)
            conn.request("GET", "/healthz")
            return conn.getresponse().status == 200
        return False

    try:
        wait_for(healthy, timeout=30, interval=0.1, message="relay web to answer")
        yield port, log
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(15)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()


def send(port: int, request_line: str, body: bytes = b"") -> bytes:
    head = (f"{request_line}\r\nHost: 127.0.0.1\r\nConnection: close\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n")
    with socket.create_connection(("127.0.0.1", port), timeout=15) as sock:
        sock.sendall(head.encode("latin-1") + body)
        answer = b""
        while chunk := sock.recv(65536):
            answer += chunk
    return answer


def test_a_request_path_cannot_write_a_line_of_its_own(web: tuple[int, Path]) -> None:
    port, log = web
    forged = "/x%0a" + FORGED.replace(" ", "%20") + "%00%1b]0;pwned%07"
    assert send(port, f"GET {forged} HTTP/1.1").startswith(b"HTTP/1.1 404")
    refused = send(port, "POST /hooks/evil%0aforged%00 HTTP/1.1", b"{}")
    assert refused.startswith(b"HTTP/1.1 404")
    # gunicorn writes its access line once the answer is sent: wait for both lines.
    wait_for(lambda: log.read_bytes().count(b"evt_forged") and b"evil" in log.read_bytes(),
             timeout=15, message="the access log and the ingress log lines")
    written = log.read_bytes()
    assert b"\x00" not in written and b"\x1b" not in written and b"\x07" not in written
    text = written.decode()
    assert not [line for line in text.splitlines() if line.startswith(FORGED[:10])], text
    assert f"/x\\n{FORGED}\\x00\\x1b]0;pwned\\x07" in text  # the access log, escaped
    assert 'source="evil\\nforged\\u0000"' in text  # the ingress's own line
