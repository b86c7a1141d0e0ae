"""`higgs-pipeline`: the one console script for users, with a subcommand per task.

Each subcommand lives in `higgs_pipeline/commands/<name>.py` as a thin wrapper over a library function that the
assets call too, so the Dagster UI and the command line give the same answers. Modules are imported only for the
subcommand that runs, so `--help` stays quick and a broken optional dependency never hides the other commands.

    higgs-pipeline score clip.wav --text "Hello there." --reference ref.wav --json
"""

from __future__ import annotations

import argparse
import importlib
import signal
import sys
import threading

from higgs_pipeline.commands import COMMANDS, CommandError


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="higgs-pipeline",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in COMMANDS:
        importlib.import_module(f"higgs_pipeline.commands.{name}").register(subparsers)
    return parser


class Terminated(KeyboardInterrupt):
    """SIGTERM (`kill`, `timeout`, a scheduler stopping the job), raised as Ctrl-C is, so a command removes what it
    had started writing exactly as it does for Ctrl-C instead of dying with it half written."""


def _terminate(_signal: int, _frame: object) -> None:
    raise Terminated


def main(argv: list[str] | None = None) -> int:
    """Run one subcommand; a `CommandError` (bad input a user can fix) is one line on stderr and exit status 2."""
    args = build_parser().parse_args(argv)
    main_thread = threading.current_thread() is threading.main_thread()  # only there can Python handle signals
    previous = signal.signal(signal.SIGTERM, _terminate) if main_thread else None
    try:
        return int(args.run(args) or 0)
    except CommandError as error:
        print(f"higgs-pipeline {args.command}: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as stop:
        terminated = isinstance(stop, Terminated)
        print(f"higgs-pipeline {args.command}: {'terminated' if terminated else 'interrupted'}", file=sys.stderr)
        return 128 + (signal.SIGTERM if terminated else signal.SIGINT)
    finally:
        if main_thread:
            signal.signal(signal.SIGTERM, signal.SIG_DFL if previous is None else previous)


if __name__ == "__main__":
    sys.exit(main())
