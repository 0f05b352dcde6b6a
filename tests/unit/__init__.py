"""The fast layer: everything runs in the test's own process. Redis is fakeredis, the web side
is Flask's test client; no redis-server, no subprocess, no server on a socket, no database.
The one exception is ``test_lint.py``, which runs ruff and lint-imports (a second together).

``python -m pytest tests/unit`` is the loop to run while you work."""
