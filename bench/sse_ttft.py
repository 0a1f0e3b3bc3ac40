"""Time to first token of a streamed LLM answer: direct, bare mitmproxy, Chaperone.

``python bench/sse_ttft.py [--requests N] [--interval MS] [--out FILE]``

What it measures: an upstream on 127.0.0.1 (HTTPS, its own CA) answers ``POST /v1/messages``
with an Anthropic Messages event stream - ``message_start``, ``content_block_start``, then
``DELTAS`` text deltas (``"Hello"``, ``"!"``, ``" I"``, ``" can"`` ... as a model tokenises) one
every ``--interval`` ms, each flushed on its own, then the stop events. The client keeps one
connection (through the proxy's CONNECT tunnel, like the SDKs' connection pools), sends N
requests one after the other and notes, per request, the time from sending to the first
``content_block_delta`` event with text (**TTFT**) and to ``message_stop`` (**total**).

Paths (bench/paths.py): ``direct``; ``mitmdump`` (bare mitmproxy, same version, as the proxy
benchmark runs it: ``stream_large_bodies=1m``, so it *buffers* an SSE answer); ``mitmdump-
streaming`` (the same told to stream every body); ``chaperone-minimal`` (policy only, no
masking); ``chaperone-masking`` (the minimal allow-all policy plus ``masking.detectors: [all]``,
so the stream goes through the SSE re-framer, policy/masking/sse.py, with every detector).

``chaperone-masking-secrets`` is the same with the four secret detectors of
examples/aws-policy.yaml. Paths run in ``--rounds`` rounds in rotating order (each started
fresh), and medians and minimums are over all rounds.

What to expect from streaming masking: a delta is released as soon as its text can no longer
be part of a secret. With ``email`` on (``all``) a word (``"Hello"``) could still be the local
part of an address, so it waits for the next delta (``"!"``) - one inter-token interval - and
the first token is such a word in most answers; with the secret detectors it goes out at once.
The rest of the added time is parsing and re-framing. The numbers of a run are written to
``--out`` (default docs/benchmarks-sse.md).
"""

from __future__ import annotations

import argparse
import http.client
import json
import ssl
import statistics
import sys
import tempfile
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
for _p in (REPO, REPO / "sidecar", REPO / "operator", REPO / "testbed"):
    if str(_p) not in sys.path:
        sys.path.insert(0, str(_p))

from bench import paths  # noqa: E402

TOKENS = ["Hello", "!", " I", " can", " help", " with", " that", ".", " Here", " is", " the", " plan",
          ":", " first", ",", " read", " the", " logs", ";", " then", " fix", " it", "."]
PATHS = ("direct", "mitmdump", "mitmdump-streaming", "chaperone-minimal", "chaperone-masking-secrets",
         "chaperone-masking")
# The detectors of examples/aws-policy.yaml (and the e2e profile): the documented starting set.
SECRET_DETECTORS = ["aws-access-key-id", "aws-secret-key", "private-key", "jwt"]


def _event(name: str, data: dict[str, Any]) -> bytes:
    return f"event: {name}\ndata: {json.dumps(data)}\n\n".encode()


class AnthropicUpstream:
    """HTTPS upstream streaming a Messages answer, one flushed chunk per event."""

    def __init__(self, directory: Path, interval: float) -> None:
        from chaperone_testbed.pki import CertAuthority

        directory.mkdir(parents=True, exist_ok=True)
        ca = CertAuthority("chaperone-bench-sse-ca")
        self.ca_file = ca.write_cert(directory / "upstream-ca.crt")
        pair = ca.write_server_cert(directory, "upstream", dns_names=("localhost",), ip_addresses=("127.0.0.1",))
        self.otlp_endpoint = "http://127.0.0.1:9"  # unused: telemetry is off on every path here

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"
            disable_nagle_algorithm = True  # small events must leave at once, as real servers send them

            def do_POST(self) -> None:  # noqa: N802
                self.rfile.read(int(self.headers.get("Content-Length") or 0))
                self.send_response(200)
                self.send_header("Content-Type", "text/event-stream")
                self.send_header("Transfer-Encoding", "chunked")
                self.end_headers()

                def send(event: bytes) -> None:
                    self.wfile.write(b"%x\r\n%s\r\n" % (len(event), event))
                    self.wfile.flush()

                send(_event("message_start", {"type": "message_start", "message": {
                    "id": "msg", "type": "message", "role": "assistant", "content": [], "model": "bench",
                    "stop_reason": None, "stop_sequence": None, "usage": {"input_tokens": 1, "output_tokens": 1}}}))
                send(_event("content_block_start", {"type": "content_block_start", "index": 0,
                                                    "content_block": {"type": "text", "text": ""}}))
                for i, token in enumerate(TOKENS):
                    if i:
                        time.sleep(interval)
                    send(_event("content_block_delta", {"type": "content_block_delta", "index": 0,
                                                        "delta": {"type": "text_delta", "text": token}}))
                send(_event("content_block_stop", {"type": "content_block_stop", "index": 0}))
                send(_event("message_delta", {"type": "message_delta", "delta": {"stop_reason": "end_turn"},
                                              "usage": {"output_tokens": len(TOKENS)}}))
                send(_event("message_stop", {"type": "message_stop"}))
                self.wfile.write(b"0\r\n\r\n")
                self.wfile.flush()

            def log_message(self, *args: Any) -> None:
                pass

        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(pair.cert_path, pair.key_path)
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.server.socket = context.wrap_socket(self.server.socket, server_side=True)
        self.port = self.server.socket.getsockname()[1]
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()


class MitmdumpStreaming(paths.Mitmdump):
    """Bare mitmproxy told to stream every body (``stream_large_bodies=1``): by default it
    buffers a chunked response up to 1 MiB, i.e. a whole SSE answer."""

    name, label = "mitmdump-streaming", "bare mitmproxy, streaming"

    def _spawn(self, argv: list[str], env: paths.Env, extra: dict[str, str] | None = None,
               cwd: Path | None = None) -> None:
        super()._spawn([a if a != "stream_large_bodies=1m" else "stream_large_bodies=1" for a in argv],
                       env, extra, cwd)


class ChaperoneMasking(paths.Chaperone):
    """``chaperone proxy`` with the minimal profile's allow-all policy plus
    ``masking.detectors`` (default ``[all]``: every response scanned by every detector)."""

    def __init__(self, detectors: list[str] | None = None) -> None:
        super().__init__("minimal")
        self.detectors = detectors or ["all"]
        if detectors:
            self.name, self.label = "chaperone-masking-secrets", "Chaperone, masking the four secret detectors"
        else:
            self.name, self.label = "chaperone-masking", "Chaperone, masking all detectors"

    def _spawn(self, argv: list[str], env: paths.Env, extra: dict[str, str] | None = None,
               cwd: Path | None = None) -> None:
        assert self.dir is not None
        policy_file = self.dir / "config" / "policies" / "bench-minimal.yaml"
        policy = json.loads(policy_file.read_text())
        policy["spec"]["masking"] = {"detectors": self.detectors}
        policy_file.write_text(json.dumps(policy, indent=1))
        super()._spawn(argv, env, extra, cwd)


def make(name: str) -> paths.ProxyPath:
    if name == "mitmdump-streaming":
        return MitmdumpStreaming()
    if name == "chaperone-masking":
        return ChaperoneMasking()
    if name == "chaperone-masking-secrets":
        return ChaperoneMasking(SECRET_DETECTORS)
    return paths.make_path(name)


def measure(path: paths.ProxyPath, upstream: AnthropicUpstream, cafiles: list[Path], n: int) -> dict[str, Any]:
    """N requests on one connection: TTFT and total per request (the first one, which pays
    the handshakes, is a warm-up and not counted)."""
    context = ssl.create_default_context()
    for cafile in cafiles:
        context.load_verify_locations(cafile)
    if path.proxy:
        host, port = path.proxy.removeprefix("http://").split(":")
        conn = http.client.HTTPSConnection(host, int(port), context=context, timeout=30)
        conn.set_tunnel("127.0.0.1", upstream.port)
    else:
        conn = http.client.HTTPSConnection("127.0.0.1", upstream.port, context=context, timeout=30)
    body = json.dumps({"model": "bench", "max_tokens": 64, "stream": True,
                       "messages": [{"role": "user", "content": "hi"}]})
    ttft: list[float] = []
    total: list[float] = []
    texts: set[str] = set()
    for i in range(n + 1):
        t0 = time.perf_counter()
        conn.request("POST", "/v1/messages", body=body, headers={"Content-Type": "application/json",
                                                                  "anthropic-version": "2023-06-01"})
        resp = conn.getresponse()
        assert resp.status == 200, resp.read()[:300]
        first, text, done, name = None, "", None, ""
        while True:
            line = resp.readline()
            if not line:
                break
            line = line.rstrip(b"\r\n")
            if line.startswith(b"event:"):
                name = line[6:].strip().decode()
            elif line.startswith(b"data:") and name == "content_block_delta":
                piece = json.loads(line[5:])["delta"].get("text", "")
                if piece and first is None:
                    first = time.perf_counter() - t0
                text += piece
            elif line.startswith(b"data:") and name == "message_stop":
                done = time.perf_counter() - t0
        resp.read()
        if i:  # the first request is the warm-up
            assert first is not None and done is not None
            ttft.append(first * 1000)
            total.append(done * 1000)
            texts.add(text)
    conn.close()
    assert texts == {"".join(TOKENS)}, texts  # every path delivers the whole answer unchanged
    return {"ttft": ttft, "total": total}


def _row(name: str, res: dict[str, Any], base: dict[str, Any]) -> str:
    med = statistics.median
    p90 = lambda xs: sorted(xs)[max(0, int(len(xs) * 0.9) - 1)]  # noqa: E731
    return (f"| {name} | {med(res['ttft']):.1f} | {min(res['ttft']):.1f} | {p90(res['ttft']):.1f} "
            f"| {med(res['ttft']) - med(base['ttft']):+.1f} | {min(res['ttft']) - min(base['ttft']):+.1f} "
            f"| {med(res['total']):.1f} | {med(res['total']) - med(base['total']):+.1f} |")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=20)
    parser.add_argument("--rounds", type=int, default=3, help="rounds over the paths, in rotating order")
    parser.add_argument("--interval", type=float, default=20.0, help="ms between two deltas")
    parser.add_argument("--paths", default=",".join(PATHS))
    parser.add_argument("--out", type=Path, default=REPO / "docs" / "benchmarks-sse.md")
    args = parser.parse_args(argv)
    names = args.paths.split(",")
    with tempfile.TemporaryDirectory(prefix="chaperone-sse-ttft-") as tmp:
        work = Path(tmp)
        upstream = AnthropicUpstream(work / "upstream", args.interval / 1000)
        env = paths.Env(work, upstream, paths.interception_ca(work / "ca"))
        closers = [upstream.stop]
        results: dict[str, dict[str, Any]] = {n: {"ttft": [], "total": []} for n in names}
        try:
            for rnd in range(args.rounds):  # A B C, B C A, ...: no path always first or last
                for name in names[rnd % len(names):] + names[:rnd % len(names)]:
                    path = make(name)
                    path.start(env)
                    try:
                        res = measure(path, upstream, env.client_cafiles, args.requests)
                    finally:
                        path.stop()
                    for key in ("ttft", "total"):
                        results[name][key] += res[key]
                    print(f"round {rnd + 1} {name}: TTFT median {statistics.median(res['ttft']):.1f} ms "
                          f"min {min(res['ttft']):.1f}", flush=True)
        finally:
            for close in reversed(closers):
                close()
    base = results[names[0]]
    lines = [
        "# Streaming masking: time to first token (bench/sse_ttft.py)",
        "",
        f"An Anthropic Messages stream of {len(TOKENS)} text deltas, one every {args.interval:g} ms; "
        f"{args.rounds} rounds (paths in rotating order, each started fresh) of {args.requests} requests "
        "per path on one kept-alive connection (after a warm-up); medians and minimums over all "
        f"rounds. Milliseconds; deltas against `{names[0]}`. Run on {time.strftime('%Y-%m-%d')}, "
        "shared 2-core machine: treat differences below ~2 ms as noise.",
        "",
        "| path | TTFT median | TTFT min | TTFT p90 | TTFT added (median) | TTFT added (min) "
        "| total median | total added |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
        *[_row(name, results[name], base) for name in names],
        "",
        "Streaming masking holds a token only while it could still be part of a secret "
        "(docs/masking.md, \"Streaming: what is held back\"). With the four secret detectors "
        "(`chaperone-masking-secrets`, as examples/aws-policy.yaml) the first token `Hello` "
        "goes out as it arrives: no detector can start with it, and its base64 decoding "
        "(`1d e9 65 a?`) cannot be part of an encoded secret. With `all`, `e-mail` is on and "
        "`Hello` may be the local part of `Hello@example.com`: it goes out with the next delta "
        "(`!`), one inter-token interval later - the price of that detector on streamed text.",
        "",
    ]
    args.out.write_text("\n".join(lines))
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
