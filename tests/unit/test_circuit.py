"""The circuit breaker's rules, one by one, on fakeredis with a fake clock: what counts as a
health failure, when a run of them opens the circuit, the probe, the slowed state and how it
closes. The drainer tells the gate what each attempt got back (``attempted``); the gate's next
check (``allow``) adds it to the destination's totals in Redis and decides.

The engine driving the gate against real answers is in tests/integration/test_gates.py."""

from __future__ import annotations

import time

import fakeredis
import pytest

from relay.core.errors import PermanentDeliveryError, RetryableDeliveryError, UnsafeURLError
from relay.core.models import DeliveryResult, Destination, RetryPolicy
from relay.delivery.gates import CircuitBreaker, CircuitPolicy, destination_state, health
from relay.store.keys import probe_key


class Clock:
    def __init__(self) -> None:
        self.now = time.time()

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


OK = DeliveryResult(status_code=200)
ERROR_500 = RetryableDeliveryError("destination answered HTTP 500", 500)
BAD_PAYLOAD = PermanentDeliveryError("destination answered HTTP 400", 400)
TIMEOUT = RetryableDeliveryError("timed out after 10s")
TOO_MANY = RetryableDeliveryError("destination answered HTTP 429", 429)
CRM = Destination(name="crm", type="webhook", timeout=5, retry=RetryPolicy((10, 60)))


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def gate(clock: Clock) -> CircuitBreaker:
    return CircuitBreaker(fakeredis.FakeRedis(), CircuitPolicy(), clock=clock)


def tell(gate: CircuitBreaker, answer: object, times: int = 1,
         destination: Destination = CRM) -> None:
    for _ in range(times):
        gate.attempted(destination, answer)


def check(gate: CircuitBreaker, want: int = 1, destination: Destination = CRM
          ) -> tuple[int, float | None]:
    return gate.allow(destination, want)


def open_it(gate: CircuitBreaker, clock: Clock) -> None:
    tell(gate, ERROR_500, 10)
    check(gate)
    clock.advance(30)
    assert check(gate)[0] == 0
    assert gate.state("crm") == "open"


# -- what counts --------------------------------------------------------------------------------


@pytest.mark.parametrize(("answer", "verdict"), [
    (OK, True),
    (DeliveryResult(detail="inserted"), True),  # a database destination: no status
    (DeliveryResult(skipped=True), None),  # nothing was sent
    (BAD_PAYLOAD, True),  # about one payload: the destination is up and answering
    (PermanentDeliveryError("answered HTTP 422", 422), True),
    (PermanentDeliveryError("answered HTTP 409", 409), True),
    (ERROR_500, False),
    (RetryableDeliveryError("answered HTTP 503", 503), False),
    (PermanentDeliveryError("gave up after 9 attempts: HTTP 502", 502), False),
    (PermanentDeliveryError("answered HTTP 401", 401), False),  # the endpoint refuses us
    (PermanentDeliveryError("answered HTTP 403", 403), False),
    (PermanentDeliveryError("answered HTTP 404", 404), False),  # no endpoint there
    (PermanentDeliveryError("answered HTTP 410", 410, gone=True), False),
    (RetryableDeliveryError("answered HTTP 408", 408), False),
    (TOO_MANY, None),  # the rate limit's business
    (TIMEOUT, False),
    (RetryableDeliveryError("connection failed: refused"), False),
    (RetryableDeliveryError("database unavailable for db: OperationalError"), False),
    (PermanentDeliveryError("gave up after 9 attempts: timed out"), None),
    (UnsafeURLError("10.0.0.1 is not a public address"), False),
    (PermanentDeliveryError("the lead has none of social_id, id, email"), None),
    (ValueError("a driver's bug"), None),
])
def test_what_an_answer_says_about_the_destination(answer: object, verdict: bool | None
                                                   ) -> None:
    assert health(answer) is verdict


# -- opening ------------------------------------------------------------------------------------


def test_a_run_of_health_failures_opens_the_circuit_once_it_lasts(
        gate: CircuitBreaker, clock: Clock) -> None:
    tell(gate, ERROR_500, 10)
    assert check(gate) == (1, None)  # ten at once: maybe first attempts, their retries to come
    clock.advance(29)
    assert check(gate) == (1, None)
    clock.advance(1)  # nothing healthy for 30 s
    granted, until = check(gate)
    assert granted == 0 and until == pytest.approx(clock() + 60)
    assert gate.state("crm") == "open"
    assert destination_state(gate.redis, "crm", clock) == "open"


def test_fewer_failures_than_the_threshold_do_not_open_it(
        gate: CircuitBreaker, clock: Clock) -> None:
    tell(gate, TIMEOUT, 9)
    clock.advance(300)
    assert check(gate) == (1, None)
    tell(gate, TIMEOUT)
    assert check(gate)[0] == 0


def test_any_health_success_ends_the_run(gate: CircuitBreaker, clock: Clock) -> None:
    """Half the attempts fail for ten minutes, the others succeed: it keeps moving."""
    for _ in range(600):
        tell(gate, ERROR_500)
        tell(gate, OK)
        clock.advance(1)
        assert check(gate, 10) == (10, None)
    assert gate.state("crm") == "closed"


def test_answers_about_one_payload_never_open_it(gate: CircuitBreaker, clock: Clock) -> None:
    for _ in range(100):
        tell(gate, BAD_PAYLOAD)
        clock.advance(1)
        assert check(gate) == (1, None)
    assert gate.state("crm") == "closed"


def test_a_payload_answer_is_a_success_that_ends_a_run(
        gate: CircuitBreaker, clock: Clock) -> None:
    tell(gate, ERROR_500, 20)
    check(gate)
    clock.advance(25)
    tell(gate, BAD_PAYLOAD)  # it answered: it is up
    tell(gate, ERROR_500, 20)
    clock.advance(10)
    assert check(gate) == (1, None)  # the new run is 10 s old


def test_rate_limit_answers_are_not_counted(gate: CircuitBreaker, clock: Clock) -> None:
    tell(gate, TOO_MANY, 100)
    clock.advance(60)
    assert check(gate) == (1, None)  # no run from 429s
    tell(gate, ERROR_500, 10)
    check(gate)
    clock.advance(20)
    tell(gate, TOO_MANY, 100)  # ... and they do not end one either
    clock.advance(10)
    assert check(gate)[0] == 0


def test_a_long_first_retry_delay_makes_the_run_last_longer(clock: Clock) -> None:
    """The retry of a failed first attempt must have had its chance: twice the first delay."""
    gate = CircuitBreaker(fakeredis.FakeRedis(), clock=clock)
    slow_retries = Destination(name="crm", type="webhook", retry=RetryPolicy((300, 600)))
    assert gate.policy.failing_for(slow_retries) == 600
    assert gate.policy.failing_for(CRM) == 30
    tell(gate, ERROR_500, 50, slow_retries)
    check(gate, destination=slow_retries)
    clock.advance(599)
    assert check(gate, destination=slow_retries) == (1, None)
    clock.advance(1)
    assert check(gate, destination=slow_retries)[0] == 0


def test_every_worker_adds_to_one_record(clock: Clock) -> None:
    client = fakeredis.FakeRedis()
    workers = [CircuitBreaker(client, clock=clock) for _ in range(3)]
    for worker in workers:
        tell(worker, ERROR_500, 4)
        assert check(worker) == (1, None)
    clock.advance(30)
    assert check(workers[0])[0] == 0  # twelve failures in all, the first 30 s ago
    assert all(w.state("crm") == "open" for w in workers)


def test_a_success_another_worker_saw_ends_the_run(clock: Clock) -> None:
    client = fakeredis.FakeRedis()
    one, other = CircuitBreaker(client, clock=clock), CircuitBreaker(client, clock=clock)
    tell(one, ERROR_500, 10)
    check(one)
    clock.advance(20)
    tell(other, OK)
    check(other)
    clock.advance(20)
    assert check(one) == (1, None)


# -- half-open: the probe -----------------------------------------------------------------------


def test_after_the_cooldown_one_worker_probes(clock: Clock) -> None:
    client = fakeredis.FakeRedis()
    one, other = CircuitBreaker(client, clock=clock), CircuitBreaker(client, clock=clock)
    open_it(one, clock)
    clock.advance(59)
    assert check(one)[0] == 0
    clock.advance(1)
    assert one.state("crm") == "half-open"
    assert check(one, 5) == (1, None)  # the probe
    granted, until = check(other, 5)  # the others wait for its answer
    assert granted == 0 and until == pytest.approx(clock() + 5)


def test_a_failed_probe_opens_it_again(gate: CircuitBreaker, clock: Clock) -> None:
    open_it(gate, clock)
    clock.advance(60)
    assert check(gate) == (1, None)
    tell(gate, ERROR_500)
    granted, until = check(gate)
    assert granted == 0 and until == pytest.approx(clock() + 60)
    assert gate.state("crm") == "open"


def test_a_probe_that_says_nothing_is_sent_again(gate: CircuitBreaker, clock: Clock) -> None:
    open_it(gate, clock)
    clock.advance(60)
    assert check(gate) == (1, None)
    tell(gate, TOO_MANY)
    assert check(gate)[0] == 0  # still waiting for a verdict
    gate.redis.delete(probe_key("crm"))  # the probe's lease ran out (a delivery's lease)
    assert check(gate) == (1, None)


# -- slowed -------------------------------------------------------------------------------------


def probe_succeeded(gate: CircuitBreaker, clock: Clock) -> None:
    open_it(gate, clock)
    clock.advance(60)
    assert check(gate) == (1, None)  # the probe
    tell(gate, OK)


def test_a_successful_probe_slows_the_destination(gate: CircuitBreaker, clock: Clock) -> None:
    probe_succeeded(gate, clock)
    assert check(gate, 5) == (2, pytest.approx(clock() + 1))  # two this second, then held
    assert gate.state("crm") == "slowed"
    assert destination_state(gate.redis, "crm", clock) == "slowed"
    assert check(gate, 5) == (0, pytest.approx(clock() + 1))


def test_slowed_the_budget_doubles_while_deliveries_succeed_and_then_it_closes(
        gate: CircuitBreaker, clock: Clock) -> None:
    probe_succeeded(gate, clock)
    budgets = []
    for _ in range(10):
        granted, _ = check(gate, 1000)
        budgets.append(granted)
        if gate.state("crm") == "closed":
            break
        tell(gate, OK, granted)
        clock.advance(1)
    assert budgets == [2, 4, 8, 16, 32, 1000]  # 64 closes it: everything goes
    assert gate.state("crm") == "closed"


def test_slowed_failures_halve_the_budget(gate: CircuitBreaker, clock: Clock) -> None:
    probe_succeeded(gate, clock)
    for granted in (2, 4, 8):
        assert check(gate, 100)[0] == granted
        tell(gate, OK, granted)
        clock.advance(1)
    assert check(gate, 100)[0] == 16
    tell(gate, OK, 6)
    tell(gate, ERROR_500, 10)
    clock.advance(1)
    assert check(gate, 100)[0] == 8
    tell(gate, ERROR_500, 8)
    clock.advance(1)
    assert check(gate, 100)[0] == 4
    assert gate.state("crm") == "slowed"


def test_slowed_a_budget_that_held_nothing_back_closes_it(
        gate: CircuitBreaker, clock: Clock) -> None:
    """A destination with little traffic: the budget is not what limits it."""
    probe_succeeded(gate, clock)
    assert check(gate, 1) == (1, None)  # one of the two this second
    tell(gate, OK)
    clock.advance(1)
    assert check(gate, 1) == (1, None)
    assert gate.state("crm") == "closed"


def test_slowed_a_run_that_lasts_opens_it_again(gate: CircuitBreaker, clock: Clock) -> None:
    probe_succeeded(gate, clock)
    for _ in range(31):
        check(gate, 1)
        tell(gate, TIMEOUT)
        clock.advance(1)
    assert check(gate)[0] == 0
    assert gate.state("crm") == "open"


def test_a_slowed_answer_is_never_cached(gate: CircuitBreaker, clock: Clock) -> None:
    worker = CircuitBreaker(gate.redis, clock=clock, snapshot_ttl=60.0)
    open_it(gate, clock)
    clock.advance(60)
    assert check(worker) == (1, None)  # the probe
    tell(worker, OK)
    assert check(worker, 5) == (2, pytest.approx(clock() + 1))
    assert check(worker, 5) == (0, pytest.approx(clock() + 1))  # asked again: not a "go"
