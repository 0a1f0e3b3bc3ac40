"""Masking through the proxy, before/after in one alternating run: 1 MiB text responses.

    python bench/ab_masking.py --before /tmp/before-checkout [--rounds 3] [--out ab.json]

Paths, each started fresh per round (order rotated each round): bare mitmproxy, Chaperone
minimal (no masking, no recording), Chaperone full *without recording and telemetry* - the
50-rule policy with ``masking.detectors: [all]`` and nothing else that touches the body - from
the ``--before`` checkout and from this one, and Chaperone full (recording, telemetry) from
both. Scenarios: ``/1m`` of ``bench/upstream.py`` (1 MiB of ``text/plain``, Content-Length
known, so masked whole, as ``Masker.mask_bytes``) over HTTPS and HTTP at concurrency 32
(req/s and the proxy's CPU time per request from /proc) and over HTTPS at concurrency 1 (p50).

Why next to bench/run.py and bench/ab.py: those measure 1 KiB (ab.py) or every path and
scenario (run.py); the masking engine's target (issue 16: >= 0.9x bare mitmproxy on 1 MiB
text) is judged on the same machine in the same minutes against the engine it replaces. The
``--before`` checkout is this tree with ``sidecar/chaperone_sidecar/policy/masking`` as it was
before the one-pass engine (docs/benchmarks.md says how the run was made).
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

_LEAN = ("recording", "telemetry")


def measure(path: paths.ProxyPath, env: paths.Env, lat_n: int, tput_s: float) -> dict:
    up, ctx, res = env.upstream, load.client_ssl(env.client_cafiles), {}
    try:
        path.start(env)
        s = asyncio.run(load.latency(up.url("https", "/1m"), path.proxy, ctx, expect=SIZES["1m"], n=lat_n,
                                     max_seconds=15))
        res["p50_ms"], res["lat_errors"] = s.p(50) * 1e3, s.errors
        for scheme in ("https", "http"):
            cpu0 = rss.cpu_seconds(path.pid)
            r = asyncio.run(load.throughput(up.url(scheme, "/1m"), path.proxy, ctx, expect=SIZES["1m"],
                                            concurrency=32, seconds=tput_s, max_requests=FULL.tput_max))
            res[f"{scheme}_cpu_us"] = (rss.cpu_seconds(path.pid) - cpu0) / (r.requests + 32) * 1e6
            res[f"{scheme}_rps"], res[f"{scheme}_errors"] = r.rps, r.errors
    except Exception as exc:  # noqa: BLE001 - reported
        res["error"] = f"{type(exc).__name__}: {exc}"
    finally:
        res["exit_code"] = path.stop()
        if res.get("error") or res.get("exit_code") not in (0, None):
            res["log_tail"] = path.logs()[-1500:]
    return res


def summarise(results: dict[str, list[dict]]) -> str:
    base = results["mitmdump"]

    def med(rows: list[dict], key: str) -> float:
        vals = [r[key] for r in rows if key in r]
        return statistics.median(vals) if vals else float("nan")

    lines = ["| path | HTTPS req/s median (min-max) | x bare | CPU µs/req (x bare) | HTTP req/s median "
             "(min-max) | x bare | CPU µs/req (x bare) | HTTPS c=1 p50 ms | errors |",
             "|---|---|---|---|---|---|---|---|---|"]
    for name, rows in results.items():
        cells = [name]
        for scheme in ("https", "http"):
            rps = [r[f"{scheme}_rps"] for r in rows if f"{scheme}_rps" in r]
            cells += [f"{med(rows, f'{scheme}_rps'):,.0f} ({min(rps, default=0):,.0f}-{max(rps, default=0):,.0f})",
                      f"{med(rows, f'{scheme}_rps') / med(base, f'{scheme}_rps'):.2f}x",
                      f"{med(rows, f'{scheme}_cpu_us'):,.0f} "
                      f"({med(rows, f'{scheme}_cpu_us') / med(base, f'{scheme}_cpu_us'):.2f}x)"]
        errors = sum(r.get("https_errors", 0) + r.get("http_errors", 0) + r.get("lat_errors", 0) for r in rows)
        cells += [f"{med(rows, 'p50_ms'):.2f}", str(errors + sum("error" in r for r in rows))]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--before", required=True, help="root of the checkout to compare against")
    parser.add_argument("--after", default=str(REPO), help="root of the checkout measured as 'after' "
                        "(default: this one)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--lat-n", type=int, default=40)
    parser.add_argument("--tput-s", type=float, default=4.0)
    parser.add_argument("--out", default=None, help="raw results as JSON")
    args = parser.parse_args(argv)
    cpus = _cpus()
    if cpus[1]:
        os.sched_setaffinity(0, cpus[1])
    if _harness_loop() == "uvloop":
        import uvloop

        asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    before, after = Path(args.before), Path(args.after)
    makers = {"mitmdump": paths.Mitmdump,
              "chaperone-minimal": lambda: paths.Chaperone("minimal", root=after),
              "masking only (before)": lambda: paths.Chaperone("full", root=before, without=_LEAN),
              "masking only (after)": lambda: paths.Chaperone("full", root=after, without=_LEAN),
              "chaperone-full (before)": lambda: paths.Chaperone("full", root=before),
              "chaperone-full (after)": lambda: paths.Chaperone("full", root=after)}
    names = list(makers)
    workdir = Path(tempfile.mkdtemp(prefix="chaperone-ab-masking-"))
    env, closers = setup_env(workdir, ["chaperone-full"], _harness_loop(), cpus)
    results: dict[str, list[dict]] = {n: [] for n in names}
    load_before = os.getloadavg()
    try:
        for rnd in range(args.rounds):
            for name in names[rnd % len(names):] + names[:rnd % len(names)]:
                res = measure(makers[name](), env, args.lat_n, args.tput_s)
                results[name].append(res)
                print(f"round {rnd + 1} {name:26s} https {res.get('https_rps', 0):5.0f} req/s "
                      f"{res.get('https_cpu_us', 0):7.0f} µs/req  http {res.get('http_rps', 0):5.0f} req/s "
                      f"{res.get('http_cpu_us', 0):7.0f} µs/req  p50 {res.get('p50_ms', 0):.2f} ms "
                      f"{res.get('error', '')}", flush=True)
    finally:
        for close in reversed(closers):
            close()
    table = summarise(results)
    print(f"\nload average before {load_before}, after {os.getloadavg()}; {args.rounds} rounds; "
          f"{time.strftime('%Y-%m-%d %H:%M:%S %Z')}\n{table}")
    if args.out:
        Path(args.out).write_text(json.dumps({"results": results, "table": table,
                                              "load": [load_before, os.getloadavg()]}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
