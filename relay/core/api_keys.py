"""The check of an API key: the admin and subscription APIs' and the console's sign-in."""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Sequence

MAX_KEY_LENGTH = 512


def key_matches(given: object, keys: Sequence[str]) -> bool:
    """Constant-time, exact check of ``given`` against every key (no early exit)."""
    if not isinstance(given, str) or not given or len(given) > MAX_KEY_LENGTH:
        return False
    # Digests have one length, so compare_digest does not even reveal the keys' lengths.
    given_digest = hashlib.sha256(given.encode("utf-8", "surrogatepass")).digest()
    matched = False
    for key in keys:
        matched |= hmac.compare_digest(given_digest, hashlib.sha256(key.encode()).digest())
    return matched
