"""The benchmark's upstream: a local HTTP + HTTPS server (aiohttp) with its own CA.

Why a separate process: the proxies under test must see a real TCP/TLS peer, and its CPU must
not be accounted to the client or the proxy. Why generated bodies: the 1 GiB download is
produced on the fly from one 256 KiB buffer, so nothing large is stored or held in memory.

Routes (every body is deterministic, so clients check what they received):

=================  ===========================================================================
``/1k``            1024 bytes of JSON (``application/json``)
``/1m``            1 MiB of text (``text/plain``): what masking has to scan in a large body
``/sse?n=N``       ``text/event-stream``: N events of ~100 bytes, each flushed on its own
``/bytes?size=N``  ``application/octet-stream`` of N bytes with a Content-Length (1 GiB download):
                   pseudo-random bytes (a seeded 256 KiB block, repeated), as compressed
                   archives, images, layers and weights are; ``&pattern=ramp`` sends
                   ``bytes(range(256))`` repeated instead (the body before session 12)
``POST /v1/*``     an OTLP/HTTP sink (``/v1/traces``, ``/v1/metrics``): Chaperone full exports
                   its spans and metrics here with the SDK's OTLP exporter, as an injected
                   sidecar does to a collector. ``--otlp-out FILE`` decodes each span into
                   one JSON line there (the smoke test reads them); otherwise it only answers.
=================  ===========================================================================

Run by :class:`Upstream` (``python bench/upstream.py --cert C --key K``); the child prints one
JSON line ``{"http": PORT, "https": PORT}`` once both listeners accept connections.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import socket
import ssl
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

__all__ = ["Upstream", "BODY_1K", "BODY_1M", "PATTERNS", "sse_event", "byte_pattern", "SIZES"]

_WORDS = (b"lorem ipsum dolor sit amet consectetur adipiscing elit sed do eiusmod tempor "
          b"incididunt ut labore et dolore magna aliqua ")


def _text(size: int) -> bytes:
    return (_WORDS * (size // len(_WORDS) + 1))[:size]


def _json_body(size: int) -> bytes:
    head, tail = b'{"ok":true,"data":"', b'"}'
    return head + _text(size - len(head) - len(tail)) + tail


BODY_1K = _json_body(1024)
BODY_1M = _text(1024 * 1024)
SIZES = {"1k": len(BODY_1K), "1m": len(BODY_1M)}
# Repeated for /bytes. Since session 12 a streamed binary body is scanned (its printable runs
# masked), so what it holds matters: random bytes have ~300 short printable runs per MiB, as
# real binaries do. The ramp before (bytes(range(256))) holds a 95-byte printable run with a
# 26-letter base64 run in it every 256 bytes - 4 096 runs to decode per MiB, like no download.
_PATTERN = random.Random(256).randbytes(256 * 1024)
_RAMP = bytes(range(256)) * 1024


def sse_event(i: int) -> bytes:
    """Event ``i`` of /sse (~100 bytes, like a model's token delta)."""
    return (b'event: delta\ndata: {"index":%d,"text":"' % i) + _text(60) + b'"}\n\n'


PATTERNS = {"random": _PATTERN, "ramp": _RAMP}


def byte_pattern(offset: int, size: int, pattern: str = "random") -> bytes:
    """The bytes /bytes sends at ``offset`` (for spot checks by the client)."""
    block, out = PATTERNS[pattern], bytearray()
    while len(out) < size:
        pos = (offset + len(out)) % len(block)
        out += block[pos:pos + size - len(out)]
    return bytes(out)


# ---------------------------------------------------------------------------- the server (child)

def _span_lines(body: bytes) -> list[str]:
    """One JSON line per span of an OTLP ``ExportTraceServiceRequest``: name and attributes."""
    from google.protobuf.json_format import MessageToDict
    from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest

    request = ExportTraceServiceRequest.FromString(body)
    lines = []
    for resource_spans in request.resource_spans:
        for scope_spans in resource_spans.scope_spans:
            for span in scope_spans.spans:
                attrs = {a.key: next(iter(MessageToDict(a.value).values()), None) for a in span.attributes}
                lines.append(json.dumps({"name": span.name, "attributes": attrs}, sort_keys=True))
    return lines


def _app(otlp_out: str | None = None) -> Any:
    from aiohttp import web

    async def one_k(_: web.Request) -> web.Response:
        return web.Response(body=BODY_1K, content_type="application/json")

    async def one_m(_: web.Request) -> web.Response:
        return web.Response(body=BODY_1M, content_type="text/plain")

    async def sse(request: web.Request) -> web.StreamResponse:
        n = min(int(request.query.get("n", "100")), 100_000)
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
        await resp.prepare(request)
        for i in range(n):
            await resp.write(sse_event(i))
        await resp.write_eof()
        return resp

    async def sized(request: web.Request) -> web.StreamResponse:
        size = min(int(request.query.get("size", "0")), 8 << 30)
        resp = web.StreamResponse(headers={"Content-Type": "application/octet-stream"})
        block = PATTERNS.get(request.query.get("pattern", "random"))
        if block is None:
            return web.Response(status=400, text=f"pattern: one of {sorted(PATTERNS)}")
        resp.content_length = size
        await resp.prepare(request)
        view, sent = memoryview(block), 0
        while sent < size:
            chunk = view[: min(len(block), size - sent)]
            await resp.write(chunk)
            sent += len(chunk)
        await resp.write_eof()
        return resp

    async def otlp(request: web.Request) -> web.Response:
        body = await request.read()
        if otlp_out and request.path == "/v1/traces":
            with open(otlp_out, "a", encoding="utf-8") as out:
                out.writelines(line + "\n" for line in _span_lines(body))
        # An empty Export*ServiceResponse: the exporter reads only the status.
        return web.Response(body=b"", content_type="application/x-protobuf")

    app = web.Application(client_max_size=64 << 20)
    app.router.add_post("/v1/traces", otlp)
    app.router.add_post("/v1/metrics", otlp)
    app.router.add_get("/1k", one_k)
    app.router.add_get("/1m", one_m)
    app.router.add_get("/sse", sse)
    app.router.add_get("/bytes", sized)
    return app


def _listen() -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    sock.listen(1024)
    return sock


async def _serve(cert: str, key: str, otlp_out: str | None = None) -> None:
    from aiohttp import web

    runner = web.AppRunner(_app(otlp_out), access_log=None, handle_signals=True)
    await runner.setup()
    tls = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    tls.load_cert_chain(cert, key)
    plain_sock, tls_sock = _listen(), _listen()
    await web.SockSite(runner, plain_sock, backlog=1024).start()
    await web.SockSite(runner, tls_sock, ssl_context=tls, backlog=1024).start()
    print(json.dumps({"http": plain_sock.getsockname()[1], "https": tls_sock.getsockname()[1]}), flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    import signal

    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    await runner.cleanup()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cert", required=True)
    parser.add_argument("--key", required=True)
    parser.add_argument("--loop", choices=("asyncio", "uvloop"), default="asyncio")
    parser.add_argument("--otlp-out", default=None, help="decode exported spans into this JSON-lines file")
    args = parser.parse_args(argv)
    if args.loop == "uvloop":
        import uvloop

        asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    asyncio.run(_serve(args.cert, args.key, args.otlp_out))
    return 0


# ---------------------------------------------------------------------------- the controller

class Upstream:
    """Starts the upstream child with a fresh CA in ``directory``; ``ca_file`` is its CA."""

    def __init__(self, directory: Path, *, loop: str = "asyncio", cpus: set[int] | None = None,
                 otlp_out: Path | None = None):
        from chaperone_testbed.pki import CertAuthority

        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        ca = CertAuthority("chaperone-bench-upstream-ca")
        self.ca_file = ca.write_cert(self.directory / "upstream-ca.crt")
        self.pair = ca.write_server_cert(self.directory, "upstream", dns_names=("localhost",),
                                         ip_addresses=("127.0.0.1",))
        self.loop, self.cpus, self.otlp_out = loop, cpus, otlp_out
        self.proc: subprocess.Popen | None = None
        self.http_port = self.https_port = 0

    def start(self, timeout: float = 30.0) -> "Upstream":
        cpus = self.cpus
        self.proc = subprocess.Popen(
            [sys.executable, str(Path(__file__).resolve()), "--cert", str(self.pair.cert_path),
             "--key", str(self.pair.key_path), "--loop", self.loop]
            + (["--otlp-out", str(self.otlp_out)] if self.otlp_out else []),
            stdout=subprocess.PIPE, stderr=(self.directory / "upstream.log").open("wb"),
            preexec_fn=(lambda: os.sched_setaffinity(0, cpus)) if cpus else None)
        assert self.proc.stdout is not None
        deadline = time.monotonic() + timeout
        os.set_blocking(self.proc.stdout.fileno(), False)
        buf = b""
        while b"\n" not in buf:
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                log = (self.directory / "upstream.log").read_text(errors="replace")[-3000:]
                raise RuntimeError(f"the bench upstream did not start:\n{log}")
            buf += self.proc.stdout.read() or b""
            time.sleep(0.02)
        ports = json.loads(buf.split(b"\n", 1)[0])
        self.http_port, self.https_port = ports["http"], ports["https"]
        return self

    @property
    def otlp_endpoint(self) -> str:
        """``OTEL_EXPORTER_OTLP_ENDPOINT`` for the sink (the exporters append ``/v1/...``)."""
        return f"http://127.0.0.1:{self.http_port}"

    def url(self, scheme: str, path: str) -> str:
        port = self.https_port if scheme == "https" else self.http_port
        return f"{scheme}://127.0.0.1:{port}{path}"

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None


if __name__ == "__main__":
    sys.exit(main())
