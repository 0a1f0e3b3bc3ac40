"""Benchmark entry point: every path side by side, alternating, then the control plane.

    python bench/run.py [--quick] [--out docs/benchmarks.md] [--paths a,b] [--rounds N]

One *round* starts each path fresh (in a rotating order: A B C, B C A, ... so no path always
runs first or last), measures its idle RSS and the 1 GiB download, runs every other scenario
through it and stops it. Reported figures are medians over rounds - never a single run - and
ratios are taken against bare mitmproxy and against direct. Then the control-plane latencies on
a real kube-apiserver, then, for each proxy target that was missed, an ablation (Chaperone full
minus one feature at a time) and py-spy profiles. The report is ``--out``; the raw results go
to ``--json`` (default ``results.json`` in the run's work dir, which also keeps every process's
log). ``python -m bench.report RESULTS.json OUT.md`` re-renders a report from them.

Scenarios per path and round (HTTP and HTTPS-intercepted, 1 KiB and 1 MiB): concurrency-1
latency, concurrency-32 throughput (with the proxy's CPU time per request), wrk for plain
HTTP, an SSE stream, and a 1 GiB download with peak-RSS sampling.

After the rounds, the *paired* phase (``bench/paired.py``): bare mitmproxy and Chaperone full
run side by side and take turns at short bursts (HTTPS 1 KiB, 1 MiB text, a download), so the
ratios issue 16 sets targets on are medians of per-pair ratios, seconds apart, not ratios of
medians of rounds minutes apart (``--paired-only`` runs just that phase).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import tempfile
import time
import traceback
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
for _p in (REPO, REPO / "sidecar", REPO / "operator", REPO / "testbed"):
    if str(_p) not in sys.path:
        sys.path.insert(0, str(_p))

from bench import load, paired, paths, report, rss  # noqa: E402
from bench.upstream import SIZES, Upstream  # noqa: E402

__all__ = ["Params", "FULL", "QUICK", "measure_path", "run_paths", "main"]

SCHEMES, BODY_SIZES = ("http", "https"), ("1k", "1m")


@dataclass
class Params:
    """Counts and bounds of one run (:data:`FULL`, :data:`QUICK`; the smoke test's tiny ones).

    Every load loop is bounded by a count *and* a time (``*_n``/``*_max``, ``*_s``).
    """

    rounds: int = 5
    lat_n: dict[str, int] = field(default_factory=lambda: {"1k": 400, "1m": 60})
    lat_max_s: float = 12.0
    concurrency: int = 32
    tput_s: float = 4.0
    tput_max: int = 200_000
    wrk_s: int = 4
    sse_streams: int = 30
    sse_events: int = 100
    download_bytes: int = 1 << 30
    download_max_s: float = 240.0
    settle_s: float = 1.5
    approvals_n: int = 40
    webhook_n: int = 60
    kubectl_n: int = 8
    profile_s: float = 8.0
    ablation_rounds: int = 3
    # bench/paired.py: bare mitmproxy and Chaperone full up side by side, short bursts alternating
    paired_bursts: paired.PairedParams = field(default_factory=paired.PairedParams)


FULL = Params()
QUICK = Params(rounds=1, lat_n={"1k": 60, "1m": 10}, lat_max_s=5, tput_s=1.5, wrk_s=1, sse_streams=5,
               download_bytes=64 << 20, download_max_s=60, settle_s=1.0, approvals_n=5, webhook_n=10,
               kubectl_n=2, profile_s=3, ablation_rounds=1,
               paired_bursts=paired.PairedParams(pairs=2, burst_s=0.5, download_bytes=32 << 20))
PAIRED_PATHS = ("mitmdump", "chaperone-full")


def _samples(s: load.Samples) -> dict[str, Any]:
    return {"p50": s.p(50), "p90": s.p(90), "p99": s.p(99), "n": len(s.values), "errors": s.errors,
            "first_error": s.first_error}


def _rate(r: load.Rate, cpu: float | None = None, extra: int = 0) -> dict[str, Any]:
    out = {"rps": r.rps, "requests": r.requests, "seconds": r.seconds, "errors": r.errors,
           "first_error": r.first_error, "p50": r.latency_p50, "p99": r.latency_p99}
    if cpu is not None and r.requests:
        out["cpu_us_per_req"] = cpu / (r.requests + extra) * 1e6
    return out


def measure_path(path: paths.ProxyPath, env: paths.Env, p: Params, client_cpus: set[int] | None = None) -> dict:
    """One round of one path: start, idle RSS, 1 GiB download, every scenario, stop."""
    up, ctx, res = env.upstream, load.client_ssl(env.client_cafiles), {}
    started = time.monotonic()
    try:
        path.start(env)
    except Exception as exc:  # noqa: BLE001 - reported; the other paths still run
        return {"error": f"start failed: {exc}"}
    res["startup_s"] = time.monotonic() - started
    pid = path.pid
    try:
        if pid:
            res["rss_idle"] = rss.settle(pid, p.settle_s)
        # The download first, on a process that has served one request only: its growth is
        # then the download's, not what the load scenarios left allocated.
        asyncio.run(load.latency(up.url("https", "/1k"), path.proxy, ctx, expect=SIZES["1k"], n=1,
                                 max_seconds=10, warmup=0))
        dl_url = up.url("https", "/bytes")
        if pid:
            before = rss.tree_rss(pid)
            with rss.PeakSampler(pid) as sampler:
                r = asyncio.run(load.download(dl_url, path.proxy, ctx, size=p.download_bytes, max_seconds=p.download_max_s))
            res["download"] = {**_rate(r), "rss_before": before, "rss_peak": sampler.peak,
                               "rss_growth": sampler.peak - before, "samples": sampler.samples}
        else:
            r = asyncio.run(load.download(dl_url, None, ctx, size=p.download_bytes, max_seconds=p.download_max_s))
            res["download"] = _rate(r)
        res["download"]["mib_s"] = p.download_bytes / (1 << 20) / r.seconds if r.requests else 0.0
        for scheme in SCHEMES:
            for size in BODY_SIZES:
                s = asyncio.run(load.latency(up.url(scheme, f"/{size}"), path.proxy, ctx, expect=SIZES[size],
                                             n=p.lat_n[size], max_seconds=p.lat_max_s))
                res[f"lat-{scheme}-{size}"] = _samples(s)
        for scheme in SCHEMES:
            for size in BODY_SIZES:
                cpu0 = rss.cpu_seconds(pid) if pid else None
                r = asyncio.run(load.throughput(up.url(scheme, f"/{size}"), path.proxy, ctx, expect=SIZES[size],
                                                concurrency=p.concurrency, seconds=p.tput_s, max_requests=p.tput_max))
                cpu = rss.cpu_seconds(pid) - cpu0 if pid and cpu0 is not None else None
                res[f"tput-{scheme}-{size}"] = _rate(r, cpu, p.concurrency)
        cpu0 = rss.cpu_seconds(pid) if pid else None
        r = load.wrk(up.url("http", "/1k"), path.port or None, env.workdir, connections=p.concurrency,
                     seconds=p.wrk_s, cpus=client_cpus)
        res["wrk-http-1k"] = _rate(r, rss.cpu_seconds(pid) - cpu0 if pid and cpu0 is not None else None)
        first, total = asyncio.run(load.sse(up.url("https", "/sse"), path.proxy, ctx, events=p.sse_events,
                                            streams=p.sse_streams, max_seconds=p.lat_max_s * 2))
        res["sse-https-first"], res["sse-https-total"] = _samples(first), _samples(total)
        res["rss_warm"] = rss.tree_rss(pid) if pid else None
    except Exception as exc:  # noqa: BLE001
        res["error"] = f"{type(exc).__name__}: {exc}\n{traceback.format_exc()[-1500:]}"
    finally:
        res["exit_code"] = path.stop()
    errors = sum(v.get("errors", 0) for v in res.values() if isinstance(v, dict))
    if errors or res.get("error") or res["exit_code"] not in (0, None):
        res["log_tail"] = path.logs()[-2500:]
    return res


def _cpus() -> tuple[set[int] | None, set[int] | None]:
    """(proxy CPUs, client + upstream CPUs): the last core for the proxy when there are 2+."""
    cpus = sorted(os.sched_getaffinity(0))
    if len(cpus) < 2:
        return None, None
    return {cpus[-1]}, set(cpus[:-1])


def _harness_loop() -> str:
    try:
        import uvloop  # noqa: F401
    except ImportError:
        return "asyncio"
    return "uvloop"


def setup_env(workdir: Path, names: list[str], harness_loop: str,
              cpus: tuple[set[int] | None, set[int] | None] = (None, None),
              otlp_out: Path | None = None) -> tuple[paths.Env, list[Any]]:
    """Upstream (also the OTLP sink; ``otlp_out`` keeps the spans it receives), interception
    CA and (for chaperone-full) the S3 server + bucket."""
    proxy_cpus, client_cpus = cpus
    closers: list[Any] = []
    upstream = Upstream(workdir / "upstream", loop=harness_loop, cpus=client_cpus, otlp_out=otlp_out).start()
    closers.append(upstream.stop)
    env = paths.Env(workdir, upstream, paths.interception_ca(workdir / "ca"), proxy_cpus=proxy_cpus)
    if any(n.startswith("chaperone-full") for n in names):
        import boto3

        from chaperone_testbed.services import S3Server

        env.s3 = S3Server().start()
        closers.append(env.s3.close)
        boto3.client("s3", **env.s3.client_kwargs()).create_bucket(Bucket=env.s3_bucket)
    return env, closers


def run_paths(names: list[str], p: Params, workdir: Path, log=print,
              cpus: tuple[set[int] | None, set[int] | None] = (None, None)) -> tuple[dict, paths.Env, list]:
    """Alternating rounds over ``names``; returns ({path: [round results]}, env, closers).

    ``cpus``: (proxy CPUs, client CPUs) from :func:`_cpus`, taken before this process pinned
    itself to the client CPUs (children inherit the affinity of their parent).
    """
    env, closers = setup_env(workdir, names, _harness_loop(), cpus)
    client_cpus = cpus[1]
    results: dict[str, list[dict]] = {n: [] for n in names}
    for rnd in range(p.rounds):
        order = names[rnd % len(names):] + names[:rnd % len(names)]
        for name in order:
            t0 = time.monotonic()
            res = measure_path(paths.make_path(name), env, p, client_cpus)
            res["round"] = rnd + 1
            results[name].append(res)
            tput = res.get("tput-https-1k", {}).get("rps")
            log(f"round {rnd + 1}/{p.rounds} {name:26s} {time.monotonic() - t0:5.1f}s  "
                f"https 1k: {tput or 0:7.0f} req/s  {res.get('error', '')[:200]}")
    return results, env, closers


ABLATION = ["chaperone-full", "chaperone-full-without-recording", "chaperone-full-without-masking",
            "chaperone-full-without-telemetry", "chaperone-minimal"]


def measure_short(path: paths.ProxyPath, env: paths.Env, p: Params) -> dict:
    """HTTPS 1 KiB only: concurrency-1 latency and concurrency-32 throughput with CPU/request."""
    up, ctx, res = env.upstream, load.client_ssl(env.client_cafiles), {}
    try:
        path.start(env)
        s = asyncio.run(load.latency(up.url("https", "/1k"), path.proxy, ctx, expect=SIZES["1k"],
                                     n=p.lat_n["1k"], max_seconds=p.lat_max_s))
        res["lat-https-1k"] = _samples(s)
        cpu0 = rss.cpu_seconds(path.pid)
        r = asyncio.run(load.throughput(up.url("https", "/1k"), path.proxy, ctx, expect=SIZES["1k"],
                                        concurrency=p.concurrency, seconds=p.tput_s, max_requests=p.tput_max))
        res["tput-https-1k"] = _rate(r, rss.cpu_seconds(path.pid) - cpu0, p.concurrency)
    except Exception as exc:  # noqa: BLE001
        res["error"] = f"{type(exc).__name__}: {exc}"
    finally:
        res["exit_code"] = path.stop()
    return res


def _ablation(summary: dict, env: paths.Env, p: Params, log) -> dict[str, list[dict]]:
    """When Chaperone full misses a proxy target: the full profile minus one feature at a time
    (and minimal), alternating like the main rounds - what each feature costs."""
    if env.s3 is None or not any(t["status"] == "missed" and (t.get("profile") or "").startswith("chaperone-full")
                                 for t in summary["targets"]):
        return {}
    out: dict[str, list[dict]] = {n: [] for n in ABLATION}
    for rnd in range(p.ablation_rounds):
        for name in ABLATION[rnd % len(ABLATION):] + ABLATION[:rnd % len(ABLATION)]:
            res = measure_short(paths.make_path(name), env, p)
            res["round"] = rnd + 1
            out[name].append(res)
            log(f"ablation round {rnd + 1}/{p.ablation_rounds} {name:34s} "
                f"{res.get('tput-https-1k', {}).get('rps', 0):7.0f} req/s {res.get('error', '')}")
    return out


def _profiles(summary: dict, env: paths.Env, p: Params, log) -> dict[str, Any]:
    """py-spy on each Chaperone path behind a missed proxy target, next to bare mitmproxy.

    Targets name what to profile as ``path@size`` (HTTPS, concurrency 32); bare mitmproxy is
    profiled on the same load for comparison.
    """
    from bench import profile

    wanted = [t["profile"] for t in summary["targets"] if t.get("profile") and t["status"] == "missed"]
    if not wanted or profile.PY_SPY is None:
        return {}
    sizes = sorted({w.split("@")[1] for w in wanted})
    out: dict[str, Any] = {}
    for key in dict.fromkeys([f"mitmdump@{size}" for size in sizes] + wanted):
        name, size = key.split("@")
        path = paths.make_path(name).start(env)
        try:
            ctx = load.client_ssl(env.client_cafiles)
            url = env.upstream.url("https", f"/{size}")
            out[key] = profile.profile_under_load(
                path.pid, env.workdir, p.profile_s,
                lambda: load.throughput(url, path.proxy, ctx, expect=SIZES[size], concurrency=p.concurrency,
                                        seconds=p.profile_s + 1, max_requests=p.tput_max), key.replace("@", "-"))
            out[key].pop("load", None)
            log(f"profiled {key}: {out[key].get('samples', 0)} samples")
        finally:
            path.stop()
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Chaperone proxy benchmarks (issue 7)")
    parser.add_argument("--quick", action="store_true", help="one round, small counts, 64 MiB download")
    parser.add_argument("--out", default=str(REPO / "docs" / "benchmarks.md"), help="Markdown report")
    parser.add_argument("--json", default=None, help="raw results as JSON (default: results.json in the work dir)")
    parser.add_argument("--paths", default=None, help=f"comma-separated, of: {', '.join(paths.PATH_NAMES)} "
                        "(default: all)")
    parser.add_argument("--rounds", type=int, default=None)
    parser.add_argument("--no-controlplane", action="store_true", help="skip the apiserver measurements")
    parser.add_argument("--no-profile", action="store_true", help="skip py-spy on misses")
    parser.add_argument("--paired-only", action="store_true",
                        help="only the paired phase (bare mitmproxy and Chaperone full); prints its table")
    parser.add_argument("--pairs", type=int, default=None, help="pairs of bursts per scenario in the paired phase")
    args = parser.parse_args(argv)
    p = QUICK if args.quick else FULL
    if args.rounds:
        p.rounds = args.rounds
    if args.pairs:
        p.paired_bursts.pairs = args.pairs
    if args.paths:
        names = [n.strip() for n in args.paths.split(",") if n.strip()]
    else:
        names = list(paths.PATH_NAMES)
    for n in names:
        paths.make_path(n)  # validates the name
    cpus = _cpus()
    meta = report.machine_info(load_before=os.getloadavg())
    if cpus[1]:
        os.sched_setaffinity(0, cpus[1])
    harness = _harness_loop()
    if harness == "uvloop":
        import uvloop

        asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    meta.update(mode="quick" if args.quick else "full", params=asdict(p), paths=names, harness_loop=harness,
                proxy_cpus=sorted(cpus[0] or []), client_cpus=sorted(cpus[1] or []),
                started=time.strftime("%Y-%m-%d %H:%M:%S %Z"))
    workdir = Path(tempfile.mkdtemp(prefix="chaperone-bench-"))
    if args.paired_only:
        return _paired_only(workdir, p, cpus)
    print(f"work dir {workdir}; {p.rounds} round(s) over {', '.join(names)}", flush=True)
    results, env, closers = run_paths(names, p, workdir, log=lambda m: print(m, flush=True), cpus=cpus)
    data: dict[str, Any] = {"meta": meta, "paths": results}
    try:
        data["footprint"] = rss.import_footprint(sys.executable, os.pathsep.join(
            str(REPO / d) for d in ("sidecar", "operator", "testbed")))
    except Exception as exc:  # noqa: BLE001 - an explanation, not a measurement
        data["footprint"] = [(f"failed: {exc}", 0)]
    try:
        if all(n in names for n in PAIRED_PATHS):
            print("paired bursts: bare mitmproxy and Chaperone full side by side ...", flush=True)
            try:
                data["paired"] = paired.run_paired(PAIRED_PATHS, env, p.paired_bursts,
                                                   log=lambda m: print(m, flush=True))
            except Exception as exc:  # noqa: BLE001 - reported in the document
                data["paired"] = {"error": f"{type(exc).__name__}: {exc}"}
        if not args.no_controlplane:
            from bench.controlplane import run_controlplane

            print("control plane: approval round trip and injection webhook ...", flush=True)
            try:
                data["controlplane"] = run_controlplane(workdir / "controlplane", approvals_n=p.approvals_n,
                                                        webhook_n=p.webhook_n, kubectl_n=p.kubectl_n)
            except Exception as exc:  # noqa: BLE001 - reported in the document
                data["controlplane"] = {"error": f"{type(exc).__name__}: {exc}"}
        summary = report.summarise(data)
        if not args.no_profile:
            data["ablation"] = _ablation(summary, env, p, log=lambda m: print(m, flush=True))
            data["profiles"] = _profiles(summary, env, p, log=lambda m: print(m, flush=True))
    finally:
        for close in reversed(closers):
            close()
    meta["load_after"] = os.getloadavg()
    meta["finished"] = time.strftime("%Y-%m-%d %H:%M:%S %Z")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(report.render(data))
    json_out = Path(args.json) if args.json else workdir / "results.json"
    json_out.write_text(json.dumps(data, indent=1, default=str))
    print(f"wrote {out} and {json_out} (logs of every process under {workdir})")
    return 0


def _paired_only(workdir: Path, p: Params, cpus: tuple[set[int] | None, set[int] | None]) -> int:
    env, closers = setup_env(workdir, list(PAIRED_PATHS), _harness_loop(), cpus)
    try:
        result = paired.run_paired(PAIRED_PATHS, env, p.paired_bursts, log=lambda m: print(m, flush=True))
    finally:
        for close in reversed(closers):
            close()
    print(f"\n{time.strftime('%Y-%m-%d %H:%M:%S %Z')}, load average {os.getloadavg()}\n"
          f"{report.paired_table(result)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
