"""The KickoffLabs sample payloads the relay ships (``relay/samples/<event>.json``), read one way.

::

    from tests.support.samples import sample

    payload = sample("new_signup", email="ada@example.com")
"""

from __future__ import annotations

import json
from typing import Any

from relay.core.events import EVENTS
from tests.support import ROOT

SAMPLES = ROOT / "relay" / "samples"
SAMPLE_EVENTS: tuple[str, ...] = EVENTS


def sample(name: str, **changes: Any) -> dict[str, Any]:
    """A fresh copy of the sample payload of event ``name``, with ``changes`` applied."""
    payload: dict[str, Any] = json.loads((SAMPLES / f"{name}.json").read_text())
    payload.update(changes)
    return payload
