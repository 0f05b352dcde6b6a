"""What the relay keeps in Redis: the work in flight, and the one place that knows the layout:
key names (:mod:`.keys`), the Lua scripts (``lua/*.lua``, loaded by :mod:`.scripts`), the
intake and the lanes (:mod:`.lanes`), the deliveries in flight (:mod:`.deliveries`), the
history stream on its way to the database (:mod:`.history`), API subscriptions and erasure.

Imports run one way: ``keys, scripts ← lanes, deliveries, history, subscriptions ← erase``."""
