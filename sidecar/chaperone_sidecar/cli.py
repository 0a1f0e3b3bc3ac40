"""The ``chaperone`` command line.

Subcommands are contributed through the ``chaperone.commands`` entry-point group: each entry
names a ``register(subparsers)`` function. This keeps one CLI for the product while the sidecar
package never imports the operator package (the operator registers its own subcommand).
"""

from __future__ import annotations

import argparse
import sys
from importlib.metadata import entry_points


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="chaperone",
        description="Kubernetes-native access gateway for AI coding agents.",
    )
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    subparsers.required = True
    for entry in sorted(entry_points(group="chaperone.commands"), key=lambda e: e.name):
        entry.load()(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
