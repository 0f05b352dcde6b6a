"""The delivery figures of SPEC §6 (issue 11, "Measured, not asserted"), each beside a baseline
measured in the same run: ``python -m bench.delivery [--scenario NAME]``.

Every relay run posts its events through the real ingress (``create_app()``'s ``POST
/hooks/kickofflabs``, Flask test client: each becomes the ingress's own intake stream entry),
then starts the exact ``relay worker`` command with its shipped defaults (one Celery worker
process per core, each with Celery's threads pool, ``--concurrency`` 8 tasks and
``RELAY_MAX_IN_FLIGHT`` 100 send threads; a destination's ``concurrency:`` defaults to 50)
and watches the drain: ``relay:stats:<dest>``
and the in-flight hashes every 10 ms, the worker's CPU (user + system of its process tree), and
afterwards, once the worker's history writer has written them, each delivery's own time from
the history database (an SQLite file, or ``--database-url``). Redis and the history are emptied
between runs.

Scenarios (``--scenario``, default all, in this order):

``isolation``
    300 events to a fast destination alone, then the same 300 to it beside a second
    destination on the same events answering in 2 s (200 OK); the fast one's time from the
    start of admission to its last delivery, beside / alone (target <= 1.5x). ``--rounds``
    alternating pairs, medians.
``slow``
    2,000 events to one destination answering in 200 ms: deliveries/s (target >= 200/s) and
    the ratio to :mod:`bench.bare_consumer` with as many threads as the destination's
    ``concurrency`` (the same number of requests in flight; target >= 0.8x).
``fast``
    5,000 events x 2 destinations on nginx (the asyncio sink when nginx is missing): relay vs
    the bare BRPOP + urllib3 consumer (same sink, same HTTP client, one process) with as many
    threads as cores and with as many as the relay kept in flight on average; the faster one
    is the baseline (target >= 0.8x); CPU ms per delivery of both. And, not a baseline, the
    bare consumer sending the relay's way (``--pool``: a future per POST on a thread pool),
    which shows what that hand-off costs without the relay's Redis bookkeeping.
``memory``
    the worker's RSS (its whole process tree) idle and with about 500 deliveries in flight
    (1,000 events to a destination with ``concurrency: 500`` answering in 2 s, ``relay worker
    --max-in-flight 500``), beside the bare consumer's peak RSS with 500 threads.

``--profile DIR``: py-spy (``--gil --nonblocking --subprocesses``) samples the worker
processes in every relay run into collapsed stacks, to see where their CPU goes.
``--worker-arg ARG`` adds an argument to ``relay worker`` (``--worker-arg=--processes=1``).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any
from unittest import mock

from sqlalchemy import func, select

from bench.common import (
    ROOT,
    CpuWatch,
    machine_info,
    percentile,
    print_machine,
    process_tree_cpu,
    process_tree_rss,
    relay_command,
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
from relay.cli import usable_cores
from relay.core.models import SUCCESSES
from relay.history import schema
from relay.history.database import open_database, upgrade
from relay.store.keys import HISTORY, INFLIGHT_PREFIX, stats_key

SCENARIOS = ("isolation", "slow", "fast", "memory")
BARE_LIST = "bench:deliveries"
POLL = 0.01
RSS_EVERY = 0.1
MiB = 2**20

ISOLATION_TARGET = 1.5
#: Warm isolation runs wait this long after their warm-up events: the 2 s lane's first answers
#: are in, so its window is open to its whole concurrency when the measured events come.
WARM_WAIT = 2.5
SLOW_RATE_TARGET = 200.0
RATIO_TARGET = 0.8


# -- what a run measured ------------------------------------------------------------------------


@dataclass
class Run:
    deliveries: int  # counted in the timed window
    seconds: float
    cpu_seconds: float
    failed: int
    redis_cpu_seconds: float
    foreign_cores: float
    noise: str = ""
    load: float = 0.0  # 1-minute load average when the run started
    in_flight_mean: float = 0.0
    in_flight_max: int = 0
    rss_idle: int = 0
    rss_peak: int = 0
    #: destination -> (first, last) delivery time (wall clock) and count, from the store
    spans: dict[str, tuple[float, float, int]] = field(default_factory=dict)
    spawned_at: float = 0.0  # wall clock: the worker started
    admitted_at: float = 0.0  # wall clock: the first (measured) event admitted
    posted_at: float = 0.0  # wall clock: the first measured event posted (live runs)
    #: destination -> (p50, p99, max) seconds from an event's 202 to its delivery (live runs)
    lags: dict[str, tuple[float, float, float]] = field(default_factory=dict)
    posting: float = 0.0  # seconds the ingress took to accept the measured events
    threads: int = 0  # bare consumer only
    pool: bool = False  # bare consumer: sent the relay's way (a future per POST on a pool)
    processes: int = 1  # bare consumer: processes sharing the list

    @property
    def rate(self) -> float:
        return self.deliveries / self.seconds if self.seconds > 0 else float("nan")

    @property
    def cpu_ms(self) -> float:
        return self.cpu_seconds * 1000 / self.deliveries if self.deliveries else float("nan")

    @property
    def redis_cpu_ms(self) -> float:
        return self.redis_cpu_seconds * 1000 / self.deliveries if self.deliveries else 0.0

    def span(self, destination: str, since: float | None = None) -> float:
        """Seconds from ``since`` (default: the first admission) to the destination's last
        delivery."""
        _, last, _ = self.spans.get(destination, (0.0, float("nan"), 0))
        return last - (self.admitted_at if since is None else since)


@dataclass
class Dest:
    name: str
    sink: str  # key into the sinks
    keys: Mapping[str, object] = field(default_factory=dict)  # extra YAML keys


class Bench:
    """The servers every scenario shares: one Redis, the sinks (started when first needed)."""

    def __init__(self, args: argparse.Namespace, workdir: Path) -> None:
        self.args = args
        self.workdir = workdir
        self.redis_server, self.client = start_redis(workdir / "redis")
        assert self.redis_server.process is not None
        self.redis_pid = self.redis_server.process.pid
        self.database_url = args.database_url or f"sqlite:///{workdir / 'history.sqlite3'}"
        upgrade(self.database_url)
        self.database = open_database(self.database_url)
        self.sinks: dict[str, tuple[subprocess.Popen[bytes], int, str]] = {}
        self.runs = 0

    def sink(self, kind: str) -> tuple[int, str]:
        """``fast`` (nginx when installed), or ``delay:<seconds>`` (the asyncio sink)."""
        if kind not in self.sinks:
            if kind == "fast":
                self.sinks[kind] = start_sink(self.workdir, prefer_nginx=not self.args.python_sink)
            else:
                self.sinks[kind] = start_sink(self.workdir, delay=float(kind.split(":", 1)[1]))
            print(f"  sink {kind}: {self.sinks[kind][2]} on 127.0.0.1:{self.sinks[kind][1]}",
                  flush=True)
        _, port, what = self.sinks[kind]
        return port, what

    def url(self, dest: Dest) -> str:
        return f"http://127.0.0.1:{self.sink(dest.sink)[0]}/{dest.name}"

    def env(self, dests: Sequence[Dest]) -> dict[str, str]:
        self.runs += 1
        config = write_config(self.workdir / f"relay-{self.runs}.yaml", None,
                              [(d.name, self.url(d), d.keys) for d in dests])
        return {"RELAY_REDIS_URL": self.redis_server.url, "RELAY_CONFIG": str(config),
                "RELAY_DATABASE_URL": self.database_url, "PYTHONPATH": str(ROOT)}

    def close(self) -> None:
        for process, _, _ in self.sinks.values():
            stop(process)
        self.redis_server.stop()
        shutil.rmtree(self.workdir / "redis", ignore_errors=True)

    # -- the relay ---------------------------------------------------------------------------

    def relay(self, label: str, dests: Sequence[Dest], events: int,
              wait_for: Sequence[str] | None = None, worker_args: Sequence[str] = (),
              live: bool = False, warmup: int = 0, warm_wait: float = 0.0) -> Run:
        """Post ``events`` through the ingress, run the worker until every destination of
        ``wait_for`` (default: all) has them all, and measure. ``live``: start the worker
        first, wait until it is ready and idle (its RSS then is ``rss_idle``), post
        ``warmup`` events and wait until ``wait_for`` has them and ``warm_wait`` seconds have
        passed, then post the measured ``events``. ``spans`` cover the measured events only."""
        reset_redis(self.client)
        with self.database.begin() as connection:
            for table in reversed(schema.metadata.sorted_tables):
                connection.execute(table.delete())
        names = [d.name for d in dests]
        waited = list(wait_for or names)
        env = self.env(dests)
        extra = [*worker_args, *self.args.worker_arg]
        argv = [sys.executable, "-m", "relay", "worker", *extra]
        load = os.getloadavg()[0]
        log = self.workdir / f"worker-{self.runs}-{label}.log"
        if not live:
            posted_at = time.time()
            ids, accepted = enqueue_through_ingress(env, events)
        spawned_at = time.time()
        worker = spawn(argv, env, log)
        deadline = time.monotonic() + self.args.timeout
        rss_idle = base = 0
        try:
            if live:
                wait_ready(worker, log, deadline, worker_processes(extra))
                time.sleep(0.5)
                rss_idle = process_tree_rss(worker.pid)
                if warmup:
                    warmed = time.monotonic()
                    enqueue_through_ingress(env, warmup)
                    while time.monotonic() < deadline:
                        counts, _, _ = self.progress(names)
                        if (all(counts[n] >= warmup for n in waited)
                                and time.monotonic() - warmed >= warm_wait):
                            break
                        time.sleep(POLL)
                    base = sum(self.progress(names)[0].values())
                posted_at = time.time()
                ids, accepted = enqueue_through_ingress(env, events, start=warmup)
            rss_peak = rss_idle
            profiler = self.profile(worker.pid, label)
            first: tuple[float, int, float, float] | None = None  # time, count, cpu, redis
            samples: list[int] = []
            last_rss = 0.0
            with CpuWatch() as watch:
                while True:
                    if worker.poll() is not None:
                        raise RuntimeError(f"the worker exited ({worker.returncode}); see {log}")
                    counts, failed, in_flight = self.progress(names)
                    now = time.monotonic()
                    done = sum(counts[n] for n in waited)
                    if first is None and sum(counts.values()) > base:
                        first = (now, sum(counts.values()), process_tree_cpu(worker.pid),
                                 process_tree_cpu(self.redis_pid))
                    if first is not None:
                        samples.append(in_flight)
                    if live and now - last_rss >= RSS_EVERY:
                        last_rss = now
                        rss_peak = max(rss_peak, process_tree_rss(worker.pid))
                    if done + failed >= (warmup + events) * len(waited) or now > deadline:
                        break
                    time.sleep(POLL)
                cpu = process_tree_cpu(worker.pid)
                redis_cpu = process_tree_cpu(self.redis_pid)
            if profiler is not None:
                profiler.send_signal(signal.SIGINT)  # py-spy writes its file and exits
                profiler.wait(30)
            if done < (warmup + events) * len(waited):
                print(f"    {label}: only {done:,} of {events * len(waited):,} delivered within "
                      f"{self.args.timeout:g}s", flush=True)
            total = sum(counts.values())
            start, count0, cpu0, redis0 = first or (now, base, cpu, redis_cpu)
            written = time.monotonic() + 60  # the delivery times are read from the history
            while self.client.xlen(HISTORY) and time.monotonic() < written:
                time.sleep(POLL)
            run = Run(total - count0, now - start, cpu - cpu0, failed, redis_cpu - redis0,
                      watch.foreign_cores, watch.note(), load,
                      statistics.fmean(samples) if samples else 0.0, max(samples, default=0),
                      rss_idle, rss_peak, self.spans(names, ids), spawned_at,
                      self.admitted_at(ids), posted_at,
                      self.lags(names, ids, accepted) if live else {},
                      accepted[-1] - posted_at if accepted else 0.0)
        finally:
            stop(worker, timeout=30)
        return run

    def profile(self, pid: int, label: str) -> subprocess.Popen[bytes] | None:
        """With ``--profile DIR``: py-spy samples the worker's GIL holder (where its CPU goes)
        while the run lasts, without pausing it, into collapsed stacks in DIR."""
        if self.args.profile is None:
            return None
        spy = shutil.which("py-spy", path=str(Path(sys.executable).parent)) or shutil.which(
            "py-spy")
        if spy is None:
            raise RuntimeError("--profile needs py-spy (pip install py-spy)")
        self.args.profile.mkdir(parents=True, exist_ok=True)
        out = self.args.profile / f"{self.runs:02d}-{label}.txt"
        print(f"    profiling the worker into {out}", flush=True)
        return spawn([spy, "record", "--pid", str(pid), "--subprocesses", "--gil",
                      "--nonblocking", "--rate", "250", "--format", "raw", "--output", str(out)],
                     log=self.args.profile / f"{self.runs:02d}-{label}.log")

    def progress(self, names: Sequence[str]) -> tuple[dict[str, int], int, int]:
        """(delivered per destination, failed attempts, deliveries in flight) from the store."""
        pipe = self.client.pipeline(transaction=False)
        for name in names:
            pipe.hmget(stats_key(name), "delivered", "failed")
            pipe.hvals(INFLIGHT_PREFIX + name)
        replies = pipe.execute()
        counts: dict[str, int] = {}
        failed = in_flight = 0
        for name, (ok, bad), held in zip(names, replies[::2], replies[1::2], strict=True):
            counts[name] = int(ok or 0)
            failed += int(bad or 0)
            in_flight += sum(int(n) for n in held)
        return counts, failed, in_flight

    def _delivered_at(self, name: str, ids: Sequence[str]) -> dict[str, float]:
        """event id -> when its delivery to ``name`` succeeded, from the history."""
        found: dict[str, float] = {}
        table = schema.deliveries
        with self.database.connect() as connection:
            for batch in _chunks(ids, 1000):
                rows = connection.execute(select(table.c.event_id, table.c.updated_at).where(
                    table.c.destination == name, table.c.status.in_(SUCCESSES),
                    table.c.event_id.in_(list(batch))))
                found.update({event_id: at for event_id, at in rows})
        return found

    def spans(self, names: Sequence[str], ids: Sequence[str]
              ) -> dict[str, tuple[float, float, int]]:
        """destination -> (first, last, count) of the delivery times of these events."""
        spans = {}
        for name in names:
            times = list(self._delivered_at(name, ids).values())
            if times:
                spans[name] = (min(times), max(times), len(times))
        return spans

    def lags(self, names: Sequence[str], ids: Sequence[str], accepted: Sequence[float]
             ) -> dict[str, tuple[float, float, float]]:
        """destination -> (p50, p99, max) of each event's delivery time minus its 202's."""
        lags = {}
        for name in names:
            delivered = self._delivered_at(name, ids)
            times = sorted(delivered[event_id] - posted
                           for event_id, posted in zip(ids, accepted, strict=True)
                           if event_id in delivered)
            if times:
                lags[name] = (percentile(times, 50), percentile(times, 99), times[-1])
        return lags

    def admitted_at(self, ids: Sequence[str]) -> float:
        table = schema.events
        first = float("inf")
        with self.database.connect() as connection:
            for batch in _chunks(ids, 1000):
                at = connection.scalar(select(func.min(table.c.admitted_at)).where(
                    table.c.event_id.in_(list(batch))))
                if at is not None:
                    first = min(first, at)
        return first if first != float("inf") else float("nan")

    def bare(self, dests: Sequence[Dest], events: int, threads: int, pool: bool = False,
             processes: int = 1) -> Run:
        """The bare consumer: one process (the baseline), or ``processes`` of them sharing
        the list (not a baseline: what the same cores give a consumer without the relay)."""
        reset_redis(self.client)
        urls = [self.url(d) for d in dests]
        pipe = self.client.pipeline(transaction=False)
        for number in range(events):
            pipe.lpush(BARE_LIST, json.dumps(lead(number)))
        pipe.execute()
        shares = [events // processes + (i < events % processes) for i in range(processes)]
        argvs = [[sys.executable, "-m", "bench.bare_consumer", "--redis", self.redis_server.url,
                  "--list", BARE_LIST, "--threads", str(threads), "--total", str(share),
                  "--timeout", str(self.args.timeout), *(["--pool"] if pool else []), *urls]
                 for share in shares]
        load = os.getloadavg()[0]
        redis0 = process_tree_cpu(self.redis_pid)
        with CpuWatch() as watch:
            children = [subprocess.Popen(argv, cwd=ROOT, stdout=subprocess.PIPE,
                                         stderr=subprocess.PIPE, text=True) for argv in argvs]
            outputs = [child.communicate(timeout=self.args.timeout + 60) for child in children]
        results = []
        for child, (stdout, stderr) in zip(children, outputs, strict=True):
            if child.returncode != 0:
                raise RuntimeError(f"bare consumer failed: {stderr}")
            results.append(json.loads(stdout.strip().splitlines()[-1]))
            if not results[-1]["complete"]:
                print(f"    bare: only {results[-1]['items']:,} items within "
                      f"{self.args.timeout:g}s; its errors: {stderr[-1000:]!r}", flush=True)
        return Run(sum(r["deliveries"] for r in results), max(r["seconds"] for r in results),
                   sum(r["cpu_seconds"] for r in results), sum(r["failed"] for r in results),
                   process_tree_cpu(self.redis_pid) - redis0,
                   watch.foreign_cores, watch.note(), load,
                   rss_peak=max(r["max_rss_bytes"] for r in results),
                   threads=threads, pool=pool, processes=processes)


def _chunks(items: Any, size: int) -> Any:
    batch: list[Any] = []
    for item in items:
        batch.append(item)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


def code_version() -> str:
    """The commit the relay runs from, and which of its files differ from it (the figures are
    of the work tree as it was during the run). A copy that is not a git checkout (``git
    archive`` of a commit, run away from a work tree others are editing) says which commit it
    is in ``BENCH_CODE``."""
    if os.environ.get("BENCH_CODE"):
        return os.environ["BENCH_CODE"]
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, text=True,
                              capture_output=True, check=True, timeout=10).stdout.strip()
        changed = subprocess.run(["git", "status", "--porcelain", "--", "relay", "workers"],
                                 cwd=ROOT, text=True, capture_output=True, check=True,
                                 timeout=10).stdout.split("\n")
    except (OSError, subprocess.SubprocessError):
        return "unknown (not a git checkout)"
    files = [line[3:] for line in changed if line.strip()]
    return head + (f" + uncommitted changes in {', '.join(files)}" if files else "")


def lead(number: int) -> dict[str, Any]:
    """The new_signup sample as a distinct lead, so every event has its own id (no dedupe)."""
    payload = sample_payload("new_signup")
    payload.update(id=10_000_000 + number, social_id=f"B{number:07d}",
                   email=f"lead{number}@example.com")
    return payload


def enqueue_through_ingress(env: dict[str, str], events: int, start: int = 0
                            ) -> tuple[list[str], list[float]]:
    """POST every event to the real ingress app (in this process), which adds it to the
    intake stream (and queues an admit task when none is queued); their event ids, and when
    each was accepted (wall clock)."""
    with mock.patch.dict(os.environ, env):
        from relay.app import create_app

        app = create_app()
        logging.getLogger("relay.ingress").setLevel(logging.WARNING)  # a line per event
        client = app.test_client()
        ids: list[str] = []
        accepted: list[float] = []
        for number in range(start, start + events):
            response = client.post("/hooks/kickofflabs", data=json.dumps(lead(number)),
                                   content_type="application/json")
            if response.status_code != 202:
                raise RuntimeError(f"ingress answered {response.status_code}: {response.data!r}")
            ids.append(response.get_json()["event_id"])
            accepted.append(time.time())
    return ids, accepted


def worker_processes(worker_args: Sequence[str]) -> int:
    """How many Celery worker processes ``relay worker <worker_args>`` runs."""
    from relay.cli import worker

    context = worker.make_context("worker", list(worker_args))
    return context.params["processes"] or usable_cores()


def wait_ready(worker: subprocess.Popen[bytes], log: Path, deadline: float,
               processes: int) -> None:
    """Until each of the worker's Celery processes logs that it is ready."""
    while time.monotonic() < deadline:
        if worker.poll() is not None:
            raise RuntimeError(f"the worker exited ({worker.returncode}); see {log}")
        if log.exists() and log.read_bytes().count(b" ready.") >= processes:
            return
        time.sleep(0.05)
    raise RuntimeError(f"the worker was not ready in time; see {log}")


def describe(label: str, run: Run) -> str:
    extra = (f", {run.processes} processes x {run.threads} threads" if run.processes > 1
             else f", {run.threads} threads") if run.threads else (
        f", in flight mean {run.in_flight_mean:.0f} max {run.in_flight_max}")
    return (f"    {label}: {run.deliveries:,} deliveries in {run.seconds:.2f}s = "
            f"{run.rate:,.0f}/s, CPU {run.cpu_ms:.2f} ms/delivery (Redis "
            f"{run.redis_cpu_ms:.2f}){extra}, {run.failed} failed; load {run.load:.2f}, "
            f"{run.noise}")


def lag(run: Run, destination: str = "fast") -> str:
    if destination not in run.lags:
        return "-"
    return " / ".join(f"{v * 1000:.0f}" for v in run.lags[destination]) + " ms"


def fmt_mib(n: int) -> str:
    return f"{n / MiB:,.0f} MiB"


# -- the scenarios -----------------------------------------------------------------------------


def isolation(bench: Bench, args: argparse.Namespace) -> dict[str, Any]:
    """Two ways, each alone then beside the 2 s destination: *cold*, the events posted before
    the worker starts (timed from the first admission; the slow lane is still opening its
    window, so it holds few of the threads), and *warm*, the worker running with the slow lane
    already full (``--isolation-warmup`` events posted first, then a wait) when the measured
    events are posted (timed from the first post)."""
    fast = Dest("fast", "fast")
    slow = Dest("slow-2s", "delay:2")
    events, warmup = args.isolation_events, args.isolation_warmup
    rows, pairs = [], []
    ratios: dict[str, list[float]] = {"cold": [], "warm": []}
    print(f"isolation: {events:,} events to 'fast' alone, then beside 'slow-2s' (2 s answers, "
          f"same events), cold and warm ({warmup} events and {WARM_WAIT:g} s first), "
          f"{args.rounds} rounds", flush=True)
    for number in range(1, args.rounds + 1):
        for way in ("cold", "warm"):
            live = {"live": True, "warmup": warmup, "warm_wait": WARM_WAIT} if way == "warm" else {}
            alone = bench.relay(f"{way}-alone", [fast], events, **live)
            beside = bench.relay(f"{way}-beside", [fast, slow], events, wait_for=["fast"], **live)
            runs = {"alone": alone, "beside": beside}
            took = {k: r.span("fast", r.posted_at if way == "warm" else r.admitted_at)
                    for k, r in runs.items()}
            for k, r in runs.items():
                print(f"    round {number} {way} {k}: fast done {took[k]:.3f}s after the first "
                      f"{'post' if way == 'warm' else 'admission'} (posting took "
                      f"{r.posting:.3f}s), in flight max "
                      f"{r.in_flight_max}, slow-2s delivered "
                      f"{r.spans.get('slow-2s', (0, 0, 0))[2]}; load {r.load:.2f}, {r.noise}",
                      flush=True)
            ratio = took["beside"] / took["alone"]
            ratios[way].append(ratio)
            pairs.append({"round": number, "way": way, "alone": asdict(alone),
                          "beside": asdict(beside), "ratio": ratio})
            rows.append([number, way, f"{took['alone']:.3f} s", f"{took['beside']:.3f} s",
                         f"{ratio:.2f}x", lag(alone), lag(beside),
                         f"{alone.in_flight_max} / {beside.in_flight_max}",
                         f"{beside.spans.get('slow-2s', (0, 0, 0))[2]} of {events}",
                         "NOISY" if "NOISY" in alone.noise + beside.noise else "ok"])
    medians = {way: statistics.median(r) for way, r in ratios.items()}
    ok = all(m <= ISOLATION_TARGET for m in medians.values())
    print("\n" + table(["round", "way", "fast alone", "fast beside slow-2s", "beside / alone",
                        "fast 202-to-delivery p50 / p99 / max, alone", "... beside",
                        "in flight max (alone / beside)", "slow-2s delivered by then",
                        "noise"], rows))
    for way, median in medians.items():
        print(f"isolation ({way}): the fast destination beside a 2 s one takes a median "
              f"{median:.2f}x its time alone (target <= {ISOLATION_TARGET}x): "
              f"{verdict(median <= ISOLATION_TARGET)}")
    print(flush=True)
    return {"rounds": pairs, "median_ratio": medians, "pass": ok}


def slow(bench: Bench, args: argparse.Namespace) -> dict[str, Any]:
    dest = Dest("slow-200ms", "delay:0.2")
    concurrency = 50  # the webhook default (relay.core.models.Destination.concurrency)
    print(f"slow: {args.slow_events:,} events to one destination answering in 200 ms "
          f"(shipped defaults: concurrency {concurrency})", flush=True)
    relay = bench.relay("slow", [dest], args.slow_events)
    print(describe("relay", relay), flush=True)
    bare = bench.bare([dest], args.slow_events, threads=concurrency)
    print(describe("bare ", bare), flush=True)
    ratio = relay.rate / bare.rate
    ok_rate, ok_ratio = relay.rate >= SLOW_RATE_TARGET, ratio >= RATIO_TARGET
    print("\n" + table(
        ["", "deliveries/s", "in flight (mean / max)", "CPU ms/delivery", "Redis CPU ms/delivery",
         "load / other cores"],
        [["relay", f"{relay.rate:,.0f}", f"{relay.in_flight_mean:.0f} / {relay.in_flight_max}",
          f"{relay.cpu_ms:.2f}", f"{relay.redis_cpu_ms:.2f}",
          f"{relay.load:.2f} / {relay.foreign_cores:.2f}"],
         [f"bare, {concurrency} threads", f"{bare.rate:,.0f}", f"{concurrency} / {concurrency}",
          f"{bare.cpu_ms:.2f}", f"{bare.redis_cpu_ms:.2f}",
          f"{bare.load:.2f} / {bare.foreign_cores:.2f}"]]))
    print(f"slow: {relay.rate:,.0f} deliveries/s (target >= {SLOW_RATE_TARGET:g}/s): "
          f"{verdict(ok_rate)}; {ratio:.2f}x the bare consumer with {concurrency} in flight "
          f"(target >= {RATIO_TARGET}x): {verdict(ok_ratio)}\n", flush=True)
    return {"relay": asdict(relay), "bare": asdict(bare), "ratio": ratio,
            "pass": ok_rate and ok_ratio}


def fast(bench: Bench, args: argparse.Namespace) -> dict[str, Any]:
    dests = [Dest("sink-a", "fast"), Dest("sink-b", "fast")]
    _, what = bench.sink("fast")
    cores = os.cpu_count() or 1
    print(f"fast: {args.events:,} events x 2 destinations on {what}", flush=True)
    relay = bench.relay("fast", dests, args.events)
    print(describe("relay", relay), flush=True)
    bares = [bench.bare(dests, args.events, threads=cores)]
    print(describe("bare ", bares[0]), flush=True)
    matched = max(1, round(relay.in_flight_mean))
    if matched != cores:  # the bare consumer with as many requests in flight as the relay
        bares.append(bench.bare(dests, args.events, threads=matched))
        print(describe("bare ", bares[1]), flush=True)
    best = max(bares, key=lambda r: r.rate)
    ratio = relay.rate / best.rate
    # Not baselines: the relay's hand-off to a send pool, without its Redis bookkeeping; and
    # bare consumers in as many processes as the relay runs, on the same cores.
    probes = [bench.bare(dests, args.events, threads=max(len(dests), matched), pool=True)]
    print(describe("pool ", probes[0]), flush=True)
    processes = worker_processes(args.worker_arg)
    if processes > 1:
        probes.append(bench.bare(dests, args.events, threads=cores, processes=processes))
        print(describe("bare ", probes[1]), flush=True)
    rows = [["relay", f"{relay.rate:,.0f}", f"{relay.in_flight_mean:.1f} / {relay.in_flight_max}",
             f"{relay.cpu_ms:.2f}", f"{relay.redis_cpu_ms:.2f}", "-",
             f"{relay.load:.2f} / {relay.foreign_cores:.2f}"]]
    for bare in [*bares, *probes]:
        name = f"bare, {'pool of ' if bare.pool else ''}{bare.threads} threads"
        if bare.processes > 1:
            name = f"bare, {bare.processes} processes x {bare.threads} threads"
        rows.append([name, f"{bare.rate:,.0f}", f"{bare.threads}",
                     f"{bare.cpu_ms:.2f}", f"{bare.redis_cpu_ms:.2f}",
                     f"{relay.rate / bare.rate:.2f}x",
                     f"{bare.load:.2f} / {bare.foreign_cores:.2f}"])
    print("\n" + table(["", "deliveries/s", "in flight (mean / max)", "CPU ms/delivery",
                        "Redis CPU ms/delivery", "relay vs this", "load / other cores"], rows))
    print(f"fast: relay {ratio:.2f}x the faster bare consumer ({best.threads} threads; target "
          f">= {RATIO_TARGET}x): {verdict(ratio >= RATIO_TARGET)}; CPU per delivery "
          f"{relay.cpu_ms:.2f} ms vs {best.cpu_ms:.2f} ms "
          f"({relay.cpu_ms / best.cpu_ms:.1f}x)\n", flush=True)
    print("(not baselines: the pool row sends the relay's way, a future per POST on a thread "
          "pool, without its Redis bookkeeping, and shows what the hand-off costs; the "
          "processes row runs as many bare consumers as the relay runs worker processes)")
    return {"sink": what, "relay": asdict(relay), "bare": [asdict(b) for b in bares],
            "probes": [asdict(p) for p in probes],
            "ratio": ratio, "pass": ratio >= RATIO_TARGET}


def memory(bench: Bench, args: argparse.Namespace) -> dict[str, Any]:
    n = args.memory_in_flight
    dest = Dest("slow-2s", "delay:2", {"concurrency": n})
    events = 2 * n
    print(f"memory: {events:,} events to a destination with concurrency {n} answering in 2 s, "
          f"relay worker --processes 1 --max-in-flight {n}", flush=True)
    relay = bench.relay("memory", [dest], events,
                        worker_args=["--processes", "1", "--max-in-flight", str(n)],
                        live=True)
    print(describe("relay", relay), flush=True)
    bare = bench.bare([dest], events, threads=n)
    print(describe("bare ", bare), flush=True)
    per = (relay.rss_peak - relay.rss_idle) / max(1, relay.in_flight_max)
    print("\n" + table(
        ["", "RSS idle", "RSS peak", "in flight max", "RSS per delivery in flight",
         "deliveries/s"],
        [["relay worker (process tree)", fmt_mib(relay.rss_idle), fmt_mib(relay.rss_peak),
          relay.in_flight_max, f"{per / 1024:,.0f} KiB", f"{relay.rate:,.0f}"],
         [f"bare consumer, {n} threads", "-", fmt_mib(bare.rss_peak), n, "-",
          f"{bare.rate:,.0f}"]]))
    print(f"memory: the worker's RSS with {relay.in_flight_max} deliveries in flight: "
          f"{fmt_mib(relay.rss_peak)} ({fmt_mib(relay.rss_idle)} idle)\n", flush=True)
    return {"relay": asdict(relay), "bare": asdict(bare), "per_in_flight_bytes": per}


RUNNERS: dict[str, Callable[[Bench, argparse.Namespace], dict[str, Any]]] = {
    "isolation": isolation, "slow": slow, "fast": fast, "memory": memory}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.delivery", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--scenario", action="append", choices=SCENARIOS, default=None,
                        help="run only this scenario (repeatable) [default: all]")
    parser.add_argument("--rounds", type=int, default=3,
                        help="isolation: alone / beside pairs (median)")
    parser.add_argument("--isolation-events", type=int, default=300)
    parser.add_argument("--isolation-warmup", type=int, default=100,
                        help="isolation, warm: events posted (and waited for) first")
    parser.add_argument("--slow-events", type=int, default=2000)
    parser.add_argument("--events", type=int, default=5000, help="events of the fast scenario")
    parser.add_argument("--memory-in-flight", type=int, default=500)
    parser.add_argument("--worker-arg", action="append", default=[], metavar="ARG",
                        help="an extra `relay worker` argument for tuning experiments "
                        "(--worker-arg=--processes=1); repeatable")
    parser.add_argument("--python-sink", action="store_true",
                        help="use the asyncio sink even when nginx is installed")
    parser.add_argument("--timeout", type=float, default=120, help="bound on each drain, s")
    parser.add_argument("--profile", type=Path, default=None, metavar="DIR",
                        help="py-spy the worker (GIL holder, collapsed stacks) in every relay "
                        "run into DIR")
    parser.add_argument("--json", type=Path, default=None, help="also write the figures here")
    parser.add_argument("--database-url", default=None,
                        help="the history database (default: an SQLite file in the workdir)")
    args = parser.parse_args(argv)
    chosen = [s for s in SCENARIOS if s in (args.scenario or SCENARIOS)]

    workdir = Path(tempfile.mkdtemp(prefix="leadrelay-bench-delivery-"))
    bench = Bench(args, workdir)
    results: dict[str, Any] = {}
    try:
        info = machine_info(bench.client)
        info["code"] = code_version()
        print_machine(info)
        argv, _ = relay_command("worker", "--processes", "1")
        processes = worker_processes(args.worker_arg)
        print(f"relay worker {' '.join(args.worker_arg)}: {processes} x {' '.join(argv[2:])};"
              f" logs in {workdir}; load average {os.getloadavg()[0]:.2f}", flush=True)
        started = time.monotonic()
        for name in chosen:
            scenario_started = time.monotonic()
            results[name] = RUNNERS[name](bench, args)
            print(f"({name} ran in {time.monotonic() - scenario_started:.0f}s)\n", flush=True)
        print("summary:")
        for name, result in results.items():
            if "pass" in result:
                print(f"  {name}: {verdict(result['pass'])}")
        print(f"(ran in {time.monotonic() - started:.0f}s)")
        if args.json:
            args.json.write_text(json.dumps(
                {"machine": info, "settings": vars(args), "worker_argv": argv,
                 "sinks": {k: v[2] for k, v in bench.sinks.items()}, "results": results},
                indent=2, default=str))
    finally:
        bench.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
