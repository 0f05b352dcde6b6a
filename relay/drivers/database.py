"""The ``database`` destination: every lead event into SQL tables (SQLAlchemy Core).

Two tables, created when missing (names start with ``table_prefix``, default ``relay_``):

``relay_events``  one row per event id, inserted with ``ON CONFLICT DO NOTHING``: the event id
                  is the idempotency key, so a retried or replayed delivery is stored once.
``relay_leads``   one row per (campaign_id, social_id) holding the lead's latest state in typed
                  columns plus the whole payload as JSON.

*Which state is newer* is decided by the event's ``received_at`` (set once at ingress, kept
across retries and replays), ties broken by the event id so every worker converges on the same
row whatever the delivery order. The payload's ``when`` and ``counter`` are not used: KickoffLabs
sends the lead's sign-up time and sign-up count there, identical across that lead's events. The
event insert and the lead upsert run in one transaction, and the upsert's ``WHERE`` compares the
stored timestamp inside the database, so concurrent workers cannot race an older state over a
newer one. A ``deleted`` event keeps the row and sets ``deleted_at``; a newer event about the
same lead clears it again (the latest state wins).

``social_id`` is the lead's identity: KickoffLabs' ``social_id``, else its ``id``, else the
lower-cased ``email``, else ``phone_number`` (the order the ingress uses). ``campaign_id`` is the
payload's ``campaign_id`` (or ``list_id``), or ``""`` when it has neither.

PostgreSQL and SQLite use their native upsert. Other dialects get a portable path (select,
update, insert) whose races surface as integrity errors and are retried.

**Batches** (``batch: {max: 100, wait: 50ms}`` by default, at most 1,000): one transaction per
batch with one multi-row ``INSERT … ON CONFLICT DO NOTHING`` for the events and one multi-row
upsert for the leads. A lead with several events in the batch gets one row in that upsert, its
newest (by the same ordering), and the upsert keeps its ``WHERE``, so the guard holds within a
batch as across batches. Rows go in key order, so two workers' batches lock shared rows in the
same order and never deadlock. A payload that is not JSON fails its own event before the
transaction; a batch the database refuses for good is written again one event per transaction,
so only the event at fault fails; a transient error retries every event of the batch.
"""

from __future__ import annotations

import json
import re
import threading
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from typing import Any, ClassVar

from marshmallow import Schema, ValidationError, fields, validate, validates
from sqlalchemy import (
    JSON,
    Boolean,
    Column,
    ColumnElement,
    Connection,
    DateTime,
    Double,
    Engine,
    Index,
    Integer,
    MetaData,
    String,
    Table,
    Text,
    and_,
    create_engine,
    exc,
    insert,
    or_,
    select,
    update,
)
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import make_url

from relay.core.dotted import dotted_get
from relay.core.errors import PermanentDeliveryError, RetryableDeliveryError
from relay.core.models import DeliveryResult, LeadEvent
from relay.drivers.base import Answer, Answers, Driver

# JSONB on PostgreSQL so users can index and query into payloads; plain JSON elsewhere.
_JSON = JSON().with_variant(postgresql.JSONB(), "postgresql")
_NATIVE_UPSERT = {"postgresql": postgresql.insert, "sqlite": sqlite.insert}
_PREFIX = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,40}$")


class DatabaseOptions(Schema):
    url = fields.String(required=True)
    table_prefix = fields.String(
        load_default="relay_",
        validate=validate.Regexp(
            _PREFIX, error="must be a SQL identifier prefix: letters, digits, _ (max 41)"
        ),
    )

    @validates("url")
    def _check_url(self, value: str, **_: Any) -> None:
        try:
            make_url(value).get_dialect()
        except Exception as error:  # ArgumentError, NoSuchModuleError: both mean a bad url
            # Never echo the url: it may carry a password.
            raise ValidationError(f"not a usable SQLAlchemy URL ({type(error).__name__})") from None


def lead_identity(payload: Mapping[str, Any]) -> str | None:
    """The lead's key: social_id, else id, else lower-cased email, else phone number."""
    for key in ("social_id", "id", "email", "phone_number"):
        value = payload.get(key)
        if value not in (None, ""):
            return str(value).strip().lower() if key == "email" else str(value)
    return None


def build_tables(prefix: str) -> tuple[Table, Table]:
    metadata = MetaData()
    leads = Table(
        f"{prefix}leads",
        metadata,
        Column("campaign_id", String(64), primary_key=True),
        Column("social_id", String(255), primary_key=True),
        Column("lead_id", String(64)),
        Column("email", String(320)),
        Column("phone_number", String(64)),
        Column("first_name", Text),
        Column("last_name", Text),
        Column("display_name", Text),
        Column("rank", Integer),
        Column("contest_score", Integer),
        Column("referrals", Integer),
        Column("verified_referrals", Integer),
        Column("unverified_referrals", Integer),
        Column("verified", Boolean),
        Column("waitlisted", Boolean),
        Column("opted_out", Boolean),
        Column("fraudulent", Boolean),
        Column("tags", _JSON),
        Column("custom_fields", _JSON),
        Column("payload", _JSON, nullable=False),
        Column("last_event", String(64), nullable=False),
        Column("last_event_id", String(255), nullable=False),
        # The ordering key (epoch seconds from ingress); DOUBLE so comparisons are exact.
        Column("last_event_received_at", Double, nullable=False),
        Column("updated_at", DateTime(timezone=True), nullable=False),
        Column("deleted_at", DateTime(timezone=True)),
    )
    events = Table(
        f"{prefix}events",
        metadata,
        Column("event_id", String(255), primary_key=True),
        Column("source", String(64), nullable=False),
        Column("name", String(64), nullable=False),
        Column("known", Boolean, nullable=False),
        Column("campaign_id", String(64), nullable=False),
        Column("social_id", String(255), nullable=False),
        Column("received_at", Double, nullable=False),
        Column("stored_at", DateTime(timezone=True), nullable=False),
        Column("payload", _JSON, nullable=False),
        Index(f"ix_{prefix}events_lead", "campaign_id", "social_id"),
    )
    return leads, events


class DatabaseDriver(Driver):
    type_name: ClassVar[str] = "database"
    default_concurrency: ClassVar[int] = 5  # a small connection pool's worth
    # Events per transaction: 1,000 rows of the leads table's 25 columns stay under SQLite's
    # 32,766 bound parameters (and PostgreSQL's 65,535) in one statement.
    max_batch: ClassVar[int] = 1000
    default_batch_max: ClassVar[int | None] = 100
    default_batch_wait: ClassVar[float] = 0.05
    options_schema: ClassVar[type[Schema]] = DatabaseOptions
    secret_fields: ClassVar[frozenset[str]] = frozenset({"url"})

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.url: str = self.options["url"]
        self.leads, self.events = build_tables(self.options.get("table_prefix", "relay_"))
        self._engine: Engine | None = None
        self._tables_ready = False
        self._lock = threading.Lock()
        self._tables_lock = threading.Lock()
        self._statements: dict[str, tuple[Any, Any]] = {}  # dialect -> the batch's statements

    # -- connection pool, one per driver instance (so one per worker process) ------------------

    @property
    def engine(self) -> Engine:
        with self._lock:
            if self._engine is None:
                self._engine = self._create_engine()
            return self._engine

    def _create_engine(self) -> Engine:
        try:
            url = make_url(self.url)
        except exc.ArgumentError:
            raise PermanentDeliveryError(
                f"destination {self.destination.name}: invalid database url"
            ) from None
        connect_args: dict[str, Any] = {}
        backend = url.get_backend_name()
        # Bound the wait for a dead server / a locked file by the destination's timeout, so a
        # stuck database turns into a retry instead of a hung worker.
        if backend == "postgresql" and "connect_timeout" not in url.query:
            connect_args["connect_timeout"] = max(1, int(self.timeout))
        elif backend == "sqlite":
            connect_args["timeout"] = self.timeout
        try:
            return create_engine(url, pool_pre_ping=True, connect_args=connect_args)
        except (exc.ArgumentError, exc.NoSuchModuleError, ImportError) as error:
            raise PermanentDeliveryError(
                f"destination {self.destination.name}: cannot use database url "
                f"({type(error).__name__})"
            ) from None

    def close(self) -> None:
        with self._lock:
            engine, self._engine = self._engine, None
            self._tables_ready = False
        if engine is not None:
            engine.dispose()

    # -- delivery ----------------------------------------------------------------------------

    def send(self, event: LeadEvent) -> DeliveryResult:
        payload = dict(event.payload)
        social_id = lead_identity(payload)
        if social_id is None:
            raise PermanentDeliveryError(
                f"destination {self.destination.name}: the lead has none of social_id, id, "
                "email, phone_number to key its row by"
            )
        engine = self.engine
        try:
            self._ensure_tables(engine)
            with engine.begin() as conn:
                outcome = self._write(conn, event, payload, social_id)
        except exc.DBAPIError as error:
            raise translate_error(error, self.destination.name) from error
        except exc.SQLAlchemyError as error:  # not from the database: e.g. a value JSON refuses
            # args[0] is the message alone; str(error) would append the lead's data.
            first = str(error.args[0]).splitlines()[0] if error.args else ""
            raise PermanentDeliveryError(
                f"destination {self.destination.name}: {type(error).__name__}: {first}"
            ) from error
        return DeliveryResult(detail=outcome)

    def send_batch(self, events: Sequence[LeadEvent]) -> Answers:
        """One transaction for the batch: the events in one multi-row insert, the leads'
        newest states in one multi-row upsert (native dialects; row by row elsewhere)."""
        if len(events) <= 1:
            return super().send_batch(events)
        answers: list[Answer | None] = [None] * len(events)
        rows: list[tuple[int, LeadEvent, dict[str, Any], str]] = []
        for index, event in enumerate(events):
            payload = dict(event.payload)
            social_id = lead_identity(payload)
            if social_id is None:
                answers[index] = PermanentDeliveryError(
                    f"destination {self.destination.name}: the lead has none of social_id, "
                    "id, email, phone_number to key its row by")
                continue
            try:
                json.dumps(payload)  # what the JSON columns will do: fail this event alone
            except (TypeError, ValueError) as error:
                answers[index] = PermanentDeliveryError(
                    f"destination {self.destination.name}: the payload is not JSON "
                    f"({type(error).__name__})")
                continue
            rows.append((index, event, payload, social_id))
        if rows:
            engine = self.engine
            try:
                self._ensure_tables(engine)
                with engine.begin() as conn:
                    details = self._write_batch(conn, rows)
                for (index, *_), detail in zip(rows, details, strict=True):
                    answers[index] = DeliveryResult(detail=detail)
            except exc.DBAPIError as error:
                failed = translate_error(error, self.destination.name)
                if isinstance(failed, PermanentDeliveryError):
                    # Refused for good: one event at a time, so only the one at fault fails.
                    for index, event, _, _ in rows:
                        answers[index] = self._send_alone(event)
                else:
                    for index, *_ in rows:
                        answers[index] = failed
        return Answers([a for a in answers if a is not None], requests=1)

    def _send_alone(self, event: LeadEvent) -> Answer:
        try:
            return self.send(event)
        except Exception as error:  # noqa: BLE001 - the engine decides about every failure
            return error

    def _write_batch(self, conn: Connection,
                     rows: Sequence[tuple[int, LeadEvent, dict[str, Any], str]]) -> list[str]:
        """Each row's outcome, as :meth:`_write` words it, in the order of ``rows``."""
        native = _NATIVE_UPSERT.get(conn.dialect.name)
        if native is None:
            return [self._write(conn, event, payload, social_id)
                    for _, event, payload, social_id in rows]
        now = datetime.now(UTC)
        new_events, newer_leads = self._batch_statements(conn.dialect.name, native)
        event_rows = {row["event_id"]: row for row in
                      (self._event_row(event, payload, social_id, now)
                       for _, event, payload, social_id in rows)}
        stored = set(conn.execute(
            new_events, sorted(event_rows.values(), key=lambda r: r["event_id"])).scalars())
        # The newest stored event of each lead: one row per lead in one upsert.
        newest: dict[tuple[str, str], dict[str, Any]] = {}
        for _, event, payload, social_id in rows:
            if event.event_id not in stored:
                continue
            lead = self._lead_row(event, payload, social_id, now)
            key = (lead["campaign_id"], lead["social_id"])
            held = newest.get(key)
            if held is None or _order(lead) > _order(held):
                newest[key] = lead
        changed: set[tuple[str, str]] = set()
        if newest:
            changed = {(c, s) for c, s in conn.execute(
                newer_leads, [newest[k] for k in sorted(newest)])}
        outcomes = []
        for _, event, _, _ in rows:
            row = event_rows[event.event_id]
            key = (row["campaign_id"], row["social_id"])
            if event.event_id not in stored:
                outcomes.append("duplicate event: already stored")
            elif key in changed and newest[key]["last_event_id"] == event.event_id:
                outcomes.append("stored")
            else:
                outcomes.append("event stored; lead state already newer")
        return outcomes

    def _batch_statements(self, dialect: str, native: Any) -> tuple[Any, Any]:
        """The batch's two statements, built once per driver and dialect and run with a row
        per event or lead: SQLAlchemy sends the rows as one multi-row VALUES statement
        ("insertmanyvalues", up to 1,000 rows a statement), and nothing is compiled per
        batch (compiling a 100-row VALUES clause each time cost more than the database)."""
        statements = self._statements.get(dialect)
        if statements is None:
            new_events = (native(self.events)
                          .on_conflict_do_nothing(index_elements=[self.events.c.event_id])
                          .returning(self.events.c.event_id))
            upsert = native(self.leads)
            newer_leads = upsert.on_conflict_do_update(
                index_elements=[self.leads.c.campaign_id, self.leads.c.social_id],
                set_={c.name: upsert.excluded[c.name] for c in self.leads.columns
                      if c.name not in ("campaign_id", "social_id")},
                where=_is_older(self.leads, upsert.excluded.last_event_received_at,
                                upsert.excluded.last_event_id),
            ).returning(self.leads.c.campaign_id, self.leads.c.social_id)
            statements = self._statements[dialect] = (new_events, newer_leads)
        return statements

    def _ensure_tables(self, engine: Engine) -> None:
        if self._tables_ready:
            return
        # A worker sends many deliveries at once: one thread of this process creates the
        # tables while the others wait, instead of racing it table by table.
        with self._tables_lock:
            if self._tables_ready:
                return
            try:
                self.leads.metadata.create_all(engine, checkfirst=True)
            except exc.DBAPIError as error:
                # Two workers may both see the tables missing and race CREATE TABLE; the loser
                # gets "already exists". Checking again then finds them; a real failure fails
                # again.
                if not _is_retryable(error):
                    self.leads.metadata.create_all(engine, checkfirst=True)
                else:
                    raise
            self._tables_ready = True

    def _event_row(self, event: LeadEvent, payload: dict[str, Any], social_id: str,
                   now: datetime) -> dict[str, Any]:
        return {
            "event_id": event.event_id,
            "source": event.source,
            "name": event.name,
            "known": event.known,
            "campaign_id": event.campaign_id or "",
            "social_id": social_id,
            "received_at": float(event.received_at),
            "stored_at": now,
            "payload": payload,
        }

    def _lead_row(self, event: LeadEvent, payload: dict[str, Any], social_id: str,
                  now: datetime) -> dict[str, Any]:
        return {
            "campaign_id": event.campaign_id or "",
            "social_id": social_id,
            **lead_columns(payload),
            "payload": payload,
            "last_event": event.name,
            "last_event_id": event.event_id,
            "last_event_received_at": float(event.received_at),
            "updated_at": now,
            "deleted_at": _deleted_at(event, now),
        }

    def _write(
        self, conn: Connection, event: LeadEvent, payload: dict[str, Any], social_id: str
    ) -> str:
        now = datetime.now(UTC)
        event_row = self._event_row(event, payload, social_id, now)
        lead_row = self._lead_row(event, payload, social_id, now)
        native = _NATIVE_UPSERT.get(conn.dialect.name)
        if native is not None:
            return self._write_native(conn, native, event_row, lead_row)
        return self._write_portable(conn, event_row, lead_row)

    def _write_native(
        self, conn: Connection, dialect_insert: Any,
        event_row: dict[str, Any], lead_row: dict[str, Any],
    ) -> str:
        stored = _wrote_a_row(
            conn,
            dialect_insert(self.events).values(event_row).on_conflict_do_nothing(
                index_elements=[self.events.c.event_id]
            ),
            self.events.c.event_id,
        )
        if not stored:
            return "duplicate event: already stored"
        upsert = dialect_insert(self.leads).values(lead_row)
        keys = {"campaign_id", "social_id"}
        upsert = upsert.on_conflict_do_update(
            index_elements=[self.leads.c.campaign_id, self.leads.c.social_id],
            set_={name: upsert.excluded[name] for name in lead_row if name not in keys},
            where=_is_older(
                self.leads, upsert.excluded.last_event_received_at, upsert.excluded.last_event_id
            ),
        )
        changed = _wrote_a_row(conn, upsert, self.leads.c.social_id)
        return "stored" if changed else "event stored; lead state already newer"

    def _write_portable(
        self, conn: Connection, event_row: dict[str, Any], lead_row: dict[str, Any]
    ) -> str:
        seen = conn.execute(
            select(self.events.c.event_id).where(self.events.c.event_id == event_row["event_id"])
        ).first()
        if seen is not None:
            return "duplicate event: already stored"
        _raced(conn, insert(self.events).values(event_row))
        key = and_(
            self.leads.c.campaign_id == lead_row["campaign_id"],
            self.leads.c.social_id == lead_row["social_id"],
        )
        newer = _is_older(
            self.leads, lead_row["last_event_received_at"], lead_row["last_event_id"]
        )
        updated = conn.execute(update(self.leads).where(key, newer).values(lead_row)).rowcount
        if updated:
            return "stored"
        if conn.execute(select(self.leads.c.social_id).where(key)).first() is not None:
            return "event stored; lead state already newer"
        _raced(conn, insert(self.leads).values(lead_row))
        return "stored"


def _is_older(leads: Table, received_at: Any, event_id: Any) -> ColumnElement[bool]:
    """SQL: the stored state is older than the incoming one (received_at, then event id).

    ``received_at`` / ``event_id`` are the incoming values: the upsert's ``excluded`` columns
    or plain Python values (bound as parameters).
    """
    stored_at, stored_id = leads.c.last_event_received_at, leads.c.last_event_id
    return or_(
        stored_at < received_at,
        and_(stored_at == received_at, stored_id < event_id),
    )


def _order(lead_row: Mapping[str, Any]) -> tuple[float, str]:
    """Which of two states of a lead is newer: the order :func:`_is_older` compares in SQL."""
    return (lead_row["last_event_received_at"], lead_row["last_event_id"])


def _wrote_a_row(conn: Connection, statement: Any, key: Any) -> bool:
    """Did this ON CONFLICT insert write a row? RETURNING says so reliably; the driver's
    rowcount does not (psycopg reports -1 for these statements)."""
    if conn.dialect.insert_returning:
        return conn.execute(statement.returning(key)).first() is not None
    return bool(conn.execute(statement).rowcount)


def _raced(conn: Connection, statement: Any) -> None:
    """An insert a concurrent worker may have beaten us to: that is a retry, not a failure."""
    try:
        conn.execute(statement)
    except exc.IntegrityError as error:
        raise RetryableDeliveryError(
            f"concurrent write to the same row ({_reason(error)}); retrying"
        ) from error


def _deleted_at(event: LeadEvent, now: datetime) -> datetime | None:
    if event.name != "deleted":
        return None
    if event.received_at:
        return datetime.fromtimestamp(event.received_at, UTC)
    return now


def lead_columns(payload: Mapping[str, Any]) -> dict[str, Any]:
    """The typed columns of the leads table, read leniently: a value of the wrong type is
    stored as NULL (the payload column keeps it verbatim) rather than failing the delivery."""
    email = _text(payload.get("email"))
    return {
        "lead_id": _text(payload.get("id")),
        "email": email.lower() if email else None,
        "phone_number": _text(payload.get("phone_number")),
        "first_name": _text(payload.get("first_name") or payload.get("given_name")),
        "last_name": _text(payload.get("last_name") or payload.get("family_name")),
        "display_name": _text(payload.get("display_name")),
        "rank": _int(payload.get("rank")),
        "contest_score": _int(payload.get("contest_score")),
        "referrals": _int(payload.get("referrals")),
        "verified_referrals": _int(dotted_get(payload, "verified_leads.direct")),
        "unverified_referrals": _int(dotted_get(payload, "unverified_leads.direct")),
        "verified": _bool(payload.get("verified")),
        "waitlisted": _bool(payload.get("waitlisted")),
        "opted_out": _bool(payload.get("opted_out")),
        "fraudulent": _bool(payload.get("fraudulent")),
        "tags": payload.get("tags"),
        "custom_fields": payload.get("custom_fields"),
    }


def _text(value: Any) -> str | None:
    if value is None or isinstance(value, Mapping | list):
        return None
    text = str(value)
    return text or None


def _int(value: Any) -> int | None:
    if isinstance(value, bool) or value is None:
        return None
    try:
        number = int(value)
    except (TypeError, ValueError):
        return None
    # Out of a 32-bit INTEGER column's range would be a DataError on PostgreSQL.
    return number if -(2**31) <= number < 2**31 else None


def _bool(value: Any) -> bool | None:
    if isinstance(value, bool) or value is None:
        return value
    text = str(value).strip().lower()
    if text in {"true", "1", "yes", "t"}:
        return True
    if text in {"false", "0", "no", "f", ""}:
        return False
    return None


# -- error classification -------------------------------------------------------------------

# SQLSTATE classes worth retrying: connection (08), transaction rollback: serialization and
# deadlock (40), insufficient resources (53), operator intervention: shutdown, cancel (57),
# system errors (58), and object in use / lock not available (55006, 55P03).
_RETRYABLE_SQLSTATE_CLASSES = {"08", "40", "53", "57", "58"}
_RETRYABLE_SQLSTATES = {"55006", "55P03"}
# SQLite primary result codes that are about the moment, not the statement: BUSY, LOCKED,
# NOMEM, IOERR, FULL, CANTOPEN, PROTOCOL. SQLITE_ERROR (1: no such table / column) is not.
_RETRYABLE_SQLITE_CODES = {5, 6, 7, 10, 13, 14, 15}


def _is_retryable(error: exc.DBAPIError) -> bool:
    if error.connection_invalidated:
        return True
    orig = error.orig
    sqlstate = getattr(orig, "sqlstate", None) or getattr(orig, "pgcode", None)
    if sqlstate:
        return sqlstate[:2] in _RETRYABLE_SQLSTATE_CLASSES or sqlstate in _RETRYABLE_SQLSTATES
    sqlite_code = getattr(orig, "sqlite_errorcode", None)
    if sqlite_code is not None:
        return (sqlite_code & 0xFF) in _RETRYABLE_SQLITE_CODES
    # No code: a connection that could not be made or was lost, or a driver we do not know.
    return isinstance(error, exc.OperationalError | exc.InterfaceError)


def _reason(error: exc.DBAPIError) -> str:
    # The driver's own message, first line only: str(error) would add the statement and its
    # parameters, i.e. the lead's personal data, to logs and dead letters.
    message = str(error.orig).strip().splitlines()
    return f"{type(error.orig).__name__}: {message[0] if message else 'no message'}"


def translate_error(error: exc.DBAPIError, destination: str) -> Exception:
    if _is_retryable(error):
        return RetryableDeliveryError(f"database unavailable for {destination}: {_reason(error)}")
    hint = ""
    if isinstance(error, exc.ProgrammingError | exc.OperationalError):
        hint = " (do the tables match the driver's schema? an existing table is not altered)"
    return PermanentDeliveryError(f"database refused the write for {destination}: "
                                  f"{_reason(error)}{hint}")
