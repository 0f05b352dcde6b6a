"""The history: what the relay keeps for the retention period, in an SQL database
(``RELAY_DATABASE_URL``: PostgreSQL in production, an SQLite file by default).

Redis holds the work in flight; everything an operator reads later lives here: events with
their payloads (verbatim), each delivery's state, every attempt, dead letters (deliveries whose
state is ``dead``), the lead index and erasures. The workers write it from the history stream
in Redis (an outbox, :mod:`relay.store.history`), in batches, idempotently:

- an event row is keyed by its event id and never rewritten;
- an attempt row is keyed by the attempt id minted when its delivery was claimed;
- a delivery row is keyed by (event id, destination) and carries a version (Redis time in
  microseconds when its state changed): a write with an older version never replaces a newer
  one, so a late write cannot downgrade a final delivery.

Modules: :mod:`.schema` (tables), :mod:`.database` (engines, SQLite's settings, migrations),
:mod:`.writer` (applying a batch of history records), :mod:`.reader` (what operators read),
:mod:`.retention` (deleting what is older than the retention period).
"""
