"""The outgoing HTTP client shared by the HTTP drivers: one pooled urllib3 manager per process.

Redirects are never followed and urllib3's own retries are off: the relay's retry policy is
the only one. Library errors are translated here into the relay's delivery errors, and HTTP
statuses are classified here once (SPEC §4) so every driver answers the same way; a driver
whose vendor documents more retryable answers (HubSpot's 423 and 477) passes them as
``retryable`` (see :data:`RetryableAnswers`).
"""

from __future__ import annotations

import email.utils
import functools
import json
import os
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import urllib3

from relay.core.errors import PermanentDeliveryError, RetryableDeliveryError

RETRYABLE_STATUSES = frozenset({408, 425, 429})
#: A vendor's own retryable answers: status -> the least wait in seconds (a floor under any
#: ``Retry-After``), or None to wait what its ``Retry-After`` says (else the schedule's delay).
RetryableAnswers = Mapping[int, float | None]
USER_AGENT = "KickoffLabs"


@dataclass(frozen=True)
class HttpResponse:
    status: int
    headers: Mapping[str, str]
    body: bytes

    def text(self, limit: int = 300) -> str:
        return self.body[:limit].decode("utf-8", "replace")

    def json_object(self) -> dict[str, Any]:
        """The body as a JSON object, or ``{}`` when it is empty, not JSON, or not an object
        (APIs answer errors in many shapes; callers look up the keys they know)."""
        try:
            value = json.loads(self.body) if self.body else {}
        except ValueError:
            return {}
        return value if isinstance(value, dict) else {}


class HttpClient:
    """A thin, pooled client. ``pool`` may be any urllib3 ``PoolManager`` (the SSRF guard
    passes one whose connections check the address they connected to)."""

    def __init__(self, pool: urllib3.PoolManager | None = None, maxsize: int = 8) -> None:
        self._pool = pool or urllib3.PoolManager(num_pools=64, maxsize=maxsize, block=False)
        # The manager's pool of each origin, looked up once: PoolManager.request parses the
        # URL and builds a pool key on every request (a few per cent of a fast delivery's
        # CPU). A pool the manager has since closed (evicted) is looked up again.
        self._origins: dict[tuple[str, str, int | None], urllib3.HTTPConnectionPool] = {}

    def request(
        self,
        method: str,
        url: str,
        *,
        body: bytes | None = None,
        headers: Mapping[str, str] | None = None,
        timeout: float = 10.0,
    ) -> HttpResponse:
        deadline = time.monotonic() + timeout
        try:
            scheme, host, port, target = _split_url(url)
            response = self._origin(scheme, host, port).urlopen(
                method,
                target,
                body=body,
                headers=dict(headers or {}),
                timeout=_timeout(timeout),
                retries=False,
                redirect=False,
                assert_same_host=False,
                preload_content=False,
            )
            data = _read_by(response, deadline, timeout)
        except PermanentDeliveryError:
            raise  # the SSRF guard refused the connected address
        except urllib3.exceptions.TimeoutError as exc:
            raise RetryableDeliveryError(f"timed out after {timeout:g}s: {exc}") from exc
        except urllib3.exceptions.LocationParseError as exc:
            raise PermanentDeliveryError(f"invalid URL: {exc}") from exc
        except urllib3.exceptions.HTTPError as exc:
            reason = getattr(exc, "reason", None)
            if isinstance(reason, PermanentDeliveryError):
                raise reason from exc
            raise RetryableDeliveryError(f"connection failed: {exc}") from exc
        return HttpResponse(response.status, response.headers, data)

    def _origin(self, scheme: str, host: str, port: int | None) -> urllib3.HTTPConnectionPool:
        key = (scheme, host, port)
        pool = self._origins.get(key)
        if pool is None or pool.pool is None:  # not looked up yet, or closed by the manager
            pool = self._pool.connection_from_host(host, port=port, scheme=scheme)
            self._origins[key] = pool
        return pool

    def clear(self) -> None:
        self._origins.clear()
        self._pool.clear()


@functools.lru_cache(maxsize=4096)  # a destination's URL, request after request
def _split_url(url: str) -> tuple[str, str, int | None, str]:
    """(scheme, host, port, request target) of an absolute http(s) URL."""
    parsed = urllib3.util.parse_url(url)
    if not parsed.host:
        raise urllib3.exceptions.LocationParseError(f"{url!r}: no host")
    return (parsed.scheme or "http").lower(), parsed.host, parsed.port, parsed.request_uri


@functools.lru_cache(maxsize=64)
def _timeout(seconds: float) -> urllib3.Timeout:
    # total: the wait for the answer's headers shrinks with the time connecting took
    return urllib3.Timeout(connect=min(seconds, 5.0), read=seconds, total=seconds)


#: Answers are read for their status and a message; a longer body is cut here.
MAX_ANSWER_BYTES = 1024 * 1024


def _read_by(response: Any, deadline: float, timeout: float) -> bytes:
    """The answer's body, read before ``deadline``: a read timeout bounds each wait for bytes,
    not a receiver that trickles them, so a delivery's whole answer is held to its timeout
    here (Celery's threads pool, which runs the sends, enforces no time limit of its own)."""
    chunks: list[bytes] = []
    size = 0
    try:
        while size < MAX_ANSWER_BYTES:
            if time.monotonic() > deadline:
                response.close()  # mid-body: the connection cannot be reused
                raise urllib3.exceptions.ReadTimeoutError(
                    None, None, f"the answer took longer than {timeout:g}s")  # type: ignore[arg-type]
            chunk = response.read1(64 * 1024)  # what one receive gives: never waits for more
            if not chunk:
                break
            chunks.append(chunk)
            size += len(chunk)
        else:
            response.close()  # the rest is never read: the connection cannot be reused
    finally:
        response.release_conn()
    return b"".join(chunks)[:MAX_ANSWER_BYTES]


def parse_retry_after(value: str | None, now: float | None = None) -> float | None:
    """Seconds to wait from a ``Retry-After`` header (delta-seconds or an HTTP date)."""
    if not value:
        return None
    value = value.strip()
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - (now if now is not None else time.time()))


def raise_for_status(response: HttpResponse, what: str = "destination",
                     retryable: RetryableAnswers | None = None) -> None:
    """Classify an answer: 2xx returns; 408/425/429/5xx and the statuses in ``retryable`` are
    retryable (``Retry-After`` kept, raised to the status's floor in ``retryable``); 410 is
    permanent and *gone*; every other status is permanent."""
    status = response.status
    if 200 <= status < 300:
        return
    snippet = response.text(200).strip()
    message = f"{what} answered HTTP {status}" + (f": {snippet}" if snippet else "")
    extra = retryable or {}
    if status in RETRYABLE_STATUSES or status >= 500 or status in extra:
        wait = parse_retry_after(response.headers.get("Retry-After"))
        floor = extra.get(status)
        if floor is not None:
            wait = max(wait or 0.0, floor)
        raise RetryableDeliveryError(message, status, wait)
    raise PermanentDeliveryError(message, status, gone=status == 410)


_local = threading.local()
_clients: dict[int, HttpClient] = {}
_clients_lock = threading.Lock()


_pool_size = 100  # RELAY_MAX_IN_FLIGHT, set by configure()


def configure(pool_size: int) -> None:
    """The pool size of the shared client this process creates from now on."""
    global _pool_size
    _pool_size = pool_size


def shared_client() -> HttpClient:
    """The process's pooled client (created after fork, so each process gets its own)."""
    pid = os.getpid()
    client = _clients.get(pid)
    if client is None:
        with _clients_lock:
            client = _clients.get(pid)
            if client is None:
                _clients.clear()
                # One pooled connection per delivery a worker may keep in flight, so none is
                # opened and thrown away per request under load.
                client = _clients[pid] = HttpClient(maxsize=_pool_size)
    return client
