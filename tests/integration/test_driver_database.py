"""The database destination against a real SQLite file and a real PostgreSQL server."""

from __future__ import annotations

import json
import random
import re
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from marshmallow import ValidationError

from relay.core.errors import PermanentDeliveryError, RetryableDeliveryError
from relay.core.models import Destination, LeadEvent
from relay.drivers import driver_class
from relay.drivers.database import DatabaseDriver, DatabaseOptions
from tests.support.loopback import free_port
from tests.support.samples import sample


def lead_event(
    name: str, received_at: float, event_id: str | None = None, **changes: Any
) -> LeadEvent:
    payload = {**sample(name), **changes}
    return LeadEvent(
        event_id=event_id or f"evt-{name}-{received_at}",
        source="kickofflabs",
        name=name,
        payload=payload,
        received_at=received_at,
    )


def make_driver(url: str, **options: Any) -> DatabaseDriver:
    loaded = DatabaseOptions().load({"url": url, **options})
    return DatabaseDriver(
        Destination(name="warehouse", type="database", options=loaded, timeout=5)
    )


@pytest.fixture(params=["sqlite", "postgresql"])
def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'relay.db'}"
    url: str = request.getfixturevalue("postgres_url")
    return url


@pytest.fixture
def prefix(request: pytest.FixtureRequest) -> str:
    # All PostgreSQL tests share one server: a prefix per test keeps their tables apart.
    return "t_" + re.sub(r"\W+", "_", request.node.name).lower()[-30:].strip("_") + "_"


@pytest.fixture
def driver(database_url: str, prefix: str) -> Iterator[DatabaseDriver]:
    instance = make_driver(database_url, table_prefix=prefix)
    yield instance
    instance.close()


def rows(url: str, table: str) -> list[dict[str, Any]]:
    engine = sa.create_engine(url)
    try:
        with engine.connect() as conn:
            result = conn.execute(sa.text(f"SELECT * FROM {table}"))  # noqa: S608 (test names)
            return [dict(row._mapping) for row in result]
    finally:
        engine.dispose()


def test_registered_under_its_type_name() -> None:
    assert driver_class("database") is DatabaseDriver
    assert DatabaseDriver.secret_fields == frozenset({"url"})


def test_options_default_prefix_and_refuse_bad_values() -> None:
    assert DatabaseOptions().load({"url": "sqlite://"})["table_prefix"] == "relay_"
    with pytest.raises(ValidationError) as refused:
        DatabaseOptions().load({"url": "nosuchdb://user:hunter2@host/db"})
    assert "hunter2" not in str(refused.value.messages)
    with pytest.raises(ValidationError):
        DatabaseOptions().load({"url": "sqlite://", "table_prefix": "x; DROP TABLE"})


def test_new_signup_creates_a_typed_lead_row(
    driver: DatabaseDriver, database_url: str, prefix: str
) -> None:
    result = driver.send(lead_event("new_signup", 1000.0))

    assert result.detail == "stored"
    [lead] = rows(database_url, f"{prefix}leads")
    assert lead["campaign_id"] == "135544"
    assert lead["social_id"] == "36N38P"
    assert lead["lead_id"] == "107646230"
    assert lead["email"] == "ada@example.com"
    assert (lead["first_name"], lead["last_name"]) == ("Ada", "Lovelace")
    assert (lead["rank"], lead["contest_score"], lead["referrals"]) == (268, 0, 0)
    assert lead["verified"] is False or lead["verified"] == 0
    assert bool(lead["waitlisted"]) is True
    assert not lead["opted_out"] and not lead["fraudulent"]
    assert lead["last_event"] == "new_signup"
    assert lead["deleted_at"] is None
    assert lead["updated_at"] is not None
    custom_fields = lead["custom_fields"]
    payload = lead["payload"]
    if isinstance(custom_fields, str):  # SQLite returns JSON text through raw SQL
        custom_fields, payload = json.loads(custom_fields), json.loads(payload)
    assert custom_fields == {"company": "Analytical Engines Ltd", "role": "engineer"}
    assert payload["__event"] == "new_signup"
    [stored] = rows(database_url, f"{prefix}events")
    assert stored["event_id"] == "evt-new_signup-1000.0"
    assert stored["social_id"] == "36N38P"


def test_the_same_event_id_is_stored_once(
    driver: DatabaseDriver, database_url: str, prefix: str
) -> None:
    event = lead_event("new_signup", 1000.0)
    driver.send(event)
    replay = driver.send(event)

    assert "duplicate" in replay.detail
    assert len(rows(database_url, f"{prefix}events")) == 1
    assert len(rows(database_url, f"{prefix}leads")) == 1


def test_an_older_event_never_overwrites_a_newer_state(
    driver: DatabaseDriver, database_url: str, prefix: str
) -> None:
    newer = lead_event("score_change", 2000.0, contest_score=15, rank=12)
    older = lead_event("new_signup", 1000.0)

    driver.send(newer)
    late = driver.send(older)

    assert "newer" in late.detail
    [lead] = rows(database_url, f"{prefix}leads")
    assert (lead["last_event"], lead["contest_score"], lead["rank"]) == ("score_change", 15, 12)
    # Both events are kept in the log, whatever their order.
    assert {row["name"] for row in rows(database_url, f"{prefix}events")} == {
        "score_change",
        "new_signup",
    }


def test_a_newer_event_updates_the_state(
    driver: DatabaseDriver, database_url: str, prefix: str
) -> None:
    driver.send(lead_event("new_signup", 1000.0))
    driver.send(lead_event("verified", 3000.0, verified=True))

    [lead] = rows(database_url, f"{prefix}leads")
    assert lead["last_event"] == "verified"
    assert bool(lead["verified"]) is True


def test_deleted_sets_deleted_at_and_keeps_the_row(
    driver: DatabaseDriver, database_url: str, prefix: str
) -> None:
    driver.send(lead_event("new_signup", 1000.0))
    driver.send(lead_event("deleted", 1_780_000_000.0))

    [lead] = rows(database_url, f"{prefix}leads")
    assert lead["last_event"] == "deleted"
    assert lead["deleted_at"] is not None
    assert lead["email"] == "ada@example.com"


def test_tables_are_created_with_a_custom_prefix(database_url: str) -> None:
    driver = make_driver(database_url, table_prefix="crm_sync_")
    try:
        driver.send(lead_event("new_signup", 1000.0))
    finally:
        driver.close()

    engine = sa.create_engine(database_url)
    try:
        names = set(sa.inspect(engine).get_table_names())
    finally:
        engine.dispose()
    assert {"crm_sync_leads", "crm_sync_events"} <= names
    assert "relay_leads" not in names


def test_lead_identity_falls_back_to_email(
    driver: DatabaseDriver, database_url: str, prefix: str
) -> None:
    driver.send(lead_event("new_signup", 1000.0, social_id=None, id=None, email="Ada@Example.com"))

    [lead] = rows(database_url, f"{prefix}leads")
    assert lead["social_id"] == "ada@example.com"


def test_an_existing_table_of_another_shape_is_a_permanent_error(
    database_url: str, prefix: str
) -> None:
    engine = sa.create_engine(database_url)
    with engine.begin() as conn:
        conn.execute(sa.text(f"CREATE TABLE {prefix}leads (campaign_id TEXT, social_id TEXT)"))
    engine.dispose()
    driver = make_driver(database_url, table_prefix=prefix)
    try:
        with pytest.raises(PermanentDeliveryError) as refused:
            driver.send(lead_event("new_signup", 1000.0))
    finally:
        driver.close()
    message = refused.value.message
    assert "schema" in message
    assert "ada@example.com" not in message  # the lead's data stays out of dead letters


def test_an_unreachable_postgresql_is_retryable() -> None:
    url = f"postgresql+psycopg://postgres@127.0.0.1:{free_port()}/postgres"
    driver = make_driver(url)
    try:
        with pytest.raises(RetryableDeliveryError) as retry:
            driver.send(lead_event("new_signup", 1000.0))
    finally:
        driver.close()
    assert "unavailable" in retry.value.message


def test_an_unopenable_sqlite_file_is_retryable(tmp_path: Path) -> None:
    driver = make_driver(f"sqlite:///{tmp_path / 'missing-dir' / 'relay.db'}")
    try:
        with pytest.raises(RetryableDeliveryError):
            driver.send(lead_event("new_signup", 1000.0))
    finally:
        driver.close()


def test_a_killed_pooled_connection_is_replaced(postgres_url: str) -> None:  # noqa: F811
    driver = make_driver(postgres_url, table_prefix="t_pool_")
    try:
        driver.send(lead_event("new_signup", 1000.0))
        admin = sa.create_engine(postgres_url)
        with admin.begin() as conn:
            conn.execute(sa.text(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                "WHERE pid <> pg_backend_pid() AND datname = current_database() "
                "AND backend_type = 'client backend'"
            ))
        admin.dispose()
        # pool_pre_ping notices the dead connection and opens a new one.
        assert driver.send(lead_event("score_change", 2000.0)).detail == "stored"
    finally:
        driver.close()


def test_concurrent_out_of_order_deliveries_converge_on_the_newest(
    driver: DatabaseDriver, database_url: str, prefix: str
) -> None:
    times = [float(n) for n in range(1, 41)]
    random.Random(7).shuffle(times)
    events = [lead_event("score_change", at, contest_score=int(at)) for at in times]
    with ThreadPoolExecutor(max_workers=8) as pool:
        list(pool.map(driver.send, events))

    [lead] = rows(database_url, f"{prefix}leads")
    assert (lead["last_event_received_at"], lead["contest_score"]) == (40.0, 40)
    assert len(rows(database_url, f"{prefix}events")) == 40


def test_portable_path_matches_the_native_one(database_url: str, prefix: str) -> None:
    # Dialects without ON CONFLICT use select / update / insert; exercised on both databases.
    url = database_url
    driver = make_driver(url, table_prefix=prefix)
    driver._write_native = lambda conn, native, event_row, lead_row: (  # type: ignore[method-assign]
        driver._write_portable(conn, event_row, lead_row)
    )
    try:
        assert driver.send(lead_event("score_change", 2000.0, contest_score=15)).detail == "stored"
        assert "newer" in driver.send(lead_event("new_signup", 1000.0)).detail
        assert "duplicate" in driver.send(lead_event("new_signup", 1000.0)).detail
        assert driver.send(lead_event("deleted", 3000.0)).detail == "stored"
    finally:
        driver.close()
    [lead] = rows(url, f"{prefix}leads")
    assert (lead["last_event"], lead["contest_score"]) == ("deleted", 0)
    assert lead["deleted_at"] is not None
    assert len(rows(url, f"{prefix}events")) == 3


def test_a_lock_timeout_is_retryable_and_the_retry_stores_once(
    postgres_url: str,  # noqa: F811
) -> None:
    # A real transient server error (SQLSTATE 55P03): another session holds the leads table.
    url = f"{postgres_url}?options=-c%20lock_timeout%3D200"
    driver = make_driver(url, table_prefix="t_locked_")
    event = lead_event("new_signup", 1000.0)
    other = sa.create_engine(postgres_url)
    try:
        driver.send(lead_event("new_signup", 500.0, event_id="evt-first"))
        with other.begin() as conn:
            conn.execute(sa.text("LOCK TABLE t_locked_leads IN ACCESS EXCLUSIVE MODE"))
            with pytest.raises(RetryableDeliveryError) as retry:
                driver.send(event)
        assert "LockNotAvailable" in retry.value.message
        assert driver.send(event).detail == "stored"
    finally:
        driver.close()
        other.dispose()
    assert len(rows(postgres_url, "t_locked_events")) == 2


def test_a_payload_that_is_not_json_is_permanent_and_not_echoed(tmp_path: Path) -> None:
    driver = make_driver(f"sqlite:///{tmp_path / 'relay.db'}")
    try:
        with pytest.raises(PermanentDeliveryError) as refused:
            driver.send(lead_event("new_signup", 1000.0, utm={"secret-ish": {1, 2}}))
    finally:
        driver.close()
    assert "JSON" in refused.value.message
    assert "ada@example.com" not in refused.value.message


# -- batches: one transaction, one multi-row upsert --------------------------------------------


def count_statements(driver: DatabaseDriver) -> dict[str, int]:
    """Transactions begun and INSERT statements run on the driver's engine from now on."""
    counts = {"begin": 0, "insert": 0, "statements": 0}

    def begun(conn: Any) -> None:
        counts["begin"] += 1

    def executed(conn: Any, cursor: Any, statement: str, *args: Any) -> None:
        counts["statements"] += 1
        counts["insert"] += statement.lstrip().upper().startswith("INSERT")

    sa.event.listen(driver.engine, "begin", begun)
    sa.event.listen(driver.engine, "before_cursor_execute", executed)
    return counts


def lead_n(n: int, name: str = "new_signup", at: float | None = None,
           **changes: Any) -> LeadEvent:
    return lead_event(name, float(n) if at is None else at, event_id=f"evt-{name}-{n}-{at}",
                      social_id=f"S{n}", email=f"lead{n}@example.com", id=n, **changes)


def test_a_batch_is_one_transaction_and_one_multi_row_upsert(
    driver: DatabaseDriver, database_url: str, prefix: str
) -> None:
    driver.send(lead_n(0))  # the tables exist: what follows is the batch alone
    counts = count_statements(driver)
    answers = driver.send_batch([lead_n(n) for n in range(1, 51)])

    assert [a.detail for a in answers] == ["stored"] * 50  # type: ignore[union-attr]
    assert answers.requests == 1
    assert counts["begin"] == 1
    assert counts["insert"] == 2  # the events, then the leads
    assert len(rows(database_url, f"{prefix}leads")) == 51
    assert len(rows(database_url, f"{prefix}events")) == 51


def test_an_older_event_in_the_same_batch_loses_to_the_newer_one(
    driver: DatabaseDriver, database_url: str, prefix: str
) -> None:
    newer = lead_n(1, "score_change", at=2000.0, contest_score=15, rank=12)
    older = lead_n(1, "new_signup", at=1000.0)
    other = lead_n(2, "new_signup", at=1500.0)
    answers = driver.send_batch([newer, other, older])

    assert [a.detail for a in answers] == [  # type: ignore[union-attr]
        "stored", "stored", "event stored; lead state already newer"]
    leads = {r["social_id"]: r for r in rows(database_url, f"{prefix}leads")}
    assert (leads["S1"]["last_event"], leads["S1"]["contest_score"]) == ("score_change", 15)
    assert len(rows(database_url, f"{prefix}events")) == 3


def test_across_batches_the_guard_holds_and_a_stored_event_is_a_duplicate(
    driver: DatabaseDriver, database_url: str, prefix: str
) -> None:
    driver.send_batch([lead_n(1, "score_change", at=2000.0, contest_score=15),
                       lead_n(2, at=10.0)])
    late = lead_n(1, "new_signup", at=1000.0)
    again = lead_n(2, at=10.0)  # the same event id: a retry or a replay
    fresh = lead_n(3, at=30.0)
    answers = driver.send_batch([late, again, fresh])

    assert [a.detail for a in answers] == [  # type: ignore[union-attr]
        "event stored; lead state already newer", "duplicate event: already stored", "stored"]
    leads = {r["social_id"]: r for r in rows(database_url, f"{prefix}leads")}
    assert (leads["S1"]["last_event"], leads["S1"]["contest_score"]) == ("score_change", 15)
    assert len(rows(database_url, f"{prefix}events")) == 4


def test_an_event_the_batch_cannot_store_fails_alone(
    driver: DatabaseDriver, database_url: str, prefix: str
) -> None:
    answers = driver.send_batch([
        lead_n(1), lead_n(2, utm={"not json": {1, 2}}),
        lead_event("new_signup", 3.0, social_id=None, id=None, email=None, phone_number=None),
        lead_n(4)])

    assert [type(a).__name__ for a in answers] == [
        "DeliveryResult", "PermanentDeliveryError", "PermanentDeliveryError", "DeliveryResult"]
    assert "not JSON" in answers[1].message  # type: ignore[union-attr]
    assert "lead2@example.com" not in answers[1].message  # type: ignore[union-attr]
    assert {r["social_id"] for r in rows(database_url, f"{prefix}leads")} == {"S1", "S4"}


def test_a_batch_postgresql_refuses_is_written_again_event_by_event(
    postgres_url: str,  # noqa: F811
) -> None:
    driver = make_driver(postgres_url, table_prefix="t_refused_")
    try:
        # A campaign id longer than the column: PostgreSQL refuses the whole statement.
        answers = driver.send_batch([lead_n(1), lead_n(2, campaign_id="x" * 80), lead_n(3)])
    finally:
        driver.close()
    assert [type(a).__name__ for a in answers] == [
        "DeliveryResult", "PermanentDeliveryError", "DeliveryResult"]
    assert {r["social_id"] for r in rows(postgres_url, "t_refused_leads")} == {"S1", "S3"}


def test_concurrent_out_of_order_batches_keep_the_newest_lead_state(
    driver: DatabaseDriver, database_url: str, prefix: str
) -> None:
    times = [float(n) for n in range(1, 81)]
    random.Random(11).shuffle(times)
    # Two leads, their events shuffled into batches sent by 8 threads at once: every batch
    # holds both leads, so concurrent batches lock the same rows (in the same order).
    events = [lead_event("score_change", at, event_id=f"evt-{at}", contest_score=int(at),
                         social_id=f"L{int(at) % 2}") for at in times]
    batches = [events[i:i + 8] for i in range(0, len(events), 8)]
    with ThreadPoolExecutor(max_workers=8) as pool:
        answers = [a for batch in pool.map(driver.send_batch, batches) for a in batch]

    assert all(not isinstance(a, Exception) for a in answers), answers
    leads = {r["social_id"]: r for r in rows(database_url, f"{prefix}leads")}
    assert (leads["L0"]["last_event_received_at"], leads["L0"]["contest_score"]) == (80.0, 80)
    assert (leads["L1"]["last_event_received_at"], leads["L1"]["contest_score"]) == (79.0, 79)
    assert len(rows(database_url, f"{prefix}events")) == 80


def test_the_database_destination_batches_by_default() -> None:
    from relay.core.models import BatchPolicy
    from tests.support.helpers import config

    [warehouse] = config([{"name": "w", "type": "database", "url": "sqlite://"}]).destinations
    assert warehouse.batch == BatchPolicy(100, 0.05)
    with pytest.raises(Exception, match="database takes at most 1000 per request"):
        config([{"name": "w", "type": "database", "url": "sqlite://", "batch": {"max": 5000}}])
