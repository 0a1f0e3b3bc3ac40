"""A 1 GiB response streamed through the Mask addon's stream callable keeps memory flat.

The callable is the one mitmproxy calls (``flow.response.stream``), fed 1 GiB of SSE text in
64 KiB chunks - with secrets planted across chunk boundaries every few MiB - then ``b""``. RSS
(``VmRSS`` in ``/proc/self/status``) may not grow by more than 50 MB over the whole stream:
a bound on behaviour (nothing accumulates), not a timing.
"""

from __future__ import annotations

import gc
import time

from mitmproxy import http
from mitmproxy.test import taddons, tflow, tutils

from chaperone_sidecar import flowctx
from chaperone_sidecar.addons.mask import Mask
from chaperone_sidecar.config import SidecarConfig
from chaperone_sidecar.policy.model import Decision, MaskSpec
from chaperone_sidecar.services import SidecarServices
from chaperone_sidecar.sources import Sources

GIB = 1 << 30
CHUNK = 64 * 1024
SECRET = b"AKIAIOSFODNN7EXAMPLE"
PLANT_EVERY = 64  # chunks (4 MiB)
MAX_GROWTH = 50 * 1024 * 1024


def rss() -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS in /proc/self/status")


def sse_chunk(fill: bytes) -> bytes:
    event = b'data: {"type":"content_block_delta","delta":{"text":"' + fill + b'"}}\n\n'
    return (event * (CHUNK // len(event) + 1))[:CHUNK]


def test_one_gib_stream_through_the_mask_callable_keeps_memory_flat(record_property):
    plain = sse_chunk(b"the quick brown fox jumps over the lazy dog 0123456789")
    # A secret split across two chunks: the end of one, the start of the next.
    head = plain[: CHUNK - 10] + SECRET[:10]
    tail = SECRET[10:] + plain[10:]
    addon = Mask(SidecarServices(config=SidecarConfig(standalone=True), sources=Sources("ns")))
    with taddons.context(addon) as tctx:
        tctx.configure(addon, chaperone_mask_buffer="1m")
        f = tflow.tflow(req=tutils.treq(host="api.anthropic.com", port=443, scheme=b"https",
                                        path=b"/v1/messages"))
        ctx = flowctx.ensure(f)
        ctx.connection = ""
        ctx.decision = Decision("allow", masks=(MaskSpec(detectors=("all",)),))
        f.response = http.Response.make(200)
        f.response.headers.clear()
        f.response.headers["content-type"] = "text/event-stream"
        f.response.headers["transfer-encoding"] = "chunked"
        addon.responseheaders(f)
        stream = f.response.stream
        assert callable(stream)

        chunks = GIB // CHUNK
        sent = masked_tokens = planted = 0
        previous_tail = b""
        gc.collect()
        # Warm up (allocator pools, regex caches) before the baseline.
        for _ in range(64):
            for out in stream(plain):
                sent += len(out)
        gc.collect()
        baseline = peak = rss()
        started = time.perf_counter()
        for i in range(64, chunks):
            if i % PLANT_EVERY == 0:
                data, planted = head, planted + 1
            elif i % PLANT_EVERY == 1:
                data = tail
            else:
                data = plain
            for out in stream(data):
                sent += len(out)
                window = previous_tail + out
                assert SECRET not in window
                masked_tokens += out.count(b"[MASKED:aws-access-key-id]")
                previous_tail = out[-64:]
            if i % 128 == 0:  # every 8 MiB
                peak = max(peak, rss())
        for out in stream(b""):
            sent += len(out)
            masked_tokens += out.count(b"[MASKED:aws-access-key-id]")
        elapsed = time.perf_counter() - started
        peak = max(peak, rss())

    growth = peak - baseline
    throughput = (chunks - 64) * CHUNK / elapsed / 1e6
    record_property("rss_growth_mb", round(growth / 1e6, 1))
    record_property("throughput_mb_s", round(throughput, 1))
    print(f"\n1 GiB through Mask's stream callable: {throughput:.1f} MB/s, "
          f"RSS {baseline / 1e6:.1f} -> peak {peak / 1e6:.1f} MB (+{growth / 1e6:.1f} MB)")
    assert masked_tokens == planted and planted == (chunks - 64) // PLANT_EVERY
    assert sent > GIB - chunks * 64  # everything else came through (tokens change lengths)
    assert flowctx.get(f).masked == {"aws-access-key-id": planted}
    capture = flowctx.get(f).bodies.get("response")
    assert capture.size == sent and len(capture.data) <= 65536  # the recording copy is bounded
    assert growth < MAX_GROWTH, f"RSS grew by {growth / 1e6:.1f} MB while streaming 1 GiB"
