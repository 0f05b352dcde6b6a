"""The test suite, in two layers: ``tests/unit`` (in one process, fast) and
``tests/integration`` (crosses a process or a socket); ``tests/support`` is what both share."""
