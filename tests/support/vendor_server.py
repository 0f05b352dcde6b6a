"""A local stand-in for a vendor API: records every request, answers scripted responses.

::

    from tests.support.vendor_server import VendorServer

    def test_upsert(vendor: VendorServer) -> None:  # the fixture: tests/integration/conftest.py
        vendor.reply(429, {"message": "slow down"}, headers={"Retry-After": "7"})
        ...  # the driver sends to vendor.url
        assert vendor.requests[0].path == "/crm/v3/objects/contacts/batch/upsert"

Scripted replies are used first-in first-out, each optionally bound to a method and path; a
request no script matches gets the default reply (200 ``{}``). It runs on the tests' one
loopback server (``loopback.py``): only 127.0.0.1 is bound.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Mapping
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler
from typing import Any

from tests.support.loopback import LoopbackHTTPServer


@dataclass(frozen=True)
class RecordedRequest:
    method: str
    path: str  # with the query string, as sent
    headers: Mapping[str, str]  # keys lower-cased
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)

    def header(self, name: str) -> str | None:
        return self.headers.get(name.lower())


@dataclass
class ScriptedReply:
    status: int
    body: bytes
    headers: dict[str, str] = field(default_factory=dict)
    method: str | None = None
    path: str | None = None

    def matches(self, method: str, path: str) -> bool:
        return (self.method is None or self.method == method) and (
            self.path is None or self.path == path
        )


class VendorServer:
    def __init__(self) -> None:
        self.requests: list[RecordedRequest] = []
        self._scripts: list[ScriptedReply] = []
        self._default = ScriptedReply(200, b"{}", {"Content-Type": "application/json"})
        self._lock = threading.Lock()
        self._httpd = LoopbackHTTPServer(self._handler_class())

    @property
    def url(self) -> str:
        return self._httpd.url

    def reply(
        self,
        status: int = 200,
        body: Any = None,
        *,
        headers: Mapping[str, str] | None = None,
        method: str | None = None,
        path: str | None = None,
        content_type: str = "application/json",
    ) -> None:
        """Script the next matching answer. ``body`` may be bytes, str, or JSON-able."""
        raw = _encode(body)
        all_headers = dict(headers or {})
        if raw:
            all_headers.setdefault("Content-Type", content_type)
        with self._lock:
            self._scripts.append(ScriptedReply(status, raw, all_headers, method, path))

    def _answer_for(self, method: str, path: str) -> ScriptedReply:
        with self._lock:
            for index, script in enumerate(self._scripts):
                if script.matches(method, path):
                    return self._scripts.pop(index)
        return self._default

    def _handler_class(self) -> type[BaseHTTPRequestHandler]:
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def _serve(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else b""
                headers = {key.lower(): value for key, value in self.headers.items()}
                with server._lock:
                    server.requests.append(RecordedRequest(self.command, self.path, headers, body))
                answer = server._answer_for(self.command, self.path)
                self.send_response(answer.status)
                for name, value in answer.headers.items():
                    self.send_header(name, value)
                self.send_header("Content-Length", str(len(answer.body)))
                self.end_headers()
                if answer.body:
                    self.wfile.write(answer.body)

            do_GET = do_POST = do_PUT = do_PATCH = do_DELETE = _serve

            def log_message(self, format: str, *args: Any) -> None:  # keep test output quiet
                pass

        return Handler

    def start(self) -> VendorServer:
        self._httpd.start()
        return self

    def stop(self) -> None:
        self._httpd.stop()


def _encode(body: Any) -> bytes:
    if body is None:
        return b""
    if isinstance(body, bytes):
        return body
    if isinstance(body, str):
        return body.encode()
    return json.dumps(body).encode()

