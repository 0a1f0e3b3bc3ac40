"""``chaperone sidecar`` (the injected container) and ``chaperone proxy`` (standalone).

Registered through the ``chaperone.commands`` entry-point group (``register`` and
``register_proxy``). Also runnable without the installed entry points, which is how the test
bed starts the sidecar as a process::

    python -m chaperone_sidecar.sidecar_cli sidecar --mode explicit --port 15001 --health-port 15021

``chaperone sidecar`` reads exactly what the injection webhook gives the container
(docs/injection.md); ``chaperone proxy`` runs the same pipeline on a laptop from a config
directory (``--config-dir``, default ``~/.chaperone``: ``connections/`` and ``policies/``
YAML, ``credentials/<connection>/``, the CA generated in ``ca/`` on first run, recordings in
``recordings/``, approvals in ``approvals/``).
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Any

from .cli import command_parser, dispatch
from .config import ConfigError, SidecarConfig, add_proxy_arguments, add_sidecar_arguments

__all__ = ["register", "register_proxy", "main"]


def register(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "sidecar", help="run the injected sidecar proxy (configured by the webhook)",
        description="The Chaperone sidecar: configured by the injection webhook's env and args.")
    add_sidecar_arguments(parser)
    parser.set_defaults(func=run_sidecar)


def register_proxy(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "proxy", help="run Chaperone standalone from local YAML (laptops, demos)",
        description="Standalone Chaperone: connections and policies from a config directory.")
    add_proxy_arguments(parser)
    parser.set_defaults(func=run_proxy)


def run_sidecar(args: argparse.Namespace) -> int:
    try:
        config = SidecarConfig.from_env(os.environ, args)
    except ConfigError as exc:
        print(f"chaperone sidecar: {exc}", file=sys.stderr)
        return 2
    from .proxy import run

    return run(config)


def run_proxy(args: argparse.Namespace) -> int:
    try:
        config = SidecarConfig.from_files(args.config_dir, port=args.port, health_port=args.health_port,
                                          listen_host=args.listen_host, namespace=args.namespace,
                                          user=args.user)
    except ConfigError as exc:
        print(f"chaperone proxy: {exc}", file=sys.stderr)
        return 2
    from .proxy import run

    return run(config)


def main(argv: list[str] | None = None) -> int:
    return dispatch(command_parser(register, register_proxy), argv)


if __name__ == "__main__":
    sys.exit(main())
