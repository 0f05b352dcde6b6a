"""WSGI entry point for gunicorn: ``gunicorn relay.wsgi:app`` (what ``relay web`` runs)."""

from relay.app import create_app

app = create_app()
