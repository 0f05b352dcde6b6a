"""One `new_signup` through a real worker to all five destination types at once."""

from __future__ import annotations

import pytest
import sqlalchemy as sa

from tests.support.deployment import RelayDeployment
from tests.support.helpers import wait_for
from tests.support.loopback import Sink
from tests.support.samples import sample
from tests.support.vendor_server import VendorServer

pytestmark = pytest.mark.integration


def test_new_signup_reaches_webhook_crm_marketing_and_database(
    deployment: RelayDeployment, sink: Sink, vendor: VendorServer, tmp_path
) -> None:
    database_url = f"sqlite:///{tmp_path / 'leads.db'}"
    deployment.configure(
        {
            "destinations": [
                {"name": "backend", "type": "webhook", "url": f"{sink.url}/leads"},
                {
                    "name": "crm",
                    "type": "hubspot",
                    "access_token": "pat-test",
                    "base_url": vendor.url,
                    "properties": {
                        "kickofflabs_rank": None,
                        "kickofflabs_referral_link": None,
                        "kickofflabs_score": None,
                        "kickofflabs_verified": None,
                        "kickofflabs_opted_out": None,
                    },
                },
                {
                    "name": "newsletter",
                    "type": "mailchimp",
                    "api_key": "abc123-us6",
                    "list_id": "L1",
                    "base_url": vendor.url,
                },
                {
                    "name": "flows",
                    "type": "klaviyo",
                    "api_key": "pk_test",
                    "list_id": "K1",
                    "unsubscribe": "list",  # what opted_out does: required with events "*"
                    "base_url": vendor.url,
                },
                {"name": "warehouse", "type": "database", "url": database_url},
            ]
        }
    )
    deployment.start_worker()
    client = deployment.web_client()
    lead = sample("new_signup")
    response = client.post("/hooks/kickofflabs", json=lead)
    assert response.status_code == 202
    event_id = response.get_json()["event_id"]

    def paths() -> list[str]:
        return [r.method + " " + r.path.split("?")[0] for r in vendor.requests]

    wait_for(
        lambda: sink.requests("/leads") and len(vendor.requests) >= 4,
        message="the webhook and the three vendor APIs",
    )
    assert "POST /crm/v3/objects/contacts/batch/upsert" in paths()
    assert "POST /3.0/lists/L1" in paths()  # Mailchimp's batch subscribe, one member
    assert "POST /api/profile-import" in paths()
    assert "POST /api/profile-subscription-bulk-create-jobs" in paths()
    assert sink.requests("/leads")[0].headers["webhook-id"] == event_id

    engine = sa.create_engine(database_url)

    def stored() -> list[tuple[str, str]]:
        with engine.connect() as connection:
            try:
                return list(
                    connection.execute(sa.text("select email, last_event from relay_leads"))
                )
            except sa.exc.OperationalError:
                return []

    assert wait_for(stored, message="the lead in the database") == [
        ("ada@example.com", "new_signup")
    ]
    with engine.connect() as connection:
        events = list(connection.execute(sa.text("select event_id from relay_events")))
    assert events == [(event_id,)]
    engine.dispose()
