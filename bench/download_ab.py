"""The 1 GiB download alone, paths alternating: MB/s, proxy CPU per MiB, RSS growth.

``python bench/download_ab.py [--paths mitmdump,chaperone-full] [--rounds 5] [--size-mib 1024]
[--pattern random|ramp] [--before CHECKOUT] [--warm 1k|1m]``

Why a separate driver: ``bench/run.py`` measures the download once per round among a dozen
scenarios, and on the shared 2-core machine one download's MB/s moves by 30 % with whatever
else runs. Here each round starts every path fresh (rotating order, as run.py), warms it with
one small request, then downloads ``/bytes`` (``application/octet-stream`` with a
Content-Length, so mitmproxy streams it past ``stream_large_bodies``) through it, sampling the
RSS of the proxy's process tree. Reported per path: median and best MB/s, the ratio to the
first path (median of per-round ratios and best-of), and the proxy's CPU seconds per MiB from
/proc - CPU time barely moves with contention, so its ratio is the robust one. ``--before``:
Chaperone full from another checkout joins the rotation as ``chaperone-full (before)`` (a change
judged against the code it replaces, as in ``bench/ab.py``). ``--warm SIZE``: before the
download each proxy serves 4 s of ``SIZE`` requests (concurrency 32) and goes idle - as in
``bench/run.py``, where the download follows the other scenarios. Session 13 found Chaperone
full spending 1.2x bare's CPU per MiB after 1 MiB traffic, 1.05x fresh (mitmdump: no
change), in a noisy probe; this option reproduces it (bench/analysis.md, "Session 13").
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
for _p in (REPO, REPO / "sidecar", REPO / "operator", REPO / "testbed"):
    if str(_p) not in sys.path:
        sys.path.insert(0, str(_p))

from bench import load, paired, paths, rss  # noqa: E402
from bench.run import _harness_loop, setup_env  # noqa: E402
from bench.upstream import PATTERNS, SIZES  # noqa: E402

BEFORE = "chaperone-full (before)"


def one(name: str, env: paths.Env, size: int, pattern: str = "random", before: Path | None = None,
        warm: str | None = None) -> dict[str, float]:
    path = paths.Chaperone("full", root=before) if name == BEFORE else paths.make_path(name)
    path.start(env)
    try:
        ctx = load.client_ssl(env.client_cafiles)
        up = env.upstream
        asyncio.run(load.latency(up.url("https", "/1k"), path.proxy, ctx, expect=SIZES["1k"], n=1,
                                 max_seconds=10, warmup=0))
        if warm:
            asyncio.run(load.throughput(up.url("https", f"/{warm}"), path.proxy, ctx, expect=SIZES[warm],
                                        concurrency=32, seconds=4.0, max_requests=100_000))
            assert path.pid is not None
            paired.quiesce(path.pid, 15.0)  # its recording shipped, its CPU idle again
        pid = path.pid
        assert pid is not None
        before, cpu0 = rss.tree_rss(pid), rss.cpu_seconds(pid)
        with rss.PeakSampler(pid) as sampler:
            r = asyncio.run(load.download(up.url("https", "/bytes"), path.proxy, ctx, size=size, max_seconds=600,
                                          pattern=pattern))
        cpu = rss.cpu_seconds(pid) - cpu0
        if not r.requests:
            raise RuntimeError(f"{name}: download failed: {r.first_error}\n{path.logs()[-2000:]}")
        mib = size / (1 << 20)
        return {"mib_s": mib / r.seconds, "cpu_ms_per_mib": cpu / mib * 1000,
                "growth_mb": (sampler.peak - before) / 1e6}
    finally:
        path.stop()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--paths", default="mitmdump,chaperone-full")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--size-mib", type=int, default=1024)
    parser.add_argument("--pattern", default="random", choices=sorted(PATTERNS),
                        help="the body: random bytes, or the ramp bytes(range(256)) (see bench/upstream.py)")
    parser.add_argument("--before", default=None, help="root of a checkout whose Chaperone full joins the rotation")
    parser.add_argument("--warm", default=None, choices=sorted(SIZES),
                        help="serve 4 s of these requests before the download (a sidecar that has been busy)")
    args = parser.parse_args(argv)
    names = args.paths.split(",") + ([BEFORE] if args.before else [])
    size = args.size_mib << 20
    results: dict[str, list[dict[str, float]]] = {n: [] for n in names}
    with tempfile.TemporaryDirectory(prefix="chaperone-download-ab-") as tmp:
        env, closers = setup_env(Path(tmp), [n for n in names if n != BEFORE], _harness_loop())
        try:
            for rnd in range(args.rounds):
                order = names[rnd % len(names):] + names[:rnd % len(names)]
                for name in order:
                    res = one(name, env, size, args.pattern, Path(args.before) if args.before else None, args.warm)
                    results[name].append(res)
                    print(f"round {rnd + 1} {name:24s} {res['mib_s']:7.1f} MiB/s  "
                          f"{res['cpu_ms_per_mib']:6.2f} ms CPU/MiB  growth {res['growth_mb']:5.1f} MB", flush=True)
        finally:
            for close in reversed(closers):
                close()
    med = statistics.median
    base = results[names[0]]
    print("\n| path | MiB/s median | MiB/s best | ratio median | ratio best | CPU ms/MiB median | CPU ratio "
          "| growth MB max |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for name in names:
        rs = results[name]
        ratios = [a["mib_s"] / b["mib_s"] for a, b in zip(rs, base, strict=True)]
        cpu_ratio = med(r["cpu_ms_per_mib"] for r in rs) / med(r["cpu_ms_per_mib"] for r in base)
        print(f"| {name} | {med(r['mib_s'] for r in rs):.1f} | {max(r['mib_s'] for r in rs):.1f} | "
              f"{med(ratios):.2f}x | {max(r['mib_s'] for r in rs) / max(r['mib_s'] for r in base):.2f}x | "
              f"{med(r['cpu_ms_per_mib'] for r in rs):.2f} | {cpu_ratio:.2f}x | "
              f"{max(r['growth_mb'] for r in rs):.1f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
