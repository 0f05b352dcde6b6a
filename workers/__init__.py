"""The Celery side of leadrelay: the app (``workers.celery_app``) and its tasks."""
