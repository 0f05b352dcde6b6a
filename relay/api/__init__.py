"""The HTTP surfaces besides the ingress: the admin API (``/api``), the KickoffLabs-compatible
subscription API (``/v2/<campaign>/outbound-webhook``), the OpenAPI document, ``/healthz``,
``/readyz`` and ``/metrics``, the dev inbox, API-key authentication and the access log.
The views parse, authenticate and answer; what they do is in :mod:`relay.operations`."""
