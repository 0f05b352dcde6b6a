"""The delivery side: admission of the intake into the lanes, the drain of each lane with
claim-then-confirm, one attempt and its decision (:mod:`.attempt`), the gates (pause, circuit
breaker, rate limit), the retry schedule, and the kicks that wake admission and drains.
:mod:`.assembly` builds the engine a worker process runs.

Imports run one way::

    retry, kicks  ←  gates, attempt  ←  engine  ←  assembly

and nothing here imports the web side or ``workers`` (the import contracts in
``pyproject.toml``)."""
