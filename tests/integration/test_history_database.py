"""The history database against real SQLite and PostgreSQL: migrations, idempotent batch
writes, versions that never let a late write downgrade a delivery, erasure that holds against
records still on their way, retention in batches, and the lead search without a cap."""

from __future__ import annotations

import json
import re
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import Engine, func, select, text
from sqlalchemy.exc import OperationalError

from relay.history import database, partitions, reader, retention, schema, writer
from relay.history.database import current_revision, open_database, reading, upgrade


@pytest.fixture(params=["sqlite", "postgresql"])
def history_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'history.sqlite3'}"
        return
    yield from fresh_postgres_database(request)


def fresh_postgres_database(request: pytest.FixtureRequest) -> Iterator[str]:
    """The URL of a database made for this test on the suite's PostgreSQL server."""
    server: str = request.getfixturevalue("postgres_url")
    name = "h_" + re.sub(r"\W+", "_", request.node.name).lower()[-20:] + uuid.uuid4().hex[:6]
    admin = open_database(server, isolation_level="AUTOCOMMIT")
    with admin.connect() as connection:
        connection.execute(text(f'CREATE DATABASE "{name}"'))
    yield server.rsplit("/", 1)[0] + "/" + name
    with admin.connect() as connection:
        connection.execute(text(f'DROP DATABASE "{name}" WITH (FORCE)'))
    admin.dispose()


@pytest.fixture
def history(history_url: str) -> Iterator[Engine]:
    upgrade(history_url)
    engine = open_database(history_url)
    yield engine
    engine.dispose()


def event_record(event_id: str, received_at: float = 100.0, email: str = "ada@example.com",
                 destinations: tuple[str, ...] = ("crm",), payload: str | None = None
                 ) -> dict[str, Any]:
    stored = payload or json.dumps({"name": "new_signup", "payload": {"email": email}})
    return {"k": "event", "id": event_id, "name": "new_signup", "source": "kickofflabs",
            "campaign_id": "135544", "received_at": received_at, "admitted_at": received_at,
            "event": stored, "leads": [["email", email.lower()]],
            "destinations": list(destinations)}


def attempt(event_id: str, number: int, outcome: str, status: str | None = None,
            destination: str = "crm", received_at: float = 100.0) -> dict[str, Any]:
    return {"k": "attempt", "attempt_id": f"{destination}:{event_id}:{number}:{outcome}",
            "id": event_id, "destination": destination, "attempt": number, "outcome": outcome,
            "at": received_at + number, "received_at": received_at, "status_code": 200,
            "status": status or outcome, "error": None if outcome == "delivered" else "boom"}


def write(engine: Engine, *entries: tuple[int, list[dict[str, Any]]]) -> None:
    with engine.begin() as connection:
        writer.apply(connection, writer.batch_of(entries), 0.0)


def count(engine: Engine, table: Any) -> int:
    with engine.connect() as connection:
        return int(connection.scalar(select(func.count()).select_from(table)) or 0)


def test_upgrade_runs_twice_and_names_its_revision(history_url: str) -> None:
    upgrade(history_url)
    upgrade(history_url)
    assert current_revision(history_url) == "0002"


def test_a_batch_written_twice_leaves_the_rows_of_once(history: Engine) -> None:
    entries = [(10, [event_record("evt_a")]), (20, [attempt("evt_a", 1, "retrying")]),
               (30, [attempt("evt_a", 2, "delivered")])]
    write(history, *entries)
    write(history, *entries)  # a writer that died between its commit and its release
    assert count(history, schema.events) == 1
    assert count(history, schema.attempts) == 2
    with history.connect() as connection:
        assert reader.delivery_states(connection, "evt_a")["crm"]["status"] == "delivered"


def test_one_batch_may_hold_the_same_delivery_twice(history: Engine) -> None:
    # PostgreSQL refuses an upsert that touches a row twice; SQLite does not: both must work.
    write(history, (10, [event_record("evt_b")]), (11, [attempt("evt_b", 1, "retrying")]),
          (12, [attempt("evt_b", 2, "dead")]))
    with history.connect() as connection:
        state = reader.delivery_states(connection, "evt_b")["crm"]
    assert (state["status"], state["attempts"]) == ("dead", 2)


def test_a_late_write_never_downgrades_a_final_delivery(history: Engine) -> None:
    write(history, (10, [event_record("evt_c")]), (30, [attempt("evt_c", 2, "delivered")]))
    write(history, (20, [attempt("evt_c", 1, "retrying")]))  # older, written later
    with history.connect() as connection:
        assert reader.delivery_states(connection, "evt_c")["crm"]["status"] == "delivered"
        assert len(reader.attempts(connection, "evt_c")) == 2


def test_a_failed_second_send_never_undoes_a_success(history: Engine) -> None:
    # Two senders of one delivery (a worker taken over while still sending): the later outcome
    # has the newer version, and still does not turn "delivered" into "retrying".
    write(history, (10, [event_record("evt_s")]), (20, [attempt("evt_s", 1, "delivered")]),
          (30, [attempt("evt_s", 2, "retrying")]))
    write(history, (40, [attempt("evt_s", 3, "dead")]))
    with history.connect() as connection:
        assert reader.delivery_states(connection, "evt_s")["crm"]["status"] == "delivered"


def test_the_payload_is_kept_byte_for_byte(history: Engine) -> None:
    stored = '{"z":1,"a":"\\u0000","payload":{"email":"ada@example.com","b":[2,1]}}'
    write(history, (10, [event_record("evt_d", payload=stored)]))
    with history.connect() as connection:
        assert reader.event_json(connection, ["evt_d"]) == {"evt_d": stored}


def test_erasure_removes_the_lead_and_keeps_records_on_their_way_out(history: Engine) -> None:
    write(history, (10, [event_record("evt_e", email="eve@example.com")]),
          (11, [attempt("evt_e", 1, "delivered")]),
          (12, [event_record("evt_f", email="bob@example.com")]))
    with history.begin() as connection:
        erased, removed = retention.erase_lead(connection, "Eve@Example.com", now=200.0)
    assert erased == ["evt_e"] and removed["relay_events"] == 1
    # Records written before the erasure, applied after it: a late attempt of the erased
    # event, and a new event of the same lead received before the erasure.
    write(history, (13, [attempt("evt_e", 2, "delivered")]),
          (14, [event_record("evt_g", received_at=150.0, email="eve@example.com")]))
    with history.connect() as connection:
        assert reader.search(connection, "eve@example.com").total == 0
        assert reader.delivery_states(connection, "evt_e") == {}
        assert reader.event_record(connection, "evt_g") is None
        assert reader.search(connection, "bob@example.com").event_ids == ["evt_f"]
        erasure = connection.execute(select(schema.erasures)).one()
    assert "eve" not in json.dumps(list(erasure))  # a digest, never the address


def test_retention_deletes_in_batches_what_is_older(history: Engine) -> None:
    write(history, *[(i, [event_record(f"evt_{i}", received_at=float(i)),
                          attempt(f"evt_{i}", 1, "delivered", received_at=float(i))])
                     for i in range(1, 8)])
    deleted = retention.purge(history, cutoff=5.0, batch=2)
    assert deleted == 4 * 4  # events, deliveries, attempts and lead keys of evt_1..evt_4
    assert count(history, schema.events) == 3
    assert count(history, schema.attempts) == 3


def test_a_lead_search_finds_every_event_of_the_lead(history: Engine) -> None:
    # The Redis index kept 1,000 events per lead; the database keeps them all.
    write(history, *[(i, [event_record(f"evt_{i:05d}", received_at=float(i))])
                     for i in range(1, 1301)])
    with history.connect() as connection:
        page = reader.search(connection, "ADA@example.com", offset=1250, limit=100)
    assert page.total == 1300
    assert page.event_ids[0] == "evt_00050" and len(page.event_ids) == 50


def test_dead_letters_are_read_by_destination_newest_first(history: Engine) -> None:
    write(history, (10, [event_record("evt_x", destinations=("crm", "db"))]),
          (11, [attempt("evt_x", 1, "dead")]),
          (12, [attempt("evt_x", 1, "dead", destination="db")]))
    with history.connect() as connection:
        assert reader.dead_letter_counts(connection) == {"crm": 1, "db": 1}
        letters = reader.dead_letters(connection, "db")
        assert [(d["event_id"], d["reason"]) for d in letters] == [("evt_x", "boom")]
        assert letters[0]["event"]["payload"]["email"] == "ada@example.com"


def test_sqlite_reads_never_queue_behind_the_writer(tmp_path: Path,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """A claim reading payloads, a console page: their transactions take no lock, so they
    neither wait for the history writer's transaction nor hold it up."""
    monkeypatch.setattr(database, "SQLITE_BUSY_TIMEOUT_MS", 200)  # a wait fails fast here
    url = f"sqlite:///{tmp_path / 'history.sqlite3'}"
    upgrade(url)
    writing, other = open_database(url), open_database(url)
    write(writing, (10, [event_record("evt_r")]))
    with writing.begin() as connection:  # the writer, mid-transaction (BEGIN IMMEDIATE)
        writer.apply(connection, writer.batch_of([(11, [event_record("evt_s")])]), 0.0)
        with reading(other) as reader_connection:
            assert reader.event_json(reader_connection, ["evt_r", "evt_s"]) == {
                "evt_r": event_record("evt_r")["event"]}  # the committed row only
        with pytest.raises(OperationalError, match="locked"), other.begin() as second:
            second.execute(text("SELECT 1"))  # a second writer does wait (and here gives up)
    writing.dispose()
    other.dispose()


DAY = partitions.DAY
TODAY = partitions.day_of(time.time())


def test_postgresql_keeps_each_day_in_its_own_partition_and_drops_old_days(
        postgres_history: Engine) -> None:
    """Retention on PostgreSQL drops whole days; what the default partition caught (a day not
    made yet) moves to its day when the day is made, and is deleted in batches if it is old."""
    history = postgres_history
    early = TODAY - 10 * DAY  # no partition for that day: the default partition takes it
    write(history, (1, [event_record("evt_early", received_at=early + 5)]),
          (2, [event_record("evt_old", received_at=TODAY - 3 * DAY + 60),
               attempt("evt_old", 1, "delivered", received_at=TODAY - 3 * DAY + 60)]),
          (3, [event_record("evt_new", received_at=TODAY + 60)]))
    with history.begin() as connection:
        made = partitions.ensure(connection, time.time(), also=[TODAY - 3 * DAY])
    assert partitions.partition_name("relay_events", TODAY - 3 * DAY) in made
    assert where("relay_events", history) == {
        "evt_early": "relay_events_default",
        "evt_old": partitions.partition_name("relay_events", TODAY - 3 * DAY),
        "evt_new": partitions.partition_name("relay_events", TODAY)}
    # The retention period ends in the middle of the day before yesterday.
    deleted = retention.purge(history, cutoff=TODAY - 2 * DAY + 3600)
    assert deleted == 3  # evt_early's event, delivery and lead key, from the default partition
    assert set(where("relay_events", history)) == {"evt_new"}
    assert count(history, schema.attempts) == 0  # evt_old's day was dropped whole
    with history.connect() as connection:
        names = partitions.days(connection, "relay_events").values()
    assert partitions.partition_name("relay_events", TODAY - 3 * DAY) not in names
    assert partitions.partition_name("relay_events", TODAY + 2 * DAY) in names  # made ahead


def test_upgrading_from_0001_keeps_every_row(history_url: str) -> None:
    """A history written under revision 0001 comes through the move to keys with
    received_at (and, on PostgreSQL, day partitions) whole."""
    upgrade(history_url, "0001")
    engine = open_database(history_url)
    with engine.begin() as connection:
        connection.execute(text(
            "INSERT INTO relay_events (event_id, name, source, received_at, event_json) "
            "VALUES ('evt_a', 'new_signup', 'kickofflabs', :at, '{}')"), {"at": TODAY - DAY})
        connection.execute(text(
            "INSERT INTO relay_deliveries (event_id, destination, status, attempts, version, "
            "updated_at, received_at) VALUES ('evt_a', 'crm', 'dead', 3, 1, :at, :at)"),
            {"at": TODAY - DAY})
    upgrade(history_url)
    assert current_revision(history_url) == "0002"
    write(engine, (5, [attempt("evt_a", 4, "delivered", received_at=TODAY - DAY)]))
    with engine.connect() as connection:
        assert reader.event_json(connection, ["evt_a"]) == {"evt_a": "{}"}
        assert connection.execute(select(schema.deliveries.c.status)).scalars().all() == [
            "delivered"]
        if partitions.partitioned(connection):
            assert where("relay_events", engine) == {
                "evt_a": partitions.partition_name("relay_events", TODAY - DAY)}
    engine.dispose()


@pytest.fixture
def postgres_history(request: pytest.FixtureRequest) -> Iterator[Engine]:
    for url in fresh_postgres_database(request):
        upgrade(url)
        engine = open_database(url)
        yield engine
        engine.dispose()


def where(table: str, engine: Engine) -> dict[str, str]:
    """event id -> the partition that holds its row."""
    with engine.connect() as connection:
        rows = connection.execute(text(f"SELECT event_id, tableoid::regclass::text FROM {table}"))
        return {event_id: partition for event_id, partition in rows}


def test_a_claim_reads_the_newest_event_of_an_id_taken_again(history: Engine) -> None:
    """An id the ingress took again after its dedupe window has two events: a claim of the
    new one reads the new payload and the new delivery's state, never the old one's."""
    old = json.dumps({"name": "new_signup", "payload": {"email": "old@example.com"}})
    new = json.dumps({"name": "new_signup", "payload": {"email": "new@example.com"}})
    write(history, (1, [event_record("evt_again", received_at=100.0, payload=old),
                        attempt("evt_again", 1, "delivered", received_at=100.0)]))
    write(history, (2, [event_record("evt_again", received_at=900_000.0, payload=new)]))
    with history.connect() as connection:
        assert reader.claimed_events(connection, ["evt_again"], "crm") == {
            "evt_again": (new, "pending")}
