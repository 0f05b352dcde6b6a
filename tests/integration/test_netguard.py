"""The SSRF guard at delivery: the address a connection really reaches is checked before any
byte is sent, against a raw TCP server on 127.0.0.1 that records every byte it receives (TLS
too). The URL and address checks themselves: tests/unit/test_netguard.py."""

from __future__ import annotations

import queue
import re
import shutil
import socket
import ssl
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
import urllib3

from relay.core.errors import PermanentDeliveryError, UnsafeURLError
from relay.drivers import ssrf_guard as netguard
from relay.drivers.http import HttpClient
from relay.drivers.ssrf_guard import AddressGuard

PUBLIC_V4 = "93.184.216.34"  # never contacted: only returned by fake resolvers


def resolving_to(*addresses: str) -> netguard.Resolver:
    return lambda host, port: list(addresses)


# -- delivery: the connected address ---------------------------------------------------------

class RecordingServer:
    """A one-connection-at-a-time TCP server on 127.0.0.1 recording the bytes of each
    connection; it answers 200 to anything that looks like an HTTP request. Optional TLS."""

    def __init__(self, tls: ssl.SSLContext | None = None) -> None:
        self.received: queue.Queue[bytes] = queue.Queue()
        self.sni: list[str | None] = []
        self._tls = tls
        self._sock = socket.create_server(("127.0.0.1", 0))
        self.port = self._sock.getsockname()[1]
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self._sock.accept()
            except OSError:
                return
            with conn:
                self.received.put(self._handle(conn))

    def _handle(self, conn: socket.socket) -> bytes:
        conn.settimeout(5)
        stream: socket.socket = conn
        data = b""
        try:
            if self._tls is not None:
                first = conn.recv(1, socket.MSG_PEEK)
                if not first:
                    return b""
                stream = self._tls.wrap_socket(conn, server_side=True)
            while b"\r\n\r\n" not in data:
                chunk = stream.recv(65536)
                if not chunk:
                    return data
                data += chunk
            # Read the body too: closing with unread bytes makes the kernel send a reset,
            # which the client may see before the answer.
            head, _, body = data.partition(b"\r\n\r\n")
            length = re.search(rb"(?i)\r\ncontent-length:\s*(\d+)", head)
            while length and len(body) < int(length.group(1)):
                chunk = stream.recv(65536)
                if not chunk:
                    break
                body += chunk
                data += chunk
            stream.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok")
        except (OSError, ssl.SSLError):
            pass
        return data

    def drain(self) -> list[bytes]:
        """Everything received so far: a marker connection proves earlier ones were seen."""
        with socket.create_connection(("127.0.0.1", self.port)) as marker:
            marker.sendall(b"MARKER\r\n\r\n")
            marker.recv(100)
        seen = []
        while (item := self.received.get(timeout=5)) != b"MARKER\r\n\r\n":
            seen.append(item)
        return seen

    def close(self) -> None:
        self._sock.close()


@pytest.fixture
def server() -> Iterator[RecordingServer]:
    srv = RecordingServer()
    yield srv
    srv.close()


def client(guard: AddressGuard) -> HttpClient:
    return HttpClient(pool=guard.pool_manager())


@pytest.mark.parametrize("scheme", ["http", "https"])
def test_a_rebound_host_is_refused_at_the_connected_address_before_any_byte(
    server: RecordingServer, scheme: str
) -> None:
    # The guard's lookup says public (as at registration); the connection's lookup gives
    # loopback, as a rebinding DNS server would.
    guard = AddressGuard(["10.0.0.0/8"], resolver=resolving_to(PUBLIC_V4))
    with pytest.raises(UnsafeURLError, match="localhost resolves to 127.0.0.1") as info:
        client(guard).request("POST", f"{scheme}://localhost:{server.port}/h", body=b"{}")
    assert isinstance(info.value, PermanentDeliveryError)
    assert server.drain() == [b""]  # connected, then closed: not even a TLS ClientHello


def test_a_host_resolving_to_a_refused_address_is_not_even_connected(
    server: RecordingServer,
) -> None:
    guard = AddressGuard(resolver=resolving_to("127.0.0.1"))
    with pytest.raises(UnsafeURLError):
        client(guard).request("POST", f"http://localhost:{server.port}/h", body=b"{}")
    with pytest.raises(UnsafeURLError):
        client(guard).request("POST", f"http://127.0.0.1:{server.port}/h", body=b"{}")
    assert server.drain() == []


def test_the_raw_pool_manager_raises_unsafe_url_error_too(server: RecordingServer) -> None:
    pool = AddressGuard(resolver=resolving_to(PUBLIC_V4)).pool_manager(maxsize=2)
    with pytest.raises(UnsafeURLError):
        pool.request("GET", f"http://localhost:{server.port}/", retries=False)
    assert server.drain() == [b""]


@pytest.mark.parametrize("host", ["localhost", "127.0.0.1"])
def test_an_allowed_network_is_delivered(server: RecordingServer, host: str) -> None:
    guard = AddressGuard.from_env("127.0.0.0/8")
    response = client(guard).request(
        "POST", f"http://{host}:{server.port}/hook", body=b'{"a": 1}',
        headers={"Content-Type": "application/json"},
    )
    assert response.status == 200
    (request,) = server.drain()
    assert request.startswith(b"POST /hook HTTP/1.1\r\n")


@pytest.fixture(scope="module")
def certificate(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    if shutil.which("openssl") is None:
        pytest.skip("openssl is needed to make a test certificate")
    directory = tmp_path_factory.mktemp("tls")
    cert, key = directory / "cert.pem", directory / "key.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2",
         "-subj", "/CN=localhost", "-addext", "subjectAltName=DNS:localhost",
         "-keyout", str(key), "-out", str(cert)],
        check=True, capture_output=True,
    )
    return cert, key


def test_https_still_verifies_certificates_and_sends_sni(certificate: tuple[Path, Path]) -> None:
    cert, key = certificate
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(cert, key)
    tls_server = RecordingServer(tls=context)
    context.sni_callback = lambda sock, name, ctx: tls_server.sni.append(name)
    try:
        guard = AddressGuard(["127.0.0.0/8"])
        trusted = HttpClient(pool=guard.pool_manager(ca_certs=str(cert)))
        url = f"https://localhost:{tls_server.port}/hook"
        assert trusted.request("POST", url, body=b"{}").status == 200
        assert tls_server.sni == ["localhost"]
        # Without the test CA the self-signed certificate is refused, as it must be.
        with pytest.raises(urllib3.exceptions.SSLError):
            guard.pool_manager().request("POST", url, body=b"{}", retries=False)
    finally:
        tls_server.close()
