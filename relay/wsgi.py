"""WSGI entry point for gunicorn: ``gunicorn relay.wsgi:app`` (what ``relay web`` runs)."""

from relay.app import create_app
from relay.observability.logs import lean_records

lean_records()  # a server process: one line per request, nothing it does not show
app = create_app()
