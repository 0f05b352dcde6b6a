"""Bad input end to end: raw HTTP (so CRLF, bad framing and huge bodies can be sent) to the real
gunicorn server `relay web` starts, on a real Redis, with a real worker behind it. The ingress
must never answer 500 and never hang, and the valid events sent in the same run must all be
delivered. tests/unit/test_ingress.py has the unit table on fakeredis; this is the wire variant."""

from __future__ import annotations

import contextlib
import http.client
import itertools
import json
import os
import signal
import socket
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from typing import Any
from urllib.parse import urlencode

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from relay.cli.embedded_redis import free_port
from tests.support import ROOT
from tests.support.deployment import RelayDeployment
from tests.support.helpers import wait_for
from tests.support.loopback import Sink
from tests.support.samples import sample

pytestmark = pytest.mark.integration

TOKEN = "s3cret-token-0123456789"
HOOK = f"/hooks/kickofflabs?token={TOKEN}"
#: What bad input may get: our 4xx, gunicorn's 400 for malformed HTTP. Never a 5xx.
REFUSED = {400, 401, 413, 415, 422}
CLOSED = None  # the server closed the connection without an answer (bad framing only)


def raw_request(body: bytes = b"", content_type: str | None = "application/json",
                path: str = HOOK, headers: list[str] | None = None,
                length: int | None = None) -> bytes:
    lines = [f"POST {path} HTTP/1.1", "Host: 127.0.0.1", "Connection: close"]
    if content_type is not None:
        lines.append(f"Content-Type: {content_type}")
    lines += headers or []
    if length is not None or "Transfer-Encoding: chunked" not in (headers or []):
        lines.append(f"Content-Length: {len(body) if length is None else length}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body


def exchange(port: int, data: bytes, half_close: bool = False,
             timeout: float = 15.0) -> tuple[int | None, bytes]:
    """Send ``data`` (from a thread: the server may answer a huge body before reading it) and
    read the answer. A socket timeout propagates: a hung ingress fails the test."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:

        def send() -> None:
            with contextlib.suppress(OSError):
                sock.sendall(data)
                if half_close:
                    sock.shutdown(socket.SHUT_WR)

        sender = threading.Thread(target=send, daemon=True)
        sender.start()
        response = http.client.HTTPResponse(sock, method="POST")
        try:
            response.begin()
            body = response.read()
        except (ConnectionResetError, BrokenPipeError, http.client.RemoteDisconnected):
            return CLOSED, b""
        sender.join(timeout)
        return response.status, body


def chunked(body: bytes, size: int = 65536) -> bytes:
    parts = [f"{len(body[i:i + size]):x}\r\n".encode() + body[i:i + size] + b"\r\n"
             for i in range(0, len(body), size)]
    return b"".join(parts) + b"0\r\n\r\n"


def lead(n: int) -> dict[str, Any]:
    payload = sample("new_signup")
    payload["social_id"] = f"valid{n}"
    return payload


@pytest.fixture
def relay_web(deployment: RelayDeployment, sink: Sink) -> Iterator[int]:
    """`relay web` (gunicorn, 1 process x 4 threads) and one worker, delivering every event to
    ``sink``/all."""
    deployment.configure({
        "sources": {"kickofflabs": {"token": TOKEN}},
        "destinations": [{"name": "all", "type": "webhook", "url": f"{sink.url}/all",
                          "events": ["*"], "timeout": "3s"}],
    })
    port = free_port()
    log = (deployment.tmp / "web.log").open("ab")
    process = subprocess.Popen(
        [sys.executable, "-m", "relay", "web", "--host", "127.0.0.1", "--port", str(port),
         "--workers", "1", "--threads", "4"],
        env=deployment.env, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT,
        start_new_session=True,
    )

    def healthy() -> bool:
        if process.poll() is not None:
            raise AssertionError((deployment.tmp / "web.log").read_text()[-3000:])
        with contextlib.suppress(OSError):
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=1)
            conn.request("GET", "/healthz")
            return conn.getresponse().status == 200
        return False

    try:
        wait_for(healthy, timeout=20, interval=0.1, message="relay web to answer")
        deployment.start_worker()
        yield port
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(10)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()


def _form(n: int) -> bytes:
    return ("&".join(f"f{i}=x" for i in range(n))).encode()


def _nested(depth: int) -> bytes:
    return b'{"__event": "new_signup", "email": "a@example.com", "x": ' + b"[" * depth + \
        b"]" * depth + b"}"


BIG = b'{"__event": "new_signup", "email": "a@example.com", "pad": "' + b"x" * (10 << 20) + b'"}'
VALID = json.dumps(sample("new_signup")).encode()

#: name -> (raw request, allowed answers)
TABLE: dict[str, tuple[bytes, set[int | None]]] = {
    "empty body": (raw_request(b""), {400}),
    "missing Content-Type": (raw_request(VALID, content_type=None), {415}),
    "wrong Content-Type": (raw_request(VALID, content_type="text/plain"), {415}),
    "10 MB body": (raw_request(BIG), {413, CLOSED}),
    "invalid UTF-8": (raw_request(b'{"__event": "new_signup", "email": "\xff\xfe"}'), {400}),
    "lone surrogate": (raw_request(b'{"__event": "new_signup", "email": "\\ud800"}'), {400}),
    "deeply nested JSON": (raw_request(_nested(100_000)), {400}),
    "duplicate keys": (raw_request(b'{"__event": "new_signup", "email": "a@example.com", '
                                   b'"email": "b@example.com"}'), {400}),
    "NaN": (raw_request(b'{"__event": "new_signup", "email": "a@example.com", "score": NaN}'),
            {400}),
    "Infinity": (raw_request(b'{"__event": "new_signup", "id": 1, "score": -Infinity}'), {400}),
    "JSON array": (raw_request(b"[1, 2]"), {422}),
    "no __event": (raw_request(b'{"email": "a@example.com"}'), {422}),
    "no identity": (raw_request(b'{"__event": "new_signup"}'), {422}),
    "100,000 form fields": (raw_request(_form(100_000),
                                        "application/x-www-form-urlencoded"), {413}),
    "2,000 multipart parts": (raw_request(
        b"".join(b"--b\r\nContent-Disposition: form-data; name=\"f%d\"\r\n\r\nx\r\n" % i
                 for i in range(2000)) + b"--b--\r\n", "multipart/form-data; boundary=b"),
        {413}),
    "empty form": (raw_request(b"", "application/x-www-form-urlencoded"), {400}),
    "CRLF folded into a header value": (raw_request(VALID, headers=["X-Note: a\r\n b"]),
                                        {400}),
    "bare CR in a header value": (raw_request(VALID, headers=["X-Note: a\rInjected: b"]), {400}),
    "NUL in a header value": (raw_request(VALID, headers=["X-Note: a\x00b"]), {400}),
    "control character in Idempotency-Key": (raw_request(VALID,
                                                         headers=["Idempotency-Key: a\tb"]),
                                             {400}),
    "100 KB header": (raw_request(VALID, headers=["X-Note: " + "a" * 100_000]), {400, 431}),
    "no token": (raw_request(VALID, path="/hooks/kickofflabs"), {401}),
    "wrong token": (raw_request(VALID, path="/hooks/kickofflabs?token=nope"), {401}),
    "stale token (before rotation)": (raw_request(
        VALID, path="/hooks/kickofflabs?token=s3cret-token-old"), {401}),
    "forged token (one character off)": (raw_request(
        VALID, path=f"/hooks/kickofflabs?token={TOKEN[:-1]}X"), {401}),
    "token prefix": (raw_request(VALID, path=f"/hooks/kickofflabs?token={TOKEN[:5]}"), {401}),
    "token with invalid percent-encoding": (raw_request(
        VALID, path="/hooks/kickofflabs?token=%FF%FE"), {401}),
    "wrong X-Relay-Token": (raw_request(VALID, path="/hooks/kickofflabs",
                                        headers=["X-Relay-Token: nope"]), {401}),
    "non-ASCII X-Relay-Token": (raw_request(VALID, path="/hooks/kickofflabs",
                                            headers=["X-Relay-Token: s3cr\xe9t"]), {400, 401}),
    "unknown source": (raw_request(VALID, path="/hooks/nobody"), {404}),
    "Content-Length not a number": (raw_request(VALID, length=None).replace(
        f"Content-Length: {len(VALID)}".encode(), b"Content-Length: abc"), {400}),
    "negative Content-Length": (raw_request(VALID).replace(
        f"Content-Length: {len(VALID)}".encode(), b"Content-Length: -5"), {400}),
    "Content-Length and chunked": (raw_request(
        chunked(VALID), headers=["Transfer-Encoding: chunked"], length=len(VALID)), {400}),
    "bad chunk size": (raw_request(b"zz\r\nabc\r\n0\r\n\r\n",
                                   headers=["Transfer-Encoding: chunked"]), {400}),
    "garbage request line": (b"PO ST /hooks/kickofflabs HTTP/9.9\r\n\r\n", {400}),
}


def post_valid(port: int, n: int) -> str:
    status, body = exchange(port, raw_request(json.dumps(lead(n)).encode()))
    assert status == 202, body
    return str(json.loads(body)["event_id"])


@pytest.mark.timeout(120)
def test_bad_input_table_never_500_and_valid_events_still_arrive(
    relay_web: int, sink: Sink
) -> None:
    port = relay_web
    expected = set()
    answers: dict[str, int | None] = {}
    for n, (name, (data, allowed)) in enumerate(TABLE.items()):
        status, body = exchange(port, data)
        answers[name] = status
        assert status in allowed, f"{name}: {status} {body[:300]!r}"
        expected.add(post_valid(port, n))  # interleaved: bad input must not disturb the next
    # A form field given twice is a 400, as a JSON key twice is (issue 18: the last one used
    # to win, so __event=new_signup&__event=deleted was stored as deleted).
    form = urlencode([("__event", "new_signup"), ("social_id", "first"),
                      ("social_id", "formrepeat"), ("email", "r@example.com")]).encode()
    status, body = exchange(port, raw_request(form, "application/x-www-form-urlencoded"))
    assert status == 400 and b"given more than once" in body, body
    expected.add(post_valid(port, len(TABLE)))
    print("\n" + "\n".join(f"  {name}: {status}" for name, status in answers.items()))

    wait_for(lambda: {r.headers["webhook-id"] for r in sink.requests("/all")} >= expected,
             timeout=30, interval=0.2, message="every valid event delivered")
    assert not [r for r in sink.requests("/all")
                if r.json().get("social_id") in ("first", "formrepeat")]


@pytest.mark.timeout(60)
def test_body_shorter_than_its_content_length_is_refused(relay_web: int) -> None:
    # A lead whose form body was cut mid-value would otherwise be stored with the cut value.
    cut = urlencode([("__event", "new_signup"), ("email", "cut@example.com"),
                     ("custom_fields[company]", "Analytical Engines Ltd")]).encode()[:-8]
    status, _ = exchange(relay_web, raw_request(cut, "application/x-www-form-urlencoded",
                                                length=len(cut) + 8), half_close=True)
    assert status in {400, CLOSED}  # an answer or a close; never a hang, never a 202


@pytest.mark.timeout(60)
def test_chunked_body_over_the_limit_is_refused_with_413(relay_web: int) -> None:
    padded = json.dumps(lead(999)).encode() + b" " * (2 << 20)
    answers = {
        "10 MB chunked": exchange(relay_web, raw_request(
            chunked(BIG), headers=["Transfer-Encoding: chunked"]))[0],
        "valid lead + 2 MB whitespace, chunked": exchange(relay_web, raw_request(
            chunked(padded), headers=["Transfer-Encoding: chunked"]))[0],
    }
    assert answers == {name: 413 for name in answers}, answers


JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=True) | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10), inner,
                                                                 max_size=4),
    max_leaves=20,
)
CONTENT_TYPES = st.sampled_from([
    "application/json", "application/x-www-form-urlencoded", "text/plain", None,
    "application/vnd.api+json", "multipart/form-data; boundary=x",
    "application/json; charset=utf-8",
])


@pytest.mark.timeout(120)
def test_random_input_never_500_and_every_accepted_event_arrives(
    relay_web: int, sink: Sink
) -> None:
    port = relay_web
    accepted: set[str] = set()
    statuses: list[int | None] = []

    def check(data: bytes) -> None:
        status, body = exchange(port, data)
        statuses.append(status)
        assert status in REFUSED | {202}, f"{status} {body[:300]!r} for {data[:300]!r}"
        if status == 202:
            accepted.add(json.loads(body)["event_id"])

    serial = itertools.count(1000)
    quick = settings(max_examples=60, deadline=None, database=None,
                     suppress_health_check=list(HealthCheck))

    @quick
    @given(st.binary(max_size=2000), CONTENT_TYPES)
    def random_bytes(body: bytes, content_type: str | None) -> None:
        check(raw_request(body, content_type))

    @quick
    @given(st.dictionaries(st.text(max_size=15), JSON_VALUES, max_size=6), st.booleans())
    def random_json(extra: dict[str, Any], with_lead: bool) -> None:
        # A fresh lead each time, so the accepted events are distinct, not deduped.
        payload: dict[str, Any] = {**lead(next(serial)), **extra} if with_lead else extra
        check(raw_request(json.dumps(payload).encode()))

    @quick
    @given(st.lists(st.tuples(st.text(max_size=12), st.text(max_size=12)), max_size=20),
           st.booleans())
    def random_form(pairs: list[tuple[str, str]], with_lead: bool) -> None:
        base = [("__event", "new_signup"), ("email", f"f{next(serial)}@example.com")
                ] if with_lead else []
        check(raw_request(urlencode(base + pairs).encode(), "application/x-www-form-urlencoded"))

    tests: list[Callable[[], None]] = [random_bytes, random_json, random_form]
    for test in tests:
        test()
    assert 202 in statuses  # the generators do reach the accepting path
    print(f"\nrandom input: {len(statuses)} requests, {statuses.count(202)} accepted, "
          f"{len(accepted)} distinct events")
    wait_for(lambda: {r.headers["webhook-id"] for r in sink.requests("/all")} >= accepted,
             timeout=30, interval=0.2, message="every accepted random event delivered")
