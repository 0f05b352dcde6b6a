"""Ingress throughput and latency against a bare Flask + LPUSH endpoint (SPEC §6).

``python -m bench.ingress`` starts the embedded Redis (AOF everysec), then serves, one after the
other and with the identical gunicorn command of ``relay web`` (gevent workers that read whole
requests, cores + 1 processes × 2 requests in the app unless ``--workers``/``--threads`` say
otherwise):

1. the baseline, :mod:`bench.bare_app` (reads the body, one ``LPUSH``, 202);
2. the relay, ``relay.wsgi:app``, on ``POST /hooks/kickofflabs?token=…``.

Each gets a warm-up, a closed-loop saturation run with wrk (its requests per second), and two
open-loop runs (:mod:`bench.loadgen`) at 50 % and 80 % of the *baseline's* saturation rate, whose
latencies count from each request's scheduled send time. The body is the ``new_signup`` sample.
``--compare-worker-class gthread`` runs both again with that gunicorn worker class (the setup
``relay web`` shipped before its gevent workers), in the same rounds.

Then the slow-client run (``--slow-clients N``, 64 by default; 0 skips it): for each relay
server, N connections trickle a ``POST /hooks/kickofflabs`` body (``Content-Length: 1000``, ten
bytes, then a byte a second) and N trickle header lines (one a second), each opened again when
the server closes it, while wrk posts as in the closed loop: what a handful of slow or stalled
clients leave of the ingress.
Before the open-loop runs the generator is checked against a trivial server (nginx, else a
Python sink) at 1.5 × the highest rate, to show it can offer more than it is asked to.
Redis is emptied (and its AOF rewritten) between runs. Everything listens on 127.0.0.1 only.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import redis

from bench.bare_app import BARE_LIST
from bench.common import (
    HOST,
    ROOT,
    CpuWatch,
    argv_option,
    free_port,
    machine_info,
    ms,
    print_machine,
    process_tree_cpu,
    reset_redis,
    sample_payload,
    spawn,
    start_redis,
    start_sink,
    stop,
    table,
    verdict,
    wait_port,
    web_argv,
    write_config,
)
from bench.loadgen import OpenLoopResult, open_loop
from relay.store.keys import INTAKE

TOKEN = "bench-token"
TARGET_RATIO = 0.8
TARGET_P99 = 0.010
LOADS = (0.5, 0.8)

WRK_SCRIPT = """
wrk.method = "POST"
wrk.headers["Content-Type"] = "application/json"
wrk.headers["User-Agent"] = "KickoffLabs"
local f = assert(io.open(os.getenv("BENCH_BODY"), "rb"))
wrk.body = f:read("*a")
f:close()

done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    "BENCH_JSON {\\"requests\\":%d,\\"duration_us\\":%d,\\"connect\\":%d,\\"read\\":%d," ..
    "\\"write\\":%d,\\"status\\":%d,\\"timeout\\":%d,\\"p50_us\\":%d,\\"p99_us\\":%d," ..
    "\\"max_us\\":%d}\\n",
    summary.requests, summary.duration, e.connect, e.read, e.write, e.status, e.timeout,
    latency:percentile(50), latency:percentile(99), latency.max))
end
"""


@dataclass
class Closed:
    rps: float
    p50: float
    p99: float
    requests: int
    errors: int
    stored: int
    cpu_ms_per_request: float
    foreign_cores: float


@dataclass
class ServerResult:
    label: str
    app: str
    path: str
    server_args: list[str] = field(default_factory=list)  # beyond relay web's command
    closed: list[Closed] = field(default_factory=list)
    open: dict[str, dict[str, Any]] = field(default_factory=dict)
    slow: dict[str, Any] = field(default_factory=dict)

    def median(self, attribute: str) -> float:
        return float(statistics.median(getattr(run, attribute) for run in self.closed))


def wrk(url: str, body_file: Path, duration: float, connections: int,
        threads: int, script: Path) -> dict[str, Any]:
    argv = ["wrk", f"-t{threads}", f"-c{connections}", f"-d{duration:g}s", "--timeout", "5s",
            "-s", str(script), url]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=duration + 60,
                          env={**os.environ, "BENCH_BODY": str(body_file)}, check=False)
    found = re.search(r"^BENCH_JSON (\{.*\})$", done.stdout, re.M)
    if done.returncode != 0 or not found:
        raise RuntimeError(f"wrk failed ({done.returncode}):\n{done.stdout}\n{done.stderr}")
    result: dict[str, Any] = json.loads(found.group(1))
    return result


def stored(client: redis.Redis) -> int:
    return int(client.xlen(INTAKE)) + int(client.llen(BARE_LIST))


class Bench:
    """One run of the whole comparison: the embedded Redis, the body, the two servers."""

    def __init__(self, args: argparse.Namespace, workdir: Path, redis_url: str,
                 client: redis.Redis) -> None:
        self.args = args
        self.workdir = workdir
        self.client = client
        self.body = json.dumps(sample_payload("new_signup")).encode()
        self.body_file = workdir / "new_signup.json"
        self.body_file.write_bytes(self.body)
        self.script = workdir / "post.lua"
        self.script.write_text(WRK_SCRIPT)
        config = write_config(workdir / "relay.yaml", TOKEN,
                              [("unused", "http://127.0.0.1:9/never-called")])
        self.env = {"RELAY_REDIS_URL": redis_url, "RELAY_CONFIG": str(config),
                    "PYTHONPATH": str(ROOT)}

    @contextlib.contextmanager
    def serve(self, server: ServerResult) -> Iterator[str]:
        """Start ``relay web``'s gunicorn command for the server's app; yield its URL after a
        202 check and a warm-up."""
        port = free_port()
        argv = web_argv(server.app, port, self.args.workers, self.args.threads)
        argv += self.args.server_arg + server.server_args
        log = self.workdir / f"{server.app.split(':')[0]}.log"
        process = spawn(argv, self.env, log)
        try:
            wait_port(port, process)
            url = f"http://{HOST}:{port}{server.path}"
            check = subprocess.run(
                ["curl", "-s", "-o", "/dev/null", "-w", "%{http_code}", "-X", "POST", "-H",
                 "Content-Type: application/json", "--data-binary", f"@{self.body_file}", url],
                capture_output=True, text=True, timeout=30, check=False)
            if check.stdout.strip() != "202":
                raise RuntimeError(f"{server.label}: expected 202, got {check.stdout!r}; "
                                   f"see {log}")
            self.server_argv = argv
            self.server_pid = process.pid
            self.run_wrk(url, self.args.warmup)
            yield url
        finally:
            stop(process)
            reset_redis(self.client)

    def run_wrk(self, url: str, duration: float) -> dict[str, Any]:
        return wrk(url, self.body_file, duration, self.args.connections, self.args.wrk_threads,
                   self.script)

    def closed(self, server: ServerResult) -> Closed:
        with self.serve(server) as url:
            reset_redis(self.client)
            cpu_before = process_tree_cpu(self.server_pid)
            with CpuWatch() as watch:
                run = self.run_wrk(url, self.args.duration)
            cpu = process_tree_cpu(self.server_pid) - cpu_before
            errors = run["connect"] + run["read"] + run["write"] + run["status"] + run["timeout"]
            result = Closed(
                rps=run["requests"] / (run["duration_us"] / 1e6), p50=run["p50_us"] / 1e6,
                p99=run["p99_us"] / 1e6, requests=run["requests"], errors=errors,
                stored=stored(self.client), cpu_ms_per_request=cpu * 1000 / max(1, run["requests"]),
                foreign_cores=watch.foreign_cores)
        server.closed.append(result)
        print(f"  {server.label}: {result.rps:,.0f} rps, p50 {ms(result.p50)}, "
              f"p99 {ms(result.p99)}, {result.errors} errors, {result.stored:,} events in Redis, "
              f"server CPU {result.cpu_ms_per_request:.2f} ms/request; {watch.note()}",
              flush=True)
        return result

    def open_loops(self, server: ServerResult, rates: list[float]) -> None:
        with self.serve(server):
            port = int(self.server_argv[self.server_argv.index("--bind") + 1].rsplit(":", 1)[1])
            for load, rate in zip(LOADS, rates, strict=True):
                reset_redis(self.client)
                with CpuWatch() as watch:
                    run = open_loop(HOST, port, server.path, self.body, rate,
                                    self.args.open_duration, self.args.gen_connections)
                server.open[f"{load:.0%}"] = {**summarize_open(run),
                                              "foreign_cores": watch.foreign_cores}
                print(f"  {server.label} at {load:.0%} ({rate:,.0f} rps offered): "
                      f"{run.achieved_rps:,.0f} rps, p50 {ms(run.pct(50))}, "
                      f"p99 {ms(run.pct(99))}, max {ms(run.pct(100))}, "
                      f"{run.ok(202):,} x 202 of {run.sent:,} sent, {run.errors} errors; "
                      f"{watch.note()}", flush=True)


    def slow_clients(self, server: ServerResult) -> None:
        """wrk's closed loop while ``--slow-clients`` slow-body and as many slow-header
        connections are held open."""
        count = self.args.slow_clients
        with self.serve(server) as url:
            reset_redis(self.client)
            port = int(argv_option(self.server_argv, "--bind").rsplit(":", 1)[1])
            with SlowClients(port, count) as slow:
                time.sleep(2.0)  # every slow client connected and past its first bytes
                held = slow.open_count()
                run = self.run_wrk(url, self.args.duration)
                held = min(held, slow.open_count())
            errors = run["connect"] + run["read"] + run["write"] + run["status"] + run["timeout"]
            server.slow = {
                "slow_body": count, "slow_header": count, "held_open": held,
                "reopened": slow.reopened, "rps": run["requests"] / (run["duration_us"] / 1e6),
                "requests": run["requests"], "errors": errors, "timeouts": run["timeout"],
                "p50": run["p50_us"] / 1e6, "p99": run["p99_us"] / 1e6,
                "max": run["max_us"] / 1e6, "stored": stored(self.client)}
        result = server.slow
        print(f"  {server.label} with {count} slow-body + {count} slow-header clients "
              f"({held} open at the end, {slow.reopened} reopened after the server closed "
              f"them): {result['rps']:,.0f} rps, p50 {ms(result['p50'])}, p99 "
              f"{ms(result['p99'])}, max {ms(result['max'])}, {result['errors']} errors "
              f"({result['timeouts']} timeouts), {result['stored']:,} events in Redis",
              flush=True)


class SlowClients:
    """``count`` connections that trickle a POST body and ``count`` that trickle header lines,
    a byte or a line a second from one thread; a connection the server closes (or answers) is
    opened again, so the server faces the same number throughout. Bounded: they stop when the
    ``with`` block ends."""

    BODY_HEAD = (b"POST /hooks/kickofflabs HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                 b"Content-Type: application/json\r\nContent-Length: 1000\r\n\r\n{\"a\": \"123")
    HEADER_HEAD = b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n"

    def __init__(self, port: int, count: int, interval: float = 1.0) -> None:
        self.port = port
        self.count = count
        self.interval = interval
        self.reopened = 0
        self._sockets: dict[int, tuple[str, socket.socket | None]] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="slow-clients", daemon=True)
        self._lock = threading.Lock()

    def __enter__(self) -> SlowClients:
        for i in range(2 * self.count):
            self._sockets[i] = ("body" if i < self.count else "header", None)
            self._open(i)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(10)
        with self._lock:
            for _, sock in self._sockets.values():
                if sock is not None:
                    sock.close()

    def open_count(self) -> int:
        with self._lock:
            return sum(1 for _, sock in self._sockets.values() if sock is not None)

    def _open(self, i: int) -> None:
        kind, _ = self._sockets[i]
        try:
            sock = socket.create_connection((HOST, self.port), timeout=2)
            sock.sendall(self.BODY_HEAD if kind == "body" else self.HEADER_HEAD)
            sock.setblocking(False)
        except OSError:
            sock = None
        with self._lock:
            self._sockets[i] = (kind, sock)

    def _closed_by_server(self, sock: socket.socket) -> bool:
        try:
            sock.recv(65536)  # an answer (408, 400) or the end of the connection
            return True
        except BlockingIOError:
            return False
        except OSError:
            return True

    def _run(self) -> None:
        step = 0
        while not self._stop.wait(self.interval):
            step += 1
            for i, (kind, sock) in list(self._sockets.items()):
                if self._stop.is_set():
                    return
                if sock is not None and not self._closed_by_server(sock):
                    try:
                        sock.send(b" " if kind == "body" else f"X-Slow-{step}: a\r\n".encode())
                        continue
                    except OSError:
                        pass
                if sock is not None:
                    sock.close()
                    self.reopened += 1
                self._open(i)


def summarize_open(run: OpenLoopResult) -> dict[str, Any]:
    return {"offered_rps": run.offered_rps, "achieved_rps": run.achieved_rps,
            "p50": run.pct(50), "p99": run.pct(99), "max": run.pct(100), "sent": run.sent,
            "accepted": run.ok(202), "errors": run.errors}


def generator_check(workdir: Path, body: bytes, rate: float,
                    args: argparse.Namespace) -> dict[str, Any]:
    """Offer more than the highest target rate to a trivial server: the generator must keep
    up, and its own latency floor is printed next to the figures it produces."""
    sink, port, what = start_sink(workdir)
    try:
        run = open_loop(HOST, port, "/", body, rate, min(5.0, args.open_duration),
                        args.gen_connections)
    finally:
        stop(sink)
    kept_up = run.completed >= 0.99 * run.sent and run.achieved_rps >= 0.97 * rate
    print(f"generator check against {what}: {rate:,.0f} rps offered (1.5 x the highest "
          f"target rate), {run.achieved_rps:,.0f} rps achieved, p50 {ms(run.pct(50))}, "
          f"p99 {ms(run.pct(99))} (the generator's own latency floor): "
          f"{'it keeps up' if kept_up else 'IT DOES NOT KEEP UP: open-loop figures are suspect'}",
          flush=True)
    return {"sink": what, **summarize_open(run), "kept_up": kept_up}


def report(servers: list[ServerResult], rates: list[float]) -> dict[str, Any]:
    """The table; ``servers`` are pairs (baseline, relay), one per server setup."""
    pairs = [(servers[i], servers[i + 1]) for i in range(0, len(servers), 2)]
    ratios_of = {relay.label: [r.rps / b.rps for b, r in zip(base.closed, relay.closed,
                                                             strict=True)]
                 for base, relay in pairs}
    rounds = len(servers[0].closed)
    rows = []
    for base, relay in pairs:
        for item in (base, relay):
            rps = [run.rps for run in item.closed]
            spread = f" ({min(rps):,.0f}-{max(rps):,.0f})" if rounds > 1 else ""
            ratio = statistics.median(ratios_of[relay.label])
            row: list[object] = [item.label, f"{item.median('rps'):,.0f}{spread}",
                                 ms(item.median("p50")), ms(item.median("p99")),
                                 "1.00x" if item is base else f"{ratio:.2f}x",
                                 f"{item.median('cpu_ms_per_request'):.2f}"]
            for load in LOADS if item.open else ():
                run = item.open[f"{load:.0%}"]
                row += [f"{run['achieved_rps']:,.0f}", ms(run["p50"]), ms(run["p99"])]
            rows.append(row)
    headers = ["endpoint", "rps closed" + (f" (median of {rounds})" if rounds > 1 else ""),
               "p50", "p99", "vs bare", "CPU ms/req"]
    for load, rate in zip(LOADS, rates if servers[1].open else [], strict=False):
        headers += [f"rps @{load:.0%} ({rate:,.0f} offered)", "p50", "p99"]
    print("\n" + table(headers, rows))
    slow = [relay for _, relay in pairs if relay.slow]
    if slow:
        print("\n" + table(
            ["endpoint", "slow clients (body + header)", "rps", "vs without", "p50", "p99",
             "max", "errors (timeouts)"],
            [[relay.label, f"{relay.slow['slow_body']} + {relay.slow['slow_header']}",
              f"{relay.slow['rps']:,.0f}", f"{relay.slow['rps'] / relay.median('rps'):.2f}x",
              ms(relay.slow["p50"]), ms(relay.slow["p99"]), ms(relay.slow["max"]),
              f"{relay.slow['errors']} ({relay.slow['timeouts']})"] for relay in slow]))
    relay = pairs[0][1]
    ratio = statistics.median(ratios_of[relay.label])
    p99_half = relay.open["50%"]["p99"] if relay.open else float("nan")
    if rounds > 1:
        for label, ratios in ratios_of.items():
            print(f"ratios per round, {label}: " + ", ".join(f"{r:.2f}" for r in ratios))
    for _, other in pairs[1:]:
        print(f"{relay.label} / {other.label}: "
              f"{relay.median('rps') / other.median('rps'):.2f}x the requests per second")
    print(f"SPEC targets: ingress >= {TARGET_RATIO} x baseline: {ratio:.2f}x "
          f"{verdict(ratio >= TARGET_RATIO)}; p99 <= {TARGET_P99 * 1000:g} ms at 50% load: "
          f"{ms(p99_half)} {verdict(p99_half <= TARGET_P99)}")
    return {"ratio": ratio, "ratios": ratios_of[relay.label], "ratios_by_server": ratios_of,
            "rates": rates, "servers": [asdict(item) for item in servers]}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.ingress", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--duration", type=float, default=10, help="closed-loop seconds")
    parser.add_argument("--open-duration", type=float, default=10, help="open-loop seconds")
    parser.add_argument("--rounds", type=int, default=3,
                        help="closed-loop rounds, alternating the servers (medians reported)")
    parser.add_argument("--warmup", type=float, default=3, help="warm-up seconds")
    parser.add_argument("--connections", type=int, default=16, help="wrk connections")
    parser.add_argument("--wrk-threads", type=int, default=1)
    parser.add_argument("--gen-connections", type=int, default=64,
                        help="open-loop generator connections")
    parser.add_argument("--workers", type=int, default=None,
                        help="gunicorn workers for both servers [relay web's default]")
    parser.add_argument("--threads", type=int, default=None,
                        help="threads per worker for both servers [relay web's default]")
    parser.add_argument("--server-arg", action="append", default=[], metavar="ARG",
                        help="an extra gunicorn argument for both servers, for tuning "
                        "experiments (e.g. --server-arg=--reuse-port); repeatable")
    parser.add_argument("--compare-worker-class", default=None, metavar="CLASS",
                        help="also run both servers with this gunicorn worker class (e.g. "
                        "gthread, relay web's before it served with gevent), same rounds")
    parser.add_argument("--slow-clients", type=int, default=64, metavar="N",
                        help="the slow-client run: N slow-body + N slow-header connections "
                        "held open during a closed loop against each relay server (0: skip)")
    parser.add_argument("--closed-only", action="store_true",
                        help="skip the open-loop runs (quick A/B comparisons while tuning)")
    parser.add_argument("--json", type=Path, default=None, help="also write the figures here")
    args = parser.parse_args(argv)
    if shutil.which("wrk") is None:
        print("bench.ingress needs wrk, which is not installed.\n"
              "Install it (Debian/Ubuntu: apt-get update && apt-get install -y wrk) and run "
              "again.", file=sys.stderr)
        return 2
    if shutil.which("curl") is None:
        print("bench.ingress needs curl (apt-get install -y curl).", file=sys.stderr)
        return 2
    workdir = Path(tempfile.mkdtemp(prefix="leadrelay-bench-ingress-"))
    redis_server, client = start_redis(workdir / "redis")
    try:
        info = machine_info(client)
        print_machine(info)
        bench = Bench(args, workdir, redis_server.url, client)
        setups = [("", [])]
        if args.compare_worker_class:
            setups.append((f" ({args.compare_worker_class})",
                           ["--worker-class", args.compare_worker_class]))
        servers = [server for suffix, extra in setups for server in (
            ServerResult("bare Flask + LPUSH" + suffix, "bench.bare_app:app",
                         "/hooks/kickofflabs", extra),
            ServerResult("leadrelay ingress" + suffix, "relay.wsgi:app",
                         f"/hooks/kickofflabs?token={TOKEN}", extra))]
        argv = web_argv("relay.wsgi:app", 0, args.workers, args.threads) + args.server_arg
        shown = " ".join(argv[2:3] + argv[4:]).replace(f"{HOST}:0", f"{HOST}:PORT")
        print(f"servers: {shown}\n"
              f"body: new_signup sample, {len(bench.body):,} bytes; closed loop: wrk "
              f"-t{args.wrk_threads} -c{args.connections} -d{args.duration:g}s x {args.rounds} "
              f"rounds; open loop: {args.open_duration:g}s over {args.gen_connections} "
              f"connections; logs in {workdir}", flush=True)
        started = time.monotonic()
        for number in range(args.rounds):
            print(f"closed loop, round {number + 1}:", flush=True)
            for server in servers:
                bench.closed(server)
        rates = [servers[0].median("rps") * load for load in LOADS]
        check = None
        if not args.closed_only:
            check = generator_check(workdir, bench.body, max(rates) * 1.5, args)
            print("open loop (latency from the scheduled send time):", flush=True)
            for server in servers:
                bench.open_loops(server, rates)
        if args.slow_clients > 0:
            print(f"slow clients ({args.slow_clients} slow-body + {args.slow_clients} "
                  "slow-header connections held open during a closed loop):", flush=True)
            for server in servers[1::2]:
                bench.slow_clients(server)
        figures = report(servers, rates)
        print(f"(ran in {time.monotonic() - started:.0f}s)")
        if args.json:
            args.json.write_text(json.dumps({"machine": info, "settings": vars(args),
                                             "server_argv": argv, "generator_check": check,
                                             **figures}, indent=2, default=str))
    finally:
        redis_server.stop()
        shutil.rmtree(workdir / "redis", ignore_errors=True)
    return 0

if __name__ == "__main__":
    sys.exit(main())
