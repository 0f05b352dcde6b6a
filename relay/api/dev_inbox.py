"""``/dev/inbox`` (``relay dev`` only): a destination that keeps what it receives, so a
newcomer sees an event go in at ``/hooks/kickofflabs`` and come out here."""

from __future__ import annotations

import json
import time
from typing import Any

from flask import Blueprint, Response, current_app, jsonify, render_template_string, request

from relay.store.keys import DEV_INBOX

bp = Blueprint("devinbox", __name__)
INBOX_CAP = 200
_SHOWN_HEADERS = (
    "Content-Type",
    "User-Agent",
    "webhook-id",
    "Idempotency-Key",
    "webhook-timestamp",
    "webhook-signature",
)

_PAGE = """<!doctype html>
<html><head><meta charset="utf-8"><title>leadrelay dev inbox</title>
<meta http-equiv="refresh" content="5">
<style>body{font-family:system-ui,sans-serif;margin:2rem;max-width:70rem}
article{border:1px solid #ccc;border-radius:6px;padding:.5rem 1rem;margin:1rem 0}
pre{background:#f6f6f6;padding:.5rem;overflow:auto;max-height:20rem}
.meta{color:#555;font-size:.9rem}</style></head>
<body><h1>Dev inbox</h1>
<p>{{ deliveries|length }} deliveries received, newest first (refreshes every 5 s;
<a href="?format=json">JSON</a>).</p>
{% for d in deliveries %}<article>
<h3>{{ d.event }} <small>{{ d.headers.get("webhook-id", "") }}</small></h3>
<p class="meta">{{ d.received_at_text }} · {{ d.headers.get("Content-Type", "") }}</p>
<pre>{{ d.pretty }}</pre></article>
{% else %}<p>Nothing yet. Try <code>relay send-sample new_signup</code>.</p>{% endfor %}
</body></html>"""


@bp.post("/dev/inbox")
def receive() -> tuple[Response, int]:
    if request.mimetype == "application/json":
        body: Any = request.get_json(silent=True)
    else:
        body = request.get_data(as_text=True)
    record = {
        "received_at": time.time(),
        "headers": {h: request.headers[h] for h in _SHOWN_HEADERS if h in request.headers},
        "body": body,
    }
    client = current_app.extensions["relay"].redis
    pipe = client.pipeline()
    pipe.lpush(DEV_INBOX, json.dumps(record))
    pipe.ltrim(DEV_INBOX, 0, INBOX_CAP - 1)
    pipe.execute()
    return jsonify({"status": "received"}), 200


@bp.get("/dev/inbox")
def show() -> Response | str:
    client = current_app.extensions["relay"].redis
    deliveries = [json.loads(item) for item in client.lrange(DEV_INBOX, 0, INBOX_CAP - 1)]
    wants_json = request.args.get("format") == "json" or (
        request.accept_mimetypes.best_match(["text/html", "application/json"]) == "application/json"
    )
    if wants_json:
        return jsonify({"deliveries": deliveries})
    for d in deliveries:
        body = d["body"]
        d["event"] = body.get("__event", "") if isinstance(body, dict) else "form body"
        d["pretty"] = json.dumps(body, indent=2) if isinstance(body, dict) else body
        d["received_at_text"] = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(d["received_at"]))
    return render_template_string(_PAGE, deliveries=deliveries)


@bp.delete("/dev/inbox")
def clear() -> Response:
    current_app.extensions["relay"].redis.delete(DEV_INBOX)
    return jsonify({"status": "cleared"})
