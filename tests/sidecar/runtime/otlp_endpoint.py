"""A real OTLP/HTTP endpoint for the exporter tests: a threaded ``http.server`` that keeps
every POST (path, headers, body) and answers each with the next queued (status, headers),
else 200 - what a collector does as far as an exporter can tell."""

from __future__ import annotations

import contextlib
import http.server
import ssl
import threading
from collections.abc import Iterator


class Endpoint(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, as a collector answers

    def do_POST(self):  # noqa: N802
        body = self.rfile.read(int(self.headers["content-length"]))
        self.server.seen.append((self.path, dict(self.headers.items()), body))
        status, headers = self.server.answers.pop(0) if self.server.answers else (200, {})
        self.send_response(status)
        for k, v in {"content-length": "0", **headers}.items():
            self.send_header(k, v)
        self.end_headers()

    def log_message(self, *args):
        pass


@contextlib.contextmanager
def otlp_endpoint() -> Iterator[http.server.ThreadingHTTPServer]:
    """A running endpoint (``.seen``: the POSTs, ``.answers``: queued answers)."""
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Endpoint)
    server.seen, server.answers = [], []  # type: ignore[attr-defined]
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()


def url(server: http.server.HTTPServer, path: str = "") -> str:
    scheme = "https" if isinstance(server.socket, ssl.SSLSocket) else "http"
    return f"{scheme}://127.0.0.1:{server.server_address[1]}{path}"
