"""The store's Lua scripts, one file each in ``lua/`` (shipped as package data).

A script names no key itself: it gets its keys as ``KEYS``, or, where they depend on the data
(an event id, a lane), their prefixes from :mod:`.keys` in ``ARGV``. Each file starts with what
it is given and what it answers.
"""

from __future__ import annotations

import functools
from importlib import resources

import redis
from redis.commands.core import Script


@functools.cache
def load(name: str) -> str:
    """The source of ``lua/<name>.lua``."""
    return (resources.files("relay.store") / "lua" / f"{name}.lua").read_text(encoding="utf-8")


def register(client: redis.Redis, name: str) -> Script:
    """The script ``name`` on ``client`` (sent by its SHA, loaded on first use)."""
    return client.register_script(load(name))
