"""Benchmarks run by hand (not by CI): ``python -m bench.ingress`` and ``python -m bench.delivery``.

Each prints the relay's figures next to a bare baseline measured in the same run on the same
machine, and the ratios SPEC §6 sets targets for. See ``bench/README.md``.
"""
