"""Idle RSS of the full-profile sidecar, for source trees side by side (issue 16).

``python bench/idle_rss.py [--tree NAME=PATH ...] [--rounds N] [--tracemalloc] [--modules]``

Each round starts one fresh full-profile sidecar per tree (``bench/chaperone_proc.py --profile
full --report-modules``: the runtime and services of ``chaperone proxy``, the 50-rule policy
with masking on, recording shipped to the test bed's S3 server, telemetry over OTLP/HTTP), in
alternating order, and reads the RSS it reports once ready and idle for a second. A tree is a
checkout of this repository (``git archive HEAD | tar -x -C /tmp/base``); the default is this
one. Medians and minima per tree, and the difference of each tree to the first, are printed:
the marginal RSS of a change, measured as the issue asks (one alternating run).

``--tracemalloc``: the sidecars run with ``PYTHONTRACEMALLOC=1`` and report the memory Python
allocated, grouped by top-level package of the allocating file (tracemalloc's own overhead
makes RSS meaningless in this mode). ``--modules``: the top-level packages each tree's sidecar
holds that the first tree's does not, and the other way round.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
for _sub in ("sidecar", "operator", "testbed", ""):
    if str(REPO / _sub) not in sys.path:
        sys.path.insert(0, str(REPO / _sub))


def idle_report(env, tree: Path, workdir: Path, *, tracemalloc: bool = False, importtime: bool = False,
                extra_connections: list[dict] = ()) -> dict:
    """Start a full-profile sidecar from ``tree``, wait for its idle report, stop it."""
    from bench import chaperone_config
    from chaperone_testbed.services import free_port

    conf = chaperone_config.write_config(workdir / "config", "full", upstream_ca=env.upstream.ca_file,
                                         interception_ca_dir=env.ca_dir)
    for conn in extra_connections:
        (conf / "connections" / f"{conn['metadata']['name']}.yaml").write_text(json.dumps(conn))
    report = workdir / "report.json"
    report.unlink(missing_ok=True)
    child_env = {k: v for k, v in os.environ.items()
                 if not k.startswith(("AWS_", "OTEL_", "CHAPERONE_", "PYTHONTRACEMALLOC"))}
    child_env.update(
        PYTHONPATH=os.pathsep.join(str(tree / p) for p in ("sidecar", "operator", "testbed", "")),
        BENCH_S3_BUCKET=env.s3_bucket, BENCH_S3_PREFIX="idle/", BENCH_S3_ENDPOINT=env.s3.endpoint_url,
        BENCH_S3_REGION=env.s3.region, BENCH_S3_ACCESS_KEY=env.s3.access_key,
        BENCH_S3_SECRET_KEY=env.s3.secret_key, BENCH_OTLP_ENDPOINT=env.upstream.otlp_endpoint)
    if tracemalloc:
        child_env["PYTHONTRACEMALLOC"] = "1"
    log_path = workdir / "sidecar.log"
    with log_path.open("w") as log:
        flags = ["-X", "importtime"] if importtime else []
        proc = subprocess.Popen([sys.executable, *flags, str(tree / "bench" / "chaperone_proc.py"), "--profile", "full",
                                 "--config-dir", str(conf), "--port", str(free_port()),
                                 "--health-port", str(free_port()), "--report-modules", str(report)],
                                env=child_env, stdout=log, stderr=subprocess.STDOUT)
        try:
            deadline = time.monotonic() + 120
            while not report.exists():
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"no idle report from {tree}: {log_path.read_text()[-3000:]}")
                time.sleep(0.2)
            out = json.loads(report.read_text())
        finally:
            proc.send_signal(signal.SIGTERM)
            proc.wait(30)
    return out


def _top(modules: list[str]) -> set[str]:
    return {m.split(".")[0] for m in modules}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tree", action="append", default=[], metavar="NAME=PATH")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--tracemalloc", action="store_true")
    parser.add_argument("--modules", action="store_true")
    parser.add_argument("--importtime", action="store_true",
                        help="run the sidecars with -X importtime (the import tree is in the saved log)")
    parser.add_argument("--save", type=Path, default=None, metavar="DIR",
                        help="keep each sidecar's report as DIR/NAME-ROUND.json")
    args = parser.parse_args(argv)
    trees = [(n, Path(p).resolve()) for n, p in (t.split("=", 1) for t in args.tree)] or [("this", REPO)]

    from bench import run

    with tempfile.TemporaryDirectory(prefix="idle-rss-") as tmp:
        env, closers = run.setup_env(Path(tmp), ["chaperone-full"], "asyncio")
        try:
            results: dict[str, list[dict]] = {n: [] for n, _ in trees}
            for rnd in range(args.rounds):
                order = trees[rnd % len(trees):] + trees[:rnd % len(trees)]
                for name, tree in order:
                    work = Path(tmp) / f"{name}-{rnd}"
                    work.mkdir()
                    res = idle_report(env, tree, work, tracemalloc=args.tracemalloc, importtime=args.importtime)
                    results[name].append(res)
                    if args.save:
                        args.save.mkdir(parents=True, exist_ok=True)
                        (args.save / f"{name}-{rnd}.json").write_text(json.dumps(res))
                        (args.save / f"{name}-{rnd}.log").write_text((work / "sidecar.log").read_text())
                    print(f"round {rnd + 1} {name:12s} {res['rss'] / 1e6:6.1f} MB  "
                          f"{len(res['modules'])} modules", flush=True)
        finally:
            for close in reversed(closers):
                close()
    first = trees[0][0]
    base = statistics.median(r["rss"] for r in results[first])
    for name, _ in trees:
        rss = [r["rss"] for r in results[name]]
        print(f"{name:12s} median {statistics.median(rss) / 1e6:6.1f} MB  min {min(rss) / 1e6:6.1f} MB  "
              f"vs {first}: {(statistics.median(rss) - base) / 1e6:+5.1f} MB")
    if args.modules:
        ref = _top(results[first][0]["modules"])
        for name, _ in trees[1:]:
            mine = _top(results[name][0]["modules"])
            print(f"{name}: + {sorted(mine - ref)}\n{name}: - {sorted(ref - mine)}")
    if args.tracemalloc:
        for name, _ in trees:
            traced = results[name][0].get("traced") or {}
            print(f"{name}: traced by package (MB): total {sum(traced.values()) / 1e6:.1f}")
            for pkg, size in sorted(traced.items(), key=lambda kv: -kv[1])[:40]:
                print(f"  {size / 1e6:6.2f}  {pkg}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
