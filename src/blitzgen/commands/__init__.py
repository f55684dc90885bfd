"""Subcommands of the ``blitzgen`` CLI; each module has ``register(subparsers)``."""
