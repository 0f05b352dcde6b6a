"""Configuration: the process's settings from the environment (:mod:`.settings`, the one
reader of ``RELAY_*``) and the YAML of sources and destinations (:mod:`.relay_yaml`), which
asks each driver to validate its own keys."""
