"""Large and chunked request bodies that must be judged by their content, through a real sidecar.

mitmproxy applies its ``stream_large_bodies`` to every flow: a body an addon told it to buffer
(``flow.request.stream = False``) is streamed on again, by mitmproxy alone, once the buffer
passes that size - before the ``request`` hook, so before any addon saw the body. With the
sidecar's 1 MiB there, a 2 MiB AWS query-protocol ``Action=DeleteQueue`` was judged as "sqs:*"
(its operation is in the body) and reached the upstream, an Anthropic request declaring a blocked
tool went through judged without its tools, and a ``bodyRegex`` rule could only refuse every
body over 1 MiB (413) instead of reading up to ``masking.maxBodyBytes`` as the CRD says.

Now Chaperone streams bodies itself and mitmproxy only past ``READ_LIMIT`` (addons/streaming.py):
a body that must be judged is read up to its limit and judged; larger: 413 naming the limit; no
length (chunked): 411. Nothing of a refused request reaches the upstream (a real http.server).
"""

from __future__ import annotations

import gzip
import json
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import httpx
import pytest
import yaml

from .pod import API, free_port, standalone_proxy

MIB = 1024 * 1024
SIGNED_SQS = ("AWS4-HMAC-SHA256 Credential=AKIDEXAMPLE/20260101/us-east-1/sqs/aws4_request, "
              "SignedHeaders=host;x-amz-date, Signature=" + "0" * 64)


def _read_chunked(rfile) -> bytes:
    body = b""
    while True:
        size = int(rfile.readline().split(b";")[0], 16)
        if size == 0:
            while rfile.readline() not in (b"\r\n", b"\n", b""):
                pass
            return body
        body += rfile.read(size)
        rfile.readline()


@pytest.fixture(scope="module")
def proxy(tmp_path_factory) -> Iterator[tuple[int, int, list[tuple[str, bytes]]]]:
    received: list[tuple[str, bytes]] = []

    class Upstream(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def do_POST(self) -> None:  # noqa: N802 - http.server's name
            if "chunked" in self.headers.get("transfer-encoding", "").lower():
                body = _read_chunked(self.rfile)
            else:
                body = self.rfile.read(int(self.headers.get("content-length", 0)))
            received.append((self.path, body))
            self.send_response(200)
            self.send_header("content-type", "application/json")
            self.send_header("content-length", "2")
            self.end_headers()
            self.wfile.write(b"{}")

        def log_message(self, *args) -> None:
            pass

    port = free_port()
    server = ThreadingHTTPServer(("127.0.0.1", port), Upstream)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    root = tmp_path_factory.mktemp("large-bodies")
    conf = root / "conf"
    for sub in ("connections", "policies"):
        (conf / sub).mkdir(parents=True)
    (conf / "chaperone.yaml").write_text(yaml.safe_dump({"namespace": "laptop", "user": "dana"}))
    connections = {
        "db-api": {"type": "http", "hosts": ["127.0.0.1"]},
        "aws": {"type": "aws", "hosts": ["localhost"],
                "aws": {"region": "us-east-1", "endpointURL": f"http://localhost:{port}"}},
        "claude": {"type": "anthropic", "hosts": ["127.0.0.2"]},
        "tools": {"type": "mcp", "hosts": ["127.0.0.3"]},
    }
    for name, spec in connections.items():
        (conf / "connections" / f"{name}.yaml").write_text(yaml.safe_dump(
            {"apiVersion": API, "kind": "ClaudeConnection", "metadata": {"name": name}, "spec": spec}))
    policies = {
        "db": {"connections": ["db-api"], "defaultEffect": "allow", "masking": {"maxBodyBytes": 3 * MIB},
               "rules": [{"name": "no-drop", "match": {"bodyRegex": "DROP TABLE"}, "block": {}}]},
        "aws": {"connections": ["aws"], "defaultEffect": "allow", "rules": [
            {"name": "keep-queues", "match": {"aws": {"actions": ["sqs:DeleteQueue"]}}, "block": {}},
            {"name": "no-prod-secrets", "match": {"aws": {"actions": ["secretsmanager:GetSecretValue"],
                                                          "resources": ["prod/*"]}}, "block": {}},
            {"name": "keep-prod-objects", "match": {"aws": {"actions": ["s3:DeleteObjects"],
                                                            "resources": ["data/prod/*"]}}, "block": {}}]},
        "claude": {"connections": ["claude"], "defaultEffect": "allow", "rules": [
            {"name": "no-bash", "match": {"anthropic": {"tools": ["bash"]}}, "block": {}}]},
        "tools": {"connections": ["tools"], "defaultEffect": "allow", "rules": [
            {"name": "no-delete", "match": {"mcp": {"tools": ["delete_*"]}}, "block": {}}]},
    }
    for name, spec in policies.items():
        (conf / "policies" / f"{name}.yaml").write_text(yaml.safe_dump(
            {"apiVersion": API, "kind": "AccessPolicy", "metadata": {"name": name}, "spec": spec}))
    anthropic = ThreadingHTTPServer(("127.0.0.2", port), Upstream)
    threading.Thread(target=anthropic.serve_forever, daemon=True).start()
    mcp = ThreadingHTTPServer(("127.0.0.3", port), Upstream)
    threading.Thread(target=mcp.serve_forever, daemon=True).start()
    try:
        with standalone_proxy(conf, root / "proxy.log") as sidecar:
            yield sidecar.port, port, received
    finally:
        server.shutdown()
        anthropic.shutdown()
        mcp.shutdown()


def _client(proxy_port: int) -> httpx.Client:
    return httpx.Client(proxy=f"http://127.0.0.1:{proxy_port}", trust_env=False, timeout=60)


def _chunks(body: bytes, size: int = 64 * 1024) -> Iterator[bytes]:
    for i in range(0, len(body), size):
        yield body[i:i + size]


def _reached(received: list[tuple[str, bytes]], path: str) -> list[int]:
    return [len(body) for p, body in received if p == path]


@pytest.mark.parametrize("where", ["first-kib", "past-first-mib"])
def test_a_body_rule_reads_a_large_body_and_blocks_it(proxy, where):
    proxy_port, port, received = proxy
    body = b"x" * (MIB + MIB // 2) + b"DROP TABLE users;" + b" " * (MIB // 2)
    if where == "first-kib":
        body = b"DROP TABLE users;" + b" " * (2 * MIB)
    with _client(proxy_port) as client:
        resp = client.post(f"http://127.0.0.1:{port}/sql-{where}", content=body)
    assert resp.status_code == 403, resp.text[:300]
    assert resp.json()["rule"]["name"] == "no-drop"
    assert _reached(received, f"/sql-{where}") == []


def test_a_large_body_the_rule_does_not_match_reaches_the_upstream_whole(proxy):
    proxy_port, port, received = proxy
    body = b"SELECT 1;" + b" " * (2 * MIB)
    with _client(proxy_port) as client:
        resp = client.post(f"http://127.0.0.1:{port}/select", content=body)
    assert resp.status_code == 200, resp.text[:300]
    assert _reached(received, "/select") == [len(body)]


def test_a_body_over_max_body_bytes_is_refused_naming_the_limit(proxy):
    proxy_port, port, received = proxy
    with _client(proxy_port) as client:
        resp = client.post(f"http://127.0.0.1:{port}/huge", content=b"SELECT 1;" + b" " * (4 * MIB))
    assert resp.status_code == 413, resp.text[:300]
    refusal = resp.json()
    assert f"larger than {3 * MIB} bytes" in refusal["message"]
    assert "maxBodyBytes" in refusal["how_to_get_access"]
    assert _reached(received, "/huge") == []


@pytest.mark.parametrize("where", ["first-kib", "past-first-mib", "clean"])
def test_a_chunked_body_a_body_rule_applies_to_never_reaches_the_upstream(proxy, where):
    proxy_port, port, received = proxy
    body = {"first-kib": b"DROP TABLE users;" + b" " * (2 * MIB),
            "past-first-mib": b" " * (MIB + 4096) + b"DROP TABLE users;" + b" " * 4096,
            "clean": b"SELECT 1;"}[where]
    with _client(proxy_port) as client:
        resp = client.post(f"http://127.0.0.1:{port}/chunked-{where}", content=_chunks(body))
    assert resp.status_code == 411, resp.text[:300]
    assert "no Content-Length" in resp.json()["message"]
    assert _reached(received, f"/chunked-{where}") == []


def _sqs(action: str, pad: int) -> bytes:
    return (f"Action={action}&QueueUrl=http%3A%2F%2Flocalhost%2F1%2Fq&Version=2012-11-05&"
            f"Pad={'x' * pad}").encode()


def test_an_aws_query_call_padded_past_a_mib_is_judged_by_its_action(proxy):
    proxy_port, port, received = proxy
    headers = {"Authorization": SIGNED_SQS, "X-Amz-Date": "20260101T000000Z",
               "Content-Type": "application/x-www-form-urlencoded; charset=utf-8"}
    with _client(proxy_port) as client:
        delete = client.post(f"http://localhost:{port}/aws-delete", content=_sqs("DeleteQueue", 2 * MIB),
                             headers=headers)
        listed = client.post(f"http://localhost:{port}/aws-list", content=_sqs("ListQueues", 2 * MIB),
                             headers=headers)
        # The URL names a harmless Action, the body the real one: judged on both (conflict).
        hidden = client.post(f"http://localhost:{port}/aws-hidden?Action=ListQueues",
                             content=_sqs("DeleteQueue", 2 * MIB),
                             headers={**headers, "Content-Type": "text/plain"})
        chunked = client.post(f"http://localhost:{port}/aws-chunked",
                              content=_chunks(_sqs("DeleteQueue", 2 * MIB)), headers=headers)
    assert delete.status_code == 403, delete.text[:300]
    assert "keep-queues" in delete.text
    assert _reached(received, "/aws-delete") == []
    assert listed.status_code == 200 and _reached(received, "/aws-list") == [len(_sqs("ListQueues", 2 * MIB))]
    assert hidden.status_code == 403 and _reached(received, "/aws-hidden") == [], hidden.text[:300]
    assert chunked.status_code == 411 and _reached(received, "/aws-chunked") == []


def test_an_anthropic_request_declaring_a_blocked_tool_is_judged_past_a_mib(proxy):
    proxy_port, port, received = proxy
    history = [{"role": "user", "content": "y" * (2 * MIB)}]
    body = {"model": "claude-sonnet-4-5", "max_tokens": 10, "messages": history,
            "tools": [{"name": "bash", "description": "run", "input_schema": {"type": "object"}}]}
    with _client(proxy_port) as client:
        blocked = client.post(f"http://127.0.0.2:{port}/v1/messages", json=body)
        body["tools"][0]["name"] = "calculator"
        fine = client.post(f"http://127.0.0.2:{port}/v1/messages", json=body)
    assert blocked.status_code == 403, blocked.text[:300]
    assert "no-bash" in blocked.text
    assert fine.status_code == 200, fine.text[:300]
    reached = [json.loads(b)["tools"][0]["name"] for p, b in received if p == "/v1/messages"]
    assert reached == ["calculator"]


@pytest.mark.parametrize("case", ["past-max-body-bytes", "trailing-garbage", "bomb"])
def test_a_compressed_body_is_judged_on_what_it_decodes_to(proxy, case):
    """A body rule reads the decoded body. Decoded past maxBodyBytes: 413 (the pattern was past
    the part the rule reads). A gzip member followed by garbage (which mitmproxy's decoder
    rejects, so the raw, compressed bytes were judged, while servers decode the member): judged
    on the member. A bomb is never expanded past the limit."""
    proxy_port, port, received = proxy
    body = {"past-max-body-bytes": b"SELECT 1;" + b" " * (3 * MIB) + b"DROP TABLE users;",
            "trailing-garbage": b"DROP TABLE users;",
            "bomb": b"\0" * (512 * MIB)}[case]
    wire = gzip.compress(body, 1) + (b"garbage" if case == "trailing-garbage" else b"")
    with _client(proxy_port) as client:
        resp = client.post(f"http://127.0.0.1:{port}/gz-{case}", content=wire,
                           headers={"Content-Encoding": "gzip"})
    assert resp.status_code == (403 if case == "trailing-garbage" else 413), resp.text[:300]
    assert _reached(received, f"/gz-{case}") == []


def test_an_mcp_call_padded_past_a_mib_is_judged_on_its_tool(proxy):
    """Padding in the arguments moves nothing out of sight: the call is read and judged (the
    blocked tool refused as a JSON-RPC error, the allowed one forwarded whole); past the
    classifier's 4 MiB: 413; chunked: 411."""
    proxy_port, port, received = proxy
    headers = {"Content-Type": "application/json", "Accept": "application/json, text/event-stream"}

    def call(tool: str, pad: int) -> bytes:
        return json.dumps({"jsonrpc": "2.0", "id": 7, "method": "tools/call",
                           "params": {"name": tool, "arguments": {"path": "/tmp/x", "pad": "p" * pad}}}).encode()
    with _client(proxy_port) as client:
        url = f"http://127.0.0.3:{port}/mcp-%s"
        delete = client.post(url % "delete", content=call("delete_file", 2 * MIB), headers=headers)
        read = client.post(url % "read", content=call("read_file", 2 * MIB), headers=headers)
        huge = client.post(url % "huge", content=call("read_file", 5 * MIB), headers=headers)
        chunked = client.post(url % "chunked", content=_chunks(call("delete_file", 2 * MIB)), headers=headers)
    assert delete.headers.get("X-Chaperone-Refused") == "blocked", delete.text[:300]
    assert delete.json()["error"]["data"]["rule"]["name"] == "no-delete"
    assert read.status_code == 200 and read.headers.get("X-Chaperone-Refused") is None, read.text[:300]
    assert _reached(received, "/mcp-read") == [len(call("read_file", 2 * MIB))]
    assert huge.status_code == 413 and f"larger than {4 * MIB} bytes" in huge.json()["message"]
    assert chunked.status_code == 411
    assert [p for p, _ in received if p in ("/mcp-delete", "/mcp-huge", "/mcp-chunked")] == []


def test_an_aws_json_call_padded_past_the_resource_limit_cannot_hide_its_resource(proxy):
    """JSON protocol: the operation is in X-Amz-Target, the resource (SecretId) in the body, read
    for resources up to 1 MiB. Padded past it, the old code streamed it and derived no resource,
    so a rule on resources did not hold: the secret was fetched. Now: read and judged up to the
    limit, refused above it (413, naming it) when a rule tests resources."""
    proxy_port, port, received = proxy
    headers = {"Authorization": SIGNED_SQS.replace("/sqs/", "/secretsmanager/"),
               "X-Amz-Date": "20260101T000000Z", "X-Amz-Target": "secretsmanager.GetSecretValue",
               "Content-Type": "application/x-amz-json-1.1"}

    def body(secret: str, pad: int) -> bytes:
        return json.dumps({"SecretId": secret, "Pad": "x" * pad}).encode()
    with _client(proxy_port) as client:
        small = client.post(f"http://localhost:{port}/sm-small", content=body("prod/db", MIB // 2), headers=headers)
        padded = client.post(f"http://localhost:{port}/sm-padded", content=body("prod/db", 2 * MIB), headers=headers)
        dev = client.post(f"http://localhost:{port}/sm-dev", content=body("dev/db", MIB // 2), headers=headers)
    assert small.status_code == 403 and "no-prod-secrets" in small.text, small.text[:300]
    assert padded.status_code == 413 and f"larger than {MIB} bytes" in padded.text, padded.text[:300]
    assert dev.status_code == 200
    assert [p for p, _ in received if p.startswith("/sm-")] == ["/sm-dev"]


def test_s3_delete_objects_padded_past_a_mib_is_judged_by_its_keys(proxy):
    """DeleteObjects lists its keys in the XML body: padded past 1 MiB the old code streamed it,
    derived only the bucket, and a rule on data/prod/* did not hold."""
    proxy_port, port, received = proxy
    headers = {"Authorization": SIGNED_SQS.replace("/sqs/", "/s3/"), "X-Amz-Date": "20260101T000000Z",
               "Content-Type": "application/xml"}

    def delete(key: str) -> bytes:
        return (f"<Delete>{' ' * (2 * MIB)}<Object><Key>{key}</Key></Object><Quiet>true</Quiet></Delete>").encode()
    with _client(proxy_port) as client:
        prod = client.post(f"http://localhost:{port}/data?delete", content=delete("prod/a"), headers=headers)
        dev = client.post(f"http://localhost:{port}/data?delete=", content=delete("dev/a"), headers=headers)
    assert prod.status_code == 403 and "keep-prod-objects" in prod.text, prod.text[:300]
    assert dev.status_code == 200, dev.text[:300]
    assert [p for p, _ in received if p.startswith("/data")] == ["/data?delete="]
