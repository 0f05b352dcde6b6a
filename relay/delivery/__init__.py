"""The delivery side: intake and lanes (Redis streams), the engine that drains them, the
claim-then-confirm state, the gates and the retry schedule.

Imports run one way::

    keys  ←  lanes, state  ←  gates, retry, attempt  ←  engine

and nothing here imports the web side or ``workers``.
"""
