"""WSGI entry point for gunicorn: ``gunicorn relay.wsgi:app`` (what ``relay web`` runs)."""

import logging

from relay.app import create_app
from relay.observability.logs import lean_records

lean_records()  # a server process: one line per request, nothing it does not show
# ... but gunicorn's own lines, which this process logs too ("Worker exiting", a request's
# error), show the pid with "%(process)d": a record without it cannot be formatted.
logging.logProcesses = True
app = create_app()
