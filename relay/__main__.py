"""``python -m relay``: the ``relay`` command (how ``relay dev`` starts its children)."""

from relay.cli import main

if __name__ == "__main__":
    main()
