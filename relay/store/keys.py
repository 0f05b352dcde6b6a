"""Every Redis key the relay writes, in one leaf module (everything may import it). The Lua
scripts (``lua/*.lua``) name no key themselves: they get theirs as ``KEYS``, or, where the set
depends on the data (an event id, a lane), as the prefixes below in ``ARGV``.

The intake, the lanes and the deliveries (:mod:`.lanes`, :mod:`.deliveries`):

=============================  =================================================  ============
``relay:intake``               stream: accepted events, field ``e`` = event JSON   until admitted
``relay:intake:kick``          an admit task is queued (``SET NX``, short TTL)     seconds
``relay:lane:<destination>``   stream: deliveries waiting for the destination,     until confirmed
                               field ``e`` = event id (and ``l`` = its lead's
                               digest, with ``ordering: per_lead``)
``relay:lanes``                set: lanes that have had work (the sweep's list)    kept
``relay:kick:<destination>``   a drain task is queued for the lane                 seconds
``relay:drainers:<dest>``      zset: drainer id -> lease expiry                    lease
``relay:inflight:<dest>``      hash: drainer id -> deliveries it has in flight     lease
``relay:hold:<destination>``   the lane is held (paused, circuit open, rate)       until due
``relay:scheduled``            zset: ``<event id>|<destination>`` -> due time      until due
``relay:order:<dest>:<lead>``  list: a lead's event ids in the order received, of   until its
                               a destination with ``ordering: per_lead``; the head  last event
                               is the one allowed out (``<lead>``: a digest)        is final
``relay:seen:<event id>``      dedupe marker: the intake entry received first      10 min, at most
                               (the database holds the long dedupe window)         dedupe_window
``relay:event:<id>``           hash: event JSON (payload), admitting entry, time   until written
                                                                                   to the database
``relay:delivery:<id>``        hash: destination -> delivery state JSON            until final
                                                                                   and written
``relay:stats:<destination>``  hash: delivered / failed / dead, consecutive        kept
                               failures, last success, last error; ``waiting``:
                               events behind an earlier one of their lead
``relay:history``              stream: history records (field ``r``, JSON) and     until written
                               their version (``v``): the outbox to the database   to the database
``relay:history:writer``       the history writer's lease (``SET PX``)              30 s
=============================  =================================================  ============

The gates (:mod:`relay.delivery.gates`):

===============================  =================================================  ============
``relay:paused``                 hash: destination -> JSON {paused_at, reason}       until resumed
``relay:circuit:<destination>``  hash: state (closed | open | slowed), reopen_at,   kept
                                 reason, the health totals and the run of failures,
                                 the totals seen at the last probe, the slowed step
``relay:circuit:<dest>:probe``   the half-open probe lease (``SET NX PX``)           the lease
``relay:rate:<budget>:<n>``      requests (deliveries) in fixed rate-limit window    two windows
                                 ``n`` of a budget (a destination's own name when
                                 it shares none)
``relay:day:<budget>:<date>``    requests on the vendor account's day ``date``       a day after
                                 (``YYYY-MM-DD`` in its time zone)                   its reset
``relay:budgets:spent``          zset: budget -> until when the vendor said its day  until then
                                 is spent (HubSpot's ``DAILY`` 429)
===============================  =================================================  ============

A budget's name is ``<type>:<account>``, ``<type>:<digest of the credential>`` (never the
credential) or a destination's name; destination names hold no colon, so they never meet.

API subscriptions (:mod:`.subscriptions`):

=================================  ===============================================  ============
``relay:sub:seq``                  INCR counter: the next ``referenceId``            kept
``relay:sub:<id>``                 JSON record of one subscription                   kept; removed
                                                                                     by a 410:
                                                                                     retention
``relay:sub:campaign:<c>``         hash: url -> id of the campaign's active ones     kept
``relay:sub:campaign:<c>:gone``    zset: ids removed by a 410, by removal time       retention
``relay:sub:version``              INCR counter bumped by every change               kept
=================================  ===============================================  ============

Operators' views (:mod:`relay.observability`, the dev inbox):

===============================  =================================================  ============
``relay:metrics``                hash: Prometheus counters and histogram buckets     kept
``relay:minute:<epoch minute>``  hash: series -> count (the console's chart)         two hours
``relay:dev:inbox``              list: what the dev inbox received (``relay dev``)   capped
===============================  =================================================  ============

The console's sign-in (:mod:`relay.console.auth`); ``<digest>`` is a SHA-256, so Redis holds
neither a session id a cookie could carry nor a client's address:

=======================================  ========================================  ============
``relay:console:session:<digest>``       hash: a signed-in session (the HMAC of     its idle
                                         its key, when it began)                    timeout
``relay:console:signin-failures:<d>``    wrong keys from one client address         15 min
``relay:console:signin-turn:<d>``        past the limit: its next key check waits   3 s
=======================================  ========================================  ============

Every stream has one consumer group, :data:`GROUP`. Entries are acknowledged and deleted in
the script that records their outcome, so a stream's length is its backlog plus what is in
flight. As the scripts build some key names from prefixes, the relay needs one Redis (or one
hash slot), not a cluster.

Beside these, Celery's broker (kombu's Redis transport) keeps its own keys in the same Redis:
the queue list ``relay`` (:mod:`relay.delivery.kicks` pushes task messages onto it),
``unacked``, ``unacked_index``, ``unacked_mutex`` and ``_kombu.binding.relay``.
"""

from __future__ import annotations

import hashlib

PREFIX = "relay:"
GROUP = "relay"

# -- the intake, the lanes and the deliveries ------------------------------------------------

INTAKE = PREFIX + "intake"
INTAKE_KICK = PREFIX + "intake:kick"
LANES = PREFIX + "lanes"
SCHEDULED = PREFIX + "scheduled"

LANE_PREFIX = PREFIX + "lane:"
KICK_PREFIX = PREFIX + "kick:"
DRAINERS_PREFIX = PREFIX + "drainers:"
INFLIGHT_PREFIX = PREFIX + "inflight:"
HOLD_PREFIX = PREFIX + "hold:"
SEEN_PREFIX = PREFIX + "seen:"
EVENT_PREFIX = PREFIX + "event:"
DELIVERY_PREFIX = PREFIX + "delivery:"
STATS_PREFIX = PREFIX + "stats:"
ORDER_PREFIX = PREFIX + "order:"


def lane_key(destination: str) -> str:
    return LANE_PREFIX + destination


def kick_key(destination: str) -> str:
    return KICK_PREFIX + destination


def drainers_key(destination: str) -> str:
    return DRAINERS_PREFIX + destination


def inflight_key(destination: str) -> str:
    return INFLIGHT_PREFIX + destination


def hold_key(destination: str) -> str:
    return HOLD_PREFIX + destination


def seen_key(event_id: str) -> str:
    return SEEN_PREFIX + event_id


def event_key(event_id: str) -> str:
    return EVENT_PREFIX + event_id


def delivery_key(event_id: str) -> str:
    return DELIVERY_PREFIX + event_id


def stats_key(destination: str) -> str:
    return STATS_PREFIX + destination


def order_key(destination: str, lead: str) -> str:
    """The order list of one lead (``lead``: its :func:`order_lead`) at a destination with
    ``ordering: per_lead``. The scripts build it as ``ORDER_PREFIX .. dest .. ':' .. lead``."""
    return f"{ORDER_PREFIX}{destination}:{lead}"


def order_lead(kind: str, value: str) -> str:
    """What names a lead in :func:`order_key`: a short SHA-256 of one of its lead keys (kind,
    normalised value; see :mod:`relay.history.leads`), so that no key name carries an
    address."""
    return hashlib.sha256(f"{kind}:{value}".encode()).hexdigest()[:16]


def parked_member(event_id: str, destination: str) -> str:
    """A parked delivery's member of :data:`SCHEDULED`."""
    return f"{event_id}|{destination}"


# -- the gates ---------------------------------------------------------------------------------

PAUSED_KEY = PREFIX + "paused"
CIRCUIT_PREFIX = PREFIX + "circuit:"
RATE_PREFIX = PREFIX + "rate:"


def circuit_key(destination: str) -> str:
    return CIRCUIT_PREFIX + destination


def probe_key(destination: str) -> str:
    return circuit_key(destination) + ":probe"


DAY_PREFIX = PREFIX + "day:"
BUDGETS_SPENT = PREFIX + "budgets:spent"


def rate_key(budget: str, window: int) -> str:
    """The counter of fixed window ``window`` (the time divided by the window's length) of a
    budget (a destination's name, when it shares no budget)."""
    return f"{RATE_PREFIX}{budget}:{window}"


def day_key(budget: str, date: str) -> str:
    """The requests counted against a budget's daily cap on ``date`` (its account's day)."""
    return f"{DAY_PREFIX}{budget}:{date}"


# -- API subscriptions -------------------------------------------------------------------------

SUB_PREFIX = PREFIX + "sub:"
SUB_SEQ = SUB_PREFIX + "seq"
SUB_VERSION = SUB_PREFIX + "version"


def subscription_key(reference_id: int) -> str:
    return f"{SUB_PREFIX}{reference_id}"


def campaign_key(campaign: str) -> str:
    return f"{SUB_PREFIX}campaign:{campaign}"


def campaign_gone_key(campaign: str) -> str:
    return campaign_key(campaign) + ":gone"


# -- operators' views ----------------------------------------------------------------------

METRICS_KEY = PREFIX + "metrics"
MINUTE_PREFIX = PREFIX + "minute:"
HISTORY = PREFIX + "history"
NOTHING = PREFIX + "nothing"  # never written: a version key for no subscriptions
HISTORY_WRITER = PREFIX + "history:writer"
DEV_INBOX = PREFIX + "dev:inbox"  # what the dev inbox received (relay dev only)


def minute_key(minute: int) -> str:
    return f"{MINUTE_PREFIX}{minute}"


# -- the console's sign-in -------------------------------------------------------------------

CONSOLE_SESSION_PREFIX = PREFIX + "console:session:"
SIGNIN_FAILURES_PREFIX = PREFIX + "console:signin-failures:"
SIGNIN_TURN_PREFIX = PREFIX + "console:signin-turn:"


def console_session_key(digest: str) -> str:
    return CONSOLE_SESSION_PREFIX + digest


def signin_failures_key(digest: str) -> str:
    return SIGNIN_FAILURES_PREFIX + digest


def signin_turn_key(digest: str) -> str:
    """A client past the wrong-key limit gets one key checked per turn (this key's life)."""
    return SIGNIN_TURN_PREFIX + digest
