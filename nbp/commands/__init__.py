"""Subcommands of the ``nbp`` CLI, one module each (see nbp.cli)."""
