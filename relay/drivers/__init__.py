"""Destination drivers, one file each, registered here explicitly.

Drivers are imported lazily so the web process never loads SQLAlchemy or a vendor's code it
does not use.
"""

from __future__ import annotations

import importlib

from relay.drivers.base import Driver

REGISTRY: dict[str, str] = {
    "webhook": "relay.drivers.webhook:WebhookDriver",
    "hubspot": "relay.drivers.hubspot:HubSpotDriver",
    "mailchimp": "relay.drivers.mailchimp:MailchimpDriver",
    "klaviyo": "relay.drivers.klaviyo:KlaviyoDriver",
    "database": "relay.drivers.database:DatabaseDriver",
}


def driver_class(type_name: str) -> type[Driver]:
    try:
        target = REGISTRY[type_name]
    except KeyError:
        raise KeyError(f"unknown destination type {type_name!r}") from None
    module_name, _, class_name = target.partition(":")
    cls: type[Driver] = getattr(importlib.import_module(module_name), class_name)
    return cls


__all__ = ["Driver", "REGISTRY", "driver_class"]
