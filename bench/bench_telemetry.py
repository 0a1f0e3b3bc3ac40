"""Telemetry's CPU per flow, measured alone: the ``Telemetry`` addon with the SDK as
``setup_telemetry`` builds it (BatchSpanProcessor + OTLP/HTTP exporter, periodic OTLP metric
reader, the Prometheus reader), exporting to a sink in another process, fed flows shaped like
the proxy benchmark's (HTTPS GET of 1 KiB, identity, connection, allow decision).

    python bench/bench_telemetry.py [--flows 5000] [--repeat 5] [--profile] [--root CHECKOUT]
    python bench/bench_telemetry.py --ab BEFORE_CHECKOUT [--rounds 6]

``--ab`` runs this script alternately on another checkout and on this one (fresh processes,
order swapped each round) and prints each side's best: the before/after of a change to the
addon or the exporter, on the same machine in the same minutes.

Reported: process CPU time (all threads: the loop's hook *and* the batch thread's encoding
and export) per flow after a ``force_flush``, best of ``--repeat``; with ``--profile`` the
cProfile of one run (the hook side only: cProfile sees the calling thread).
"""

from __future__ import annotations

import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
# bench/profile.py would shadow the standard library's profile module that cProfile imports.
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != BENCH]
_ROOT = next((sys.argv[i + 1] for i, a in enumerate(sys.argv[:-1]) if a == "--root"), str(REPO))
sys.path.insert(0, str(Path(_ROOT) / "sidecar"))

import argparse  # noqa: E402
import cProfile  # noqa: E402
import pstats  # noqa: E402
import subprocess  # noqa: E402
import time  # noqa: E402

SINK = r"""
import http.server, sys
class H(http.server.BaseHTTPRequestHandler):
    def do_POST(self):
        self.rfile.read(int(self.headers.get("content-length") or 0))
        self.send_response(200); self.send_header("content-length", "0"); self.end_headers()
    def log_message(self, *a): pass
s = http.server.ThreadingHTTPServer(("127.0.0.1", 0), H)
print(s.server_address[1], flush=True)
s.serve_forever()
"""


def make_flows(n: int):
    from mitmproxy import http
    from mitmproxy.test import tflow, tutils

    from chaperone_sidecar import flowctx
    from chaperone_sidecar.policy.model import Action, Decision, Identity, RuleRef

    ident = Identity(service_account="bench/agent", pod_namespace="bench", pod_name="agent-0",
                     creator="alice", on_behalf_of="")
    flows = []
    for _ in range(n):
        f = tflow.tflow(req=tutils.treq(host="upstream.bench", port=8443, scheme=b"https",
                                        method=b"GET", path=b"/1k",
                                        headers=http.Headers(host="upstream.bench"), content=b""),
                        resp=tutils.tresp(content=b"x" * 1024))
        now = time.time()
        f.request.timestamp_start, f.response.timestamp_end = now - 0.002, now
        ctx = flowctx.ensure(f)
        ctx.identity, ctx.connection, ctx.connection_type = ident, "upstream", "http"
        ctx.action = Action("http", "GET", "https", "upstream.bench", 8443, "/1k", name="http:GET")
        ctx.decision = Decision("allow", rule=RuleRef("bench/policy", "reads"))
        ctx.upstream_started, ctx.upstream_latency = time.monotonic() - 0.001, 0.001
        flows.append(f)
    return flows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--flows", type=int, default=5000)
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--profile", action="store_true")
    parser.add_argument("--root", default=str(REPO), help="checkout whose sidecar is measured")
    parser.add_argument("--ab", default=None, help="checkout to compare this one with")
    parser.add_argument("--rounds", type=int, default=6)
    args = parser.parse_args(argv)
    if args.ab:
        return ab(args)
    sink = subprocess.Popen([sys.executable, "-c", SINK], stdout=subprocess.PIPE, text=True)
    try:
        port = int(sink.stdout.readline())
        env = {"OTEL_EXPORTER_OTLP_ENDPOINT": f"http://127.0.0.1:{port}"}
        from prometheus_client import CollectorRegistry

        from chaperone_sidecar.addons.telemetry import Telemetry
        from chaperone_sidecar.config import SidecarConfig
        from chaperone_sidecar.services import SidecarServices
        from chaperone_sidecar.sources import Sources
        from chaperone_sidecar.telemetry_setup import setup_telemetry

        setup = setup_telemetry(env, install_global=False, prometheus_registry=CollectorRegistry())
        # the per-flow histograms as build_services wires them (a checkout before them has none)
        extra = {"histograms": setup.histograms} if hasattr(setup, "histograms") else {}
        services = SidecarServices(config=SidecarConfig(standalone=True), sources=Sources("bench"),
                                   tracer=setup.tracer(), meter=setup.meter(), **extra)
        addon = Telemetry(services)
        results = []
        for i in range(args.repeat + 1):  # the first run warms up
            flows = make_flows(args.flows)
            prof = cProfile.Profile() if args.profile and i == 1 else None
            t0 = time.process_time()
            if prof:
                prof.enable()
            for f in flows:
                addon.response(f)
            if prof:
                prof.disable()
            hook = time.process_time() - t0
            setup.tracer_provider.force_flush()
            total = time.process_time() - t0
            if i:
                results.append((total / args.flows * 1e6, hook / args.flows * 1e6))
                print(f"run {i}: {results[-1][0]:.1f} µs/flow all threads, hook {results[-1][1]:.1f}",
                      flush=True)
            if prof:
                pstats.Stats(prof).sort_stats("cumulative").print_stats(30)
        best = min(results)
        print(f"best: {best[0]:.1f} µs CPU per flow (hook on the loop {min(r[1] for r in results):.1f})")
        setup.shutdown()
    finally:
        sink.terminate()
        sink.wait()
    return 0


def ab(args: argparse.Namespace) -> int:
    import re

    sides = {"before": args.ab, "after": str(REPO)}
    best: dict[str, list[float]] = {k: [] for k in sides}
    for rnd in range(args.rounds):
        for name in (list(sides) if rnd % 2 == 0 else list(sides)[::-1]):
            out = subprocess.run([sys.executable, __file__, "--root", sides[name], "--flows",
                                  str(args.flows), "--repeat", str(args.repeat)],
                                 capture_output=True, text=True, check=True).stdout
            value = float(re.search(r"best: ([\d.]+)", out).group(1))
            best[name].append(value)
            print(f"round {rnd + 1} {name}: {value:.1f} µs/flow", flush=True)
    for name, values in best.items():
        print(f"{name}: best {min(values):.1f} µs/flow, median {sorted(values)[len(values) // 2]:.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
