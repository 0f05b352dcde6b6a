"""Opening the history database, and bringing its schema up to date (Alembic migrations).

``RELAY_DATABASE_URL`` is any SQLAlchemy URL of PostgreSQL or SQLite. Without it the relay uses
an SQLite file, ``.relay/history.sqlite3`` under the working directory
(:data:`relay.config.settings.DEFAULT_DATABASE_URL`): fit for one machine (``relay dev``, a
single host running web and workers). Several machines need PostgreSQL: SQLite has one writer
at a time and must live on a local disk.

SQLite is opened in WAL mode (readers never wait for the writer) with a busy timeout, and every
transaction starts with ``BEGIN IMMEDIATE``, so two writers queue for the lock instead of
failing half-way with "database is locked"; except those of :func:`reading`, which only read
and take no lock (so a read never waits behind the history writer, nor holds it up).
"""

from __future__ import annotations

import functools
import os
import time
from importlib import resources
from typing import Any

from sqlalchemy import Connection, Engine, create_engine, event
from sqlalchemy.engine import make_url

from relay.history import partitions

SQLITE_BUSY_TIMEOUT_MS = 30_000


def open_database(url: str, **options: Any) -> Engine:
    """An engine for ``url``; SQLite files get WAL, a busy timeout and ``BEGIN IMMEDIATE``."""
    parsed = make_url(url)
    if parsed.get_backend_name() != "sqlite":
        options.setdefault("pool_pre_ping", True)
        return create_engine(url, **options)
    database = parsed.database or ""
    if database and database != ":memory:" and not database.startswith("file:"):
        os.makedirs(os.path.dirname(os.path.abspath(database)), exist_ok=True)
    engine = create_engine(url, **options)

    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_connection: Any, _record: Any) -> None:
        # pysqlite's own transaction handling would BEGIN DEFERRED: take it over.
        dbapi_connection.isolation_level = None
        cursor = dbapi_connection.cursor()
        cursor.execute(f"PRAGMA busy_timeout = {SQLITE_BUSY_TIMEOUT_MS}")
        if database and database != ":memory:":
            cursor.execute("PRAGMA journal_mode = WAL")
            cursor.execute("PRAGMA synchronous = NORMAL")  # durable at each WAL checkpoint
        cursor.close()

    @event.listens_for(engine, "begin")
    def _on_begin(connection: Any) -> None:
        reads = connection.get_execution_options().get(_READS_ONLY, False)
        connection.exec_driver_sql("BEGIN" if reads else "BEGIN IMMEDIATE")

    return engine


_READS_ONLY = "relay_reads_only"


def reading(database: Engine) -> Connection:
    """A connection that only reads (``with reading(database) as connection:``)."""
    return database.connect().execution_options(**{_READS_ONLY: True})


@functools.lru_cache(maxsize=8)
def shared_database(url: str) -> Engine:
    """One engine (and pool) per URL and process."""
    return open_database(url)


def alembic_config(url: str) -> Any:
    from alembic.config import Config

    config = Config()
    config.set_main_option("script_location",
                           str(resources.files("relay.history").joinpath("migrations")))
    config.set_main_option("sqlalchemy.url", url.replace("%", "%%"))
    return config


def upgrade(url: str, revision: str = "head") -> None:
    """Bring the database at ``url`` to ``revision`` (``relay db upgrade``; ``relay dev`` runs it
    on start). Safe to run again: Alembic skips what is applied."""
    from alembic import command

    engine = open_database(url)
    try:
        with engine.begin() as connection:
            config = alembic_config(url)
            config.attributes["connection"] = connection
            command.upgrade(config, revision)
            if revision == "head":
                partitions.ensure(connection, time.time())
    finally:
        engine.dispose()


def current_revision(url: str) -> str | None:
    from alembic.runtime.migration import MigrationContext

    engine = open_database(url)
    try:
        with engine.connect() as connection:
            return MigrationContext.configure(connection).get_current_revision()
    finally:
        engine.dispose()
