"""Paired bursts: two proxies running side by side, short loads alternating, ratios per pair.

    python bench/run.py --paired-only [--pairs 10]     (also a phase of every bench/run.py run)

Why: on the shared 2-core machine the rounds of ``bench/run.py`` (each path started fresh and
put through a dozen scenarios, ~30 s per path) are minutes apart, and what else runs on the
box moves between them: in one run bare mitmproxy served 358 and 544 req/s in two rounds of
the same scenario, and a 512 MiB download went through it at 171-272 MiB/s
(``bench/download_ab.py``, 2026-12-05). A ratio of two medians over three such rounds moved by
±20 % between runs (Chaperone full at 1 MiB: 0.73x, 0.80x in two ``run.py`` runs, 0.93x and
0.98x in ``ab.py`` runs the same afternoon) - more than the effects issue 16 measures.

Here both proxies are started once and stay up; each *pair* runs the same short burst through
one and then the other (the order flips every pair), seconds apart, so a slow minute slows
both halves of a pair. Reported per scenario: the median of the per-pair ratios (second path
over first) and their quartiles - the spread is the noise, shown - for the rate and for the
proxy's CPU per request (or per MiB) from /proc (rendered by ``report.paired_table``).

After each burst the driver waits until the proxy is idle again (no CPU tick over a
quarter-second) and counts the CPU spent meanwhile into the burst: Chaperone's recording ships
to S3 in the background, and that work belongs to the burst that caused it - it must neither be
left out nor land in the other proxy's next burst. Scenarios: HTTPS 1 KiB and 1 MiB text at
concurrency 32 (req/s), and a large ``application/octet-stream`` download (MiB/s; the 1 GiB
download's stream, shorter).
"""

from __future__ import annotations

import asyncio
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from . import load, paths, rss
from .upstream import SIZES

__all__ = ["PairedParams", "SCENARIOS", "quiesce", "run_paired", "summarise_paired"]

SCENARIOS = ("tput-https-1k", "tput-https-1m", "download")
IDLE_STEP = 0.25  # seconds without a CPU tick: the proxy is idle


@dataclass
class PairedParams:
    pairs: int = 10
    burst_s: float = 2.0
    concurrency: int = 32
    download_bytes: int = 256 << 20
    quiesce_max_s: float = 15.0


def quiesce(pid: int, max_s: float, step: float = IDLE_STEP) -> float:
    """Wait until ``pid``'s tree spends no CPU tick over ``step`` seconds (at most ``max_s``);
    returns the CPU seconds it spent meanwhile."""
    start, deadline = rss.cpu_seconds(pid), time.monotonic() + max_s
    while time.monotonic() < deadline:
        before = rss.cpu_seconds(pid)
        time.sleep(step)
        if rss.cpu_seconds(pid) - before <= 0:
            break
    return rss.cpu_seconds(pid) - start


def _burst(scenario: str, path: paths.ProxyPath, env: paths.Env, p: PairedParams) -> dict[str, Any]:
    """One burst of ``scenario`` through ``path``: rate, and CPU per unit including the tail."""
    assert path.pid is not None
    ctx = load.client_ssl(env.client_cafiles)
    quiesce(path.pid, p.quiesce_max_s)
    cpu0 = rss.cpu_seconds(path.pid)
    if scenario == "download":
        r = asyncio.run(load.download(env.upstream.url("https", "/bytes"), path.proxy, ctx,
                                      size=p.download_bytes, max_seconds=120))
        units = p.download_bytes / (1 << 20) if r.requests else 0
        rate = units / r.seconds if units else 0.0
    else:
        size = scenario.rsplit("-", 1)[1]
        r = asyncio.run(load.throughput(env.upstream.url("https", f"/{size}"), path.proxy, ctx, expect=SIZES[size],
                                        concurrency=p.concurrency, seconds=p.burst_s, max_requests=200_000))
        units, rate = r.requests + p.concurrency, r.rps  # the warm-up requests cost CPU too
    cpu = rss.cpu_seconds(path.pid) - cpu0 + quiesce(path.pid, p.quiesce_max_s)
    return {"rate": rate, "cpu_per_unit": cpu / units if units and r.requests else None,
            "errors": r.errors, "first_error": r.first_error}


def run_paired(names: tuple[str, str], env: paths.Env, p: PairedParams,
               log: Callable[[str], None] = print) -> dict[str, Any]:
    """Both paths up at once; ``p.pairs`` pairs of bursts per scenario (order flipping)."""
    procs = {name: paths.make_path(name) for name in names}
    bursts: dict[str, dict[str, list[dict]]] = {s: {n: [] for n in names} for s in SCENARIOS}
    try:
        for proc in procs.values():
            proc.start(env)
        for i in range(p.pairs):
            order = names if i % 2 == 0 else names[::-1]
            for scenario in SCENARIOS:
                for name in order:
                    bursts[scenario][name].append(_burst(scenario, procs[name], env, p))
            log(f"pair {i + 1}/{p.pairs}: " + "; ".join(
                f"{s} " + " / ".join(f"{bursts[s][n][-1]['rate']:.0f}" for n in names) for s in SCENARIOS))
    finally:
        for proc in procs.values():
            proc.stop()
    return {"paths": list(names), "params": vars(p).copy(), "bursts": bursts,
            "summary": summarise_paired(bursts, names)}


def _quartiles(values: list[float]) -> tuple[float, float, float]:
    if not values:
        return (float("nan"),) * 3
    if len(values) < 2:
        return values[0], values[0], values[0]
    q1, q2, q3 = statistics.quantiles(values, n=4, method="inclusive")
    return q1, q2, q3


def summarise_paired(bursts: dict[str, dict[str, list[dict]]], names: tuple[str, str] | list[str]) -> dict[str, Any]:
    """Per scenario: median and quartiles of the per-pair ratios (second path / first)."""
    base, other = names
    out: dict[str, Any] = {}
    for scenario, by_path in bursts.items():
        pairs = [(a, b) for a, b in zip(by_path[base], by_path[other], strict=True)
                 if a["rate"] and b["rate"] and not a["errors"] and not b["errors"]]
        rate = [b["rate"] / a["rate"] for a, b in pairs]
        cpu = [b["cpu_per_unit"] / a["cpu_per_unit"] for a, b in pairs if a["cpu_per_unit"] and b["cpu_per_unit"]]
        out[scenario] = {
            "pairs": len(pairs),
            "rate_ratio": _quartiles(rate), "cpu_ratio": _quartiles(cpu),
            "rate": {n: statistics.median([x["rate"] for x in by_path[n]]) if by_path[n] else float("nan")
                     for n in names},
            "cpu_per_unit": {n: statistics.median(v) if (v := [x["cpu_per_unit"] for x in by_path[n]
                                                                 if x["cpu_per_unit"]]) else float("nan")
                             for n in names},
            "errors": {n: sum(x["errors"] for x in by_path[n]) for n in names},
        }
    return out
