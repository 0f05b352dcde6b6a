"""The per-lead ordering figures of issue 17 ("Measured, not asserted"), each beside its baseline
measured in the same run: ``python -m bench.ordering``.

Every run posts ``score_change`` events through the real ingress (each lead's events in turn,
as a campaign's bursts interleave: step 0 of every lead, then step 1, ...), then starts the
exact ``relay worker`` command with its shipped defaults, delivering to one webhook
destination (its default ``concurrency: 50``; ``retry: {schedule: [1s, 1s, 1s]}``) on the
asyncio sink of :mod:`bench.sinks`, answering in ``--latency`` (200 ms). A run is timed from
the first event's admission to the last delivery, both read from the history database. A lead
is counted *out of order* when its deliveries were recorded in another order than its steps
(with ordering, a lead's next event is only sent once the outcome of the one before is
recorded, so for those runs that is also the order the receiver got them).

Runs (``--rounds`` alternating pairs of the throughput shapes, medians):

``100 leads x 5, first attempts fail``
    500 events, with ``ordering: per_lead`` then ``none``, to a receiver that answers 503 to
    the first attempt of one event in ``--fail-first`` (10) and 200 to its retry: how many
    leads got their events out of order.
``100 leads x 5``
    500 events, ``ordering: none`` then ``per_lead``: deliveries per second, and the ratio.
``10 leads x 50``
    500 events of fewer leads than the destination's concurrency: with ordering at most one
    request per lead is out (10), not 50.
``one failing lead``
    100 leads x 5 with a receiver that answers 503 to every request of one lead (its events
    retry three times, a second apart, then are dead letters): the other 99 leads' time
    beside the 100 x 5 run without a failing lead (what one failing lead costs the others),
    and when the failing lead's last event became a dead letter, with ordering and without.

Run by hand, not by CI (about 2 minutes). Everything listens on 127.0.0.1 and stops by itself.
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
import time
from collections import defaultdict
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any
from unittest import mock

import yaml
from sqlalchemy import func, select

from bench.common import (
    ROOT,
    CpuWatch,
    machine_info,
    print_machine,
    process_tree_cpu,
    reset_redis,
    sample_payload,
    spawn,
    start_redis,
    start_sink,
    stop,
    table,
)
from bench.delivery import code_version
from relay.core.models import SUCCESSES
from relay.history import schema
from relay.history.database import open_database, upgrade
from relay.store.keys import HISTORY, INFLIGHT_PREFIX, stats_key

POLL = 0.02
REFUSED = "refused-lead@example.com"  # the failing lead's address: the sink refuses its bodies


@dataclass
class OrderRun:
    label: str
    ordering: str
    events: int
    delivered: int
    #: first admission to the last delivery (of the leads that do not fail)
    seconds: float
    #: first admission to the failing lead's last dead letter (nan: no failing lead)
    dead_seconds: float
    out_of_order: int  # leads whose deliveries were recorded in another order than sent
    in_flight_max: int
    worker_cpu_ms: float  # per delivery
    noise: str

    @property
    def rate(self) -> float:
        return self.delivered / self.seconds if self.seconds > 0 else float("nan")


def payload(lead: int, step: int, refused: bool = False) -> dict[str, Any]:
    """Step ``step`` of lead ``lead``: a ``score_change`` of its own (its id differs by its
    ``__score_change`` block)."""
    event = sample_payload("score_change")
    event.update(id=20_000_000 + lead, social_id=f"O{lead:07d}",
                 email=REFUSED if refused else f"lead{lead}@example.com")
    event["__score_change"] = {"points": step + 1, "contest_score": step,
                               "message": f"step {step}"}
    return event


def post(env: dict[str, str], leads: int, steps: int, refused: bool
         ) -> dict[str, tuple[int, int]]:
    """Post every lead's events through the ingress app (in this process), step by step;
    event id -> (lead, step). With ``refused``, lead 0 is the one the sink refuses."""
    with mock.patch.dict(os.environ, env):
        from relay.app import create_app

        app = create_app()
        logging.getLogger("relay.ingress").setLevel(logging.WARNING)
        client = app.test_client()
        ids: dict[str, tuple[int, int]] = {}
        for step in range(steps):
            for lead in range(leads):
                response = client.post("/hooks/kickofflabs", data=json.dumps(
                    payload(lead, step, refused and lead == 0)),
                    content_type="application/json")
                if response.status_code != 202:
                    raise RuntimeError(f"ingress answered {response.status_code}")
                ids[response.get_json()["event_id"]] = (lead, step)
    return ids


class OrderBench:
    def __init__(self, args: argparse.Namespace, workdir: Path) -> None:
        self.args = args
        self.workdir = workdir
        self.redis_server, self.client = start_redis(workdir / "redis")
        self.database_url = f"sqlite:///{workdir / 'history.sqlite3'}"
        upgrade(self.database_url)
        self.database = open_database(self.database_url)
        self.sinks: dict[tuple[bool, int, int], tuple[Any, int, str]] = {}
        self.runs = 0

    def sink(self, refusing: bool, fail_first: int) -> int:
        """The receiver: one per kind; a fresh one per run when it fails first attempts (it
        remembers what it answered)."""
        kind = (refusing, fail_first, self.runs if fail_first else 0)
        if kind not in self.sinks:
            self.sinks[kind] = start_sink(self.workdir, self.args.latency,
                                          fail=REFUSED if refusing else "",
                                          fail_first=fail_first)
        return int(self.sinks[kind][1])

    def close(self) -> None:
        for process, _, _ in self.sinks.values():
            stop(process)
        self.redis_server.stop()
        shutil.rmtree(self.workdir / "redis", ignore_errors=True)

    def run(self, label: str, ordering: str, leads: int, steps: int,
            refused: bool = False, fail_first: int = 0) -> OrderRun:
        reset_redis(self.client)
        with self.database.begin() as connection:
            for table_ in reversed(schema.metadata.sorted_tables):
                connection.execute(table_.delete())
        self.runs += 1
        config = self.workdir / f"relay-{self.runs}.yaml"
        config.write_text(yaml.safe_dump({
            "sources": {"kickofflabs": {"token": None}},
            "destinations": [{
                "name": "crm", "type": "webhook", "events": ["*"],
                "url": f"http://127.0.0.1:{self.sink(refused, fail_first)}/crm",
                "timeout": "10s",
                "ordering": ordering, "retry": {"schedule": ["1s", "1s", "1s"]}}]}))
        env = {"RELAY_REDIS_URL": self.redis_server.url, "RELAY_CONFIG": str(config),
               "RELAY_DATABASE_URL": self.database_url, "PYTHONPATH": str(ROOT)}
        ids = post(env, leads, steps, refused)
        dead_wanted = steps if refused else 0
        wanted = len(ids) - dead_wanted
        log = self.workdir / f"worker-{self.runs}.log"
        worker = spawn([sys.executable, "-m", "relay", "worker", *self.args.worker_arg],
                       env, log)
        deadline = time.monotonic() + self.args.timeout
        most = 0
        delivered = dead = 0
        cpu0: float | None = None
        try:
            with CpuWatch() as watch:
                while time.monotonic() < deadline:
                    if worker.poll() is not None:
                        raise RuntimeError(f"the worker exited ({worker.returncode}); see {log}")
                    pipe = self.client.pipeline(transaction=False)
                    pipe.hmget(stats_key("crm"), "delivered", "dead")
                    pipe.hvals(INFLIGHT_PREFIX + "crm")
                    (ok, gone), held = pipe.execute()
                    delivered, dead = int(ok or 0), int(gone or 0)
                    if cpu0 is None and delivered:
                        cpu0 = process_tree_cpu(worker.pid)
                    most = max(most, sum(int(n) for n in held))
                    if delivered >= wanted and dead >= dead_wanted:
                        break
                    time.sleep(POLL)
                cpu = process_tree_cpu(worker.pid) - (cpu0 or 0.0)
            if delivered < wanted or dead < dead_wanted:
                print(f"    {label}: only {delivered:,} of {wanted:,} delivered and {dead} of "
                      f"{dead_wanted} dead within {self.args.timeout:g}s", flush=True)
            seconds, dead_seconds, out_of_order = self.history(ids)
        finally:
            stop(worker, timeout=30)
        return OrderRun(label, ordering, len(ids), delivered, seconds, dead_seconds,
                        out_of_order, most, cpu * 1000 / delivered if delivered else 0.0,
                        watch.note())

    def history(self, ids: dict[str, tuple[int, int]]) -> tuple[float, float, int]:
        """From the history database: seconds from the first admission to the last delivery
        and to the failing lead's last dead letter, and how many leads' deliveries were
        recorded out of step order."""
        written = time.monotonic() + 60
        while self.client.xlen(HISTORY) and time.monotonic() < written:
            time.sleep(POLL)
        events, deliveries = schema.events, schema.deliveries
        with self.database.connect() as connection:
            first = connection.scalar(select(func.min(events.c.admitted_at)))
            rows = connection.execute(select(deliveries.c.event_id, deliveries.c.status,
                                             deliveries.c.updated_at).where(
                deliveries.c.destination == "crm")).all()
        if first is None:
            return float("nan"), float("nan"), 0
        done: dict[int, list[tuple[float, int]]] = defaultdict(list)
        last = last_dead = float("nan")
        for event_id, status, at in rows:
            lead, step = ids.get(event_id, (-1, -1))
            if status in SUCCESSES:
                done[lead].append((at, step))
                last = at if last != last else max(last, at)
            elif status == "dead":
                last_dead = at if last_dead != last_dead else max(last_dead, at)
        out_of_order = sum(1 for got in done.values()
                           if [step for _, step in sorted(got)] != sorted(s for _, s in got))
        return float(last - first), float(last_dead - first), out_of_order


def row(run: OrderRun) -> list[str]:
    dead = "-" if run.dead_seconds != run.dead_seconds else f"{run.dead_seconds:.1f} s"
    return [run.label, run.ordering, f"{run.delivered:,}", f"{run.seconds:.2f} s",
            f"{run.rate:,.0f}", str(run.in_flight_max), str(run.out_of_order), dead,
            f"{run.worker_cpu_ms:.2f}", "NOISY" if "NOISY" in run.noise else "ok"]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.ordering", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--latency", type=float, default=0.2, help="the receiver's seconds")
    parser.add_argument("--rounds", type=int, default=2, help="alternating pairs, medians")
    parser.add_argument("--fail-first", type=int, default=10, metavar="N",
                        help="the first attempt of one event in N fails (the first runs)")
    parser.add_argument("--timeout", type=float, default=180, help="bound per run, s")
    parser.add_argument("--worker-arg", action="append", default=[], metavar="ARG")
    parser.add_argument("--json", type=Path, default=None, help="also write the figures here")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    workdir = Path(tempfile.mkdtemp(prefix="leadrelay-bench-ordering-"))
    info = machine_info()
    info["code"] = code_version()
    print_machine(info)
    print(f"logs in {workdir}; load average {os.getloadavg()[0]:.2f}", flush=True)
    bench = OrderBench(args, workdir)
    runs: list[OrderRun] = []

    def measured(label: str, ordering: str, leads: int, steps: int,
                 refused: bool = False, fail_first: int = 0) -> OrderRun:
        run = bench.run(label, ordering, leads, steps, refused, fail_first)
        print(f"    {label}, ordering {ordering}: {run.delivered:,} delivered in "
              f"{run.seconds:.2f} s ({run.rate:,.0f}/s), at most {run.in_flight_max} in "
              f"flight, {run.out_of_order} leads out of order; {run.noise}", flush=True)
        runs.append(run)
        return run

    shapes: dict[str, dict[str, list[OrderRun]]] = {}
    try:
        print(f"ordering: score_change events to a webhook answering in "
              f"{args.latency * 1000:g} ms, relay worker with its defaults", flush=True)
        retried = {ordering: measured(f"100 leads x 5, 1 in {args.fail_first} first "
                                      "attempts fail", ordering, 100, 5,
                                      fail_first=args.fail_first)
                   for ordering in ("per_lead", "none")}
        for label, leads, steps in [("100 leads x 5", 100, 5), ("10 leads x 50", 10, 50)]:
            for _ in range(args.rounds):
                for ordering in ("none", "per_lead"):
                    shapes.setdefault(label, {}).setdefault(ordering, []).append(
                        measured(label, ordering, leads, steps))
        failing = {ordering: measured("one failing lead", ordering, 100, 5, refused=True)
                   for ordering in ("per_lead", "none")}
    finally:
        bench.close()
    print("\n" + table(["run", "ordering", "delivered", "first admission to last delivery",
                        "deliveries/s", "in flight (max)", "leads out of order",
                        "failing lead's last dead letter", "worker CPU ms/delivery", "noise"],
                       [row(r) for r in runs]))
    medians = {label: {o: statistics.median(r.rate for r in rs) for o, rs in ways.items()}
               for label, ways in shapes.items()}
    print(f"first attempts failed: with ordering {retried['per_lead'].out_of_order} of 100 "
          f"leads out of order, without {retried['none'].out_of_order}")
    for label, rates in medians.items():
        print(f"{label}: ordering per_lead {rates['per_lead']:,.0f}/s, none "
              f"{rates['none']:,.0f}/s: {rates['per_lead'] / rates['none']:.2f}x (medians)")
    plain = statistics.median(r.seconds for r in shapes["100 leads x 5"]["per_lead"])
    hit = failing["per_lead"].seconds
    print(f"one failing lead: the other 99 leads' 495 events in {hit:.2f} s with ordering, "
          f"{hit / plain:.2f}x the {plain:.2f} s without a failing lead; its own 5 events "
          f"were dead letters after {failing['per_lead'].dead_seconds:.1f} s with ordering "
          f"(one at a time), {failing['none'].dead_seconds:.1f} s without", flush=True)
    if args.json:
        args.json.write_text(json.dumps({"machine": info, "settings": vars(args),
                                         "runs": [asdict(r) for r in runs],
                                         "medians": medians}, indent=2, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
