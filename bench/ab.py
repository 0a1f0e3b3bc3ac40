"""Before/after in one alternating run: bare mitmproxy, Chaperone full from another checkout
("before") and Chaperone full from this one ("after"), HTTPS 1 KiB (``--size 1m``: the 1 MiB text
body every detector scans, at the same concurrency).

    python bench/ab.py --before /tmp/base-checkout [--rounds 5] [--size 1k|1m] [--out ab.json]

Why a script of its own next to bench/run.py: a change to the sidecar is judged against the
code it replaces on the same machine in the same minutes - on 2 cores shared with other work
the absolute figures swing between runs, the ratios of paths measured in alternation do not.
Per round and path (order rotated each round): fresh start, idle RSS, the concurrency-1
latency (p50) and the concurrency-32 throughput with the proxy's CPU time per request (from
/proc: what contention moves least). Reported: median and best over rounds, and the spread
(max/min of req/s) so the noise is visible.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
for _p in (REPO, REPO / "sidecar", REPO / "operator", REPO / "testbed"):
    if str(_p) not in sys.path:
        sys.path.insert(0, str(_p))

from bench import load, paths, rss  # noqa: E402
from bench.run import FULL, _cpus, _harness_loop, setup_env  # noqa: E402
from bench.upstream import SIZES  # noqa: E402


def measure(path: paths.ProxyPath, env: paths.Env, lat_n: int, tput_s: float, size: str = "1k") -> dict:
    up, ctx, res = env.upstream, load.client_ssl(env.client_cafiles), {}
    try:
        path.start(env)
        res["rss_idle_mb"] = rss.settle(path.pid, 1.5) / 1e6
        url = up.url("https", f"/{size}")
        s = asyncio.run(load.latency(url, path.proxy, ctx, expect=SIZES[size], n=lat_n, max_seconds=15))
        res["p50_ms"], res["lat_errors"] = s.p(50) * 1e3, s.errors
        cpu0 = rss.cpu_seconds(path.pid)
        r = asyncio.run(load.throughput(url, path.proxy, ctx, expect=SIZES[size], concurrency=32,
                                        seconds=tput_s, max_requests=FULL.tput_max))
        res["cpu_us"] = (rss.cpu_seconds(path.pid) - cpu0) / (r.requests + 32) * 1e6
        res["rps"], res["errors"] = r.rps, r.errors
        res["rss_warm_mb"] = rss.tree_rss(path.pid) / 1e6
    except Exception as exc:  # noqa: BLE001 - reported
        res["error"] = f"{type(exc).__name__}: {exc}"
    finally:
        res["exit_code"] = path.stop()
        if res.get("error") or res.get("exit_code") not in (0, None):
            res["log_tail"] = path.logs()[-1500:]
    return res


def summarise(results: dict[str, list[dict]]) -> str:
    base = results.get("mitmdump", [])
    lines = ["| path | req/s median (min-max) | x bare | CPU µs/req median (best) | x bare CPU | "
             "p50 ms median (best) | +p50 vs bare | idle RSS MB |", "|---|---|---|---|---|---|---|---|"]

    def med(rows: list[dict], key: str) -> float:
        vals = [r[key] for r in rows if key in r]
        return statistics.median(vals) if vals else float("nan")

    def best(rows: list[dict], key: str, low: bool = True) -> float:
        vals = [r[key] for r in rows if key in r]
        return (min(vals) if low else max(vals)) if vals else float("nan")

    for name, rows in results.items():
        rps = [r["rps"] for r in rows if "rps" in r]
        lines.append(
            f"| {name} | {med(rows, 'rps'):,.0f} ({min(rps, default=0):,.0f}-{max(rps, default=0):,.0f}) | "
            f"{med(rows, 'rps') / med(base, 'rps'):.2f}x | {med(rows, 'cpu_us'):,.0f} ({best(rows, 'cpu_us'):,.0f}) | "
            f"{med(rows, 'cpu_us') / med(base, 'cpu_us'):.2f}x | "
            f"{med(rows, 'p50_ms'):.2f} ({best(rows, 'p50_ms'):.2f}) | "
            f"{med(rows, 'p50_ms') - med(base, 'p50_ms'):+.2f} | {med(rows, 'rss_idle_mb'):.1f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--before", required=True, help="root of the checkout to compare against")
    parser.add_argument("--after", default=None, help="root of the checkout measured as 'after' (default: this one)")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--lat-n", type=int, default=400)
    parser.add_argument("--tput-s", type=float, default=4.0)
    parser.add_argument("--also", default="", help="comma-separated further paths of bench/paths.py measured "
                        "in the same rotation (e.g. chaperone-full-without-recording,chaperone-minimal)")
    parser.add_argument("--size", choices=sorted(SIZES), default="1k", help="response body of every request")
    parser.add_argument("--out", default=None, help="raw results as JSON")
    args = parser.parse_args(argv)
    cpus = _cpus()
    if cpus[1]:
        os.sched_setaffinity(0, cpus[1])
    if _harness_loop() == "uvloop":
        import uvloop

        asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    workdir = Path(tempfile.mkdtemp(prefix="chaperone-ab-"))
    makers = {"mitmdump": paths.Mitmdump,
              "chaperone-full (before)": lambda: paths.Chaperone("full", root=Path(args.before)),
              "chaperone-full (after)": lambda: paths.Chaperone("full", root=Path(args.after) if args.after else None)}
    for extra in filter(None, (n.strip() for n in args.also.split(","))):
        paths.make_path(extra)  # validates the name
        makers[extra] = lambda extra=extra: paths.make_path(extra)
    names = list(makers)
    env, closers = setup_env(workdir, ["chaperone-full"], _harness_loop(), cpus)
    results: dict[str, list[dict]] = {n: [] for n in names}
    load_before = os.getloadavg()
    try:
        for rnd in range(args.rounds):
            for name in names[rnd % len(names):] + names[:rnd % len(names)]:
                res = measure(makers[name](), env, args.lat_n, args.tput_s, args.size)
                results[name].append(res)
                print(f"round {rnd + 1} {name:26s} {res.get('rps', 0):6.0f} req/s "
                      f"{res.get('cpu_us', 0):6.0f} µs/req p50 {res.get('p50_ms', 0):.2f} ms "
                      f"rss {res.get('rss_idle_mb', 0):.1f} MB {res.get('error', '')}", flush=True)
    finally:
        for close in reversed(closers):
            close()
    table = summarise(results)
    print(f"\nload average before {load_before}, after {os.getloadavg()}; {args.rounds} rounds; {args.size} bodies; "
          f"{time.strftime('%Y-%m-%d %H:%M:%S %Z')}\n{table}")
    if args.out:
        Path(args.out).write_text(json.dumps({"results": results, "table": table,
                                              "load": [load_before, os.getloadavg()]}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
