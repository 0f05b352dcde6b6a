"""leadrelay: a queue-backed relay for KickoffLabs lead-event webhooks.

``relay`` is the Flask app and the shared core; ``workers`` is the Celery side. ``relay`` never
imports ``workers``.
"""

__version__ = "0.1.0"
