"""The way in: ``POST /hooks/<source>`` (:mod:`.view`) reads the body, normalises the lead
(:mod:`.lead_schema`), derives the event id and writes the event to the intake
(:mod:`.intake`), then answers ``202``."""
