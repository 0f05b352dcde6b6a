"""A loopback HTTP/1.1 sink: answers ``200 ok`` to every request, after ``--delay`` seconds;
``503`` to a request whose body contains ``--fail``'s text (a receiver that refuses one lead),
and to the first request of one body in ``--fail-first N`` (its CRC-32 divisible by N: a
receiver that fails the first attempt of some events and takes their retries).

``python -m bench.sinks --port P [--delay 0.05] [--fail TEXT] [--fail-first N]``.
Keep-alive, many connections at once on one asyncio loop (the delay is a timer, not a blocked
thread), so a 50 ms receiver stays a 50 ms receiver however many deliveries are in flight.
Used as the slow destination of ``bench.delivery``, as the fast one when nginx is not
installed, and as the receivers of ``bench.ordering``.
"""

from __future__ import annotations

import argparse
import asyncio
import zlib

RESPONSE = b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: 3\r\n\r\nok\n"
REFUSAL = (b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: text/plain\r\n"
           b"Content-Length: 5\r\n\r\nbusy\n")


class SinkProtocol(asyncio.Protocol):
    def __init__(self, delay: float, fail: bytes = b"", fail_first: int = 0,
                 seen: set[int] | None = None) -> None:
        self.delay = delay
        self.fail = fail
        self.fail_first = fail_first
        self.seen = seen if seen is not None else set()  # bodies answered once (CRC-32)
        self.buffer = b""
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        while True:
            head_end = self.buffer.find(b"\r\n\r\n")
            if head_end < 0:
                return
            length = 0
            for line in self.buffer[:head_end].split(b"\r\n")[1:]:
                name, _, value = line.partition(b":")
                if name.strip().lower() == b"content-length":
                    length = int(value.strip())
            end = head_end + 4 + length
            if len(self.buffer) < end:
                return
            answer = self._answer_for(self.buffer[head_end + 4:end])
            self.buffer = self.buffer[end:]
            if self.delay > 0:
                asyncio.get_running_loop().call_later(self.delay, self._answer, answer)
            else:
                self._answer(answer)

    def _answer_for(self, body: bytes) -> bytes:
        if self.fail and self.fail in body:
            return REFUSAL
        if self.fail_first:
            crc = zlib.crc32(body)
            if crc % self.fail_first == 0 and crc not in self.seen:
                self.seen.add(crc)
                return REFUSAL
        return RESPONSE

    def _answer(self, answer: bytes = RESPONSE) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.write(answer)


async def serve(port: int, delay: float, fail: bytes = b"", fail_first: int = 0) -> None:
    loop = asyncio.get_running_loop()
    seen: set[int] = set()
    server = await loop.create_server(lambda: SinkProtocol(delay, fail, fail_first, seen),
                                      "127.0.0.1", port, backlog=1024)
    async with server:
        await server.serve_forever()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--delay", type=float, default=0.0)
    parser.add_argument("--fail", default="", help="answer 503 to bodies containing this")
    parser.add_argument("--fail-first", type=int, default=0, metavar="N",
                        help="answer 503 to the first request of one body in N")
    args = parser.parse_args()
    asyncio.run(serve(args.port, args.delay, args.fail.encode(), args.fail_first))


if __name__ == "__main__":
    main()
