"""A bodyRegex block rule through a real sidecar, with a body larger than its streaming size.

mitmproxy streams a request body above ``stream_large_bodies`` (1 MiB) as it arrives; told to
buffer it instead (in ``requestheaders``), it streams it again on its own once the buffer passes
that size, before the ``request`` hook - so the body went upstream unjudged and the upstream's
answer reached the agent. Such a body must be read and judged, or refused before any of it
leaves (413).
"""

from __future__ import annotations

import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import httpx
import yaml

from .pod import API, free_port, standalone_proxy


def test_a_large_body_a_body_rule_blocks_never_reaches_the_upstream(tmp_path):
    received: list[bytes] = []

    class Upstream(BaseHTTPRequestHandler):
        def do_POST(self) -> None:  # noqa: N802 - http.server's name
            received.append(self.rfile.read(int(self.headers.get("content-length", 0)))[:40])
            self.send_response(200)
            self.send_header("content-length", "2")
            self.end_headers()
            self.wfile.write(b"ok")

        def log_message(self, *args) -> None:
            pass

    port = free_port()
    server = ThreadingHTTPServer(("127.0.0.1", port), Upstream)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    conf = tmp_path / "conf"
    for sub in ("connections", "policies"):
        (conf / sub).mkdir(parents=True)
    (conf / "chaperone.yaml").write_text(yaml.safe_dump({"namespace": "laptop", "user": "dana"}))
    (conf / "connections" / "db-api.yaml").write_text(yaml.safe_dump(
        {"apiVersion": API, "kind": "ClaudeConnection", "metadata": {"name": "db-api"},
         "spec": {"type": "http", "hosts": ["127.0.0.1"]}}))
    (conf / "policies" / "p.yaml").write_text(yaml.safe_dump(
        {"apiVersion": API, "kind": "AccessPolicy", "metadata": {"name": "p"},
         "spec": {"defaultEffect": "allow", "rules": [
             {"name": "no-drop", "match": {"bodyRegex": "DROP TABLE"}, "block": {}}]}}))
    try:
        with standalone_proxy(conf, tmp_path / "proxy.log") as proxy, \
                httpx.Client(proxy=f"http://127.0.0.1:{proxy.port}", trust_env=False, timeout=30) as client:
            small = client.post(f"http://127.0.0.1:{port}/q", content=b"DROP TABLE users;")
            large = client.post(f"http://127.0.0.1:{port}/q", content=b"DROP TABLE users;" + b" " * (2 << 20))
            fine = client.post(f"http://127.0.0.1:{port}/q", content=b"SELECT 1;" + b" " * (2 << 20))
    finally:
        server.shutdown()
    assert small.status_code == 403 and small.json()["rule"]["name"] == "no-drop"
    # read and judged (403), or refused as too large to read first (413): never forwarded
    assert large.status_code in (403, 413) and large.headers["X-Chaperone-Refused"] == "blocked"
    assert fine.status_code in (200, 413)  # judged and let through, or refused the same way
    assert all(body.startswith(b"SELECT") for body in received)
