"""``chaperone operator``: run the kopf operator (webhooks, status, expiry) cluster-wide.

Registered through the ``chaperone.commands`` entry-point group (see ``chaperone_sidecar.cli``);
``python -m chaperone_operator.cli operator`` does the same without an installed entry point.
Configuration comes from ``CHAPERONE_*`` environment variables (:mod:`.settings` and
``chaperone_operator.injection.settings``); the flags here only shape the process: logging,
the liveness endpoint, and forcing standalone mode.
"""

from __future__ import annotations

import argparse
import sys

from chaperone_sidecar.cli import command_parser, dispatch

__all__ = ["register", "run", "main"]


def register(subparsers) -> argparse.ArgumentParser:
    """Add the ``operator`` subcommand to the ``chaperone`` CLI."""
    parser = subparsers.add_parser(
        "operator", help="run the Chaperone operator (admission webhooks, status, expiry)",
        description="Run the kopf operator cluster-wide. Settings come from CHAPERONE_* "
                    "environment variables (see the Helm chart's values.yaml).")
    parser.add_argument("--liveness", metavar="URL", default=None,
                        help="serve kopf's liveness probe, e.g. http://0.0.0.0:8080/healthz")
    parser.add_argument("--standalone", action="store_true",
                        help="disable kopf peering (a single replica)")
    parser.add_argument("--log-format", choices=("plain", "full", "json"), default="full",
                        help="log line format (default: full)")
    level = parser.add_mutually_exclusive_group()
    level.add_argument("--verbose", action="store_true", help="log debug messages")
    level.add_argument("--quiet", action="store_true", help="log warnings and errors only")
    parser.set_defaults(func=run)
    return parser


def run(args: argparse.Namespace) -> int:
    """Import the handlers and run kopf until SIGTERM/SIGINT."""
    import kopf

    from . import main as _handlers  # noqa: F401  (registers the handlers)

    kopf.configure(verbose=args.verbose, quiet=args.quiet,
                   log_format=kopf.LogFormat[args.log_format.upper()])
    kopf.run(clusterwide=True, standalone=True if args.standalone else None,
             liveness_endpoint=args.liveness)
    return 0


def main(argv: list[str] | None = None) -> int:
    return dispatch(command_parser(register), argv)


if __name__ == "__main__":
    sys.exit(main())
