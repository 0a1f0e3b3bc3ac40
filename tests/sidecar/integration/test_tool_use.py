"""The model's tool_use through the real sidecar, read by the official Anthropic SDKs.

A standalone ``chaperone proxy`` (the real sidecar process) sits between the SDKs and a real
HTTPS server playing the Messages API (``chaperone_testbed.anthropic_api``); a tool-use rule
blocks ``bash`` with ``rm -rf``. Checked with the Python ``anthropic`` SDK (``messages.stream``,
``create(stream=True)``, non-streaming ``create``) and the Node ``@anthropic-ai/sdk``:

* a blocked tool_use (its input split over many deltas, JSON escapes, interleaved with text, or
  next to an allowed one) reaches the SDK as a text block it parses, never as a tool_use, and no
  piece of its input reaches the client; the allowed one arrives intact;
* an allowed tool_use followed by the agent's HTTP call of the same pod is linked in the
  recording (``causedBy`` on the request event), and ``chaperone sessions replay`` shows the
  pair; the ``tool-use`` events hold the masked input.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import textwrap
import uuid
from pathlib import Path
from typing import Any

import boto3
import pytest
import requests
import yaml

from chaperone_testbed.anthropic_api import AnthropicAPI, sse_event

from .pod import API, PYTHONPATH, HTTPSUpstream, base_env, standalone_proxy
from .test_sdk_streams import node_modules

API_KEY = "sk-ant-held-by-the-sidecar-1"
HOST = "127.0.0.2"  # the Messages server; loopback, but not 127.0.0.1 (the tickets API)
KEY_ID = "AKIAIOSFODNN7EXAMPLE"
RM = "rm -rf /"


def answer_for(tickets: str):
    """The scripted model: the user's message names the scenario."""
    def answer(body: dict[str, Any]) -> Any:
        said = json.dumps(body.get("messages", []))
        if "two-tools" in said:
            return {"stop_reason": "tool_use", "content": [
                {"type": "text", "text": "Two things."},
                {"type": "tool_use", "id": "toolu_ls", "name": "bash", "input": {"command": "ls -la"}},
                {"type": "tool_use", "id": "toolu_rm2", "name": "bash", "input": {"command": RM}}]}
        if "interleaved" in said:
            return interleaved_events()
        if "drop-bucket" in said:
            bucket = said.split("drop-bucket ")[1].split('"')[0]
            return {"stop_reason": "tool_use", "content": [
                {"type": "tool_use", "id": "toolu_rb", "name": "bash",
                 "input": {"command": f"aws s3 rb s3://{bucket}"}}]}
        if "frozen-ticket" in said:
            return {"stop_reason": "tool_use", "content": [
                {"type": "tool_use", "id": "toolu_frozen", "name": "bash",
                 "input": {"command": f"curl -X DELETE {tickets}/tickets/13"}}]}
        if "close-ticket" in said:
            return {"stop_reason": "tool_use", "content": [
                {"type": "tool_use", "id": "toolu_close", "name": "bash",
                 "input": {"command": f"curl -X DELETE {tickets}/tickets/42 # key {KEY_ID}"}}]}
        return {"stop_reason": "tool_use", "content": [
            {"type": "text", "text": "I will clean the disk."},
            {"type": "tool_use", "id": "toolu_rm", "name": "bash",
             "input": {"command": RM, "description": "free space"}}]}
    return answer


def interleaved_events() -> list[bytes]:
    """A hostile stream: the blocked input in one-character deltas with a \\u escape, a text
    block started inside it, pings in between."""
    events = [sse_event("message_start", {"type": "message_start", "message": {
        "id": "msg_x", "type": "message", "role": "assistant", "model": "claude-test", "content": [],
        "stop_reason": None, "stop_sequence": None, "usage": {"input_tokens": 1, "output_tokens": 1}}}),
        sse_event("content_block_start", {"type": "content_block_start", "index": 0, "content_block": {
            "type": "tool_use", "id": "toolu_rm3", "name": "bash", "input": {}}})]
    raw = '{"command": "rm -rf \\u002f"}'
    for i, ch in enumerate(raw):
        events.append(sse_event("content_block_delta", {"type": "content_block_delta", "index": 0,
                                                        "delta": {"type": "input_json_delta", "partial_json": ch}}))
        if i == 5:
            events += [sse_event("content_block_start", {"type": "content_block_start", "index": 1,
                                                         "content_block": {"type": "text", "text": ""}}),
                       sse_event("ping", {"type": "ping"}),
                       sse_event("content_block_delta", {"type": "content_block_delta", "index": 1,
                                                         "delta": {"type": "text_delta", "text": "meanwhile"}}),
                       sse_event("content_block_stop", {"type": "content_block_stop", "index": 1})]
    events += [sse_event("content_block_stop", {"type": "content_block_stop", "index": 0}),
               sse_event("message_delta", {"type": "message_delta", "delta": {"stop_reason": "tool_use"},
                                           "usage": {"output_tokens": 9}}),
               sse_event("message_stop", {"type": "message_stop"})]
    return events


@pytest.fixture(scope="module")
def sidecar(tmp_path_factory, s3_server):
    root = tmp_path_factory.mktemp("tool-use")
    model = AnthropicAPI(root / "anthropic", api_key=API_KEY, host=HOST, split=3)
    tickets = HTTPSUpstream(root / "tickets")
    model.answer = answer_for(f"https://localhost:{tickets.port}")
    conf = root / "conf"
    for sub in ("connections", "policies", "credentials/claude", "credentials/aws", "upstream-ca/claude",
                "upstream-ca/tickets"):
        (conf / sub).mkdir(parents=True)
    (conf / "credentials" / "claude" / "token").write_text(API_KEY)
    (conf / "credentials" / "aws" / "AWS_ACCESS_KEY_ID").write_text(s3_server.access_key)
    (conf / "credentials" / "aws" / "AWS_SECRET_ACCESS_KEY").write_text(s3_server.secret_key)
    (conf / "upstream-ca" / "claude" / "ca.crt").write_bytes(model.ca_file.read_bytes())
    (conf / "upstream-ca" / "tickets" / "ca.crt").write_bytes(tickets.ca_file.read_bytes())
    (conf / "chaperone.yaml").write_text(yaml.safe_dump({"namespace": "laptop", "user": "dana"}))
    for name, spec in {
        "claude": {"type": "anthropic", "hosts": [HOST],
                   "credentials": {"source": "secret", "secretRef": {"name": "claude", "tokenKey": "token"}}},
        "tickets": {"type": "http", "hosts": ["localhost"], "credentials": {"source": "none"}},
        "aws": {"type": "aws", "aws": {"region": s3_server.region, "endpointURL": s3_server.endpoint_url},
                "credentials": {"source": "secret", "secretRef": {"name": "aws"}}},
    }.items():
        (conf / "connections" / f"{name}.yaml").write_text(yaml.safe_dump(
            {"apiVersion": API, "kind": "ClaudeConnection", "metadata": {"name": name}, "spec": spec}))
    (conf / "policies" / "p.yaml").write_text(yaml.safe_dump(
        {"apiVersion": API, "kind": "AccessPolicy", "metadata": {"name": "guard"},
         "spec": {"defaultEffect": "allow", "masking": {"detectors": ["aws-access-key-id"]}, "rules": [
             {"name": "no-recursive-delete", "match": {"anthropic": {
                 "toolUses": ["bash"], "toolInputRegex": r"rm\s+-[a-z]*r[a-z]*f?\s+/"}},
              "block": {"message": "recursive deletes need a human"}},
             {"name": "ticket-13-is-frozen", "match": {"paths": ["/tickets/13"]}, "block": {}}]}}))
    try:
        with standalone_proxy(conf, root / "proxy.log") as proxy:
            yield proxy, conf, model, tickets, s3_server
    finally:
        model.close()
        tickets.close()


def agent_env(conf: Path, port: int) -> dict[str, str]:
    env = base_env()
    proxy = f"http://127.0.0.1:{port}"
    ca = str(conf / "ca" / "mitmproxy-ca-cert.pem")
    env.update({"HTTPS_PROXY": proxy, "https_proxy": proxy, "SSL_CERT_FILE": ca, "NODE_EXTRA_CA_CERTS": ca,
                "REQUESTS_CA_BUNDLE": ca, "AWS_CA_BUNDLE": ca, "PYTHONPATH": PYTHONPATH,
                "AWS_ACCESS_KEY_ID": "placeholder", "AWS_SECRET_ACCESS_KEY": "placeholder",
                "AWS_DEFAULT_REGION": "us-east-1", "AWS_CONFIG_FILE": "/dev/null",
                "AWS_SHARED_CREDENTIALS_FILE": "/dev/null"})
    return env


PY_CLIENT = textwrap.dedent("""
    import json, sys, anthropic
    base_url, mode, prompt = sys.argv[1:4]
    client = anthropic.Anthropic(base_url=base_url, api_key="agent-placeholder", max_retries=0)
    args = dict(model="claude-test", max_tokens=64, messages=[{"role": "user", "content": prompt}])
    if mode == "stream":
        with client.messages.stream(**args) as stream:
            events = [e.type for e in stream]
            message = stream.get_final_message()
    elif mode == "create-stream":
        events = [e.type for e in client.messages.create(stream=True, **args)]
        message = None
    else:
        events, message = [], client.messages.create(**args)
    out = {"events": events}
    if message is not None:
        out["stop_reason"] = message.stop_reason
        out["content"] = [b.model_dump() for b in message.content]
    print(json.dumps(out))
""")

NODE_CLIENT = textwrap.dedent("""
    const Anthropic = require('@anthropic-ai/sdk').default;
    const { ProxyAgent, fetch } = require('undici');
    const [baseURL, prompt] = process.argv.slice(2);
    const client = new Anthropic({ baseURL, apiKey: 'agent-placeholder', maxRetries: 0, fetch,
                                   fetchOptions: { dispatcher: new ProxyAgent(process.env.HTTPS_PROXY) } });
    (async () => {
      const stream = client.messages.stream({ model: 'claude-test', max_tokens: 64,
                                              messages: [{ role: 'user', content: prompt }] });
      const message = await stream.finalMessage();
      console.log(JSON.stringify({ stop_reason: message.stop_reason, content: message.content }));
    })().catch((e) => { console.error(e); process.exit(3); });
""")


def run(argv: list[str], env: dict[str, str]) -> dict[str, Any]:
    out = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=90)
    assert out.returncode == 0, out.stdout + out.stderr
    return json.loads(out.stdout.strip().splitlines()[-1])


def python_sdk(sidecar, mode: str, prompt: str) -> dict[str, Any]:
    proxy, conf, model, *_ = sidecar
    return run([sys.executable, "-c", PY_CLIENT, model.url, mode, prompt], agent_env(conf, proxy.port))


def assert_blocked(got: dict[str, Any], tool_id: str, index: int) -> None:
    blob = json.dumps(got)
    assert "rm -rf" not in blob and "-rf /" not in blob and "free space" not in blob, got
    block = got["content"][index]
    assert block["type"] == "text" and block["text"].startswith(f"[Chaperone blocked tool_use {tool_id} (bash)")
    assert "laptop/guard#no-recursive-delete" in block["text"] and "recursive deletes need a human" in block["text"]


@pytest.mark.parametrize("mode", ["stream", "create"])
def test_python_sdk_gets_a_text_block_for_the_blocked_tool_use(sidecar, mode):
    got = python_sdk(sidecar, mode, "clean the disk")
    assert [b["type"] for b in got["content"]] == ["text", "text"], got
    assert got["content"][0]["text"] == "I will clean the disk."
    assert_blocked(got, "toolu_rm", 1)
    assert got["stop_reason"] == "end_turn"  # nothing left to run: the agent's loop ends its turn


def test_python_sdk_raw_stream_never_sees_the_tool_use(sidecar):
    got = python_sdk(sidecar, "create-stream", "clean the disk")
    assert "content_block_start" in got["events"] and got["events"][-1] == "message_stop"


def test_split_escaped_interleaved_input_is_blocked_and_indices_hold(sidecar):
    got = python_sdk(sidecar, "stream", "interleaved")
    assert [b["type"] for b in got["content"]] == ["text", "text"], got
    assert_blocked(got, "toolu_rm3", 0)
    assert got["content"][1]["text"] == "meanwhile"


@pytest.mark.parametrize("mode", ["stream", "create"])
def test_two_tool_uses_one_blocked(sidecar, mode):
    got = python_sdk(sidecar, mode, "two-tools")
    assert [b["type"] for b in got["content"]] == ["text", "tool_use", "text"], got
    assert got["content"][1]["id"] == "toolu_ls" and got["content"][1]["input"] == {"command": "ls -la"}
    assert_blocked(got, "toolu_rm2", 2)
    assert got["stop_reason"] == "tool_use"  # the allowed one still runs


def test_node_sdk_parses_the_replacement(sidecar, tmp_path):
    proxy, conf, model, *_ = sidecar
    script = tmp_path / "client.js"
    script.write_text(NODE_CLIENT)
    env = agent_env(conf, proxy.port) | {"NODE_PATH": str(node_modules())}
    got = run(["node", str(script), model.url, "two-tools"], env)
    assert [b["type"] for b in got["content"]] == ["text", "tool_use", "text"], got
    assert got["content"][1]["input"] == {"command": "ls -la"}
    assert_blocked(got, "toolu_rm2", 2)


BATCH_CLIENT = textwrap.dedent("""
    import json, sys, anthropic
    client = anthropic.Anthropic(base_url=sys.argv[1], api_key="agent-placeholder", max_retries=0)
    print(json.dumps([r.model_dump() for r in client.messages.batches.results(sys.argv[2])]))
""")


def test_message_batch_results_are_judged_too(sidecar):
    """A batch is another way to get the model's tool_use: its results are judged line by line."""
    proxy, conf, model, *_ = sidecar
    model.batch_results["msgbatch_01"] = [
        {"stop_reason": "tool_use", "content": [{"type": "tool_use", "id": "toolu_b_rm", "name": "bash",
                                                 "input": {"command": RM}}]},
        {"stop_reason": "tool_use", "content": [{"type": "tool_use", "id": "toolu_b_ls", "name": "bash",
                                                 "input": {"command": "ls"}}]}]
    got = run([sys.executable, "-c", BATCH_CLIENT, model.url, "msgbatch_01"], agent_env(conf, proxy.port))
    messages = [r["result"]["message"] for r in got]
    assert [r["custom_id"] for r in got] == ["req-0", "req-1"]
    assert messages[0]["content"][0]["type"] == "text" and messages[0]["stop_reason"] == "end_turn"
    assert messages[0]["content"][0]["text"].startswith("[Chaperone blocked tool_use toolu_b_rm (bash)")
    allowed = messages[1]["content"][0]
    assert (allowed["type"], allowed["id"], allowed["input"]) == ("tool_use", "toolu_b_ls", {"command": "ls"})
    assert "rm -rf" not in json.dumps(got)


def test_allowed_tool_use_then_the_agents_call_are_linked_in_the_recording(sidecar):
    proxy, conf, model, tickets, s3_server = sidecar
    got = python_sdk(sidecar, "stream", "close-ticket")
    block = got["content"][0]
    assert block["type"] == "tool_use" and block["id"] == "toolu_close", got
    assert "[MASKED:aws-access-key-id]" in block["input"]["command"] and KEY_ID not in json.dumps(got)
    # the agent runs what the model asked for: its call goes through the same sidecar
    session = requests.Session()
    session.trust_env = False
    session.proxies = {"https": f"http://127.0.0.1:{proxy.port}"}
    session.verify = str(conf / "ca" / "mitmproxy-ca-cert.pem")
    assert session.delete(f"https://localhost:{tickets.port}/tickets/42", timeout=30).status_code == 200
    assert session.get(f"https://localhost:{tickets.port}/health", timeout=30).status_code == 200
    # an action the model asked for that the policy refuses is linked too
    assert python_sdk(sidecar, "stream", "frozen-ticket")["content"][0]["id"] == "toolu_frozen"
    assert session.delete(f"https://localhost:{tickets.port}/tickets/13", timeout=30).status_code == 403
    # ... and the real AWS CLI runs the command the model wrote, word for word
    bucket = f"scratch-{uuid.uuid4().hex[:8]}"
    s3 = boto3.client("s3", **s3_server.client_kwargs())
    s3.create_bucket(Bucket=bucket)
    got = python_sdk(sidecar, "stream", f"drop-bucket {bucket}")
    command = got["content"][0]["input"]["command"]
    assert command == f"aws s3 rb s3://{bucket}", got
    aws = str(Path(sys.executable).with_name("aws"))
    out = subprocess.run([aws, *command.split()[1:]], env=agent_env(conf, proxy.port), capture_output=True,
                         text=True, timeout=90)
    assert out.returncode == 0, out.stdout + out.stderr
    assert bucket not in [b["Name"] for b in s3.list_buckets()["Buckets"]]  # it really happened

    proxy.proc.send_signal(signal.SIGTERM)  # the session is shipped when the sidecar stops
    assert proxy.proc.wait(60) == 0
    events = []
    for path in sorted((conf / "recordings").rglob("*.jsonl*")):
        events += [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    assert events, list((conf / "recordings").rglob("*"))
    uses = {e["data"]["id"]: e["data"] for e in events if e["type"] == "tool-use"}
    assert uses["toolu_rm"]["blocked"]["rule"] == {"policy": "laptop/guard", "name": "no-recursive-delete"}
    assert uses["toolu_rm"]["replaced"] is True and "rm -rf" in uses["toolu_rm"]["input"]["text"]
    assert uses["toolu_close"]["replaced"] is False and KEY_ID not in json.dumps(uses)
    assert "[MASKED:aws-access-key-id]" in uses["toolu_close"]["input"]["text"]
    requests_ = [e for e in events if e["type"] == "request" and "/tickets/42" in e["data"]["url"]]
    assert len(requests_) == 1
    cause = requests_[0]["data"]["causedBy"]
    assert cause["toolUseId"] == "toolu_close" and cause["name"] == "bash" and cause["score"] >= 0.4
    assert "path /tickets/42" in cause["reason"]
    deletes = [e for e in events if e["type"] == "request" and (e["data"].get("action") or {}).get("name")
               == "s3:DeleteBucket"]
    assert len(deletes) == 1, [e["data"].get("action") for e in events if e["type"] == "request"]
    cause = deletes[0]["data"]["causedBy"]
    assert cause["toolUseId"] == "toolu_rb" and "AWS CLI s3 rb" in cause["reason"]
    assert f"resource {bucket}" in cause["reason"]
    [frozen] = [e for e in events if e["type"] == "request" and "/tickets/13" in e["data"]["url"]]
    assert frozen["data"]["causedBy"]["toolUseId"] == "toolu_frozen"
    assert frozen["data"]["decision"]["effect"] == "block"
    health = [e for e in events if e["type"] == "request" and "/health" in e["data"]["url"]]
    assert "causedBy" not in health[0]["data"]  # nothing the model asked for names it

    session_id = requests_[0]["session"]
    env = base_env() | {"PYTHONPATH": PYTHONPATH}
    out = subprocess.run([sys.executable, "-m", "chaperone_sidecar.recording.sessions_cli", "sessions", "replay",
                          "--dir", str(conf / "recordings"), session_id], env=env, capture_output=True,
                         text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    text = out.stdout
    assert "the model asked -> the agent did:" in text
    line = next(i for i, row in enumerate(text.splitlines()) if "tool_use toolu_close bash" in row)
    assert "DELETE" in text.splitlines()[line + 1] and "/tickets/42" in text.splitlines()[line + 1]
    assert "tool_use toolu_rm bash" in text and "BLOCKED by laptop/guard#no-recursive-delete" in text
