"""gunicorn's configuration for ``relay web`` (``gunicorn -c python:relay.cli.web_server``): the
app sees whole requests, so slow or stalled clients cost a greenlet each, never a turn of the app.

``relay web`` runs gevent workers. In each, a connection is a greenlet: reading a request line
and headers that trickle in, or a body that arrives a byte a second, waits on the socket without
holding anything the other requests need. What the app's turns are limited by is this module's
:class:`WholeRequests`, which each worker wraps around the app (the ``post_worker_init`` hook,
whatever app gunicorn serves, so ``bench.ingress``'s baseline runs on the same server):

* the body is read whole, at most ``RELAY_MAX_BODY_BYTES`` + 1 bytes of it (a declared
  ``Content-Length`` over the limit is left unread: the app answers 413 without reading it),
  before the app is called; it must arrive within gunicorn's ``--timeout`` (``relay web
  --timeout``), else the app is handed a body whose reading raises 408 Request Timeout;
* at most ``--threads`` requests are in the app at once per process (fewer than the process's
  Redis connections, ``RELAY_REDIS_POOL``, so the pool never runs out); the others wait their
  turn.

The request line and headers must arrive within ``--keep-alive`` seconds (gevent workers read
each request under that timeout), or the connection is closed; ``--worker-connections`` (1,000)
bounds the connections of one process, idle, slow or busy.

gunicorn's master imports this module (and the light ``relay.cli`` package) only: gevent
patches each worker after gunicorn forks it, and the app is loaded after that.
"""

from __future__ import annotations

import collections
import io
from collections.abc import Callable, Iterable
from typing import Any

#: The read size while buffering a body (a chunked body is read the same way).
CHUNK = 65536

WSGIApp = Callable[[dict[str, Any], Callable[..., Any]], Iterable[bytes]]


class WholeRequests:
    """A WSGI middleware for gevent workers: read the body whole within ``timeout`` seconds,
    then call ``app`` with at most ``concurrency`` requests inside it at once."""

    def __init__(self, app: WSGIApp, *, limit: int, timeout: float, concurrency: int) -> None:
        self.app = app
        self.limit = limit
        self.timeout = timeout
        self.concurrency = concurrency
        self.gate = FairGate(concurrency)

    def __call__(self, environ: dict[str, Any], start_response: Callable[..., Any]
                 ) -> Iterable[bytes]:
        environ["wsgi.input"] = self.read_body(environ)
        with self.gate:
            # Flask has done the request's work (and popped its context) when it returns.
            return self.app(environ, start_response)

    def read_body(self, environ: dict[str, Any]) -> Any:
        """``wsgi.input`` for the app: the body read whole, or the stream as it was when there
        is nothing to wait for, or a stream that raises what reading it raised."""
        import gevent
        from werkzeug.exceptions import RequestTimeout

        stream = environ["wsgi.input"]
        chunked = "chunked" in environ.get("HTTP_TRANSFER_ENCODING", "").lower()
        try:
            length = int(environ.get("CONTENT_LENGTH") or -1)
        except ValueError:
            return stream  # the app refuses it (gunicorn does first)
        if (length < 0 and not chunked) or length == 0 or length > self.limit:
            return stream  # no body, or one the app refuses with 413 before reading it
        wanted = length if length > 0 else self.limit + 1  # one more: the app sees it is over
        chunks: list[bytes] = []
        received = 0
        timer = gevent.Timeout(self.timeout)
        timer.start()
        try:
            while received < wanted:
                chunk = stream.read(min(CHUNK, wanted - received))
                if not chunk:
                    break  # the client ended the body early: the app sees how short it is
                chunks.append(chunk)
                received += len(chunk)
        except gevent.Timeout as exc:
            if exc is not timer:
                raise
            return Unreadable(RequestTimeout(
                f"the request body did not arrive within {self.timeout:g} seconds"))
        except Exception as exc:  # noqa: BLE001 - bad chunked framing, a reset: the app's to answer
            return Unreadable(exc)
        finally:
            timer.close()
        return io.BytesIO(b"".join(chunks))


class FairGate:
    """At most ``size`` holders at once, served in the order they came.

    gevent's own semaphore lets the greenlet that releases it take it again before a waiter
    wakes up: a keep-alive connection whose next request is already in would keep its turn
    while others wait (seconds at the tail under load). Here a release hands the slot to the
    first waiter directly."""

    def __init__(self, size: int) -> None:
        self.free = size
        self.waiters: collections.deque[Any] = collections.deque()

    def __enter__(self) -> None:
        if self.free > 0 and not self.waiters:
            self.free -= 1
            return
        from gevent.event import Event

        turn = Event()
        self.waiters.append(turn)
        try:
            turn.wait()
        except BaseException:
            if turn.is_set():  # handed the slot as it was cancelled: pass it on
                self._release()
            else:
                self.waiters.remove(turn)
            raise

    def __exit__(self, *exc: object) -> None:
        self._release()

    def _release(self) -> None:
        if self.waiters:
            self.waiters.popleft().set()  # the slot goes to it, not back to the pool
        else:
            self.free += 1


class Unreadable:
    """A ``wsgi.input`` whose reading raises ``error``: what reading the real one raised (the
    app answers bad framing with 400, as it did when it read the socket itself), or 408."""

    def __init__(self, error: BaseException) -> None:
        self.error = error

    def read(self, size: int | None = -1) -> bytes:
        raise self.error

    def readline(self, size: int | None = -1) -> bytes:
        raise self.error

    def readinto(self, buffer: Any) -> int:
        raise self.error

    def __iter__(self) -> Unreadable:
        return self

    def __next__(self) -> bytes:
        raise self.error


def post_worker_init(worker: Any) -> None:
    """gunicorn's hook, in each worker once it has loaded the app: wrap the app."""
    if not type(worker).__module__.endswith("ggevent"):
        worker.log.warning("relay web: %s is not a gevent worker: slow clients hold its "
                           "threads (the app is served as it is)", type(worker).__name__)
        return
    from relay.config.settings import Settings

    settings = Settings.from_env()
    # One Redis connection is the metrics flusher's; each request in the app uses one at most.
    concurrency = max(1, min(worker.cfg.threads, settings.redis_pool - 1))
    worker.wsgi = WholeRequests(worker.wsgi, limit=settings.max_body_bytes,
                                timeout=worker.cfg.timeout, concurrency=concurrency)
