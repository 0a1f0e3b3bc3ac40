"""Streamed LLM answers through the sidecar process, read by the official Anthropic SDKs.

The upstream (a local HTTPS server with its own CA, behind an ``anthropic`` connection) answers
``POST /v1/messages`` with a Messages event stream in which secrets are **split across two
``content_block_delta`` events**, each event written and flushed on its own (so the sidecar
gets them in separate reads): an AWS secret access key in the text, an AWS access key id in a
tool call's ``input_json_delta`` and in a ``thinking_delta``. No single JSON string on the
wire holds a whole secret, so masking the bytes (what the sidecar did before) lets the SDK
join the halves into the secret.

The clients are the official SDKs as an agent runs them, configured only by the pod's
environment: Python ``anthropic`` (``messages.stream()`` and ``messages.create(stream=True)``)
and TypeScript ``@anthropic-ai/sdk`` on Node (installed by ``make node-deps`` into the cache;
found through ``CHAPERONE_NODE_MODULES``, missing = failure). What the SDK assembled must hold
``[MASKED:...]`` and no half of any secret; the recording shipped to S3 must hold no half either.
"""

from __future__ import annotations

import json
import os
import ssl
import subprocess
import sys
import textwrap
import threading
import time
import uuid
from http.server import BaseHTTPRequestHandler
from pathlib import Path
from typing import Any

import boto3
import pytest

from chaperone_operator.injection.settings import InjectionSettings
from chaperone_testbed.pki import CertAuthority

from .pod import (InjectedPod, _QuietServer, connection, free_port, policy, setup_namespace,
                  wait_for)

HOST = "127.0.0.2"  # loopback, but not in the NO_PROXY the webhook writes
API_KEY = "sk-ant-sidecar-held-key-7f3e"
SECRET = "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY"  # AWS's documentation example
KEY_ID = "AKIAIOSFODNN7EXAMPLE"
HALVES = [SECRET[:20], SECRET[20:], KEY_ID[:10], KEY_ID[10:]]
TEXT_PARTS = ["Found it in the CI config: aws_secret_access_key = " + SECRET[:20],
              SECRET[20:] + "\nRotate it soon."]
TOOL_PARTS = ['{"command": "aws configure set aws_access_key_id ' + KEY_ID[:10], KEY_ID[10:] + '"}']
THINKING_PARTS = ["The key id is " + KEY_ID[:10], KEY_ID[10:] + " which I should not repeat."]


def _event(name: str, data: dict[str, Any]) -> bytes:
    return f"event: {name}\ndata: {json.dumps(data)}\n\n".encode()


def message_events() -> list[bytes]:
    """A Messages stream (thinking, text, tool_use blocks), one event per write."""
    events = [_event("message_start", {"type": "message_start", "message": {
        "id": "msg_01", "type": "message", "role": "assistant", "content": [], "model": "claude-test",
        "stop_reason": None, "stop_sequence": None, "usage": {"input_tokens": 12, "output_tokens": 1}}})]
    blocks = [({"type": "thinking", "thinking": "", "signature": ""}, "thinking_delta", "thinking", THINKING_PARTS),
              ({"type": "text", "text": ""}, "text_delta", "text", TEXT_PARTS),
              ({"type": "tool_use", "id": "toolu_01", "name": "bash", "input": {}}, "input_json_delta",
               "partial_json", TOOL_PARTS)]
    for index, (block, delta_type, field, parts) in enumerate(blocks):
        events.append(_event("content_block_start", {"type": "content_block_start", "index": index,
                                                     "content_block": block}))
        if index == 1:
            events.append(_event("ping", {"type": "ping"}))
        for part in parts:
            events.append(_event("content_block_delta", {"type": "content_block_delta", "index": index,
                                                         "delta": {"type": delta_type, field: part}}))
        if delta_type == "thinking_delta":
            events.append(_event("content_block_delta", {"type": "content_block_delta", "index": index,
                                                         "delta": {"type": "signature_delta",
                                                                   "signature": "c2lnbmF0dXJl"}}))
        events.append(_event("content_block_stop", {"type": "content_block_stop", "index": index}))
    events.append(_event("message_delta", {"type": "message_delta", "delta": {"stop_reason": "tool_use",
                                                                               "stop_sequence": None},
                                           "usage": {"output_tokens": 42}}))
    events.append(_event("message_stop", {"type": "message_stop"}))
    return events


class SSEUpstream:
    """HTTPS server answering ``POST /v1/messages`` with ``message_events()``, chunked, one
    flushed write per event (a few ms apart, so they reach the sidecar as separate reads)."""

    def __init__(self, directory: Path) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        self.ca = CertAuthority(f"chaperone-it-sse-{uuid.uuid4().hex[:6]}")
        self.ca_file = self.ca.write_cert(directory / "upstream-ca.crt")
        pair = self.ca.write_server_cert(directory, "upstream", dns_names=("localhost",), ip_addresses=(HOST,))
        self.seen: list[dict[str, Any]] = []
        upstream = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_POST(self) -> None:  # noqa: N802 (http.server's naming)
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                upstream.seen.append({"path": self.path, "headers": {k.lower(): v for k, v in self.headers.items()},
                                      "body": json.loads(body or b"{}")})
                if self.headers.get("x-api-key") != API_KEY:
                    data = json.dumps({"type": "error", "error": {"type": "authentication_error",
                                                                  "message": "invalid x-api-key"}}).encode()
                    self.send_response(401)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(data)))
                    self.end_headers()
                    self.wfile.write(data)
                    return
                self.send_response(200)
                self.send_header("Content-Type", "text/event-stream; charset=utf-8")
                self.send_header("Cache-Control", "no-cache")
                self.send_header("Transfer-Encoding", "chunked")
                self.end_headers()
                for event in message_events():
                    self.wfile.write(b"%x\r\n%s\r\n" % (len(event), event))
                    self.wfile.flush()
                    time.sleep(0.005)
                self.wfile.write(b"0\r\n\r\n")
                self.wfile.flush()

            def log_message(self, *args: Any) -> None:
                pass

        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(pair.cert_path, pair.key_path)
        self.server = _QuietServer((HOST, 0), Handler)
        self.server.socket = context.wrap_socket(self.server.socket, server_side=True)
        self.port = self.server.socket.getsockname()[1]
        self.url = f"https://{HOST}:{self.port}"
        threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def node_modules() -> Path:
    """Where ``make node-deps`` installed the Node SDK; a missing install fails the test."""
    default = Path(os.environ.get("CHAPERONE_CACHE", Path.home() / ".cache" / "chaperone")) / "node" / "node_modules"
    path = Path(os.environ.get("CHAPERONE_NODE_MODULES") or default)
    if not (path / "@anthropic-ai" / "sdk").is_dir() or not (path / "undici").is_dir():
        pytest.fail(f"@anthropic-ai/sdk and undici are not installed in {path}: run `make node-deps`")
    return path


@pytest.fixture(scope="module")
def pod(control_plane, crds_installed, s3_server, tmp_path_factory):
    root = tmp_path_factory.mktemp("sdk-streams")
    upstream = SSEUpstream(root / "upstream")
    s3 = boto3.client("s3", **s3_server.client_kwargs())
    bucket = f"recordings-{uuid.uuid4().hex[:8]}"
    s3.create_bucket(Bucket=bucket)
    ns = f"sdk-streams-{uuid.uuid4().hex[:8]}"
    conns = [connection("claude", {"type": "anthropic", "hosts": [HOST],
                                   "credentials": {"source": "secret", "secretRef": {"name": "claude-key",
                                                                                     "tokenKey": "token"}},
                                   "upstreamCA": {"kind": "ConfigMap", "name": "claude-ca", "key": "ca.crt"}})]
    policies = [policy("claude", {"connections": ["claude"], "defaultEffect": "allow", "rules": [
        {"name": "messages", "match": {"methods": ["POST"]}, "allow": {}}],
                                  "masking": {"detectors": ["aws-access-key-id", "aws-secret-key"]}})]
    setup_namespace(control_plane, ns, conns + policies)
    settings = InjectionSettings(proxy_port=free_port(), health_port=free_port(), s3_bucket=bucket,
                                 s3_endpoint=s3_server.endpoint_url, s3_region=s3_server.region,
                                 sidecar_secret="chaperone-sidecar")
    sidecar = InjectedPod(
        control_plane, ns, root / "pod", connections=conns, settings=settings, mode="explicit",
        secrets={"claude-key": {"token": API_KEY},
                 "chaperone-sidecar": {"AWS_ACCESS_KEY_ID": s3_server.access_key,
                                       "AWS_SECRET_ACCESS_KEY": s3_server.secret_key}},
        configmaps={"claude-ca": {"ca.crt": upstream.ca_file.read_bytes()}})
    sidecar.start()
    try:
        sidecar.wait_ready()
        yield sidecar, upstream, s3, bucket
    finally:
        code = sidecar.stop()
        upstream.close()
    assert code == 0, sidecar.logs()


def run(argv: list[str], env: dict[str, str], timeout: float = 90) -> dict[str, Any]:
    out = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=timeout)
    assert out.returncode == 0, out.stdout + out.stderr
    return json.loads(out.stdout.strip().splitlines()[-1])


def assert_masked(got: dict[str, Any]) -> None:
    """The SDK's assembled text, thinking and tool input: tokens, no half of any secret."""
    blob = json.dumps(got)
    for half in HALVES:
        assert half not in blob, (half, got)
    assert "aws_secret_access_key = [MASKED:aws-secret-key]\nRotate it soon." in got["text"], got
    assert got["thinking"] == "The key id is [MASKED:aws-access-key-id] which I should not repeat.", got
    assert got["input"] == {"command": "aws configure set aws_access_key_id [MASKED:aws-access-key-id]"}, got


PY_CLIENT = textwrap.dedent("""
    import json, sys, anthropic
    base_url, mode = sys.argv[1], sys.argv[2]
    client = anthropic.Anthropic(base_url=base_url, api_key="agent-placeholder", max_retries=0)
    args = dict(model="claude-test", max_tokens=64, messages=[{"role": "user", "content": "hi"}])
    if mode == "stream":
        with client.messages.stream(**args) as stream:
            deltas = sum(1 for e in stream if e.type == "content_block_delta")
            message = stream.get_final_message()
        blocks = {b.type: b for b in message.content}
        out = {"text": blocks["text"].text, "thinking": blocks["thinking"].thinking,
               "input": blocks["tool_use"].input, "deltas": deltas}
    else:
        text, thinking, partial, deltas = "", "", "", 0
        for event in client.messages.create(stream=True, **args):
            if event.type == "content_block_delta":
                deltas += 1
                d = event.delta
                if d.type == "text_delta": text += d.text
                elif d.type == "thinking_delta": thinking += d.thinking
                elif d.type == "input_json_delta": partial += d.partial_json
        out = {"text": text, "thinking": thinking, "input": json.loads(partial), "deltas": deltas}
    print(json.dumps(out))
""")

NODE_CLIENT = textwrap.dedent("""
    // The official SDK on Node's fetch; Node 20's fetch ignores HTTPS_PROXY, so the proxy is
    // undici's ProxyAgent as its docs show. Trust comes only from NODE_EXTRA_CA_CERTS.
    const Anthropic = require('@anthropic-ai/sdk').default;
    const { ProxyAgent, fetch } = require('undici');
    const [baseURL, mode] = process.argv.slice(2);
    const client = new Anthropic({ baseURL, apiKey: 'agent-placeholder', maxRetries: 0, fetch,
                                   fetchOptions: { dispatcher: new ProxyAgent(process.env.HTTPS_PROXY) } });
    const args = { model: 'claude-test', max_tokens: 64, messages: [{ role: 'user', content: 'hi' }] };
    (async () => {
      let out;
      if (mode === 'stream') {
        const stream = client.messages.stream(args);
        let deltas = 0;
        stream.on('streamEvent', (e) => { if (e.type === 'content_block_delta') deltas++; });
        const message = await stream.finalMessage();
        const blocks = Object.fromEntries(message.content.map((b) => [b.type, b]));
        out = { text: blocks.text.text, thinking: blocks.thinking.thinking, input: blocks.tool_use.input, deltas };
      } else {
        let text = '', thinking = '', partial = '', deltas = 0;
        for await (const e of await client.messages.create({ ...args, stream: true })) {
          if (e.type !== 'content_block_delta') continue;
          deltas++;
          if (e.delta.type === 'text_delta') text += e.delta.text;
          else if (e.delta.type === 'thinking_delta') thinking += e.delta.thinking;
          else if (e.delta.type === 'input_json_delta') partial += e.delta.partial_json;
        }
        out = { text, thinking, input: JSON.parse(partial), deltas };
      }
      console.log(JSON.stringify(out));
    })().catch((e) => { console.error(e); process.exit(3); });
""")


@pytest.mark.parametrize("mode", ["stream", "create"])
def test_python_sdk_assembles_masked_text(pod, mode):
    sidecar, upstream, _, _ = pod
    before = len(upstream.seen)
    got = run([sys.executable, "-c", PY_CLIENT, upstream.url, mode], sidecar.agent_env())
    assert_masked(got)
    assert got["deltas"] >= 4  # still streamed as deltas, not one blob
    seen = upstream.seen[before:]
    assert len(seen) == 1 and seen[0]["path"] == "/v1/messages" and seen[0]["headers"]["x-api-key"] == API_KEY


@pytest.mark.parametrize("mode", ["stream", "create"])
def test_node_sdk_assembles_masked_text(pod, mode, tmp_path):
    sidecar, upstream, _, _ = pod
    script = tmp_path / "client.js"
    script.write_text(NODE_CLIENT)
    env = sidecar.agent_env({"NODE_PATH": str(node_modules())})
    got = run(["node", str(script), upstream.url, mode], env)
    assert_masked(got)
    assert got["deltas"] >= 4


def test_text_flows_before_the_stream_ends(pod):
    """Incremental: the first text delta reaches the client while the upstream is still
    sending (well before the last event), not after the stream was collected."""
    sidecar, upstream, _, _ = pod
    env = sidecar.agent_env()
    script = textwrap.dedent("""
        import json, sys, time, anthropic
        client = anthropic.Anthropic(base_url=sys.argv[1], api_key="x", max_retries=0)
        t0 = time.monotonic(); first = None
        with client.messages.stream(model="m", max_tokens=8, messages=[{"role": "user", "content": "hi"}]) as s:
            for e in s:
                if e.type == "content_block_delta" and first is None:
                    first = time.monotonic() - t0
            total = time.monotonic() - t0
        print(json.dumps({"first": first, "total": total}))
    """)
    got = run([sys.executable, "-c", script, upstream.url], env)
    assert got["first"] is not None and got["first"] < got["total"], got


def test_the_recording_holds_no_half_of_a_secret(pod):
    sidecar, upstream, s3, bucket = pod
    # The recording is shipped when the session ends: run one more streamed call, then stop.
    run([sys.executable, "-c", PY_CLIENT, upstream.url, "stream"], sidecar.agent_env())
    assert sidecar.stop() == 0, sidecar.logs()

    def objects() -> list[str]:
        return [o["Key"] for o in s3.list_objects_v2(Bucket=bucket).get("Contents", [])]

    wait_for(lambda: any(k.endswith("manifest.json") for k in objects()), 60, "the session's manifest in S3")
    stored = b"".join(s3.get_object(Bucket=bucket, Key=k)["Body"].read() for k in objects())
    for half in HALVES:
        assert half.encode() not in stored, half
    events = []
    for line in stored.splitlines():  # event chunks are JSON lines (the manifest is not)
        try:
            events.append(json.loads(line))
        except ValueError:
            continue
    bodies = [e["data"]["body"].get("text", "") for e in events
              if e.get("type") == "response" and isinstance((e.get("data") or {}).get("body"), dict)]
    streamed = [b for b in bodies if "content_block_delta" in b]
    assert streamed, f"no streamed response body recorded: {bodies!r}"
    for body in streamed:
        assert "[MASKED:aws-secret-key]" in body and "[MASKED:aws-access-key-id]" in body
