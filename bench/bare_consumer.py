"""The delivery baseline: threads that ``BRPOP`` a body from a Redis list and POST it to each URL.

``python -m bench.bare_consumer --redis URL --list KEY --threads N --total N URL [URL …]``

What a relay worker does minus everything that makes it a relay (Celery, dedupe, routing,
claim/confirm, gates, the delivery log): the floor ``bench.delivery`` compares against. Same HTTP
client as the relay's (one urllib3 ``PoolManager`` per process, no retries, no redirects, the
webhook driver's headers). It stops after ``--total`` items and prints one JSON line: the time
and CPU (user + system of this process) from the first item taken to the last delivery, and the
process's peak resident memory. One process, like ``relay worker``: each thread keeps one
request in flight, so ``--threads`` is the number of requests in flight. ``--pool`` sends the
relay's way instead (one reader, each POST a future on a thread pool of ``--threads``): the
cost of that hand-off alone, without the relay's bookkeeping.
"""

from __future__ import annotations

import argparse
import json
import queue
import resource
import sys
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor

import redis
import urllib3


def cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


class Consumer:
    def __init__(self, client: redis.Redis, key: str, urls: list[str], total: int,
                 pool_size: int) -> None:
        self.client = client
        self.key = key
        self.urls = urls
        self.total = total
        self.pool = urllib3.PoolManager(num_pools=64, maxsize=pool_size, block=False)
        self.lock = threading.Lock()
        self.taken = 0
        self.done = 0
        self.failed = 0
        self.first: tuple[float, float] | None = None  # (monotonic, cpu) at the first item
        self.last: tuple[float, float] = (0.0, 0.0)
        self.finished = threading.Event()

    def run(self) -> None:
        while not self.finished.is_set():
            with self.lock:
                if self.taken >= self.total:
                    return
                self.taken += 1
            try:
                item = self.client.brpop([self.key], timeout=1)
            except redis.RedisError as exc:  # printed, so a stalled run says why
                print(f"BRPOP failed: {exc!r}", file=sys.stderr, flush=True)
                item = None
            if item is None:
                with self.lock:
                    self.taken -= 1
                continue
            with self.lock:
                if self.first is None:
                    self.first = (time.monotonic(), cpu_seconds())
            body = item[1]
            ok = True
            for url in self.urls:
                ok = self.post(url, body) and ok
            self.finish(ok)

    def post(self, url: str, body: bytes) -> bool:
        try:
            response = self.pool.request(
                "POST", url, body=body, timeout=urllib3.Timeout(connect=5, read=10),
                retries=False, redirect=False, preload_content=True,
                headers={"Content-Type": "application/json", "User-Agent": "KickoffLabs"})
            return 200 <= response.status < 300
        except urllib3.exceptions.HTTPError as exc:
            print(f"POST failed: {exc!r}", file=sys.stderr, flush=True)
            return False

    def finish(self, ok: bool) -> None:
        with self.lock:
            self.done += 1
            self.failed += 0 if ok else 1
            if self.done == self.total:
                self.last = (time.monotonic(), cpu_seconds())
                self.finished.set()

    def run_pooled(self, window: int) -> None:
        """The relay's send model without its bookkeeping: one reader hands each POST to a
        ``ThreadPoolExecutor`` of ``window`` threads as a future (a done callback queues it
        back), keeping up to ``window`` POSTs in flight; an item is done when all its POSTs
        are."""
        executor = ThreadPoolExecutor(window, thread_name_prefix="bare-send")
        finished: queue.SimpleQueue[tuple[Future[bool], list[int]]] = queue.SimpleQueue()
        in_flight = 0
        while not self.finished.is_set():
            while in_flight + len(self.urls) <= window and self.taken < self.total:
                try:
                    body = self.client.rpop(self.key)
                except redis.RedisError as exc:
                    print(f"RPOP failed: {exc!r}", file=sys.stderr, flush=True)
                    body = None
                if body is None:
                    break
                self.taken += 1
                with self.lock:
                    if self.first is None:
                        self.first = (time.monotonic(), cpu_seconds())
                left = [len(self.urls), 1]  # POSTs still out, all ok (1/0)
                for url in self.urls:
                    future = executor.submit(self.post, url, body)
                    future.add_done_callback(lambda f, left=left: finished.put((f, left)))
                    in_flight += 1
            try:
                done = [finished.get(timeout=1 if in_flight else 0.01)]
            except queue.Empty:
                continue
            while True:
                try:
                    done.append(finished.get_nowait())
                except queue.Empty:
                    break
            for future, left in done:
                in_flight -= 1
                left[0] -= 1
                left[1] &= int(future.result())
                if left[0] == 0:
                    self.finish(bool(left[1]))
        executor.shutdown(wait=False)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--redis", required=True)
    parser.add_argument("--list", required=True)
    parser.add_argument("--threads", type=int, required=True,
                        help="threads each keeping one request in flight; with --pool, the "
                        "pool's size (requests in flight)")
    parser.add_argument("--pool", action="store_true",
                        help="one reader submitting each POST to a thread pool (the relay's "
                        "send model) instead of threads that BRPOP and POST")
    parser.add_argument("--total", type=int, required=True, help="items to take")
    parser.add_argument("--timeout", type=float, default=600)
    parser.add_argument("urls", nargs="+")
    args = parser.parse_args()
    # Bounded connects and reads (BRPOP waits 1 s): a connect lost in a full accept queue is
    # an error that is printed and retried, not a thread that hangs for minutes.
    client = redis.Redis.from_url(args.redis, socket_connect_timeout=5, socket_timeout=10)
    consumer = Consumer(client, args.list, args.urls, args.total,
                        pool_size=max(8, args.threads))
    if args.pool:
        threads = [threading.Thread(target=consumer.run_pooled, args=(args.threads,),
                                    daemon=True)]
    else:
        threads = [threading.Thread(target=consumer.run, daemon=True)
                   for _ in range(args.threads)]
    for thread in threads:
        thread.start()
    consumer.finished.wait(args.timeout)
    first = consumer.first or (0.0, 0.0)
    print(json.dumps({"items": consumer.done, "deliveries": consumer.done * len(args.urls),
                      "failed": consumer.failed, "seconds": consumer.last[0] - first[0],
                      "cpu_seconds": consumer.last[1] - first[1],
                      "complete": consumer.finished.is_set(),
                      # Linux reports KiB
                      "max_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
                      }), flush=True)


if __name__ == "__main__":
    main()
