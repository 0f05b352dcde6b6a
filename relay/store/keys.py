"""The Redis keys of the delivery side, in one leaf module (everything may import it).

=============================  =================================================  ============
``relay:intake``               stream: accepted events, field ``e`` = event JSON   until admitted
``relay:intake:kick``          an admit task is queued (``SET NX``, short TTL)     seconds
``relay:lane:<destination>``   stream: deliveries waiting for the destination,     until confirmed
                               field ``e`` = event id
``relay:lanes``                set: lanes that have had work (the sweep's list)    kept
``relay:kick:<destination>``   a drain task is queued for the lane                 seconds
``relay:drainers:<dest>``      zset: drainer id -> lease expiry                    lease
``relay:inflight:<dest>``      hash: drainer id -> deliveries it has in flight     lease
``relay:hold:<destination>``   the lane is held (paused, circuit open, rate)       until due
``relay:scheduled``            zset: ``<event id>|<destination>`` -> due time      until due
``relay:seen:<event id>``      dedupe marker: the intake entry received first      dedupe_window
``relay:event:<id>``           hash: event JSON, admitting entry, duplicates       retention
``relay:delivery:<id>``        hash: destination -> delivery state JSON            retention
``relay:log:<id>``             list: one JSON record per attempt (capped)          retention
``relay:dead``                 hash: ``<id>|<destination>`` -> dead letter JSON     until replayed
``relay:dead:index``           zset: dead letter ids by time of death              until replayed
``relay:stats:<destination>``  hash: delivered / failed / dead, last error         kept
``relay:recent:<dest>:<s>``    zset: event ids by time, per delivery status        retention, capped
=============================  =================================================  ============

Every stream has one consumer group, :data:`GROUP`. Entries are acknowledged and deleted in
the script that records their outcome, so a stream's length is its backlog plus what is in
flight. The scripts build some key names from these prefixes: the relay needs one Redis
(or one hash slot), not a cluster.
"""

from __future__ import annotations

PREFIX = "relay:"
GROUP = "relay"

INTAKE = PREFIX + "intake"
INTAKE_KICK = PREFIX + "intake:kick"
LANES = PREFIX + "lanes"
SCHEDULED = PREFIX + "scheduled"
DEAD_KEY = PREFIX + "dead"
DEAD_INDEX = PREFIX + "dead:index"
PAUSED_KEY = PREFIX + "paused"

LANE_PREFIX = PREFIX + "lane:"
KICK_PREFIX = PREFIX + "kick:"
DRAINERS_PREFIX = PREFIX + "drainers:"
INFLIGHT_PREFIX = PREFIX + "inflight:"
HOLD_PREFIX = PREFIX + "hold:"
STATS_PREFIX = PREFIX + "stats:"
DEV_INBOX = PREFIX + "dev:inbox"  # what the dev inbox received (relay dev only)


def lane_key(destination: str) -> str:
    return LANE_PREFIX + destination


def kick_key(destination: str) -> str:
    return KICK_PREFIX + destination


def hold_key(destination: str) -> str:
    return HOLD_PREFIX + destination


def seen_key(event_id: str) -> str:
    return f"{PREFIX}seen:{event_id}"


def event_key(event_id: str) -> str:
    return f"{PREFIX}event:{event_id}"


def delivery_key(event_id: str) -> str:
    return f"{PREFIX}delivery:{event_id}"


def log_key(event_id: str) -> str:
    return f"{PREFIX}log:{event_id}"


def stats_key(destination: str) -> str:
    return STATS_PREFIX + destination


def recent_key(destination: str, status: str) -> str:
    return f"{PREFIX}recent:{destination}:{status}"


def circuit_key(destination: str) -> str:
    return f"{PREFIX}circuit:{destination}"


def dead_id(event_id: str, destination: str) -> str:
    return f"{event_id}|{destination}"


def parked_member(event_id: str, destination: str) -> str:
    return f"{event_id}|{destination}"
