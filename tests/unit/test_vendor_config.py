"""What ``relay check-config`` says of the vendor destinations beyond their keys: the defaults
each ships with (batch, limits, timeout), Klaviyo's unsubscribe choice, Mailchimp's merge field
types; and the lead fields' kinds the drivers check mappings against."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from relay.cli import main
from relay.config.relay_yaml import parse_config
from relay.core.errors import ConfigError
from relay.core.models import BatchPolicy, RateLimit
from relay.drivers.mailchimp import merge_fields_of, merge_value
from relay.drivers.mapping import LEAD_KINDS, lead_kind
from relay.ingress.lead_schema import _PLAN, _Items


def klaviyo(**keys: Any) -> dict[str, Any]:
    return {"name": "flows", "type": "klaviyo", "api_key": "pk_test", **keys}


def problems_of(*destinations: dict[str, Any]) -> list[str]:
    with pytest.raises(ConfigError) as caught:
        parse_config({"destinations": list(destinations)}, {})
    return caught.value.problems


# -- the lead fields' kinds -----------------------------------------------------------------------


def test_lead_kinds_are_the_ingress_schema_s_types() -> None:
    kinds = {int: "integer", bool: "boolean", str: "text", dict: "object", list: "list"}

    def flat(plan: dict[str, Any], prefix: str = "") -> dict[str, str]:
        out: dict[str, str] = {}
        for key, kind in plan.items():
            if isinstance(kind, _Items):
                out[prefix + key] = "list"
            elif isinstance(kind, dict):
                out[prefix + key] = "object"
                out.update(flat(kind, f"{prefix}{key}."))
            elif kind in kinds:
                out[prefix + key] = kinds[kind]
        return out

    assert flat(_PLAN) == LEAD_KINDS
    assert lead_kind("custom_fields.company") is None  # anything: converted value by value


# -- Klaviyo --------------------------------------------------------------------------------------


def test_klaviyo_defaults_are_its_published_limits() -> None:
    config = parse_config({"destinations": [klaviyo(unsubscribe="global")]}, {})
    [flows] = config.destinations
    assert flows.batch == BatchPolicy(500, 1.0)
    assert flows.rate_limit == RateLimit(2, 1.0)
    assert flows.concurrency == 2
    assert flows.timeout == 90.0
    assert flows.options["job_timeout"] == 60.0
    assert parse_config({"destinations": [klaviyo(
        unsubscribe="global", batch={"max": 10_000})]}, {}).destinations[0].batch.max == 10_000
    assert "at most 10000" in problems_of(klaviyo(unsubscribe="global",
                                                  batch={"max": 10_001}))[0]


def test_klaviyo_unsubscribe_is_required_when_opt_outs_reach_it() -> None:
    [missing] = problems_of(klaviyo())
    assert missing.startswith("destinations[0] (flows): unsubscribe: opted_out events reach")
    assert "`global`" in missing and "`list`" in missing and "`none`" in missing
    assert problems_of(klaviyo(events=["new_signup", "phone_number_opt_out"]))
    # Events that never unsubscribe: no choice to make.
    config = parse_config({"destinations": [klaviyo(events=["new_signup", "verified"])]}, {})
    assert not any("flows" in warning for warning in config.warnings)


def test_klaviyo_unsubscribe_choice_is_said_by_check_config() -> None:
    said = parse_config({"destinations": [klaviyo(unsubscribe="global")]}, {}).warnings
    assert any("from email marketing in the whole Klaviyo account" in w
               and w.endswith("(unsubscribe: global)") for w in said)
    said = parse_config({"destinations": [klaviyo(unsubscribe="list", list_id="Y6nRLr")]},
                        {}).warnings
    assert any("from list Y6nRLr (unsubscribe: list); Klaviyo unsubscribes a lead who is not "
               "in that list from the whole account" in w for w in said)
    said = parse_config({"destinations": [klaviyo(unsubscribe="none")]}, {}).warnings
    assert any("leave Klaviyo consent as it is (unsubscribe: none)" in w for w in said)


def test_klaviyo_keys_that_cannot_work_together_are_refused() -> None:
    assert "unsubscribe: `list` needs a list_id" in problems_of(klaviyo(unsubscribe="list"))[0]
    [short] = problems_of(klaviyo(unsubscribe="none", timeout="30s"))
    assert "job_timeout (60s) must be shorter than timeout (30s)" in short
    [shorter] = parse_config({"destinations": [klaviyo(
        unsubscribe="none", timeout="30s", job_timeout="20s")]}, {}).destinations
    assert (shorter.timeout, shorter.options["job_timeout"]) == (30.0, 20.0)
    [bad] = problems_of(klaviyo(unsubscribe="none", properties={"external_id": "utm",
                                                                "location.town": "ip"}))
    assert "location.town: Klaviyo's location has no such field" in bad
    assert "external_id: utm is an object" in bad
    assert "unsubscribe" in problems_of(klaviyo(unsubscribe="sometimes"))[0]


def test_check_config_prints_the_unsubscribe_mode(tmp_path: Path) -> None:
    path = tmp_path / "relay.yaml"
    path.write_text("destinations:\n  - {name: flows, type: klaviyo, api_key: pk_x, "
                    "list_id: Y6nRLr, unsubscribe: list}\n")
    result = CliRunner().invoke(main, ["check-config", str(path)])
    assert result.exit_code == 0, result.output
    assert "unsubscribe: list" in result.stdout
    assert "pk_x" not in result.stdout
    assert "warning: destinations[0] (flows): opted_out unsubscribes the lead from list " \
           "Y6nRLr" in result.stderr


# -- Mailchimp ------------------------------------------------------------------------------------


def mailchimp(**keys: Any) -> dict[str, Any]:
    return {"name": "newsletter", "type": "mailchimp", "api_key": "0123abcd-us21",
            "list_id": "a1b2c3d4e5", **keys}


def test_mailchimp_defaults_keep_within_its_connections() -> None:
    [newsletter] = parse_config({"destinations": [mailchimp()]}, {}).destinations
    assert newsletter.concurrency == 5  # of Mailchimp's 10 simultaneous connections
    assert newsletter.rate_limit is None  # Mailchimp counts connections, not requests
    assert newsletter.batch == BatchPolicy(500, 0.2)
    assert newsletter.timeout == 60.0
    assert "at most 500" in problems_of(mailchimp(batch={"max": 501}))[0]


@pytest.mark.parametrize(("field", "expected"), [
    ({"path": "contest_score", "type": "date"},
     "contest_score is a whole number; a Mailchimp date field cannot take it"),
    ({"path": "verified", "type": "number"},
     "verified is a yes/no value; a Mailchimp number field cannot take it"),
    ({"path": "first_name", "type": "address"},
     "first_name is text; a Mailchimp address field cannot take it"),
    ("utm", "utm is an object: map one of its fields, or give a type"),
    ("tags", "tags is a list: map one of its fields"),
    ({"path": "rank", "type": "integer"}, "type: must be one of text, number, address"),
    ({"path": "rank", "type": "text", "choices": ["a"]}, "choices: only radio and dropdown"),
    ({"path": "rank", "kind": "text"}, "unknown keys ['kind']"),
])
def test_mailchimp_merge_fields_a_lead_field_can_never_fill_are_refused(
        field: Any, expected: str) -> None:
    [problem] = problems_of(mailchimp(merge_fields={"F": field}))
    assert problem.startswith("destinations[0] (newsletter): merge_fields.F")
    assert expected in problem


def test_mailchimp_merge_field_types_are_kept_or_inferred() -> None:
    [newsletter] = parse_config({"destinations": [mailchimp(merge_fields={
        "SCORE": "contest_score", "COMPANY": "custom_fields.company", "PHONE": "custom_fields.m",
        "WHEN": {"path": "when", "type": "date"}, "LNAME": None,
        "PLAN": {"path": "custom_fields.plan", "type": "dropdown", "choices": ["a", "b"]},
        "HOME": {"path": "custom_fields.address", "type": "address"}})]}, {}).destinations
    fields = merge_fields_of(newsletter.options["merge_fields"])
    assert {tag: spec["type"] for tag, spec in fields.items()} == {
        "FNAME": "text", "PHONE": "phone", "SCORE": "number", "COMPANY": "text",
        "WHEN": "date", "PLAN": "dropdown", "HOME": "address"}
    assert fields["PLAN"]["choices"] == ["a", "b"]


@pytest.mark.parametrize(("kind", "value", "converted"), [
    ("text", 268, "268"), ("text", True, "true"), ("number", "12", 12), ("number", "1.5", 1.5),
    ("number", 3.25, 3.25), ("date", "2026-07-15T14:29:23-04:00", "2026-07-15"),
    ("birthday", "1990-12-25", "12/25"), ("birthday", "02/29", "02/29"),
    ("zip", 10017, "10017"), ("zip", "10017-1234", "10017-1234"),
    ("url", "https://example.com/x", "https://example.com/x"),
    ("phone", "+1 500 555", "+1 500 555"), ("dropdown", 3, "3"),
])
def test_mailchimp_values_are_converted_when_exact(kind: str, value: Any, converted: Any) -> None:
    assert merge_value(kind, value) == (converted, None)


@pytest.mark.parametrize(("kind", "value"), [
    ("text", {"a": 1}), ("number", "twelve"), ("number", True), ("date", "15/07/2026"),
    ("date", 1752600000), ("birthday", "25 December"), ("zip", 2134), ("zip", "N1 9GU"),
    ("url", "example.com"), ("address", "1 Engine Way, London"),
    ("address", {"addr1": "1 Engine Way", "city": "London"}), ("phone", 15005550006),
])
def test_mailchimp_values_that_cannot_be_converted_exactly_are_refused(kind: str,
                                                                       value: Any) -> None:
    converted, why_not = merge_value(kind, value)
    assert converted is None and why_not
    assert merge_value("dropdown", "c", ["a", "b"])[1] == "'c' is not one of a, b"


def test_klaviyo_and_mailchimp_destinations_with_one_key_share_its_account() -> None:
    """The vendor counts an account's requests together: so does the relay (one budget)."""
    flows, news, other = parse_config({"destinations": [
        klaviyo(unsubscribe="global"), klaviyo(name="news", unsubscribe="global"),
        klaviyo(name="other", api_key="pk_other", unsubscribe="global")]}, {}).destinations
    assert flows.budget_name == news.budget_name != other.budget_name
    assert "pk_" not in flows.budget_name
    one, two = parse_config({"destinations": [
        {"name": "one", "type": "mailchimp", "api_key": "key-us1", "list_id": "a1"},
        {"name": "two", "type": "mailchimp", "api_key": "key-us1", "list_id": "b2",
         "rate_limit": "5/s"}]}, {}).destinations
    assert one.budget_name == two.budget_name and one.rate_limit == two.rate_limit
