"""relay web's server layer (relay.cli.web_server) in one process: the body read whole before
the app runs, its limit and deadline, and the gate that lets requests into the app in the order
they came. Against the real server with real sockets: tests/integration/test_slow_clients.py."""

from __future__ import annotations

import io
from typing import Any

import gevent
import pytest
from werkzeug.exceptions import RequestTimeout

from relay.cli.web_server import FairGate, Unreadable, WholeRequests

LIMIT = 100


def served(environ: dict[str, Any], timeout: float = 5.0) -> Any:
    """What ``wsgi.input`` the app is handed."""
    seen: dict[str, Any] = {}

    def app(environ: dict[str, Any], start_response: Any) -> list[bytes]:
        seen["input"] = environ["wsgi.input"]
        return [b""]

    WholeRequests(app, limit=LIMIT, timeout=timeout, concurrency=2)(environ, lambda *a: None)
    return seen["input"]


class Trickle(io.RawIOBase):
    """A body arriving a byte at a time, ``pause`` seconds (a greenlet's sleep) apart."""

    def __init__(self, data: bytes, pause: float) -> None:
        self.data, self.pause = data, pause

    def read(self, size: int = -1) -> bytes:
        gevent.sleep(self.pause)
        chunk, self.data = self.data[:1], self.data[1:]
        return chunk


def test_the_body_is_read_whole_before_the_app_runs() -> None:
    stream = io.BytesIO(b'{"a": 1}')
    body = served({"wsgi.input": stream, "CONTENT_LENGTH": "8"})
    assert stream.tell() == 8 and body is not stream
    assert body.read() == b'{"a": 1}'


def test_a_body_shorter_than_declared_reaches_the_app_short() -> None:
    body = served({"wsgi.input": io.BytesIO(b"abc"), "CONTENT_LENGTH": "10"})
    assert body.read(10) == b"abc"  # the app refuses it (400), as it did reading the socket


def test_nothing_is_read_where_nothing_is_awaited() -> None:
    for environ in ({}, {"CONTENT_LENGTH": "0"}, {"CONTENT_LENGTH": str(LIMIT + 1)},
                    {"CONTENT_LENGTH": "x"}):
        stream = io.BytesIO(b"x" * (LIMIT + 1))
        assert served({"wsgi.input": stream, **environ}) is stream
        assert stream.tell() == 0  # over the limit: the app answers 413 without reading it


def test_a_chunked_body_is_read_up_to_one_byte_over_the_limit() -> None:
    stream = io.BytesIO(b"x" * (10 * LIMIT))
    body = served({"wsgi.input": stream, "HTTP_TRANSFER_ENCODING": "chunked"})
    assert len(body.read()) == LIMIT + 1  # the app sees it is over, and answers 413


def test_a_body_that_does_not_arrive_in_time_reads_as_408() -> None:
    body = served({"wsgi.input": Trickle(b"x" * 50, pause=0.02), "CONTENT_LENGTH": "50"},
                  timeout=0.1)
    assert isinstance(body, Unreadable)
    with pytest.raises(RequestTimeout):
        body.read()


def test_an_error_reading_the_body_is_raised_where_the_app_reads_it() -> None:
    class Broken(io.RawIOBase):
        def read(self, size: int = -1) -> bytes:
            raise ValueError("invalid chunk size")

    body = served({"wsgi.input": Broken(), "HTTP_TRANSFER_ENCODING": "chunked"})
    with pytest.raises(ValueError, match="invalid chunk size"):
        body.read(10)


def test_the_gate_serves_in_the_order_of_arrival() -> None:
    gate = FairGate(1)
    order: list[str] = []

    def keep_alive() -> None:  # releases and asks again at once, three times
        for _ in range(3):
            with gate:
                order.append("a")
                gevent.sleep(0.01)

    def other() -> None:
        with gate:
            order.append("b")

    first = gevent.spawn(keep_alive)
    gevent.sleep(0.001)
    gevent.joinall([first, gevent.spawn(other)])
    assert order == ["a", "b", "a", "a"]


def test_the_gate_holds_no_more_than_its_size_and_survives_a_cancelled_waiter() -> None:
    gate = FairGate(2)
    inside, most = [0], [0]

    def hold() -> None:
        with gate:
            inside[0] += 1
            most[0] = max(most[0], inside[0])
            gevent.sleep(0.01)
            inside[0] -= 1

    holders = [gevent.spawn(hold) for _ in range(6)]
    cancelled = gevent.spawn(hold)
    gevent.sleep(0)
    cancelled.kill()  # waiting its turn when killed
    gevent.joinall(holders)
    assert most[0] == 2 and inside[0] == 0
    assert gate.free == 2 and not gate.waiters
