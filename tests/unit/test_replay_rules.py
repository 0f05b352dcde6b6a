"""Replay, by the same rules wherever it is asked for (issue 18, point 7): an unknown destination
is a 404 as for pause, and what a confirmation counts is what exists."""

from __future__ import annotations

import pytest

from relay.history.schema import deliveries
from tests.support.operator_world import OperatorWorld, csrf_of
from tests.support.samples import sample


@pytest.fixture
def world(monkeypatch: pytest.MonkeyPatch) -> OperatorWorld:
    return OperatorWorld(monkeypatch)


def dead_letters(world: OperatorWorld, n: int) -> list[str]:
    ids = [world.post(sample("new_signup", email=f"lead{i}@example.com", social_id=f"s{i}",
                             id=i)) for i in range(n)]
    world.process()
    return ids


def test_replay_to_an_unknown_destination_is_a_404_like_pause(world: OperatorWorld) -> None:
    dead_letters(world, 1)
    for action in ("/api/destinations/nope/pause", "/api/dead-letters/replay"):
        response = world.api("post", action, json={"destination": "nope"})
        assert response.status_code == 404, (action, response.get_json())
        assert response.get_json()["error"] == "unknown destination 'nope'"
    known = world.api("post", "/api/dead-letters/replay", json={"destination": "crm"})
    assert known.status_code == 200 and known.get_json() == {"queued": 1}


def test_a_destination_gone_from_the_config_can_still_replay_its_dead_letters(
        world: OperatorWorld) -> None:
    dead_letters(world, 1)
    with world.app.extensions["relay"].database.begin() as connection:
        connection.execute(deliveries.update().values(destination="retired"))
    response = world.api("post", "/api/dead-letters/replay", json={"destination": "retired"})
    assert response.status_code == 200 and response.get_json() == {"queued": 1}


def test_the_cli_refuses_an_unknown_destination_too(world: OperatorWorld) -> None:
    dead_letters(world, 1)
    result = world.cli("dlq", "replay", "--destination", "nope", code=1)
    assert "unknown destination 'nope'" in result.output
    assert "queued 1 dead letter(s)" in world.cli("dlq", "replay", "--destination", "crm").output


def test_the_console_confirmation_counts_only_dead_letters_that_exist(
        world: OperatorWorld) -> None:
    [event_id] = dead_letters(world, 1)
    client = world.console()
    page = client.get("/console/dead-letters").text
    given = [f"{event_id}|crm", "evt_nope|crm", f"{event_id}|nope", "evt_none"]
    confirm = client.post("/console/dead-letters/replay", data={
        "csrf_token": csrf_of(page), "ids": given, "back": "/console/dead-letters"})
    assert confirm.status_code == 200
    assert "Replay 1 dead letter?" in confirm.text  # it said "Replay 3 dead letters?"
    assert "<span class=\"mono\">evt_nope" not in confirm.text  # nor listed


def test_the_api_and_the_cli_count_only_dead_letters_that_exist(world: OperatorWorld) -> None:
    first, second = dead_letters(world, 2)
    response = world.api("post", "/api/dead-letters/replay",
                         json={"ids": [f"{first}|crm", "evt_nope|crm", f"{first}|nope"]})
    assert response.get_json() == {"queued": 1}
    out = world.cli("dlq", "replay", f"{second}|crm", "evt_nope|crm").output
    assert "queued 1 dead letter(s) for delivery; 1 of the ids given are not dead letters" in out
    assert "no longer dead" not in out
