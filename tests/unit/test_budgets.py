"""Budgets: the destinations that use one vendor account share its ``rate_limit`` windows and
its daily cap; when the day's cap is spent, or the vendor says so (HubSpot's ``DAILY`` 429),
every destination of the budget holds until the reset, without attempts counted.

On fakeredis with a clock the tests move; the engine's tests use a recording driver in place of
HubSpot's (the driver's own answer to a ``DAILY`` 429 is in
tests/integration/test_driver_hubspot.py, two worker processes in
tests/integration/test_hubspot_limits.py).
"""

from __future__ import annotations

import datetime
import json
import time
from collections.abc import Sequence
from typing import Any

import fakeredis
import pytest
from prometheus_client.parser import text_string_to_metric_families

from relay.config.relay_yaml import RelayConfig, masked
from relay.config.settings import Settings
from relay.core.errors import BudgetSpentError, ConfigError
from relay.core.models import Budget, Destination, LeadEvent, RateLimit, account_day
from relay.delivery.attempt import DriverCache
from relay.delivery.engine import Engine
from relay.delivery.gates import PauseGate, RateLimitGate
from relay.drivers import Driver
from relay.drivers.base import Answer
from relay.observability.metrics import METRICS_KEY, metrics_for
from relay.store.keys import BUDGETS_SPENT, day_key, hold_key, lane_key, rate_key, stats_key
from tests.support.helpers import config, make_app, parked_deliveries
from tests.support.operator_world import OperatorWorld
from tests.support.samples import sample
from tests.unit.test_batching import Clock, RecordingDriver

UTC = datetime.UTC


def epoch(*when: int, zone: datetime.tzinfo = UTC) -> float:
    return datetime.datetime(*when, tzinfo=zone).timestamp()  # type: ignore[misc]


def hubspot(name: str, **keys: Any) -> dict[str, Any]:
    return {"name": name, "type": "hubspot", "access_token": "pat-na1-shared", **keys}


# -- which destinations share a budget ------------------------------------------------------------


def test_destinations_with_the_same_token_share_a_budget_named_by_a_digest() -> None:
    crm, scores, other, hook = config([
        hubspot("crm"), hubspot("scores"), hubspot("other", access_token="pat-na1-other"),
        {"name": "hook", "type": "webhook", "url": "https://example.com/hook"},
    ]).destinations
    assert crm.budget == scores.budget
    assert crm.budget_name == scores.budget_name != other.budget_name
    assert crm.budget_name.startswith("hubspot:") and len(crm.budget_name) == len("hubspot:") + 12
    assert "pat-na1" not in crm.budget_name  # a digest, never the token
    # HubSpot's limits by default: 100 per 10 s kept clear, 250,000 requests a day (UTC days).
    assert crm.budget == Budget(crm.budget_name, 250_000, None)
    assert crm.rate_limit == RateLimit(9, 1.0)
    # A webhook shares nothing unless it says so: its rate windows are its own.
    assert hook.budget is None and hook.budget_name == "hook"


def test_the_same_token_at_another_api_host_is_another_account() -> None:
    real, stand_in = config([hubspot("real"),
                             hubspot("stand-in", base_url="http://127.0.0.1:9/")]).destinations
    assert real.budget_name != stand_in.budget_name


def test_account_names_a_shared_budget_explicitly() -> None:
    one, two, hook_a, hook_b = config([
        hubspot("one", account="acme"), hubspot("two", account="acme", access_token="pat-2"),
        {"name": "hook-a", "type": "webhook", "url": "https://a.example.com/", "account": "rx",
         "rate_limit": "5/s"},
        {"name": "hook-b", "type": "webhook", "url": "https://b.example.com/", "account": "rx"},
    ]).destinations
    # Two private apps of one HubSpot account: their daily cap is the account's.
    assert one.budget_name == two.budget_name == "hubspot:acme"
    # Any destination may share a budget by naming it; a limit said once holds for all of it.
    assert hook_a.budget_name == hook_b.budget_name == "webhook:rx"
    assert hook_a.rate_limit == hook_b.rate_limit == RateLimit(5, 1.0)
    assert hook_a.daily_limit is None


def test_a_limit_said_by_one_destination_of_a_budget_holds_for_all_of_it() -> None:
    crm, scores = config([hubspot("crm", rate_limit="18/s", daily_limit=625_000,
                                  account_timezone="America/New_York"),
                          hubspot("scores")]).destinations
    assert scores.rate_limit == RateLimit(18, 1.0)
    assert scores.budget == crm.budget == Budget(crm.budget_name, 625_000, "America/New_York")


@pytest.mark.parametrize(("key", "one", "two"), [
    ("rate_limit", "9/s", "5/s"),
    ("daily_limit", 250_000, None),
    ("account_timezone", "UTC", "Europe/Berlin"),
])
def test_two_destinations_of_a_budget_that_say_different_limits_is_a_config_error(
        key: str, one: Any, two: Any) -> None:
    with pytest.raises(ConfigError) as refused:
        config([hubspot("crm", **{key: one}), hubspot("scores", **{key: two})])
    [problem] = refused.value.problems
    assert problem.startswith(f"destinations[1] (scores): {key}: ")
    assert "but crm says" in problem and "a budget has one" in problem


def test_daily_limit_null_turns_the_drivers_cap_off() -> None:
    [crm] = config([hubspot("crm", daily_limit=None)]).destinations
    assert crm.daily_limit is None and crm.budget is not None  # still shares its windows


def test_a_daily_limit_on_a_destination_that_shares_nothing_is_its_own_budget() -> None:
    [hook] = config([{"name": "hook", "type": "webhook", "url": "https://e.com/h",
                      "daily_limit": 1000}]).destinations
    assert hook.budget == Budget("hook", 1000, None)


@pytest.mark.parametrize(("keys", "problem"), [
    ({"account_timezone": "Mars/Olympus"}, "account_timezone: unknown time zone 'Mars/Olympus'"),
    ({"daily_limit": 0}, "daily_limit:"),
    ({"account": "acme:eu"}, "account: use letters, digits, - and _ only"),
])
def test_check_config_refuses_a_bad_budget_key(keys: dict[str, Any], problem: str) -> None:
    with pytest.raises(ConfigError) as refused:
        config([hubspot("crm", **keys)])
    assert any(problem in p for p in refused.value.problems), refused.value.problems


def test_the_same_token_in_two_budgets_is_warned_about() -> None:
    relay_config = config([hubspot("crm", account="acme"), hubspot("scores")])
    [warning] = [w for w in relay_config.warnings if "credential" in w]
    assert warning.startswith("crm, scores use the same account credential")
    assert "give them the same account:" in warning


def test_check_config_shows_each_shared_or_capped_budget_without_the_secret() -> None:
    relay_config = config([hubspot("crm"), hubspot("scores"),
                           {"name": "hook", "type": "webhook", "url": "https://e.com/h"}])
    view = masked(relay_config)
    budget = relay_config.destinations[0].budget_name
    assert view["budgets"] == {budget: {"destinations": ["crm", "scores"], "rate_limit": "9/1s",
                                        "daily_limit": 250_000, "day_begins": "midnight UTC"}}
    assert [d["budget"] for d in view["destinations"]] == [budget, budget, None]
    assert "pat-na1-shared" not in json.dumps(view)


# -- the account's day ---------------------------------------------------------------------------


def test_the_accounts_day_ends_at_midnight_in_its_time_zone() -> None:
    noon = epoch(2026, 12, 5, 12)
    assert account_day(noon) == ("2026-12-05", epoch(2026, 12, 6))
    # New York is five hours behind UTC in December: its midnight is 05:00 UTC.
    assert account_day(noon, "America/New_York") == ("2026-12-05", epoch(2026, 12, 6, 5))
    assert account_day(epoch(2026, 12, 6, 3), "America/New_York")[0] == "2026-12-05"
    # The day daylight saving time begins is 23 hours long.
    date, reset = account_day(epoch(2026, 3, 8, 6), "America/New_York")
    assert (date, reset) == ("2026-03-08", epoch(2026, 3, 9, 4))


# -- the gate: one budget's windows and day ------------------------------------------------------


class Gates:
    """Two destinations of one budget (and one of another), the gate of two workers, a clock
    the test moves."""

    def __init__(self, **keys: Any) -> None:
        self.redis = fakeredis.FakeRedis()
        self.now = epoch(2026, 12, 5, 23, 59, 58) + 0.25
        self.config = config([hubspot("crm", **keys), hubspot("scores"),
                              hubspot("elsewhere", access_token="pat-na1-other")])
        self.workers = [RateLimitGate(self.redis, clock=lambda: self.now) for _ in range(2)]

    def __getitem__(self, name: str) -> Destination:
        found = self.config.destination(name)
        assert found is not None
        return found


def test_two_destinations_of_a_budget_share_its_rate_window_across_workers() -> None:
    gates = Gates()
    one, two = gates.workers
    assert one.allow(gates["crm"], 5) == (5, None)
    window_end = float(int(gates.now) + 1)
    assert two.allow(gates["scores"], 5) == (4, window_end)  # 9 a second for the two
    assert one.allow(gates["crm"], 1) == (0, window_end)
    assert two.allow(gates["elsewhere"], 9) == (9, None)  # another account: its own window
    budget = gates["crm"].budget_name
    assert int(gates.redis.get(rate_key(budget, int(gates.now)))) == 9


def test_the_daily_cap_holds_every_destination_of_the_budget_until_the_reset() -> None:
    gates = Gates(daily_limit=5, rate_limit="100/s")
    one, two = gates.workers
    midnight = epoch(2026, 12, 6)
    assert one.allow(gates["crm"], 3) == (3, None)
    assert two.allow(gates["scores"], 4) == (2, midnight)  # the day's last two
    assert one.allow(gates["crm"], 1) == (0, midnight)  # held until the reset, not a second
    gates.now += 1.0
    assert two.allow(gates["scores"], 1) == (0, midnight)  # a new second, the same day
    assert one.allow(gates["elsewhere"], 1) == (1, None)
    gates.now = midnight + 0.5  # the account's new day
    assert two.allow(gates["scores"], 4) == (4, None)
    date = account_day(gates.now)[0]
    assert int(gates.redis.get(day_key(gates["crm"].budget_name, date))) == 4
    metrics_for(gates.redis).flush()
    held = gates.redis.hgetall(METRICS_KEY)
    assert any(b'"gate","daily"' in field for field in held)  # counted as the daily cap's


def test_the_daily_cap_counts_the_accounts_day_in_its_time_zone() -> None:
    gates = Gates(daily_limit=2, rate_limit="100/s", account_timezone="America/New_York")
    one, _ = gates.workers
    # 23:59 UTC is 18:59 in New York: its day ends at 05:00 UTC.
    assert one.allow(gates["crm"], 3) == (2, epoch(2026, 12, 6, 5))
    gates.now = epoch(2026, 12, 6, 0, 30)
    assert one.allow(gates["scores"], 1) == (0, epoch(2026, 12, 6, 5))  # UTC's new day
    gates.now = epoch(2026, 12, 6, 5, 0, 1)
    assert one.allow(gates["scores"], 1) == (1, None)


def test_requests_given_back_count_neither_in_the_window_nor_in_the_day() -> None:
    gates = Gates(daily_limit=10)
    one, _ = gates.workers
    assert one.allow(gates["crm"], 4) == (4, None)
    one.give_back(gates["crm"], 3)
    budget = gates["crm"].budget_name
    assert int(gates.redis.get(rate_key(budget, int(gates.now)))) == 1
    assert int(gates.redis.get(day_key(budget, "2026-12-05"))) == 1
    one.charge(gates["scores"], 2)  # a split batch's extra requests
    assert int(gates.redis.get(day_key(budget, "2026-12-05"))) == 3


def test_a_vendor_that_says_the_day_is_spent_holds_the_budget_until_its_reset() -> None:
    gates = Gates()
    one, two = gates.workers
    until = gates.now + 7200
    spent = BudgetSpentError("HubSpot answered HTTP 429: daily limit", until, now=gates.now)
    assert spent.retry_after == pytest.approx(7200)
    one.attempted(gates["crm"], spent)
    assert two.allow(gates["scores"], 1) == (0, until)  # another destination, another worker
    assert two.allow(gates["elsewhere"], 1) == (1, None)
    gates.now = until + 0.1
    assert two.allow(gates["scores"], 1) == (1, None)
    # A later mark wins over an earlier one, never the other way round.
    one.spend(gates["crm"], until + 100)
    two.spend(gates["scores"], until + 50)
    assert gates.redis.zscore(BUDGETS_SPENT, gates["crm"].budget_name) == until + 100


# -- the engine: deliveries wait, no attempts counted --------------------------------------------


class Drivers(DriverCache):
    """A recording driver per destination."""

    def __init__(self, drivers: dict[str, RecordingDriver]) -> None:
        super().__init__()
        self.drivers = drivers

    def get(self, destination: Destination) -> Driver:
        return self.drivers[destination.name]


class World:
    """The ingress and one engine on one fakeredis; ``crm`` and ``scores`` are two HubSpot
    destinations with the same token (one budget), each with a recording driver, and a retry
    schedule of one retry."""

    def __init__(self, crm: RecordingDriver | None = None, **keys: Any) -> None:
        self.redis = fakeredis.FakeRedis()
        self.clock = Clock()
        common = {"retry": {"schedule": ["1s"]}, "batch": {"max": 10, "wait": 0}, **keys}
        self.config: RelayConfig = config([hubspot("crm", **common),
                                           hubspot("scores", **common)],
                                          sources={"kickofflabs": {}})
        self.client = make_app(self.config, self.redis).test_client()
        self.drivers = {"crm": crm or RecordingDriver(), "scores": RecordingDriver()}
        self.relay = Engine(Settings(), self.config, self.redis, drivers=Drivers(self.drivers),
                            gates=(PauseGate(self.redis),
                                   RateLimitGate(self.redis, clock=self.clock)))
        self.posted = 0

    def post(self, n: int) -> None:
        for _ in range(n):
            number = self.posted
            self.posted += 1
            response = self.client.post("/hooks/kickofflabs", json=sample(
                "new_signup", email=f"lead{number}@example.com", social_id=f"s{number}",
                id=number))
            assert response.status_code == 202, response.get_data(as_text=True)
        self.relay.admit()

    def drain(self, lane: str) -> dict[str, int]:
        return self.relay.drain(lane).as_dict()

    def waiting(self, lane: str) -> int:
        return int(self.redis.xlen(lane_key(lane)))

    def stats(self, lane: str) -> dict[str, str]:
        return {k.decode(): v.decode() for k, v in self.redis.hgetall(stats_key(lane)).items()}


def test_when_the_days_cap_is_spent_deliveries_wait_in_the_lane_until_the_reset() -> None:
    world = World(daily_limit=2)
    # Days ahead of the real clock: a lane's hold expires by Redis's (real) time.
    world.clock.now = epoch(2030, 12, 5, 20)
    world.post(15)
    # Two requests (of ten and five) for crm: the day's two requests for the whole account.
    assert world.drain("crm") == {"delivered": 15}
    # None left today for scores: nothing is claimed, attempted or counted; its lane waits
    # until the account's day ends, and so does crm's next delivery.
    assert world.drain("scores") == {}
    assert world.drivers["scores"].calls == []
    assert world.waiting("scores") == 15
    assert float(world.redis.get(hold_key("scores"))) == epoch(2030, 12, 6)
    assert world.stats("scores") == {} and parked_deliveries(world.redis) == []
    world.post(1)
    assert world.drain("crm") == {}
    assert float(world.redis.get(hold_key("crm"))) == epoch(2030, 12, 6)
    world.clock.now = epoch(2030, 12, 6, 0, 0, 1)  # the account's new day
    assert world.drain("scores") == {"delivered": 16}
    assert world.drain("crm") == {}  # scores used the new day's two requests
    assert [len(c) for c in world.drivers["scores"].calls] == [10, 6]


def test_a_vendor_that_says_the_day_is_spent_defers_the_request_and_holds_the_budget() -> None:
    until = time.time() + 3 * 3600

    def daily(events: Sequence[LeadEvent]) -> Sequence[Answer]:
        error = BudgetSpentError("HubSpot answered HTTP 429: the account's daily limit is spent",
                                 until)
        return [error for _ in events]

    world = World(RecordingDriver(script=daily), batch={"max": 4, "wait": 0}, concurrency=1)
    world.post(6)
    # The request that met the answer: its deliveries wait for the reset, no attempt counted
    # (their schedule has one retry: a counted attempt would have used it up) ...
    assert world.drain("crm") == {"deferred": 4}
    assert len(world.drivers["crm"].calls) == 1
    parked = parked_deliveries(world.redis)
    assert len(parked) == 4 and all(due == pytest.approx(until) for _, _, due in parked)
    for event_id, destination, _ in parked:
        state = json.loads(world.redis.hget(f"relay:delivery:{event_id}", destination))
        assert state["status"] == "pending" and state["attempts"] == 0
        assert state["next_attempt_at"] == pytest.approx(until)
    assert world.stats("crm").get("failed") is None  # not a failure, no dead letter
    # ... the rest of the lane waits unsent, and so does every destination of the budget.
    assert world.waiting("crm") == 2
    assert float(world.redis.get(hold_key("crm"))) == pytest.approx(until, abs=1)
    assert world.drain("scores") == {}
    assert world.drivers["scores"].calls == []
    assert float(world.redis.get(hold_key("scores"))) == pytest.approx(until)
    world.clock.now = until + 1
    assert world.drain("scores") == {"delivered": 6}


def test_a_plain_429_holds_every_destination_of_the_budget() -> None:
    def limited(events: Sequence[LeadEvent]) -> Sequence[Answer]:
        from relay.core.errors import RetryableDeliveryError

        return [RetryableDeliveryError("HubSpot answered HTTP 429: rate limit", 429, 10.0)
                for _ in events]

    world = World(RecordingDriver(script=limited), concurrency=1)
    world.post(3)
    assert world.drain("crm") == {"retrying": 3}
    assert world.drain("scores") == {}  # the other destination of the account holds too
    assert world.drivers["scores"].calls == []
    world.clock.now = time.time() + 11
    assert world.drain("scores") == {"delivered": 3}



# -- shown: /metrics, relay status, the console ---------------------------------------------------


@pytest.fixture
def operator(monkeypatch: pytest.MonkeyPatch) -> OperatorWorld:
    """Three HubSpot destinations: two of one account (its day nearly spent), one of another
    (the vendor said its day is spent), and a webhook without a budget."""
    world = OperatorWorld(monkeypatch)
    world.config = config([hubspot("crm"), hubspot("scores"),
                           hubspot("eu", access_token="pat-eu1-other",
                                   account_timezone="Europe/Berlin"),
                           {"name": "hook", "type": "webhook", "url": "https://e.com/h"}])
    world.app = make_app(world.config, world.redis, world.settings)
    world.client = world.app.test_client()
    now = time.time()
    crm, eu = world.config.destination("crm"), world.config.destination("eu")
    assert crm is not None and crm.budget is not None and eu is not None
    world.redis.set(day_key(crm.budget_name, crm.budget.day(now)[0]), 249_000)
    RateLimitGate(world.redis).spend(eu, now + 5400)
    return world


def test_metrics_show_each_budgets_requests_left_today_and_its_reset(
        operator: OperatorWorld) -> None:
    text = operator.client.get("/metrics").get_data(as_text=True)
    families = {f.name: f for f in text_string_to_metric_families(text)}
    remaining = {s.labels["budget"]: s.value for s in families["relay_budget_remaining"].samples}
    resets = {s.labels["budget"]: s.value for s in families["relay_budget_resets_at"].samples}
    shared = operator.config.destinations[0].budget_name
    eu = operator.config.destinations[2].budget_name
    assert remaining == {shared: 1000.0, eu: 0.0}  # the webhook has no budget to show
    assert resets[shared] == account_day(time.time())[1]  # UTC's midnight
    assert resets[eu] == pytest.approx(time.time() + 5400, abs=5)  # the vendor's hold


def test_relay_status_has_a_line_per_budget_spent_or_low(operator: OperatorWorld) -> None:
    out = operator.cli("status").output
    shared = operator.config.destinations[0].budget_name
    eu = operator.config.destinations[2].budget_name
    assert f"budget {shared} (crm, scores): 1,000 of 250,000 requests left today, resets " in out
    assert f"budget {eu} (eu): spent (the vendor says so), held until " in out
    overview = json.loads(operator.cli("status", "--json").output)
    rows = {d["name"]: d for d in overview["destinations"]}
    assert rows["scores"]["budget"]["remaining"] == 1000 and rows["hook"]["budget"] is None
    # A budget with most of its day left is not worth a line.
    operator.redis.delete(day_key(shared, account_day(time.time())[0]))
    assert f"budget {shared}" not in operator.cli("status").output


def test_the_console_shows_a_destinations_budget_left_today(operator: OperatorWorld) -> None:
    page = operator.console().get("/console/destinations").get_data(as_text=True)
    assert "1,000 of 250,000 requests left today; resets" in page
    assert "account's day spent (the vendor says so); held until" in page
    assert 'id="budget-hook"' not in page
