"""The recording of a flow measured alone: CPU per flow of the Record addon with a real Recorder,
and the pieces of it (event building, header redaction, sealing).

    python bench/bench_recording.py [--flows 3000] [--concurrency 16] [--repeat 3]

Why: under load the proxy's CPU per request is noisy (2 shared cores); the recording's share of
it is measured here in one process - the Record addon on mitmproxy test flows shaped like the
benchmark's HTTPS 1 KiB GETs (allow decision with the policy-wide ``all`` detectors, a masked
1 KiB JSON response capture, strict recording, spool on disk, group fsync as the sidecar's
defaults), ``concurrency`` flows at a time on one event loop. CPU is the process's (every thread:
the writer thread's sealing and writes count), divided by flows; best of ``repeat`` runs.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
for _p in (REPO, REPO / "sidecar"):
    if str(_p) not in sys.path:
        sys.path.insert(0, str(_p))

from mitmproxy import http  # noqa: E402
from mitmproxy.test import tflow, tutils  # noqa: E402

from chaperone_sidecar import flowctx  # noqa: E402
from chaperone_sidecar.addons.record import Record  # noqa: E402
from chaperone_sidecar.config import SidecarConfig  # noqa: E402
from chaperone_sidecar.flowctx import BodyCapture, RecordingSettings  # noqa: E402
from chaperone_sidecar.policy.model import Action, Decision, Identity, MaskSpec, RuleRef  # noqa: E402
from chaperone_sidecar.recording import Recorder  # noqa: E402
from chaperone_sidecar.recording.events import Chain, new_event  # noqa: E402
from chaperone_sidecar.recording.flow_events import redact_headers  # noqa: E402
from chaperone_sidecar.recording.spool import SpoolConfig  # noqa: E402
from chaperone_sidecar.services import SidecarServices  # noqa: E402
from chaperone_sidecar.sources import Sources  # noqa: E402

NS = "bench"
BODY = json.dumps({"items": [{"id": i, "name": f"item-{i}", "ok": True} for i in range(30)]}).encode()[:1024]
MASKS = (MaskSpec(detectors=("all",), target="both", source=RuleRef(f"{NS}/p", "all")),)
CONN = {"metadata": {"name": "up"}, "spec": {"type": "http", "hosts": ["127.0.0.1"]}}


def services(recorder: Recorder | None) -> SidecarServices:
    sources = Sources(NS)
    sources.publish({"connection_objs": [CONN], "policy_objs": []})
    return SidecarServices(config=SidecarConfig(standalone=True), sources=sources, recorder=recorder)


def make_flow(svc: SidecarServices) -> http.HTTPFlow:
    hdrs = http.Headers(host="127.0.0.1:8443", user_agent="python-aiohttp/3.9", accept="*/*",
                        accept_encoding="gzip, deflate")
    f = tflow.tflow(req=tutils.treq(host="127.0.0.1", port=8443, scheme=b"https", method=b"GET",
                                    path=b"/1k", headers=hdrs, content=b""))
    ctx = flowctx.ensure(f)
    ctx.identity = Identity(service_account=f"{NS}/agent", pod_namespace=NS, pod_name="agent-0")
    ctx.connection, ctx.connection_type = "up", "http"
    ctx.action = Action("http", "GET", "https", "127.0.0.1", 8443, "/1k", name="http:GET", summary="GET /1k")
    ctx.decision = Decision("allow", rule=RuleRef(f"{NS}/p", "allow-the-rest"), masks=MASKS)
    ctx.snapshot = svc.snapshot()
    ctx.recording = RecordingSettings.from_spec(None)
    return f


def respond(f: http.HTTPFlow) -> None:
    f.response = http.Response.make(200, BODY, {"content-type": "application/json",
                                                "date": "Sat, 05 Dec 2026 08:00:00 GMT",
                                                "server": "bench-upstream"})
    capture = BodyCapture(65536)
    capture.set(BODY)
    capture.complete = True
    flowctx.ensure(f).bodies["response"] = capture


async def flows(n: int, concurrency: int, spool: Path, record_them: bool = True) -> tuple[float, float]:
    """(CPU seconds, wall seconds) of ``n`` recorded flows, ``concurrency`` at a time (with
    ``record_them`` False the same loop without the Record hooks: the harness's own cost)."""
    rec = Recorder(SpoolConfig(spool), namespace=NS, pod="agent-0", session="bench")
    svc = services(rec)
    record = Record(svc)
    await rec.start()
    todo = [make_flow(svc) for _ in range(n)]

    async def one(f: http.HTTPFlow) -> None:
        if record_them:
            await record.request(f)
        respond(f)
        if record_them:
            await record.response(f)
        else:
            await asyncio.sleep(0)

    async def worker(chunk: list[http.HTTPFlow]) -> None:
        for f in chunk:
            await one(f)

    cpu0, wall0 = time.process_time(), time.perf_counter()
    await asyncio.gather(*(worker(todo[i::concurrency]) for i in range(concurrency)))
    cpu, wall = time.process_time() - cpu0, time.perf_counter() - wall0
    await rec.close()
    assert record.unrecorded == 0 and record.refused == 0
    return cpu, wall


def best_of(fn, repeat: int, number: int) -> float:
    """Best per-call seconds of ``fn`` over ``repeat`` runs of ``number`` calls."""
    best = float("inf")
    for _ in range(repeat):
        t0 = time.process_time()
        for _ in range(number):
            fn()
        best = min(best, (time.process_time() - t0) / number)
    return best


def pieces(repeat: int) -> dict[str, float]:
    svc = services(None)
    record = Record(svc)
    f = make_flow(svc)
    respond(f)
    ctx = flowctx.ensure(f)
    req_event = record._request_event(f, ctx, ctx.recording, False)
    req_event["data"]["decision"] = record._decision_data(ctx)
    resp_event = record._response_event(f, ctx, ctx.recording, ctx.record)
    for e in (req_event, resp_event):
        e["time"] = "2026-12-05T08:00:00.000000Z"
    chain = Chain("bench")
    n = 2000
    return {
        "redact_headers (request, 4 headers, masker)": best_of(
            lambda: redact_headers(f.request.headers, "", record._masker(ctx)), repeat, n),
        "request event built (incl. decision)": best_of(
            lambda: record._request_event(f, ctx, ctx.recording, False), repeat, n),
        "response event built": best_of(lambda: record._response_event(f, ctx, ctx.recording, ctx.record),
                                        repeat, n),
        "seal request event": best_of(lambda: chain.seal(req_event), repeat, n),
        "seal response event (1 KiB body)": best_of(lambda: chain.seal(resp_event), repeat, n),
        "new_event": best_of(lambda: new_event("request", flow="x", data={}, identity={"a": "b"}), repeat, n),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--flows", type=int, default=3000)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--no-pieces", action="store_true")
    args = parser.parse_args(argv)
    if not args.no_pieces:
        for name, sec in pieces(args.repeat).items():
            print(f"{name:50s} {sec * 1e6:8.1f} µs")
    best, base = float("inf"), float("inf")
    for i in range(args.repeat):
        with tempfile.TemporaryDirectory(prefix="bench-rec-") as tmp:
            cpu, wall = asyncio.run(flows(args.flows, args.concurrency, Path(tmp)))
            harness, _ = asyncio.run(flows(args.flows, args.concurrency, Path(tmp) / "h", record_them=False))
        per, base = cpu / args.flows * 1e6, min(base, harness / args.flows * 1e6)
        best = min(best, per)
        print(f"run {i + 1}: {per:6.1f} µs CPU per flow with recording, {harness / args.flows * 1e6:6.1f} "
              f"without ({args.flows / wall:,.0f} flows/s)")
    print(f"best: recording of a flow {best - base:.1f} µs CPU ({best:.1f} - harness {base:.1f})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
