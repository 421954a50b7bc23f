"""Command-line interface: ``aanas <command> ...``. Thin: parses flags, calls the library.

Each subcommand is a pair ``_add_<name>(subparsers)`` / ``_run_<name>(args) -> int`` registered in
``_COMMANDS``. Library errors that come from user input (``ValueError``, ``FileNotFoundError``)
are printed as one line, ``aanas: error: ...``, with exit code 2, never as a traceback.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Callable, Sequence

from aanas import __version__

__all__ = ["main", "build_parser"]

_AddParser = Callable[["argparse._SubParsersAction[argparse.ArgumentParser]"], None]


# --- subcommands (one section each; keep them thin) -------------------------------------------


# --- registry ---------------------------------------------------------------------------------

_COMMANDS: list[_AddParser] = []


def build_parser() -> argparse.ArgumentParser:
    """The full ``aanas`` argument parser (also used by the docs and tests)."""
    parser = argparse.ArgumentParser(
        prog="aanas",
        description="Attention-augmented neural architecture search and mobile models "
        "(Bello et al., arXiv:1904.09925).",
    )
    parser.add_argument("--version", action="version", version=f"aanas {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for add in _COMMANDS:
        add(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``aanas`` console script; returns the process exit code."""
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(levelname)s %(name)s: %(message)s",
    )
    run: Callable[[argparse.Namespace], int] | None = getattr(args, "run", None)
    if run is None:
        parser.print_help()
        return 0
    try:
        return run(args)
    except (ValueError, FileNotFoundError, NotADirectoryError) as exc:
        print(f"aanas: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("aanas: interrupted", file=sys.stderr)
        return 130
