"""The operators' service layer: the one place that reads and changes relay state for a
person. The admin API, the console and the CLI call these functions and never each other.

- :mod:`.events`: one event's deliveries and attempts; a destination's latest deliveries
- :mod:`.dead_letters`: list, choose and replay dead letters
- :mod:`.destinations`: which exist, their health, pause and resume
- :mod:`.status`: the relay at a glance
- :mod:`.leads`: erase a lead
"""
