"""A hostile body being masked does not stall the other flows of the sidecar.

Whoever controls upstream data (an agent can write an object to S3 or a page to a web server
and read it back) chooses the body that is masked. A buffered body was masked in Mask's
``response`` hook on mitmproxy's event loop, so while one hostile body was being masked every
other flow of the pod waited. Now a whole body from ``mask.OFFLOAD_BYTES`` on is masked in a
worker thread (the hook returns a coroutine mitmproxy awaits).

Through a real standalone sidecar and a real upstream: a ~1 MiB flood of
``-----BEGIN PRIVATE KEY-----`` (the slowest known whole-body case after the finder fixes,
seconds of masking; under ``stream_large_bodies`` so it is buffered) is requested; once the
upstream has sent it, small requests go through the same sidecar. They must all be answered
before the hostile one (and each in under half of its time); the hostile answer is still
masked (a card and a key id planted at its end).
"""

from __future__ import annotations

import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import httpx
import yaml

from .pod import API, free_port, standalone_proxy

_UNIT = b"-----BEGIN PRIVATE KEY-----"
# The planted secrets after a "{": the flood's open PEM runs stop there, so they are found alone.
HOSTILE = _UNIT * (1000 * 1024 // len(_UNIT)) + b'\n{"card": "4111 1111 1111 1111", "id": "AKIAIOSFODNN7EXAMPLE"}\n'



def test_a_hostile_body_being_masked_does_not_stall_other_flows(tmp_path):
    sent = threading.Event()

    class Upstream(BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 - http.server's name
            body = HOSTILE if self.path == "/big" else b'{"ok": true}'
            self.send_response(200)
            self.send_header("content-type", "text/plain" if self.path == "/big" else "application/json")
            self.send_header("content-length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)
            self.wfile.flush()
            if self.path == "/big":
                sent.set()

        def log_message(self, *args) -> None:
            pass

    port = free_port()
    server = ThreadingHTTPServer(("127.0.0.1", port), Upstream)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    conf = tmp_path / "conf"
    for sub in ("connections", "policies"):
        (conf / sub).mkdir(parents=True)
    (conf / "chaperone.yaml").write_text(yaml.safe_dump({"namespace": "laptop", "user": "dana"}))
    (conf / "connections" / "web.yaml").write_text(yaml.safe_dump(
        {"apiVersion": API, "kind": "ClaudeConnection", "metadata": {"name": "web"},
         "spec": {"type": "http", "hosts": ["127.0.0.1"]}}))
    (conf / "policies" / "p.yaml").write_text(yaml.safe_dump(
        {"apiVersion": API, "kind": "AccessPolicy", "metadata": {"name": "p"},
         "spec": {"defaultEffect": "allow", "rules": [
              {"name": "no-delete", "match": {"methods": ["DELETE"]}, "block": {}}],
             "masking": {"detectors": ["all"]}}}))
    big: dict[str, object] = {}
    small: list[tuple[float, float, int]] = []  # (started, done, status)
    try:
        with standalone_proxy(conf, tmp_path / "proxy.log") as proxy:
            url = f"http://127.0.0.1:{port}"

            def client() -> httpx.Client:
                return httpx.Client(proxy=f"http://127.0.0.1:{proxy.port}", trust_env=False, timeout=120)

            with client() as c:  # warm: the first flow of a sidecar loads policies and such
                warm = c.get(f"{url}/small")
                assert warm.status_code == 200, warm.text

            def fetch_big() -> None:
                big["started"] = time.monotonic()
                with client() as c:
                    big["response"] = c.get(f"{url}/big")
                big["done"] = time.monotonic()

            worker = threading.Thread(target=fetch_big)
            worker.start()
            assert sent.wait(60), "the upstream never sent the hostile body"
            with client() as c:
                for _ in range(3):  # new connections each: nothing rides on the big one's
                    started = time.monotonic()
                    status = c.get(f"{url}/small", headers={"connection": "close"}).status_code
                    small.append((started, time.monotonic(), status))
            worker.join(120)
            assert not worker.is_alive()
    finally:
        server.shutdown()
    response = big["response"]
    assert isinstance(response, httpx.Response) and response.status_code == 200
    assert b"4111 1111 1111 1111" not in response.content and b"AKIAIOSFODNN7EXAMPLE" not in response.content
    assert b"[MASKED:credit-card]" in response.content and b"[MASKED:aws-access-key-id]" in response.content
    big_time = big["done"] - big["started"]  # type: ignore[operator]
    assert all(status == 200 for _, _, status in small)
    # Every small request was answered while the hostile body was still being masked.
    assert all(done < big["done"] for _, done, _ in small), (small, big)  # type: ignore[operator]
    assert all(done - started < big_time / 2 for started, done, _ in small), (small, big_time)
