"""The history database away: the ingress never notices, what reads the history says 503."""

from __future__ import annotations

import fakeredis
from sqlalchemy import create_engine

from relay.app import create_app
from relay.config.settings import Settings
from tests.support.helpers import config
from tests.support.samples import sample

KEY = "admin-key"


def test_the_ingress_accepts_and_history_reads_answer_503() -> None:
    nowhere = create_engine("postgresql+psycopg://relay@127.0.0.1:1/relay")  # refused at once
    app = create_app({"RELAY_SETTINGS": Settings(api_keys=(KEY,)),
                      "RELAY_CONFIG_OBJECT": config(sources={"kickofflabs": {}}),
                      "RELAY_REDIS": fakeredis.FakeRedis(), "RELAY_DATABASE": nowhere})
    client = app.test_client()
    assert client.post("/hooks/kickofflabs", json=sample("new_signup")).status_code == 202
    for path in ("/api/dead-letters", "/api/events/evt_x", "/api/destinations"):
        response = client.get(path, headers={"Authorization": f"Bearer {KEY}"})
        assert response.status_code == 503, path
        assert response.headers["Retry-After"] and "history database" in response.json["error"]
