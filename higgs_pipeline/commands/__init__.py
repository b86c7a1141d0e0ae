"""Subcommands of the `higgs-pipeline` console script (see `higgs_pipeline/cli.py`).

A subcommand module defines `register(subparsers)`, which adds its parser and sets `run=<function(args) -> int>`
as a default. It imports only the standard library at module level: heavy imports happen inside `run`.
"""

from __future__ import annotations

# The subcommands, in the order `--help` lists them.
COMMANDS: tuple[str, ...] = ("score", "synthesize", "export", "prepare")


class CommandError(Exception):
    """Bad input a user can fix (a missing file, empty text, an existing output): one line on stderr, exit 2."""
