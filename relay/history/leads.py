"""How a lead is looked up: the (kind, value) keys of a payload, as the lead index stores them."""

from __future__ import annotations

import hashlib
import re
from collections.abc import Mapping
from typing import Any

_PHONE_JUNK = re.compile(r"[^0-9+]")
KINDS = ("email", "social_id", "phone", "id")


def normalise_phone(phone: str) -> str:
    """``+1 (555) 010-0000`` and ``+15550100000`` are one number."""
    return _PHONE_JUNK.sub("", phone)


def normalise(kind: str, value: str) -> str:
    value = value.strip()
    if kind == "email":
        return value.lower()
    if kind == "phone":
        return normalise_phone(value)
    return value


def lead_keys(payload: Mapping[str, Any]) -> list[tuple[str, str]]:
    """The (kind, value) pairs a lead payload can be found by: one per identity it carries."""
    found = []
    for field, kind in (("email", "email"), ("social_id", "social_id"),
                        ("phone_number", "phone"), ("id", "id")):
        value = payload.get(field)
        if isinstance(value, int | float) and not isinstance(value, bool):
            value = str(value)
        if isinstance(value, str) and value.strip():
            normal = normalise(kind, value)
            if normal:
                found.append((kind, normal[:320]))
    return found


def erasure_digest(kind: str, value: str) -> str:
    """What an erasure keeps of a lead key: its SHA-256, never the address itself."""
    return hashlib.sha256(f"{kind}:{normalise(kind, value)}".encode()).hexdigest()


def event_digest(event_id: str) -> str:
    """What an erasure keeps of an erased event's id."""
    return hashlib.sha256(event_id.encode()).hexdigest()
