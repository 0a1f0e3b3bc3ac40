"""docs/benchmarks.md from the raw results: medians, ratios, targets, machine and versions.

Every figure is a median over the rounds of a path (``min-max`` shows the spread); ratios are
against bare mitmproxy and against direct, computed from the medians. Targets are those of
issue 7, each reported as met / missed / not measured with the figure that decided it.
Sizes are MB = 10^6 bytes (the stricter reading of the targets' "MB").
"""

from __future__ import annotations

import math
import platform
import re
import shutil
import ssl
import statistics
import subprocess
import sys
from pathlib import Path
from typing import Any, Iterable

__all__ = ["machine_info", "summarise", "render", "median_of", "paired_table"]

NAMES = {"direct": "direct", "mitmdump": "bare mitmproxy", "chaperone-minimal": "Chaperone minimal",
         "chaperone-full": "Chaperone full", "chaperone-minimal-asyncio": "Chaperone minimal (asyncio loop)",
         "chaperone-full-asyncio": "Chaperone full (asyncio loop)", "squid": "Squid ssl-bump"}
MB = 1e6


def _version(argv: list[str], pattern: str) -> str:
    if not shutil.which(argv[0]) and not Path(argv[0]).exists():
        return "not installed"
    try:
        res = subprocess.run(argv, capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.TimeoutExpired):
        return "?"
    match = re.search(pattern, res.stdout + res.stderr)
    return match.group(1) if match else "?"


def _dist(name: str) -> str:
    from importlib import metadata

    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return "not installed"


def machine_info(load_before: Iterable[float] = ()) -> dict[str, Any]:
    """nproc, CPU model, memory, kernel and the versions of everything measured."""
    import os

    cpuinfo = Path("/proc/cpuinfo").read_text(errors="replace") if Path("/proc/cpuinfo").exists() else ""
    model = re.search(r"^model name\s*:\s*(.+)$", cpuinfo, re.M)
    meminfo = Path("/proc/meminfo").read_text() if Path("/proc/meminfo").exists() else ""
    mem = re.search(r"^MemTotal:\s+(\d+) kB", meminfo, re.M)
    from bench.paths import SQUID

    return {
        "nproc": len(os.sched_getaffinity(0)), "cpu_model": model.group(1).strip() if model else "?",
        "memory_gib": int(mem.group(1)) / (1 << 20) if mem else math.nan, "kernel": platform.release(),
        "python": platform.python_version(), "mitmproxy": _dist("mitmproxy"), "aiohttp": _dist("aiohttp"),
        "uvloop": _dist("uvloop"), "opentelemetry-sdk": _dist("opentelemetry-sdk"), "openssl": ssl.OPENSSL_VERSION,
        "squid": _version([SQUID or "squid", "-v"], r"Version (\S+)"), "wrk": _version(["wrk", "-v"], r"wrk (\S+)"),
        "hyperscan": _hyperscan_engine(), "load_before": list(load_before),
    }


def _hyperscan_engine() -> str:
    """What the sidecar's masking scans with, as its hs_compile chooses it in this environment."""
    from chaperone_sidecar.policy.masking.hs_compile import engine_name, system_library

    lib = system_library()
    if lib is None:
        return engine_name()
    features = lib.compile([b"x"], [0]).info().split("Features:")[1].split("Mode:")[0].strip()
    return f"{engine_name()} ({features or 'generic'})"


# ---------------------------------------------------------------------------- numbers

def _get(d: Any, key: str) -> Any:
    for part in key.split("."):
        if not isinstance(d, dict):
            return None
        d = d.get(part)
    return d


def _ok(v: Any) -> bool:
    return isinstance(v, (int, float)) and not (isinstance(v, float) and math.isnan(v))


def median_of(rounds: list[dict], key: str) -> float:
    values = [_get(r, key) for r in rounds]
    values = [v for v in values if _ok(v)]
    return statistics.median(values) if values else math.nan


def _spread(rounds: list[dict], key: str) -> tuple[float, float]:
    values = [v for v in (_get(r, key) for r in rounds) if _ok(v)]
    return (min(values), max(values)) if values else (math.nan, math.nan)


def _errors(rounds: list[dict], scenario: str) -> int:
    return sum(int(_get(r, f"{scenario}.errors") or 0) for r in rounds)


def summarise(data: dict) -> dict[str, Any]:
    """The targets of issue 7 with their figures and status (also stored in ``data``)."""
    runs = data.get("paths", {})
    med = lambda path, key: median_of(runs.get(path, []), key)  # noqa: E731
    targets: list[dict[str, Any]] = []

    def add(name: str, figure: float, ok: bool | None, text: str, profile: str | None = None) -> None:
        status = "not measured" if not _ok(figure) else ("met" if ok else "missed")
        targets.append({"target": name, "figure": text if _ok(figure) else "n/a", "status": status,
                        "value": figure, "profile": profile})

    base_rps, full_rps = med("mitmdump", "tput-https-1k.rps"), med("chaperone-full", "tput-https-1k.rps")
    ratio = full_rps / base_rps if base_rps else math.nan
    cpu = med("chaperone-full", "tput-https-1k.cpu_us_per_req") / med("mitmdump", "tput-https-1k.cpu_us_per_req")
    std_rps = med("chaperone-full-asyncio", "tput-https-1k.rps")
    std = f"; on the asyncio loop {std_rps / base_rps:.2f}x" if _ok(std_rps) and base_rps else ""
    add("Chaperone full >= 0.95x bare mitmproxy throughput (HTTPS 1 KiB, c=32)", ratio, ratio >= 0.95,
        f"{ratio:.2f}x ({full_rps:,.0f} vs {base_rps:,.0f} req/s; CPU per request {cpu:.2f}x){std}", "chaperone-full@1k")
    added = (med("chaperone-full", "lat-https-1k.p50") - med("mitmdump", "lat-https-1k.p50")) * 1e3
    std_added = (med("chaperone-full-asyncio", "lat-https-1k.p50") - med("mitmdump", "lat-https-1k.p50")) * 1e3
    std = f"; on the asyncio loop {std_added:+.2f} ms" if _ok(std_added) else ""
    add("Chaperone full adds <= 0.5 ms p50 over bare mitmproxy (HTTPS 1 KiB, c=1)", added, added <= 0.5,
        f"{added:+.2f} ms ({med('chaperone-full', 'lat-https-1k.p50') * 1e3:.2f} vs "
        f"{med('mitmdump', 'lat-https-1k.p50') * 1e3:.2f} ms){std}", "chaperone-full@1k")
    variants = [v for v in ("chaperone-full", "chaperone-full-asyncio") if _ok(med(v, "tput-https-1k.rps"))]
    best = max(variants, key=lambda v: med(v, "tput-https-1k.rps")) if variants else "chaperone-full"
    stretch = med(best, "tput-https-1k.rps") / base_rps if base_rps else math.nan
    add("Stretch: Chaperone full >= 1.5x bare mitmproxy throughput", stretch, stretch >= 1.5,
        f"{stretch:.2f}x ({NAMES[best]})", f"{best}@1k")
    big = med("chaperone-full", "tput-https-1m.rps") / med("mitmdump", "tput-https-1m.rps")
    add("(informative) Chaperone full >= 0.95x bare mitmproxy throughput, HTTPS 1 MiB text (masking scans it all)",
        big, big >= 0.95, f"{big:.2f}x", "chaperone-full@1m")
    idle = med("chaperone-full", "rss_idle") / MB
    add("Chaperone full idle RSS <= 80 MB", idle, idle <= 80, f"{idle:.1f} MB")
    growth = med("chaperone-full", "download.rss_growth") / MB
    size = (data.get("meta", {}).get("params", {}).get("download_bytes") or 0) / (1 << 30)
    add(f"Chaperone full RSS growth over a 1 GiB download <= 50 MB (measured: {size:g} GiB)", growth,
        growth <= 50, f"{growth:.1f} MB")
    cp = data.get("controlplane") or {}
    p99 = _get(cp, "approval.api_patch.p99")
    add("Approval round trip (patch -> released) p99 <= 1 s", p99 if _ok(p99) else math.nan,
        _ok(p99) and p99 <= 1.0, f"{p99 * 1e3:.0f} ms (kubectl patch: "
        f"{(_get(cp, 'approval.kubectl_patch.p99') or math.nan) * 1e3:.0f} ms)" if _ok(p99) else "")
    def added_ms(variant: str, q: str) -> float:
        lab, unl = _get(cp, f"{variant}.api.labelled.{q}"), _get(cp, f"{variant}.api.unlabelled.{q}")
        return (lab - unl) * 1e3 if _ok(lab) and _ok(unl) else math.nan

    wh, before = added_ms("webhook", "p99"), added_ms("webhook_consistent_list", "p99")
    fixed = f"; before the fix (a consistent list, no resourceVersion): {before:+.1f} ms p99 " \
            f"({added_ms('webhook_consistent_list', 'p50'):+.1f} ms p50)" if _ok(before) else ""
    add("Injection webhook adds <= 30 ms p99 to pod admission", wh, wh <= 30,
        f"{wh:+.1f} ms p99 ({added_ms('webhook', 'p50'):+.1f} ms p50){fixed}")
    data["targets"] = targets
    data["targets16"] = _issue16_targets(runs, data.get("paired"))
    return {"targets": targets, "targets16": data["targets16"]}


def _issue16_targets(runs: dict, pairs: dict | None = None) -> list[dict[str, Any]]:
    """Issue 16's targets (the fast path), from the same run: Chaperone full against bare
    mitmproxy side by side. The throughput ratios come from the paired phase when it ran
    (``bench/paired.py``: median of per-pair ratios, quartiles shown), the ratio of the round
    medians beside them; without it, from the rounds alone. The SSE time-to-first-token target
    has its own benchmark (bench/sse_ttft.py, docs/benchmarks-sse.md)."""
    med = lambda path, key: median_of(runs.get(path, []), key)  # noqa: E731
    summary = (pairs or {}).get("summary") or {}
    targets: list[dict[str, Any]] = []

    def add(name: str, figure: float, ok: bool, text: str) -> None:
        status = "not measured" if not _ok(figure) else ("met" if ok else "missed")
        targets.append({"target": name, "figure": text if _ok(figure) else "n/a", "status": status, "value": figure})

    def ratio(key: str) -> float:
        base = med("mitmdump", key)
        return med("chaperone-full", key) / base if base else math.nan

    def figure(scenario: str, key: str, unit: str) -> tuple[float, str]:
        """(the ratio judged, its text): paired when measured, else the rounds' medians."""
        rounds, cpu = ratio(f"{key}.rps" if key != "download" else "download.mib_s"), ratio(
            f"{key}.cpu_us_per_req") if key != "download" else math.nan
        rounds_text = f"{rounds:.2f}x" + (f" (CPU per {unit} {cpu:.2f}x bare)" if _ok(cpu) else "")
        s = summary.get(scenario)
        if not s or not s.get("pairs"):
            return rounds, rounds_text
        (r1, r, r3), (c1, c, c3) = s["rate_ratio"], s["cpu_ratio"]
        return r, (f"{r:.2f}x paired (quartiles {r1:.2f}-{r3:.2f}, {s['pairs']} pairs; CPU per {unit} {c:.2f}x, "
                   f"{c1:.2f}-{c3:.2f}); rounds: {rounds_text}")

    rps, text = figure("tput-https-1k", "tput-https-1k", "request")
    add("Chaperone full >= 1.0x bare mitmproxy throughput (HTTPS 1 KiB, c=32; policy, masking, strict recording, "
        "telemetry)", rps, rps >= 1.0, text)
    added = (med("chaperone-full", "lat-https-1k.p50") - med("mitmdump", "lat-https-1k.p50")) * 1e3
    add("Chaperone full adds <= 0.3 ms p50 over bare mitmproxy (HTTPS 1 KiB, c=1)", added, added <= 0.3,
        f"{added:+.2f} ms")
    big, text = figure("tput-https-1m", "tput-https-1m", "request")
    add("Chaperone full >= 0.9x bare mitmproxy on 1 MiB text responses (HTTPS, c=32; every detector on)", big,
        big >= 0.9, text)
    idle = med("chaperone-full", "rss_idle") / MB
    add("Chaperone full idle RSS <= 80 MB", idle, idle <= 80, f"{idle:.1f} MB (bare mitmproxy "
        f"{med('mitmdump', 'rss_idle') / MB:.1f} MB)")
    dl, text = figure("download", "download", "MiB")
    growth = med("chaperone-full", "download.rss_growth") / MB
    add("1 GiB download >= 0.95x bare mitmproxy MB/s, RSS growth <= 50 MB", dl, dl >= 0.95 and growth <= 50,
        f"{text}; 1 GiB in the rounds: {med('chaperone-full', 'download.mib_s'):,.0f} vs "
        f"{med('mitmdump', 'download.mib_s'):,.0f} MiB/s, growth {growth:.1f} MB")
    return targets


def paired_table(result: dict[str, Any]) -> str:
    """The summary of a paired phase (``bench/paired.py``) as a Markdown table."""
    base, other = result["paths"]
    units = {"download": ("MiB/s", "ms CPU/MiB", 1e3, ",.2f")}
    lines = [f"| scenario | {base} | {other} | ratio: median (quartiles) | CPU per unit: {base} | {other} | "
             "CPU ratio: median (quartiles) | pairs |", "|---|---:|---:|---|---:|---:|---|---:|"]
    for scenario, s in result["summary"].items():
        rate_unit, cpu_unit, scale, spec = units.get(scenario, ("req/s", "µs CPU/req", 1e6, ",.0f"))
        r, c = s["rate_ratio"], s["cpu_ratio"]
        lines.append(
            f"| {scenario} ({rate_unit}) | {s['rate'][base]:,.0f} | {s['rate'][other]:,.0f} | "
            f"{r[1]:.2f}x ({r[0]:.2f}-{r[2]:.2f}) | {s['cpu_per_unit'][base] * scale:{spec}} | "
            f"{s['cpu_per_unit'][other] * scale:{spec}} {cpu_unit} | {c[1]:.2f}x ({c[0]:.2f}-{c[2]:.2f}) | "
            f"{s['pairs']} |")
    return "\n".join(lines)


def _paired(data: dict) -> list[str]:
    pairs = data.get("paired")
    if not pairs:
        return []
    head = ["## Paired bursts: bare mitmproxy and Chaperone full side by side", ""]
    if pairs.get("error"):
        return head + [f"Failed: `{pairs['error']}`", ""]
    prm = pairs.get("params", {})
    return head + [
        f"Both proxies up at once, taking turns (order flipping every pair) at bursts of "
        f"{prm.get('burst_s', 0):g} s (HTTPS, concurrency {prm.get('concurrency', 0)}) and a "
        f"{prm.get('download_bytes', 0) / (1 << 20):,.0f} MiB download; each burst's CPU includes the work its "
        "proxy finished after it (recording shipped to S3) - `bench/paired.py`. Ratios are Chaperone full over "
        "bare mitmproxy per pair: median and quartiles (the spread is the machine's noise).", "",
        paired_table(pairs), ""]


# ---------------------------------------------------------------------------- markdown

def _f(v: Any, spec: str, scale: float = 1.0, suffix: str = "") -> str:
    return format(v * scale, spec) + suffix if _ok(v) else "n/a"


def _table(head: list[str], rows: list[list[str]]) -> list[str]:
    out = ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
    return out + ["| " + " | ".join(r) + " |" for r in rows]


def _throughput(data: dict, scenario: str, title: str) -> list[str]:
    runs, key = data["paths"], f"{scenario}.rps"
    base, direct = median_of(runs.get("mitmdump", []), key), median_of(runs.get("direct", []), key)
    rows = []
    for path, rounds in runs.items():
        m, (lo, hi) = median_of(rounds, key), _spread(rounds, key)
        rows.append([NAMES.get(path, path), _f(m, ",.0f"), f"{_f(lo, ',.0f')}-{_f(hi, ',.0f')}",
                     _f(m / base if base else math.nan, ".2f", suffix="x"),
                     _f(m / direct if direct else math.nan, ".2f", suffix="x"),
                     _f(median_of(rounds, f"{scenario}.cpu_us_per_req"), ",.0f"),
                     _f(median_of(rounds, f"{scenario}.p50"), ".2f", 1e3), str(_errors(rounds, scenario))])
    return [f"### {title}", ""] + _table(
        ["path", "req/s", "min-max", "x bare mitmproxy", "x direct", "proxy CPU µs/req", "p50 ms", "errors"], rows) + [""]


def _latency(data: dict, scenario: str, title: str) -> list[str]:
    runs = data["paths"]
    base, direct = (median_of(runs.get(p, []), f"{scenario}.p50") for p in ("mitmdump", "direct"))
    rows = []
    for path, rounds in runs.items():
        p50 = median_of(rounds, f"{scenario}.p50")
        rows.append([NAMES.get(path, path), _f(p50, ".2f", 1e3), _f(median_of(rounds, f"{scenario}.p90"), ".2f", 1e3),
                     _f(median_of(rounds, f"{scenario}.p99"), ".2f", 1e3), _f(p50 - base, "+.2f", 1e3),
                     _f(p50 - direct, "+.2f", 1e3), _f(p50 / base if base else math.nan, ".2f", suffix="x"),
                     str(_errors(rounds, scenario))])
    return [f"### {title}", ""] + _table(["path", "p50 ms", "p90 ms", "p99 ms", "p50 vs bare mitmproxy",
                                         "p50 vs direct", "p50 x bare mitmproxy", "errors"], rows) + [""]


def _memory(data: dict) -> list[str]:
    rows = []
    for path, rounds in data["paths"].items():
        if path == "direct":
            continue
        rows.append([NAMES.get(path, path), _f(median_of(rounds, "rss_idle"), ".1f", 1 / MB),
                     _f(median_of(rounds, "rss_warm"), ".1f", 1 / MB), _f(median_of(rounds, "download.rss_peak"), ".1f", 1 / MB),
                     _f(median_of(rounds, "download.rss_growth"), ".1f", 1 / MB),
                     _f(median_of(rounds, "download.mib_s"), ",.0f"), _f(median_of(rounds, "startup_s"), ".2f")])
    direct = median_of(data["paths"].get("direct", []), "download.mib_s")
    size = data["meta"]["params"]["download_bytes"] / (1 << 20)
    return ["### Memory and the large download", "",
            f"RSS of the proxy's process tree (MB = 10^6 bytes): idle after start-up, warm after the load scenarios, "
            f"and the peak sampled every 20 ms during a {size:,.0f} MiB HTTPS download (growth = peak - RSS just "
            f"before it). Direct download: {_f(direct, ',.0f')} MiB/s.", ""] + _table(
        ["path", "idle MB", "warm MB", "peak MB", "growth MB", "download MiB/s", "start-up s"], rows) + [""] + _footprint(data)


def _footprint(data: dict) -> list[str]:
    rows = [[label, _f(size, ".1f", 1 / MB)] for label, size in data.get("footprint") or []]
    if not rows:
        return []
    return ["Where an idle Chaperone's RSS comes from: what each group of its imports adds, measured in a fresh "
            "interpreter importing them in this order (`bench/rss.py` `import_footprint`).", ""] + _table(
        ["imports", "adds MB"], rows) + [""]


def _sse(data: dict) -> list[str]:
    rows = []
    for path, rounds in data["paths"].items():
        rows.append([NAMES.get(path, path), _f(median_of(rounds, "sse-https-first.p50"), ".2f", 1e3),
                     _f(median_of(rounds, "sse-https-total.p50"), ".2f", 1e3),
                     _f(median_of(rounds, "sse-https-total.p99"), ".2f", 1e3), str(_errors(rounds, "sse-https-total"))])
    events = data["meta"]["params"]["sse_events"]
    return [f"### SSE stream (HTTPS, {events} events of ~100 bytes, concurrency 1)", ""] + _table(
        ["path", "first event p50 ms", "whole stream p50 ms", "whole stream p99 ms", "errors"], rows) + [""]


def _uvloop(data: dict) -> list[str]:
    runs, rows = data["paths"], []
    for profile in ("minimal", "full"):
        a, b = runs.get(f"chaperone-{profile}-asyncio", []), runs.get(f"chaperone-{profile}", [])
        if not a or not b:
            continue
        for label, key, spec, scale in (("HTTPS 1 KiB req/s (c=32)", "tput-https-1k.rps", ",.0f", 1),
                                        ("HTTP 1 KiB req/s (c=32)", "tput-http-1k.rps", ",.0f", 1),
                                        ("proxy CPU µs/req (HTTPS 1 KiB)", "tput-https-1k.cpu_us_per_req", ",.0f", 1),
                                        ("HTTPS 1 KiB p50 ms (c=1)", "lat-https-1k.p50", ".2f", 1e3),
                                        ("1 GiB download MiB/s", "download.mib_s", ",.0f", 1),
                                        ("idle RSS MB", "rss_idle", ".1f", 1 / MB)):
            x, y = median_of(a, key), median_of(b, key)
            rows.append([f"Chaperone {profile}", label, _f(x, spec, scale), _f(y, spec, scale),
                         _f(y / x if _ok(x) and x else math.nan, ".2f", suffix="x")])
    if not rows:
        return []
    return ["## uvloop: before / after", "", "The same Chaperone process on the standard asyncio loop "
            "(`CHAPERONE_EVENT_LOOP=asyncio`) and on uvloop, the sidecar's default since this run "
            "(`auto`: uvloop when installed; it is a dependency).", ""] + _table(
        ["path", "metric", "asyncio", "uvloop", "after / before"], rows) + [""]


def _ablation(data: dict) -> list[str]:
    runs = data.get("ablation") or {}
    full = runs.get("chaperone-full", [])
    if not full:
        return []
    f_cpu, f_p50 = median_of(full, "tput-https-1k.cpu_us_per_req"), median_of(full, "lat-https-1k.p50")
    rows = []
    for name, rounds in runs.items():
        cpu, p50 = median_of(rounds, "tput-https-1k.cpu_us_per_req"), median_of(rounds, "lat-https-1k.p50")
        label = NAMES.get(name) or name.replace("chaperone-full-without-", "Chaperone full without ")
        rows.append([label, _f(median_of(rounds, "tput-https-1k.rps"), ",.0f"), _f(cpu, ",.0f"), _f(cpu - f_cpu, "+,.0f"),
                     _f(p50, ".2f", 1e3), _f(p50 - f_p50, "+.2f", 1e3), str(_errors(rounds, "tput-https-1k"))])
    n = max(len(r) for r in runs.values())
    return ["## What each feature of the full profile costs (ablation)", "",
            f"Chaperone full with one feature switched off at a time, and minimal, HTTPS 1 KiB; {n} alternating "
            "round(s), medians. A feature's cost is what switching it off saves (negative deltas).", ""] + _table(
        ["variant", "req/s (c=32)", "proxy CPU µs/req", "vs full", "p50 ms (c=1)", "vs full", "errors"], rows) + [""]


def _controlplane(data: dict) -> list[str]:
    cp = data.get("controlplane")
    if not cp:
        return ["## Control plane", "", "Not measured in this run (`--no-controlplane`).", ""]
    if cp.get("error"):
        return ["## Control plane", "", f"Failed: `{cp['error']}`", ""]
    ms = lambda d, k: _f(_get(d, k), ".1f", 1e3)  # noqa: E731
    out = ["## Control plane (real kube-apiserver of the test bed)", "", "### Approval round trip: patch -> released", ""]
    rows = [[label, str(_get(cp, f"approval.{k}.n")), ms(cp, f"approval.{k}.p50"), ms(cp, f"approval.{k}.p90"),
             ms(cp, f"approval.{k}.p99"), ms(cp, f"approval.{k}.max")]
            for label, k in (("merge-PATCH over a kept-alive connection", "api_patch"), ("`kubectl patch` (process)", "kubectl_patch"))]
    out += _table(["approver's patch", "n", "p50 ms", "p90 ms", "p99 ms", "max ms"], rows) + [""]
    if cp["approval"].get("failures"):
        out += [f"Failures: {cp['approval']['failures']}", ""]
    out += ["### Injection webhook: pod admission with and without the label", ""]
    rows = []
    for variant, label in (("webhook", "operator's way (connections from the watch cache, resourceVersion=0)"),
                           ("webhook_consistent_list", "before the fix (a consistent list)")):
        if variant not in cp:
            continue
        for how in ("api", "kubectl"):
            for kind in ("labelled", "unlabelled"):
                if _get(cp, f"{variant}.{how}.{kind}.n"):
                    rows.append([label, "POST (kept alive)" if how == "api" else "`kubectl create`", kind,
                                 str(_get(cp, f"{variant}.{how}.{kind}.n")), ms(cp, f"{variant}.{how}.{kind}.p50"),
                                 ms(cp, f"{variant}.{how}.{kind}.p99")])
        rows.append([label, "webhook handler alone", "labelled", str(_get(cp, f"{variant}.handler.n")),
                     ms(cp, f"{variant}.handler.p50"), ms(cp, f"{variant}.handler.p99")])
        rows.append([label, "of which: listing connections", "labelled", str(_get(cp, f"{variant}.handler_list.n")),
                     ms(cp, f"{variant}.handler_list.p50"), ms(cp, f"{variant}.handler_list.p99")])
    return out + _table(["webhook", "create", "pods", "n", "p50 ms", "p99 ms"], rows) + [""]


# Stack roots every sample shares: the event loop and the entry points.
_TRIVIAL = re.compile(r"\((asyncio/(runners|base_events|events)|threading|bench/chaperone_proc|mitmproxy/tools/main|"
                      r"chaperone_sidecar/(proxy|sidecar_cli))\.py\)|^<module>")


def _profiles(data: dict) -> list[str]:
    profiles = data.get("profiles") or {}
    if not profiles:
        return []
    out = ["## Profiles (py-spy, HTTPS 1 KiB at concurrency 32)", "",
           "Shares of the samples py-spy took while the process was busy (all threads). *component*: the addon hook or "
           "helper a sample belongs to; *self*: the innermost frame; *total*: anywhere on the stack (event-loop "
           "frames every sample shares left out).", ""]
    for key, prof in profiles.items():
        name, _, size = key.partition("@")
        body = {"1k": "1 KiB", "1m": "1 MiB"}.get(size, size)
        out += [f"### {NAMES.get(name, name)}, HTTPS {body} ({prof.get('samples', 0)} samples)", ""]
        if prof.get("error"):
            out += [f"py-spy failed: `{prof['error']}`", ""]
            continue
        rows = [[f"`{f}`", f"{s:.1%}"] for f, s in prof.get("components", [])[:15]]
        out += _table(["component (first Chaperone frame, else mitmproxy addon / library)", "share"], rows) + [""]
        rows = [[f"`{f}`", f"{s:.1%}"] for f, s in prof.get("self", [])[:15]]
        out += _table(["self", "share"], rows) + [""]
        rows = [[f"`{f}`", f"{s:.1%}"] for f, s in prof.get("total", []) if not _TRIVIAL.search(f)][:15]
        out += _table(["total", "share"], rows) + [""]
    return out


ANALYSIS = Path(__file__).with_name("analysis.md")


def render(data: dict, notes: str | None = None) -> str:
    """The whole Markdown document; ``notes`` (default: bench/analysis.md, the hand-written
    reading of the misses) goes right after the targets."""
    summarise(data)
    if notes is None:
        notes = ANALYSIS.read_text().strip() if ANALYSIS.exists() else ""
    meta, p = data["meta"], data["meta"]["params"]
    out = ["# Benchmarks", "", "Generated by `python bench/run.py" + (" --quick" if meta["mode"] == "quick" else "")
           + "` (`make bench-proxy`); do not edit by hand - rerun it. " + f"Run {meta.get('started', '')} - "
           f"{meta.get('finished', '')}, {p['rounds']} alternating round(s) per path, medians over rounds.", ""]
    out += ["## Targets (issue 7)", ""] + _table(["target", "figure", "status"], [
        [t["target"], t["figure"], f"**{t['status']}**"] for t in data["targets"]]) + [""]
    out += ["## Targets (issue 16: the fast path)", ""] + _table(["target", "figure", "status"], [
        [t["target"], t["figure"], f"**{t['status']}**"] for t in data["targets16"]]) + [""]
    if notes:
        out += [notes, ""]
    out += _paired(data)
    out += ["## Machine and versions", ""] + _machine_rows(meta) + [""]
    out += ["## Proxy paths", ""]
    out += _throughput(data, "tput-https-1k", "Throughput: HTTPS intercepted, 1 KiB, concurrency 32")
    out += _throughput(data, "tput-http-1k", "Throughput: HTTP, 1 KiB, concurrency 32")
    out += _throughput(data, "wrk-http-1k", "Throughput: HTTP, 1 KiB, concurrency 32, wrk (absolute-form URIs)")
    out += _throughput(data, "tput-https-1m", "Throughput: HTTPS intercepted, 1 MiB, concurrency 32")
    out += _throughput(data, "tput-http-1m", "Throughput: HTTP, 1 MiB, concurrency 32")
    out += _latency(data, "lat-https-1k", "Latency: HTTPS intercepted, 1 KiB, concurrency 1")
    out += _latency(data, "lat-http-1k", "Latency: HTTP, 1 KiB, concurrency 1")
    out += _latency(data, "lat-https-1m", "Latency: HTTPS intercepted, 1 MiB, concurrency 1")
    out += _latency(data, "lat-http-1m", "Latency: HTTP, 1 MiB, concurrency 1")
    out += _sse(data) + _memory(data) + _uvloop(data) + _controlplane(data) + _ablation(data) + _profiles(data)
    failed = [(path, r["round"], r.get("error") or "", r.get("log_tail", "")) for path, rounds in data["paths"].items()
              for r in rounds if r.get("error") or r.get("log_tail")]
    if failed:
        out += ["## Errors seen", ""]
        for path, rnd, err, tail in failed:
            out += [f"- {NAMES.get(path, path)}, round {rnd}: {err.splitlines()[0] if err else 'request errors'}"]
    return "\n".join(out).rstrip() + "\n"


def _loads(values: Any) -> str:
    return "/".join(f"{v:.2f}" for v in values) if values else "?"


def _machine_rows(meta: dict) -> list[str]:
    rows = [["CPU", f"{meta['cpu_model']}, {meta['nproc']} CPUs (proxy pinned to CPU {meta.get('proxy_cpus')}; "
                    f"client, wrk and upstream to {meta.get('client_cpus')})"],
            ["memory", f"{meta['memory_gib']:.1f} GiB"], ["kernel", meta["kernel"]],
            ["load average 1/5/15 min", f"before {_loads(meta.get('load_before'))}, after {_loads(meta.get('load_after'))}"],
            ["Python", meta["python"]], ["mitmproxy", meta["mitmproxy"]], ["Squid", meta["squid"]],
            ["aiohttp (client and upstream)", f"{meta['aiohttp']} on {meta.get('harness_loop')}"],
            ["uvloop", meta["uvloop"]], ["opentelemetry-sdk", meta["opentelemetry-sdk"]],
            ["OpenSSL", meta["openssl"]], ["wrk", meta["wrk"]],
            ["Hyperscan (masking)", meta.get("hyperscan", "the hyperscan wheel (not recorded)")]]
    return _table(["", ""], rows)


if __name__ == "__main__":  # re-render from a results.json: python -m bench.report RESULTS OUT
    import json

    Path(sys.argv[2]).write_text(render(json.loads(Path(sys.argv[1]).read_text())))
