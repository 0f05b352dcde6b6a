"""Alembic's environment for the history database: run online, on the connection that
:func:`relay.history.database.upgrade` passes in (or one opened from the configured URL)."""

from __future__ import annotations

from alembic import context

from relay.history.database import open_database
from relay.history.schema import metadata

config = context.config


def run() -> None:
    connection = config.attributes.get("connection")
    if connection is not None:
        context.configure(connection=connection, target_metadata=metadata,
                          render_as_batch=connection.dialect.name == "sqlite")
        with context.begin_transaction():
            context.run_migrations()
        return
    engine = open_database(config.get_main_option("sqlalchemy.url") or "")
    with engine.begin() as opened:
        context.configure(connection=opened, target_metadata=metadata,
                          render_as_batch=opened.dialect.name == "sqlite")
        with context.begin_transaction():
            context.run_migrations()
    engine.dispose()


run()
