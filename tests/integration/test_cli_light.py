"""What loading the ``relay`` command costs, in a fresh process: every command, ``relay worker``
(each worker process starts as one) and ``relay --help`` included, loads it before it runs. The
web side is gunicorn's to import (``relay web``), the operations each operator command's own."""

from __future__ import annotations

import json
import subprocess
import sys

WEB_SIDE = ("flask", "werkzeug", "jinja2", "apispec", "relay.app", "relay.wsgi", "relay.api",
            "relay.console", "relay.ingress")
COMMANDS_OWN = ("redis", "marshmallow", "urllib3", "relay.config.relay_yaml",
                "relay.operations", "relay.delivery", "relay.store")


def test_loading_the_cli_imports_neither_the_web_app_nor_the_operations() -> None:
    probe = ("import json, sys, relay.cli, relay.cli.operator; "
             f"print(json.dumps(sorted(m for m in {list(WEB_SIDE + COMMANDS_OWN)!r} "
             "if m in sys.modules)))")
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True,
                          check=True, timeout=60)
    loaded = json.loads(done.stdout)
    assert [m for m in loaded if m in WEB_SIDE] == [], "the web side"
    assert [m for m in loaded if m in COMMANDS_OWN] == [], "what only some commands need"
