"""An open-loop HTTP load generator: requests go out at fixed times, whatever the server does.

wrk (closed loop) sends the next request on a connection only when the previous one answered, so
a slow server slows the load down and its stalls vanish from the latency figures (coordinated
omission). Here request ``i`` is *scheduled* at ``t0 + i / rate``; its latency is measured from
that scheduled time to the end of its response, so time spent waiting for a free connection or
behind a stalled server counts. wrk2 does this but is not packaged in Debian.

One asyncio loop, ``connections`` keep-alive sockets used round-robin (FIFO, so none idles into
the server's keep-alive timeout), one prebuilt request. Bounded: nothing is sent after
``duration``, and requests still unanswered ``grace`` seconds later are counted as timeouts.
"""

from __future__ import annotations

import asyncio
import gc
import time
from dataclasses import dataclass, field

from bench.common import percentile


@dataclass
class OpenLoopResult:
    offered_rps: float
    duration: float
    sent: int = 0
    latencies: list[float] = field(default_factory=list)  # seconds, from the scheduled time
    lateness: list[float] = field(default_factory=list)  # send time - scheduled time
    statuses: dict[int, int] = field(default_factory=dict)
    errors: int = 0
    elapsed: float = 0.0

    @property
    def completed(self) -> int:
        return len(self.latencies)

    @property
    def achieved_rps(self) -> float:
        return self.completed / self.elapsed if self.elapsed else 0.0

    def pct(self, p: float) -> float:
        return percentile(sorted(self.latencies), p)

    def late_pct(self, p: float) -> float:
        return percentile(sorted(self.lateness), p)

    def ok(self, expected_status: int) -> int:
        return self.statuses.get(expected_status, 0)


def build_request(host: str, port: int, path: str, body: bytes,
                  content_type: str = "application/json") -> bytes:
    head = (f"POST {path} HTTP/1.1\r\nHost: {host}:{port}\r\nContent-Type: {content_type}\r\n"
            f"Content-Length: {len(body)}\r\nUser-Agent: KickoffLabs\r\n\r\n")
    return head.encode() + body


async def _read_response(reader: asyncio.StreamReader) -> tuple[int, bool]:
    head = await reader.readuntil(b"\r\n\r\n")
    lines = head.split(b"\r\n")
    status = int(lines[0].split(b" ", 2)[1])
    length = 0
    close = False
    for line in lines[1:]:
        name, _, value = line.partition(b":")
        name = name.strip().lower()
        if name == b"content-length":
            length = int(value.strip())
        elif name == b"connection" and value.strip().lower() == b"close":
            close = True
    if length:
        await reader.readexactly(length)
    return status, close


async def _run(host: str, port: int, request: bytes, rate: float, duration: float,
               connections: int, grace: float) -> OpenLoopResult:
    result = OpenLoopResult(rate, duration)
    queue: asyncio.Queue[float | None] = asyncio.Queue()
    clock = time.perf_counter

    async def connection() -> None:
        reader: asyncio.StreamReader | None = None
        writer: asyncio.StreamWriter | None = None
        while True:
            scheduled = await queue.get()
            if scheduled is None:
                break
            result.lateness.append(clock() - scheduled)
            for attempt in range(2):  # once more on a fresh socket if keep-alive raced a close
                try:
                    if writer is None:
                        reader, writer = await asyncio.open_connection(host, port)
                    writer.write(request)
                    status, close = await _read_response(reader)  # type: ignore[arg-type]
                except (OSError, asyncio.IncompleteReadError, ValueError, IndexError):
                    if writer is not None:
                        writer.close()
                    reader = writer = None
                    if attempt == 1:
                        result.errors += 1
                    continue
                result.latencies.append(clock() - scheduled)
                result.statuses[status] = result.statuses.get(status, 0) + 1
                if close:
                    writer.close()
                    reader = writer = None
                break
        if writer is not None:
            writer.close()

    workers = [asyncio.create_task(connection()) for _ in range(connections)]
    await asyncio.sleep(0.2)  # let the connections settle before the clock starts
    total = int(rate * duration)
    t0 = clock() + 0.01
    sent = 0
    while sent < total:
        due = min(total, int((clock() - t0) * rate) + 1)
        while sent < due:
            queue.put_nowait(t0 + sent / rate)
            sent += 1
        await asyncio.sleep(max(0.0, t0 + sent / rate - clock()))
    result.sent = sent
    for _ in workers:
        queue.put_nowait(None)
    _, pending = await asyncio.wait(workers, timeout=grace)
    for task in pending:
        task.cancel()
    result.elapsed = clock() - t0
    result.errors = sent - result.completed  # failed twice, or unanswered within the grace
    return result


def open_loop(host: str, port: int, path: str, body: bytes, rate: float, duration: float,
              connections: int = 64, grace: float = 10.0) -> OpenLoopResult:
    """Offer ``rate`` requests per second for ``duration`` seconds; see the module doc."""
    request = build_request(host, port, path, body)
    gc.collect()
    gc.disable()  # a collector pause in the generator would show up as server latency
    try:
        return asyncio.run(_run(host, port, request, rate, duration, connections, grace))
    finally:
        gc.enable()
