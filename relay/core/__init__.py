"""The relay's vocabulary, imported by every other layer and importing none of them: the
models (``LeadEvent``, ``Destination``, ``DeliveryResult``), the one error tree, the event
catalogue and event ids, routing, Standard Webhooks signing, form bodies in bracket notation,
durations, dotted paths into a payload, API-key checks and redaction."""
