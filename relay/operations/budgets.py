"""Vendor accounts' budgets as an operator sees them: for each budget of the YAML with a daily
cap (or that the vendor said is spent), what is left today and when it resets."""

from __future__ import annotations

from typing import Any

import redis

from relay.config.relay_yaml import RelayConfig
from relay.store.budgets import budgets_left


def budget_rows(client: redis.Redis, config: RelayConfig | None) -> list[dict[str, Any]]:
    """``{"name", "destinations", "daily_limit", "used", "remaining", "resets_at",
    "spent_until", "spent", "low"}`` per budget worth showing; ``low`` is less than a tenth of
    the day's cap left (or spent)."""
    if config is None:
        return []
    budgets = config.budgets()
    rows = []
    for left in budgets_left(client, budgets):
        if left.remaining is None and left.spent_until is None:
            continue  # no daily cap, not spent: nothing to show
        budget = next(b for b in budgets if b.name == left.name)
        rows.append({"name": left.name, "destinations": list(budgets[budget]),
                     "daily_limit": left.daily_limit, "used": left.used,
                     "remaining": left.remaining, "resets_at": left.resets_at,
                     "spent_until": left.spent_until, "spent": left.spent, "low": left.low()})
    return rows
