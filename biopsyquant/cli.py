"""Command-line entry point ``biopsyquant``.

Each sub-command lives in its own module under :mod:`biopsyquant._cli` and exposes
``add_parser(subparsers)`` and ``run(args) -> int``.  This module only dispatches and turns
:class:`~biopsyquant.errors.BiopsyQuantError` into a one-line message (no traceback).
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys

from . import __version__
from .errors import BiopsyQuantError

#: sub-command name -> module under biopsyquant._cli
SUBCOMMANDS = {
    "info": "info",
    "score": "score",
    "compare": "compare",
    "demo": "demo",
}


def build_parser() -> argparse.ArgumentParser:
    """Return the top-level parser with every available sub-command registered."""
    parser = argparse.ArgumentParser(
        prog="biopsyquant",
        description="Quantify IHC on skeletal-muscle biopsy slides.",
    )
    parser.add_argument("--version", action="version", version=f"biopsyquant {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for mod in SUBCOMMANDS.values():
        try:
            module = importlib.import_module(f"biopsyquant._cli.{mod}")
        except ModuleNotFoundError as exc:
            if exc.name == f"biopsyquant._cli.{mod}":
                continue  # sub-command not built yet
            raise
        p = module.add_parser(sub)
        p.set_defaults(_run=module.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run the CLI; returns the process exit code."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "_run", None):
        parser.print_help()
        return 2
    try:
        return int(args._run(args) or 0)
    except BiopsyQuantError as exc:
        print(f"biopsyquant: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("biopsyquant: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # output piped into e.g. `head`: stop quietly
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 141


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
