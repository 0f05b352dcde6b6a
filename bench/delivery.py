"""End-to-end delivery throughput and CPU against a bare Redis-list consumer (SPEC §6).

``python -m bench.delivery``: for each scenario (sink × concurrency), with the embedded Redis:

1. **relay**: N events are posted through the real ingress (``create_app()``'s
   ``POST /hooks/kickofflabs``, Flask test client, so each becomes the ingress's own Celery
   message on the queue), each routed to two webhook destinations on the sink; then ``relay
   worker`` (its exact command: Celery prefork, ``--concurrency``) is started and the bench
   times the drain from the first delivery to the last (``relay:stats:<destination>``),
   sampling the CPU (user + system) of the worker's processes over the same window;
2. **bare**: the same N payloads are ``LPUSH``ed to a list and :mod:`bench.bare_consumer`
   (threads = the worker's process count, the same urllib3 ``PoolManager``) posts each to the
   same two URLs.

3. **Celery floor** (fast sink only): :mod:`bench.celery_floor`, the same worker command and
   Celery settings with a task that only POSTs each payload to the two URLs: the share of the
   gap that one Celery task per event costs before the relay does any work of its own.

Sinks: ``fast`` is nginx answering 200 on loopback (the asyncio sink of :mod:`bench.sinks` when
nginx is missing; the output says which), ``slow`` answers after 50 ms. Redis is emptied between
runs. Target: relay deliveries/s >= 0.5 x bare.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any
from unittest import mock

import redis

from bench.common import (
    ROOT,
    CpuWatch,
    machine_info,
    print_machine,
    process_tree_cpu,
    relay_argv,
    reset_redis,
    sample_payload,
    spawn,
    start_redis,
    start_sink,
    stop,
    table,
    verdict,
    write_config,
)
from relay.delivery.state import stats_key
from relay.taskqueue import QUEUE

TARGET_RATIO = 0.5
DESTINATIONS = ("sink-a", "sink-b")
BARE_LIST = "bench:deliveries"
SLOW_DELAY = 0.05
POLL = 0.02


@dataclass
class Run:
    deliveries: int
    seconds: float
    cpu_seconds: float
    failed: int
    redis_cpu_seconds: float
    foreign_cores: float
    noise: str = ""

    @property
    def rate(self) -> float:
        return self.deliveries / self.seconds if self.seconds > 0 else float("nan")

    @property
    def cpu_ms(self) -> float:
        return self.cpu_seconds * 1000 / self.deliveries if self.deliveries else float("nan")

    @property
    def redis_cpu_ms(self) -> float:
        return self.redis_cpu_seconds * 1000 / self.deliveries if self.deliveries else 0.0


@dataclass
class Scenario:
    sink: str  # "fast" | "slow"
    concurrency: int
    events: int
    relay: Run | None = None
    bare: Run | None = None
    floor: Run | None = None  # the Celery floor (fast sink only)

    @property
    def ratio(self) -> float:
        if self.relay is None or self.bare is None:
            return float("nan")
        return self.relay.rate / self.bare.rate


def lead(number: int) -> dict[str, Any]:
    """The new_signup sample as a distinct lead, so every event has its own id (no dedupe)."""
    payload = sample_payload("new_signup")
    payload.update(id=10_000_000 + number, social_id=f"B{number:07d}",
                   email=f"lead{number}@example.com")
    return payload


def enqueue_through_ingress(env: dict[str, str], events: int) -> None:
    """POST every event to the real ingress app (in this process), which queues its message."""
    with mock.patch.dict(os.environ, env):
        from relay.app import create_app

        app = create_app()
        logging.getLogger("relay.ingress").setLevel(logging.WARNING)  # 5,000 lines of noise
        client = app.test_client()
        for number in range(events):
            response = client.post("/hooks/kickofflabs", data=json.dumps(lead(number)),
                                   content_type="application/json")
            if response.status_code != 202:
                raise RuntimeError(f"ingress answered {response.status_code}: {response.data!r}")


def delivered(client: redis.Redis) -> tuple[int, int]:
    """(delivered, failed attempts) over the destinations, from the store's counters."""
    pipe = client.pipeline(transaction=False)
    for name in DESTINATIONS:
        pipe.hmget(stats_key(name), "delivered", "failed")
    done = failed = 0
    for ok, bad in pipe.execute():
        done += int(ok or 0)
        failed += int(bad or 0)
    return done, failed


def run_relay(scenario: Scenario, args: argparse.Namespace, env: dict[str, str],
              client: redis.Redis, redis_pid: int, workdir: Path) -> Run:
    enqueue_through_ingress(env, scenario.events)
    total = scenario.events * len(DESTINATIONS)
    argv = relay_argv("worker", "--concurrency", str(scenario.concurrency)) + args.worker_arg
    worker = spawn(argv, env, workdir / f"worker-{scenario.sink}-{scenario.concurrency}.log")
    deadline = time.monotonic() + args.timeout
    try:
        first: tuple[float, int, float, float] | None = None  # time, count, cpu, redis cpu
        with CpuWatch() as watch:
            while True:
                if worker.poll() is not None:
                    raise RuntimeError(f"the worker exited ({worker.returncode}); see its log")
                count, failed = delivered(client)
                now = time.monotonic()
                if first is None and count > 0:
                    first = (now, count, process_tree_cpu(worker.pid),
                             process_tree_cpu(redis_pid))
                if count + failed >= total or now > deadline:
                    break
                time.sleep(POLL)
            cpu = process_tree_cpu(worker.pid)
            redis_cpu = process_tree_cpu(redis_pid)
        if first is None or count < total:
            print(f"    relay: only {count:,} of {total:,} delivered within {args.timeout:g}s",
                  flush=True)
        start, count0, cpu0, redis0 = first or (now, 0, cpu, redis_cpu)
        return Run(count - count0, now - start, cpu - cpu0, failed, redis_cpu - redis0,
                   watch.foreign_cores, watch.note())
    finally:
        stop(worker, timeout=30)


def run_floor(scenario: Scenario, args: argparse.Namespace, env: dict[str, str],
              client: redis.Redis, redis_pid: int, workdir: Path, urls: list[str]) -> Run:
    """The Celery floor (:mod:`bench.celery_floor`): the same worker command serving a task
    that only POSTs, timed by the broker's keys emptying."""
    env = {**env, "BENCH_URLS": " ".join(urls)}
    with mock.patch.dict(os.environ, env):  # the floor's app reads the broker URL at import
        from bench import celery_floor

        celery_floor.enqueue([json.dumps(lead(n)) for n in range(scenario.events)])
    argv = relay_argv("worker", "--concurrency", str(scenario.concurrency)) + args.worker_arg
    argv[argv.index("-A") + 1] = "bench.celery_floor"
    worker = spawn(argv, env, workdir / f"floor-{scenario.sink}-{scenario.concurrency}.log")
    deadline = time.monotonic() + args.timeout
    queued = scenario.events
    try:
        first: tuple[float, int, float, float] | None = None
        with CpuWatch() as watch:
            while True:
                if worker.poll() is not None:
                    raise RuntimeError(f"the floor worker exited ({worker.returncode})")
                pipe = client.pipeline(transaction=False)
                pipe.llen(QUEUE)
                pipe.hlen(celery_floor.UNACKED_KEY)
                waiting, unacked = pipe.execute()
                now = time.monotonic()
                if first is None and waiting < queued:
                    first = (now, queued - waiting - unacked, process_tree_cpu(worker.pid),
                             process_tree_cpu(redis_pid))
                if (waiting == 0 and unacked == 0) or now > deadline:
                    break
                time.sleep(POLL)
            cpu = process_tree_cpu(worker.pid)
            redis_cpu = process_tree_cpu(redis_pid)
        start, done0, cpu0, redis0 = first or (now, 0, cpu, redis_cpu)
        done = queued - waiting - unacked
        per_event = len(DESTINATIONS)
        return Run((done - done0) * per_event, now - start, cpu - cpu0, 0, redis_cpu - redis0,
                   watch.foreign_cores, watch.note())
    finally:
        stop(worker, timeout=30)


def run_bare(scenario: Scenario, args: argparse.Namespace, client: redis.Redis,
             redis_url: str, redis_pid: int, urls: list[str]) -> Run:
    pipe = client.pipeline(transaction=False)
    for number in range(scenario.events):
        pipe.lpush(BARE_LIST, json.dumps(lead(number)))
    pipe.execute()
    argv = [sys.executable, "-m", "bench.bare_consumer", "--redis", redis_url, "--list",
            BARE_LIST, "--threads", str(scenario.concurrency), "--total", str(scenario.events),
            "--timeout", str(args.timeout), *urls]
    redis0 = process_tree_cpu(redis_pid)
    with CpuWatch() as watch:
        done = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True,
                              timeout=args.timeout + 60, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"bare consumer failed: {done.stderr}")
    result = json.loads(done.stdout.strip().splitlines()[-1])
    if not result["complete"]:
        print(f"    bare: only {result['items']:,} items within {args.timeout:g}s", flush=True)
    return Run(result["deliveries"], result["seconds"], result["cpu_seconds"], result["failed"],
               process_tree_cpu(redis_pid) - redis0, watch.foreign_cores, watch.note())


def describe(label: str, run: Run) -> str:
    return (f"    {label}: {run.deliveries:,} deliveries in {run.seconds:.2f}s = "
            f"{run.rate:,.0f}/s, "
            f"CPU {run.cpu_ms:.2f} ms/delivery (Redis {run.redis_cpu_ms:.2f}), "
            f"{run.failed} failed; {run.noise}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.delivery", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    cores = os.cpu_count() or 1
    parser.add_argument("--events", type=int, default=5000, help="events per fast-sink run")
    parser.add_argument("--slow-events", type=int, default=1000,
                        help="events per slow-sink run at the default concurrency (at 50 ms "
                        "per request it takes about events / concurrency / 10 seconds)")
    parser.add_argument("--concurrency", type=int, default=cores,
                        help="worker processes = bare threads [relay worker's default: cores]")
    parser.add_argument("--slow-concurrency", type=int, default=16,
                        help="also run the slow sink at this concurrency (0: skip)")
    parser.add_argument("--only", choices=["fast", "slow"], default=None)
    parser.add_argument("--worker-arg", action="append", default=[], metavar="ARG",
                        help="an extra Celery worker argument for tuning experiments "
                        "(e.g. --worker-arg=--prefetch-multiplier=16); repeatable")
    parser.add_argument("--python-sink", action="store_true",
                        help="use the asyncio sink even when nginx is installed")
    parser.add_argument("--timeout", type=float, default=300, help="bound on each drain")
    parser.add_argument("--json", type=Path, default=None, help="also write the figures here")
    args = parser.parse_args(argv)

    workdir = Path(tempfile.mkdtemp(prefix="leadrelay-bench-delivery-"))
    redis_server, client = start_redis(workdir / "redis")
    assert redis_server.process is not None
    sinks: dict[str, tuple[subprocess.Popen[bytes], int, str]] = {}
    scenarios: list[Scenario] = []
    try:
        info = machine_info(client)
        print_machine(info)
        if args.only != "slow":
            sinks["fast"] = start_sink(workdir, prefer_nginx=not args.python_sink)
            scenarios.append(Scenario("fast", args.concurrency, args.events))
        if args.only != "fast":
            sinks["slow"] = start_sink(workdir, delay=SLOW_DELAY)
            scenarios.append(Scenario("slow", args.concurrency, args.slow_events))
            if args.slow_concurrency:
                scenarios.append(Scenario("slow", args.slow_concurrency, args.events))
        for name, (_, port, what) in sinks.items():
            print(f"{name} sink: {what} on 127.0.0.1:{port}")
        worker_cmd = relay_argv("worker", "--concurrency", "1") + args.worker_arg
        shown = " ".join(worker_cmd[2:]).replace("--concurrency 1", "--concurrency N")
        print(f"relay worker: {shown}; logs in {workdir}", flush=True)
        started = time.monotonic()
        for scenario in scenarios:
            port = sinks[scenario.sink][1]
            urls = [f"http://127.0.0.1:{port}/{name}" for name in DESTINATIONS]
            config = write_config(workdir / f"relay-{port}.yaml", None,
                                  list(zip(DESTINATIONS, urls, strict=True)))
            env = {"RELAY_REDIS_URL": redis_server.url, "RELAY_CONFIG": str(config),
                   "PYTHONPATH": str(ROOT)}
            print(f"{scenario.sink} sink, concurrency {scenario.concurrency}, "
                  f"{scenario.events:,} events x {len(DESTINATIONS)} destinations:", flush=True)
            reset_redis(client)
            scenario.relay = run_relay(scenario, args, env, client, redis_server.process.pid,
                                       workdir)
            print(describe("relay", scenario.relay), flush=True)
            reset_redis(client)
            scenario.bare = run_bare(scenario, args, client, redis_server.url,
                                     redis_server.process.pid, urls)
            print(describe("bare ", scenario.bare), flush=True)
            reset_redis(client)
            if scenario.sink == "fast":
                scenario.floor = run_floor(scenario, args, env, client,
                                           redis_server.process.pid, workdir, urls)
                print(describe("floor", scenario.floor), flush=True)
                reset_redis(client)
        report(scenarios, sinks)
        print(f"(ran in {time.monotonic() - started:.0f}s)")
        if args.json:
            args.json.write_text(json.dumps(
                {"machine": info, "settings": vars(args), "worker_argv": worker_cmd,
                 "sinks": {k: v[2] for k, v in sinks.items()},
                 "scenarios": [{**asdict(s), "ratio": s.ratio} for s in scenarios]},
                indent=2, default=str))
    finally:
        for process, _, _ in sinks.values():
            stop(process)
        redis_server.stop()
        shutil.rmtree(workdir / "redis", ignore_errors=True)
    return 0


def report(scenarios: list[Scenario], sinks: dict[str, tuple[Any, int, str]]) -> None:
    rows = []
    for s in scenarios:
        assert s.relay is not None and s.bare is not None
        sink = "fast" if s.sink == "fast" else f"{SLOW_DELAY * 1000:g} ms"
        floor = ("-", "-") if s.floor is None else (
            f"{s.floor.rate:,.0f} ({s.floor.rate / s.bare.rate:.2f}x)", f"{s.floor.cpu_ms:.2f}")
        rows.append([sink, s.concurrency, f"{s.events:,} x {len(DESTINATIONS)}",
                     f"{s.relay.rate:,.0f}", f"{s.bare.rate:,.0f}", floor[0],
                     f"{s.ratio:.2f}x", f"{s.relay.cpu_ms:.2f}", f"{s.bare.cpu_ms:.2f}",
                     floor[1], f"{s.relay.redis_cpu_ms:.2f} / {s.bare.redis_cpu_ms:.2f}",
                     verdict(s.ratio >= TARGET_RATIO)])
    print("\n" + table(["sink", "concurrency", "deliveries", "relay /s", "bare /s",
                        "Celery floor /s (vs bare)", "relay vs bare", "relay CPU ms/delivery",
                        "bare CPU ms/delivery", "floor CPU ms/delivery",
                        "Redis CPU ms (relay / bare)", f">= {TARGET_RATIO}x"], rows))
    fast = [s.ratio for s in scenarios if s.sink == "fast"]
    if fast:
        print(f"SPEC target (fast sink): delivery >= {TARGET_RATIO} x bare consumer: "
              f"{statistics.median(fast):.2f}x {verdict(statistics.median(fast) >= TARGET_RATIO)}")
    floors = [s.relay.rate / s.floor.rate for s in scenarios if s.floor and s.relay]
    if floors:
        print(f"relay vs the Celery floor (fast sink): {statistics.median(floors):.2f}x")


if __name__ == "__main__":
    sys.exit(main())
