"""Servers on 127.0.0.1 for the tests, and ports where nothing answers.

Every HTTP server the tests run is a :class:`LoopbackHTTPServer`: a threaded server bound to a
free port of 127.0.0.1 (and nowhere else), served from a daemon thread; its request handler
class says what it answers. The recording :class:`Sink` below, the vendor stand-in
(``vendor_server.py``) and the fault tests' sink that never answers are handlers on it, and
:func:`serve_app` puts a WSGI app (the relay's Flask app) on it.

::

    sink = start_sink()
    sink.script("/crm", [503, (429, {"Retry-After": "7"})])   # then 200s
    ...  # a destination posts to f"{sink.url}/crm"
    assert [r.json()["email"] for r in sink.requests("/crm")] == [...]
    sink.stop()
"""

from __future__ import annotations

import json
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import TYPE_CHECKING, Any, Self
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer

if TYPE_CHECKING:
    from _typeshed.wsgi import WSGIApplication


class LoopbackHTTPServer(ThreadingHTTPServer):
    """``handler`` on a free port of 127.0.0.1: ``start()``, use ``url``, ``stop()`` (or use it
    as a context manager). One thread per connection, all daemons: a request left hanging never
    keeps the test run alive."""

    # socketserver listens with a backlog of 5: a drainer opening its window (tens of
    # connections at once) met resets a real receiver would not give.
    request_queue_size = 128

    def __init__(self, handler: type[BaseHTTPRequestHandler]) -> None:
        super().__init__(("127.0.0.1", 0), handler)
        # A short poll: stop() returns within 50 ms instead of the default half second.
        self._thread = threading.Thread(target=self.serve_forever, args=(0.05,), daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"

    def start(self) -> Self:
        self._thread.start()
        return self

    def stop(self) -> None:
        self.shutdown()
        self.server_close()
        self._thread.join(timeout=5)

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()


class _WSGIServer(LoopbackHTTPServer, WSGIServer):
    """The standard library's WSGI server on the loopback server's socket and thread."""


class _QuietWSGIRequestHandler(WSGIRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:  # keep test output quiet
        pass


@contextmanager
def serve_app(app: WSGIApplication) -> Iterator[str]:
    """``app`` served over real HTTP on a loopback port; yields its base URL."""
    server = _WSGIServer(_QuietWSGIRequestHandler)
    server.set_app(app)
    with server:
        yield server.url


# -- the recording sink ----------------------------------------------------------------------


@dataclass
class Received:
    method: str
    path: str
    headers: dict[str, str]
    body: bytes
    at: float

    def json(self) -> Any:
        return json.loads(self.body)


@dataclass
class Sink:
    """A loopback HTTP server that records every request. ``script(path, [500, 500, 200])``
    answers the next requests to ``path`` with those statuses (then 200); an item may be a
    tuple ``(status, headers)``; ``delay`` slows every answer."""

    server: LoopbackHTTPServer | None = None
    received: list[Received] = field(default_factory=list)
    scripts: dict[str, list[Any]] = field(default_factory=dict)
    delay: float = 0.0
    lock: threading.Lock = field(default_factory=threading.Lock)

    @property
    def url(self) -> str:
        assert self.server is not None
        return self.server.url

    def script(self, path: str, answers: list[Any]) -> None:
        with self.lock:
            self.scripts[path] = list(answers)

    def requests(self, path: str | None = None) -> list[Received]:
        with self.lock:
            return [r for r in self.received if path is None or r.path == path]

    def answer(self, path: str) -> tuple[int, dict[str, str]]:
        with self.lock:
            queue = self.scripts.get(path)
            item = queue.pop(0) if queue else 200
        return item if isinstance(item, tuple) else (item, {})

    def stop(self) -> None:
        assert self.server is not None
        self.server.stop()


def start_sink() -> Sink:
    """A running :class:`Sink`; ``stop()`` it when done (the ``sink`` fixture does)."""
    sink = Sink()

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"
        disable_nagle_algorithm = True  # headers and body go out in two writes

        def do_POST(self) -> None:  # noqa: N802
            length = int(self.headers.get("Content-Length") or 0)
            body = self.rfile.read(length)
            path = self.path.split("?")[0]
            with sink.lock:
                sink.received.append(Received("POST", path, dict(self.headers.items()), body,
                                              time.time()))
            if sink.delay:
                time.sleep(sink.delay)
            status, headers = sink.answer(path)
            payload = b'{"ok": true}' if status < 300 else b'{"error": "scripted"}'
            self.send_response(status)
            for name, value in headers.items():
                self.send_header(name, value)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            self.wfile.write(payload)

        def log_message(self, *args: Any) -> None:
            pass

    sink.server = LoopbackHTTPServer(Handler).start()
    return sink


# -- ports where nothing answers -------------------------------------------------------------


def free_port() -> int:
    """A port of 127.0.0.1 that nothing listens on right now (bound, then closed): free for a
    server to listen on, and refusing connections until one does."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port


closed_port = free_port  # the same port, named for a test that wants its connection refused


@contextmanager
def silent_server() -> Iterator[str]:
    """A loopback URL whose server accepts the connection (kernel backlog) but never answers,
    so a client's read times out."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    sock.listen(16)
    try:
        host, port = sock.getsockname()
        yield f"http://{host}:{port}"
    finally:
        sock.close()
