"""Command line for the test bed.

    python -m chaperone_testbed build   # locate or build kube-apiserver + etcd, print the dir
    python -m chaperone_testbed up      # run control plane + Redis + S3 until Ctrl-C/SIGTERM

Why: developers need the same environment the tests use to poke at by hand (kubectl, the
operator run from a shell); `up` prints it as shell `export` lines so `eval` or copy-paste works.
"""

from __future__ import annotations

import argparse
import contextlib
import shlex
import signal
import sys
import time

from .controlplane import USERS, ControlPlane, locate_assets
from .services import RedisServer, S3Server, TestbedError


def _build(args: argparse.Namespace) -> int:
    print(locate_assets(args.build_script))
    return 0


def _up(args: argparse.Namespace) -> int:
    # SIGTERM gets the same orderly teardown as Ctrl-C (the `with` blocks below).
    def on_term(signum, frame):
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, on_term)
    started = time.monotonic()
    try:
        with contextlib.ExitStack() as stack:
            cp = stack.enter_context(
                ControlPlane(assets_dir=args.assets, build_script=args.build_script))
            env = {"KUBECONFIG": str(cp.kubeconfig_path)}
            if not args.no_redis:
                env["REDIS_URL"] = stack.enter_context(RedisServer()).url
            if not args.no_s3:
                env.update(stack.enter_context(S3Server()).env())
            for key, value in env.items():
                print(f"export {key}={shlex.quote(value)}")
            print(f"# up in {time.monotonic() - started:.1f}s; apiserver {cp.url}; "
                  f"kubectl contexts: {', '.join(USERS)}; workdir {cp.workdir}", file=sys.stderr)
            print("# Ctrl-C or SIGTERM to stop", file=sys.stderr)
            sys.stdout.flush()
            while True:
                signal.pause()
    except KeyboardInterrupt:
        print("# stopped", file=sys.stderr)
        return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m chaperone_testbed")
    parser.add_argument("--build-script", help="path to hack/build-control-plane.sh")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("build", help="locate or build kube-apiserver + etcd; print the assets dir")
    up = sub.add_parser("up", help="run control plane, Redis and S3 until interrupted")
    up.add_argument("--assets", help="directory holding kube-apiserver and etcd")
    up.add_argument("--no-redis", action="store_true")
    up.add_argument("--no-s3", action="store_true")
    args = parser.parse_args(argv)
    try:
        return _build(args) if args.command == "build" else _up(args)
    except TestbedError as exc:
        print(f"chaperone_testbed: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
