"""Which destinations an event goes to: ``events``, ``campaigns`` and ``where`` as written in
the YAML (SPEC §3), against payloads as the ingress normalises them."""

from __future__ import annotations

from typing import Any

import pytest

from relay.core.events import canonical_event_name, is_known
from relay.core.models import Destination, LeadEvent
from relay.core.routing import matches, route
from tests.support.helpers import config
from tests.support.samples import sample


def destination(**keys: Any) -> Destination:
    [built] = config([{"name": "d", "type": "webhook", "url": "http://127.0.0.1:9/h", **keys}]
                     ).destinations
    return built


def event(name: str = "new_signup", **changes: Any) -> LeadEvent:
    payload = sample(name if is_known(name) else "new_signup", **changes)
    canonical = canonical_event_name(name)
    payload["__event"] = canonical
    return LeadEvent(f"evt_{name}", "kickofflabs", canonical, payload, is_known(canonical))


# -- events --------------------------------------------------------------------------------------


def test_named_events_only() -> None:
    backend = destination(events=["new_signup", "referral"])
    assert matches(backend, event("new_signup"))
    assert matches(backend, event("referral"))
    assert not matches(backend, event("tagged"))
    assert not matches(backend, event("deleted"))


def test_fraudulent_alias_in_the_yaml_routes_the_canonical_event() -> None:
    assert matches(destination(events=["fraudulent"]), event("marked_as_fraudulent"))
    assert matches(destination(events=["marked_as_fraudulent"]), event("fraudulent"))


def test_star_gets_every_event_including_unknown_ones() -> None:
    everything = destination(events=["*"])
    for name in ("new_signup", "deleted", "phone_number_opt_out"):
        assert matches(everything, event(name))
    assert matches(everything, event("lead_exploded"))


def test_named_lists_never_get_unknown_events() -> None:
    unknown = event("lead_exploded")
    assert not unknown.known
    assert not matches(destination(events=["new_signup"]), unknown)
    # Even a destination built in code that names the unknown event does not get it.
    named = Destination("x", "webhook", events=frozenset({"lead_exploded"}))
    assert not matches(named, unknown)


def test_route_keeps_config_order_and_filters() -> None:
    relay_config = config([
        {"name": "all", "type": "webhook", "url": "http://127.0.0.1:9/a", "events": ["*"]},
        {"name": "signups", "type": "webhook", "url": "http://127.0.0.1:9/b",
         "events": ["new_signup"]},
        {"name": "tags", "type": "webhook", "url": "http://127.0.0.1:9/c", "events": ["tagged"]},
    ])
    names = [d.name for d in route(event("new_signup"), relay_config.destinations)]
    assert names == ["all", "signups"]
    assert [d.name for d in route(event("lead_exploded"), relay_config.destinations)] == ["all"]


# -- campaigns -----------------------------------------------------------------------------------


@pytest.mark.parametrize("yaml_campaign", [135544, "135544"])
@pytest.mark.parametrize("payload_campaign", [135544, "135544"])
def test_campaigns_match_int_and_string(yaml_campaign: Any, payload_campaign: Any) -> None:
    backend = destination(campaigns=[yaml_campaign])
    assert matches(backend, event(campaign_id=payload_campaign))
    assert not matches(backend, event(campaign_id=999, list_id=999))


def test_campaigns_fall_back_to_list_id() -> None:
    backend = destination(campaigns=[135544])
    without = sample("new_signup")
    del without["campaign_id"]
    lead = LeadEvent("evt_1", "kickofflabs", "new_signup", {**without, "list_id": 135544})
    assert matches(backend, lead)
    assert matches(backend, event(campaign_id=None, list_id="135544"))
    assert not matches(backend, event(campaign_id=None, list_id=1))


def test_campaign_id_wins_over_list_id() -> None:
    assert not matches(destination(campaigns=[135544]), event(campaign_id=7, list_id=135544))


def test_no_campaign_at_all_does_not_match_a_campaign_filter() -> None:
    assert not matches(destination(campaigns=[135544]), event(campaign_id=None, list_id=None))
    assert matches(destination(), event(campaign_id=None, list_id=None))


def test_several_campaigns() -> None:
    backend = destination(campaigns=[1, 2, "3"])
    assert [matches(backend, event(campaign_id=c)) for c in (1, 2, 3, 4)] == [
        True, True, True, False
    ]


# -- where ---------------------------------------------------------------------------------------


def test_where_equality_on_top_level_fields() -> None:
    backend = destination(where={"first_name": "Ada"})
    assert matches(backend, event(first_name="Ada"))
    assert not matches(backend, event(first_name="Grace"))


def test_where_on_a_dotted_path() -> None:
    backend = destination(where={"custom_fields.plan": "pro"})
    assert matches(backend, event(custom_fields={"plan": "pro", "company": "AE"}))
    assert not matches(backend, event(custom_fields={"plan": "free"}))
    assert not matches(backend, event(custom_fields={}))
    assert not matches(backend, event(custom_fields=None))


def test_where_on_a_key_that_contains_a_dot() -> None:
    assert matches(destination(where={"a.b": "1"}), event(**{"a.b": "1"}))


def test_where_with_several_conditions_needs_all() -> None:
    backend = destination(where={"verified": True, "custom_fields.plan": "pro"})
    assert matches(backend, event(verified=True, custom_fields={"plan": "pro"}))
    assert not matches(backend, event(verified=False, custom_fields={"plan": "pro"}))
    assert not matches(backend, event(verified=True, custom_fields={"plan": "free"}))


@pytest.mark.parametrize(
    ("expected", "actual", "result"),
    [
        (True, True, True),
        (True, False, False),
        (False, False, True),
        (False, True, False),
        (True, "true", True),  # custom fields from a form body stay strings
        (True, "false", False),
        (False, "false", True),
        (True, None, False),
    ],
)
def test_where_booleans(expected: bool, actual: Any, result: bool) -> None:
    backend = destination(where={"custom_fields.beta": expected})
    assert matches(backend, event(custom_fields={"beta": actual})) is result


def test_where_numbers_match_their_string_form() -> None:
    assert matches(destination(where={"rank": 268}), event(rank=268))
    seats = destination(where={"custom_fields.seats": 5})
    assert matches(seats, event(custom_fields={"seats": "5"}))
    assert not matches(destination(where={"rank": 268}), event(rank=269))


def test_where_null_matches_a_missing_field() -> None:
    assert matches(destination(where={"custom_fields.plan": None}), event(custom_fields={}))
    assert not matches(destination(where={"custom_fields.plan": None}),
                       event(custom_fields={"plan": "pro"}))


def test_where_list_means_any_of() -> None:
    backend = destination(where={"custom_fields.plan": ["pro", "team"]})
    assert matches(backend, event(custom_fields={"plan": "team"}))
    assert not matches(backend, event(custom_fields={"plan": "free"}))


def test_events_campaigns_and_where_combine() -> None:
    backend = destination(events=["new_signup"], campaigns=[135544],
                          where={"custom_fields.plan": "pro"})
    good = {"campaign_id": 135544, "custom_fields": {"plan": "pro"}}
    assert matches(backend, event("new_signup", **good))
    assert not matches(backend, event("referral", **good))
    assert not matches(backend, event("new_signup", **{**good, "campaign_id": 1, "list_id": 1}))
    assert not matches(backend, event("new_signup", **{**good, "custom_fields": {}}))
