"""The outgoing HTTP client against a real loopback server: how every status, a refused
connection and a read timeout are classified (SPEC §4), and that nothing is retried or followed
behind the relay's back."""

from __future__ import annotations

import email.utils
from datetime import UTC, datetime, timedelta

import pytest

from relay.core.errors import PermanentDeliveryError, RetryableDeliveryError
from relay.drivers.http import HttpClient, raise_for_status, shared_client
from tests.support.loopback import closed_port, silent_server
from tests.support.vendor_server import VendorServer


@pytest.fixture
def http() -> HttpClient:
    return HttpClient()


def post(http: HttpClient, vendor: VendorServer, path: str = "/hook") -> None:
    response = http.request("POST", vendor.url + path, body=b'{"a":1}',
                            headers={"Content-Type": "application/json"}, timeout=5)
    raise_for_status(response, "test sink")


@pytest.mark.parametrize("status", [200, 201, 202, 204, 299])
def test_2xx_is_success(http: HttpClient, vendor: VendorServer, status: int) -> None:
    vendor.reply(status)
    post(http, vendor)
    [request] = vendor.requests
    assert request.method == "POST" and request.path == "/hook"
    assert request.body == b'{"a":1}'
    assert request.header("Content-Type") == "application/json"


@pytest.mark.parametrize("status", [408, 425, 429, 500, 502, 503, 504, 599])
def test_retryable_statuses(http: HttpClient, vendor: VendorServer, status: int) -> None:
    vendor.reply(status, {"message": "try later"})
    with pytest.raises(RetryableDeliveryError) as caught:
        post(http, vendor)
    assert caught.value.status_code == status
    assert caught.value.retry_after is None
    assert str(status) in caught.value.message and "try later" in caught.value.message
    assert len(vendor.requests) == 1, "urllib3 must not retry on its own"


@pytest.mark.parametrize("status", [429, 503])
def test_retry_after_in_seconds(http: HttpClient, vendor: VendorServer, status: int) -> None:
    vendor.reply(status, headers={"Retry-After": "120"})
    with pytest.raises(RetryableDeliveryError) as caught:
        post(http, vendor)
    assert caught.value.retry_after == 120.0


def test_retry_after_as_an_http_date(http: HttpClient, vendor: VendorServer) -> None:
    when = datetime.now(UTC) + timedelta(hours=1)
    vendor.reply(429, headers={"Retry-After": email.utils.format_datetime(when, usegmt=True)})
    with pytest.raises(RetryableDeliveryError) as caught:
        post(http, vendor)
    assert caught.value.retry_after is not None
    assert 3000 < caught.value.retry_after <= 3600


def test_410_is_permanent_and_gone(http: HttpClient, vendor: VendorServer) -> None:
    vendor.reply(410, {"message": "unsubscribed"})
    with pytest.raises(PermanentDeliveryError) as caught:
        post(http, vendor)
    assert caught.value.gone is True
    assert caught.value.status_code == 410


@pytest.mark.parametrize(
    "status", [300, 301, 302, 303, 304, 307, 308, 400, 401, 403, 404, 405, 409, 413, 422, 451]
)
def test_other_3xx_and_4xx_are_permanent(http: HttpClient, vendor: VendorServer,
                                         status: int) -> None:
    vendor.reply(status, headers={"Location": vendor.url + "/elsewhere", "Retry-After": "5"})
    with pytest.raises(PermanentDeliveryError) as caught:
        post(http, vendor)
    assert not isinstance(caught.value, RetryableDeliveryError)
    assert caught.value.status_code == status
    assert caught.value.gone is False
    # Redirects are never followed: the sink saw exactly the one request.
    assert [r.path for r in vendor.requests] == ["/hook"]


def test_error_message_keeps_only_a_snippet_of_the_body(http: HttpClient,
                                                        vendor: VendorServer) -> None:
    vendor.reply(400, "x" * 10_000)
    with pytest.raises(PermanentDeliveryError) as caught:
        post(http, vendor)
    assert len(caught.value.message) < 400


def test_connection_refused_is_retryable(http: HttpClient) -> None:
    with pytest.raises(RetryableDeliveryError) as caught:
        http.request("POST", f"http://127.0.0.1:{closed_port()}/hook", body=b"{}", timeout=2)
    assert caught.value.status_code is None


def test_read_timeout_is_retryable(http: HttpClient) -> None:
    with silent_server() as url, pytest.raises(RetryableDeliveryError) as caught:
        http.request("POST", url + "/hook", body=b"{}", timeout=0.3)
    assert "timed out" in caught.value.message
    assert caught.value.status_code is None


def test_invalid_url_is_permanent(http: HttpClient) -> None:
    with pytest.raises(PermanentDeliveryError):
        http.request("POST", "http://127.0.0.1:99999999/hook", body=b"{}", timeout=1)


def test_pooled_connections_are_reused_across_requests(http: HttpClient,
                                                       vendor: VendorServer) -> None:
    for _ in range(5):
        post(http, vendor)
    assert len(vendor.requests) == 5
    assert shared_client() is shared_client()


def test_a_driver_declares_its_vendor_retryable_answers(http: HttpClient,
                                                        vendor: VendorServer) -> None:
    # 423 is permanent for a destination that says nothing about it ...
    vendor.reply(423, {"message": "locked"})
    with pytest.raises(PermanentDeliveryError):
        post(http, vendor)
    # ... and retryable, with its floor under the Retry-After, for one that declares it.
    vendor.reply(423, {"message": "locked"}, headers={"Retry-After": "1"})
    answer = http.request("POST", vendor.url + "/hook", body=b"{}", timeout=5)
    with pytest.raises(RetryableDeliveryError) as caught:
        raise_for_status(answer, "vendor", {423: 2.0, 477: None})
    assert caught.value.status_code == 423
    assert caught.value.retry_after == 2.0
    vendor.reply(423, headers={"Retry-After": "9"})
    answer = http.request("POST", vendor.url + "/hook", body=b"{}", timeout=5)
    with pytest.raises(RetryableDeliveryError) as caught:
        raise_for_status(answer, "vendor", {423: 2.0})
    assert caught.value.retry_after == 9.0


def test_a_receiver_that_trickles_its_answer_is_cut_off_at_the_timeout(http: HttpClient) -> None:
    # Each byte comes well within the read timeout, so only a deadline on the whole answer
    # stops it: the threads pool that runs the sends has no time limit of its own.
    import socket
    import threading
    import time

    server = socket.create_server(("127.0.0.1", 0))
    stop = threading.Event()

    def trickle() -> None:
        connection, _ = server.accept()
        with connection:
            connection.recv(65536)
            connection.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 1000\r\n\r\n")
            while not stop.is_set():
                try:
                    connection.sendall(b"x")
                except OSError:
                    return
                time.sleep(0.2)

    threading.Thread(target=trickle, daemon=True).start()
    started = time.monotonic()
    try:
        with pytest.raises(RetryableDeliveryError) as caught:
            http.request("POST", f"http://127.0.0.1:{server.getsockname()[1]}/", body=b"{}",
                         timeout=1.0)
    finally:
        stop.set()
        server.close()
    assert "timed out" in caught.value.message
    assert time.monotonic() - started < 5  # generous: one second plus a trickled byte


def test_an_origin_whose_pool_the_manager_evicted_is_looked_up_again(
        vendor: VendorServer) -> None:
    import urllib3

    # One pool in all: every request to the other origin evicts (closes) this one's pool.
    http = HttpClient(urllib3.PoolManager(num_pools=1))
    other = vendor.url.replace("127.0.0.1", "localhost")
    for _ in range(3):
        post(http, vendor)
        response = http.request("POST", other + "/hook", body=b"{}", timeout=5)
        assert response.status == 200
    assert len(vendor.requests) == 6
    # The query string is part of the request target.
    http.request("POST", vendor.url + "/hook?a=1&b=2", body=b"{}", timeout=5)
    assert vendor.requests[-1].path == "/hook?a=1&b=2"
