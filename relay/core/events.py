"""The KickoffLabs event catalogue and event identity (SPEC §2, §4)."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from typing import Any

EVENTS: tuple[str, ...] = (
    "new_signup",
    "repeat_signup",
    "score_change",
    "marked_as_fraudulent",
    "opted_out",
    "referral",
    "tagged",
    "reward_level",
    "verified",
    "phone_number_opt_out",
    "new_signup_not_excluded",
    "deleted",
)
KNOWN_EVENTS = frozenset(EVENTS)
ALIASES = {"fraudulent": "marked_as_fraudulent"}
#: The event-specific block each event carries (``__referral`` …), part of its identity.
EVENT_BLOCKS = {
    "referral": "__referral",
    "marked_as_fraudulent": "__fraudulent",
    "score_change": "__score_change",
    "tagged": "__tagged",
    "reward_level": "__reward_level",
}
LEAD_IDENTITY_FIELDS = ("social_id", "id", "email", "phone_number")
# One encoder for every event id (json.dumps builds a new one per call with these options).
_canonical_json = json.JSONEncoder(sort_keys=True, separators=(",", ":"), default=str).encode


def canonical_event_name(name: str) -> str:
    """``fraudulent`` → ``marked_as_fraudulent``; other names unchanged (case-folded, trimmed)."""
    name = name.strip().lower()
    return ALIASES.get(name, name)


def is_known(name: str) -> bool:
    return name in KNOWN_EVENTS


def lead_identity(payload: Mapping[str, Any]) -> str | None:
    """First present of social_id, id, lower-cased email, phone_number."""
    for field in LEAD_IDENTITY_FIELDS:
        value = payload.get(field)
        if value not in (None, ""):
            text = str(value)
            return f"{field}:{text.lower() if field == 'email' else text}"
    return None


def event_id_from_header(source: str, key: str) -> str:
    """A sender-supplied ``Idempotency-Key`` / ``webhook-id``, namespaced by source."""
    digest = hashlib.sha256(f"{source}\x00{key}".encode()).hexdigest()
    return f"evt_{digest[:32]}"


def derive_event_id(source: str, name: str, payload: Mapping[str, Any]) -> str:
    """Hash of what makes two deliveries of KickoffLabs the same event (SPEC §4)."""
    parts: list[Any] = [
        source,
        payload.get("campaign_id"),
        payload.get("list_id"),
        lead_identity(payload),
        name,
    ]
    block = EVENT_BLOCKS.get(name)
    if block is None and not is_known(name):
        # Unknown events: every ``__…`` block except ``__event`` identifies them.
        parts.append({k: v for k, v in payload.items() if k.startswith("__") and k != "__event"})
    elif block is not None:
        parts.append(payload.get(block))
    if name == "repeat_signup":
        parts.append(payload.get("counter"))
    canonical = _canonical_json(parts)
    return "evt_" + hashlib.sha256(canonical.encode()).hexdigest()[:32]
