"""The ``chaperone`` command line.

Subcommands are contributed through the ``chaperone.commands`` entry-point group: each entry
names a ``register(subparsers)`` function whose parser sets ``func(args) -> exit code``. This
keeps one CLI for the product while the sidecar package never imports the operator package (the
operator registers its own subcommand).

:func:`command_parser` and :func:`dispatch` are the one place that builds a ``chaperone`` parser
and runs the chosen command; each command module's own ``main`` (used by tests, ``python -m``
and the test bed, without installed entry points) is those two calls with its ``register``.
Errors stay argparse's (exit 2 with usage on stderr) and each command's own (it returns its exit
code): there is no shared error or logging handling to factor, since the commands differ there.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence
from importlib.metadata import entry_points
from typing import Any

__all__ = ["build_parser", "command_parser", "dispatch", "main"]

Register = Callable[[Any], object]


def command_parser(*registers: Register, description: str | None = None) -> argparse.ArgumentParser:
    """A ``chaperone`` parser whose subcommands (one required) are added by ``registers``."""
    parser = argparse.ArgumentParser(prog="chaperone", description=description)
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for register in registers:
        register(subparsers)
    return parser


def dispatch(parser: argparse.ArgumentParser, argv: Sequence[str] | None = None) -> int:
    """Parse ``argv`` and run the chosen command's ``func``; its result is the exit code."""
    args = parser.parse_args(argv)
    return int(args.func(args) or 0)


def build_parser() -> argparse.ArgumentParser:
    """Every installed ``chaperone.commands`` entry point, in name order."""
    registers = [entry.load() for entry in sorted(entry_points(group="chaperone.commands"),
                                                   key=lambda e: e.name)]
    return command_parser(*registers,
                          description="Kubernetes-native access gateway for AI coding agents.")


def main(argv: list[str] | None = None) -> int:
    return dispatch(build_parser(), argv)


if __name__ == "__main__":
    sys.exit(main())
