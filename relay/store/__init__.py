"""Everything the relay keeps in Redis, and the one place that knows the layout: key names
(:mod:`.keys`), the Lua scripts (``lua/*.lua``, loaded by :mod:`.scripts`), the intake and the
lanes (:mod:`.lanes`), delivery state, attempts and dead letters (:mod:`.deliveries`), API
subscriptions, the lead index and erasure.

Imports run one way: ``keys, scripts ← lanes, deliveries, subscriptions, lead_index ← erase``."""
