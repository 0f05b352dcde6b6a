"""What the relay shows of itself: metrics counted across every process (kept in Redis), the
per-minute series of the console's chart, and the log format. No web framework here: the
``/metrics`` endpoint and the access log are in :mod:`relay.api`."""
