"""The ``nbp`` command line: ``nbp info | generate | bench | train | eval``.

Each subcommand lives in its own module under ``nbp.commands`` exposing
``register(subparsers)``, which adds a parser whose ``func(args) -> int`` runs it.
"""
from __future__ import annotations

import argparse
import importlib
import sys

COMMANDS = ["info", "generate", "bench", "train", "eval"]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="nbp", description="Next-Block Prediction video generation")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in COMMANDS:
        try:
            module = importlib.import_module(f"nbp.commands.{name}")
        except ModuleNotFoundError as e:
            if e.name != f"nbp.commands.{name}":
                raise
            continue  # subcommand not part of this build
        module.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except (ValueError, OSError, RuntimeError) as e:
        # user errors (bad flags, unreadable or unwritable files) end with one message,
        # not a traceback; ValueError covers LoadError and nbp.video.VideoError
        print(f"nbp {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
