"""CPU cost of the OCSF export and of the GenAI usage tap (docs/telemetry.md).

``python bench/bench_ocsf.py [--flows N]``: process CPU time (``time.process_time``), in this
process, of

* ``OcsfExporter.submit`` for a flow's two recorded events (what the event loop pays);
* pairing + mapping to OCSF + JSON encoding + the JSONL file write (what the export thread pays);
* the byte-counting wrapper of a streamed answer with and without the Anthropic usage tap, over a
  206-event Messages stream fed one event per chunk.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from typing import Any

from chaperone_sidecar.addons.telemetry import _AnthropicUsage, _Counting
from chaperone_sidecar.recording.ocsf import FlowEvents
from chaperone_sidecar.recording.ocsf_export import _ENCODE, FileSink, OcsfExporter

IDENTITY = {"namespace": "team-a", "pod": "agent-0", "podUID": "u-1", "serviceAccount": "claude",
            "creator": "alice"}


def flow(i: int) -> list[dict[str, Any]]:
    request = {"type": "request", "flow": f"f{i}", "identity": IDENTITY, "session": "s-1", "seq": 2 * i,
               "time": "2026-12-04T18:00:00.000000Z", "data": {
                   "method": "DELETE", "url": "https://s3.amazonaws.com/b?X-Amz-Signature=[REDACTED]",
                   "httpVersion": "HTTP/1.1", "connection": "aws-prod", "connectionType": "aws",
                   "headers": [["Host", "s3.amazonaws.com"], ["Authorization", "[REDACTED]"],
                               ["User-Agent", "aws-cli/2.15"], ["X-Amz-Date", "20261204T180000Z"]],
                   "action": {"name": "s3:DeleteBucket", "summary": "s3:DeleteBucket b"},
                   "decision": {"effect": "block", "rule": {"policy": "team-a/prod", "name": "no-delete"},
                                "message": "no deletes", "refused": "chaperone_blocked"}}}
    response = {"type": "response", "flow": f"f{i}", "identity": IDENTITY, "session": "s-1",
                "seq": 2 * i + 1, "time": "2026-12-04T18:00:00.250000Z",
                "data": {"status": 403, "reason": "Forbidden", "refused": "chaperone_blocked",
                         "masked": {}, "durationMs": 250}}
    return [request, response]


def sse_answer(deltas: int = 200) -> list[bytes]:
    head = (b'event: message_start\ndata: {"type":"message_start","message":{"id":"msg_01",'
            b'"type":"message","role":"assistant","model":"claude-x","content":[],"stop_reason":null,'
            b'"usage":{"input_tokens":25,"output_tokens":1}}}\n\n',
            b'event: content_block_start\ndata: {"type":"content_block_start","index":0,'
            b'"content_block":{"type":"text","text":""}}\n\n')
    delta = (b'event: content_block_delta\ndata: {"type":"content_block_delta","index":0,'
             b'"delta":{"type":"text_delta","text":"hello world, some text"}}\n\n')
    tail = (b'event: content_block_stop\ndata: {"type":"content_block_stop","index":0}\n\n',
            b'event: message_delta\ndata: {"type":"message_delta","delta":{"stop_reason":"end_turn"},'
            b'"usage":{"output_tokens":15}}\n\n',
            b'event: message_stop\ndata: {"type":"message_stop"}\n\n')
    return [*head, *[delta] * deltas, *tail]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--flows", type=int, default=20000)
    n = parser.parse_args().flows
    flows = [flow(i) for i in range(n)]
    exporter = OcsfExporter([], queue_size=2 * n + 10)  # no thread: the loop side alone
    t = time.process_time()
    for request, response in flows:
        exporter.submit([request])
        exporter.submit([response])
    loop = (time.process_time() - t) / n * 1e6
    with tempfile.TemporaryDirectory() as d:
        sink, pairs = FileSink(os.path.join(d, "o.jsonl")), FlowEvents(limit=n)
        t = time.process_time()
        for i in range(0, n, 50):
            events = pairs.add([e for f in flows[i:i + 50] for e in f])
            sink.write(events, [_ENCODE(e).encode() + b"\n" for e in events])
        thread = (time.process_time() - t) / n * 1e6
        size = os.path.getsize(os.path.join(d, "o.jsonl")) / n
        sink.close()
    print(f"OCSF submit (event loop): {loop:.1f} us/flow; map+encode+write (export thread): "
          f"{thread:.1f} us/flow; {size:.0f} bytes/event")
    events, runs = sse_answer(), 300
    for tapped in (False, True):
        t = time.process_time()
        for _ in range(runs):
            wrapper = _Counting(True, _AnthropicUsage() if tapped else None)
            for event in events:
                wrapper(event)
        cost = (time.process_time() - t) / runs * 1e6
        print(f"streamed answer of {len(events)} events, {'with' if tapped else 'without'} the "
              f"usage tap: {cost:.0f} us")


if __name__ == "__main__":
    main()
