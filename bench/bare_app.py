"""The ingress baseline: a bare Flask endpoint that only ``LPUSH``es the body (SPEC §6).

``bench.ingress`` serves it with exactly the gunicorn command of ``relay web`` (same worker class,
workers, threads, keep-alive, access log), against the same embedded Redis, so the ratio measures
what the relay's ingress adds: parsing, validation, the event id and the Celery envelope.
"""

from __future__ import annotations

import os

import redis
from flask import Flask, Response, jsonify, request

BARE_LIST = "bench:bare"

app = Flask(__name__)
_redis = redis.Redis.from_url(os.environ.get("RELAY_REDIS_URL", "redis://127.0.0.1:6379/0"))


@app.post("/hooks/<source>")
def receive(source: str) -> tuple[Response, int]:
    _redis.lpush(BARE_LIST, request.get_data())
    return jsonify({"status": "accepted"}), 202
