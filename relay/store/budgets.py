"""What is left of a budget's day, as the operator's views show it (``/metrics``, the console,
``relay status``). The gate that counts it is :class:`relay.delivery.gates.RateLimitGate`;
this only reads its counters, one round trip for all the budgets.
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from dataclasses import dataclass

import redis

from relay.core.models import Budget
from relay.store.keys import BUDGETS_SPENT, day_key


@dataclass(frozen=True)
class BudgetLeft:
    """A budget's day: the requests counted, what is left (0 while the vendor says the day is
    spent) and when that changes: the day's end, or the end of the vendor's hold."""

    name: str
    daily_limit: int | None
    used: int
    remaining: int | None  # None: no daily cap (only ``spent_until`` holds it)
    resets_at: float
    spent_until: float | None  # the vendor said the budget is spent until then

    @property
    def spent(self) -> bool:
        return self.remaining == 0 or self.spent_until is not None

    def low(self, share: float = 0.1) -> bool:
        """Spent, or less than ``share`` of the day's cap left."""
        return self.spent or (self.remaining is not None and self.daily_limit is not None
                              and self.remaining < self.daily_limit * share)


def budgets_left(client: redis.Redis, budgets: Iterable[Budget],
                 now: float | None = None) -> list[BudgetLeft]:
    """Each budget's day at ``now``, in the order given."""
    now = time.time() if now is None else now
    budgets = list(budgets)
    days = [budget.day(now) for budget in budgets]
    pipe = client.pipeline(transaction=False)
    for budget, (date, _) in zip(budgets, days, strict=True):
        pipe.get(day_key(budget.name, date))
        pipe.zscore(BUDGETS_SPENT, budget.name)
    answers = pipe.execute()
    found = []
    for i, (budget, (_, reset)) in enumerate(zip(budgets, days, strict=True)):
        used = int(answers[2 * i] or 0)
        spent = answers[2 * i + 1]
        spent_until = float(spent) if spent is not None and float(spent) > now else None
        remaining = (None if budget.daily_limit is None
                     else 0 if spent_until is not None else max(0, budget.daily_limit - used))
        found.append(BudgetLeft(budget.name, budget.daily_limit, used, remaining,
                                spent_until or reset, spent_until))
    return found
