"""MCP through a real sidecar: the ``mcp`` SDK's own client and a FastMCP server (streamable HTTP).

A standalone ``chaperone proxy`` with an ``mcp`` connection and a policy that blocks
``delete_file``, holds ``deploy`` for alice's approval and masks AWS keys in ``get_secret``'s
output. The server runs in both response modes of the transport, SSE (the SDK's default) and
JSON, and stateless (no session). What must hold: the model never sees ``delete_file`` in
``list_tools``; calling it anyway raises the SDK's ``McpError`` naming the rule, and nothing
reaches the server; the secret is masked in the tool result; ``deploy`` runs once alice
approved it; a batch hiding a forbidden call and an ambiguous body (duplicate keys) are refused.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
import yaml
from mcp import ClientSession
from mcp.client.streamable_http import streamable_http_client
from mcp.shared.exceptions import McpError

from .pod import API, PYTHONPATH, base_env, free_port, standalone_proxy, wait_for

SECRET = "AKIAIOSFODNN7EXAMPLE"
TOKEN = "mcp-server-token-the-agent-never-holds"
MODES = ("sse", "json", "stateless")


def cli(*args: str) -> subprocess.CompletedProcess:
    env = base_env()
    env.update({"PYTHONPATH": PYTHONPATH, "USER": "dana"})
    return subprocess.run([sys.executable, "-m", "chaperone_sidecar.standalone_cli", *args], env=env,
                          capture_output=True, text=True, timeout=60)


def _listening(port: int) -> bool:
    try:
        httpx.get(f"http://127.0.0.1:{port}/mcp", timeout=1)
        return True
    except httpx.HTTPError:
        return False


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("mcp")
    calls = root / "calls.jsonl"
    calls.touch()
    env = {**base_env(), "MCP_CALLS": str(calls), "PYTHONPATH": PYTHONPATH}
    servers, ports = [], {}
    for mode in MODES:
        ports[mode] = free_port()
        servers.append(subprocess.Popen([sys.executable, "-m", "chaperone_testbed.mcp_server", str(ports[mode]), mode],
                                        env=env,
                                        stderr=(root / f"server-{mode}.log").open("wb")))
    conf = root / "conf"
    for sub in ("connections", "policies", "credentials/files"):
        (conf / sub).mkdir(parents=True)
    (conf / "credentials" / "files" / "token").write_text(TOKEN)
    # approvalMode defer: the sidecar's own word; a rule saying hold still holds (approve.py)
    (conf / "chaperone.yaml").write_text(yaml.safe_dump({"namespace": "laptop", "user": "dana",
                                                         "approvalMode": "defer"}))
    (conf / "connections" / "files.yaml").write_text(yaml.safe_dump(
        {"apiVersion": API, "kind": "ClaudeConnection", "metadata": {"name": "files"},
         "spec": {"type": "mcp", "hosts": ["127.0.0.1"],
                  "credentials": {"source": "secret", "secretRef": {"name": "files-token"},
                                  "header": "Authorization", "prefix": "Bearer "}}}))
    (conf / "policies" / "p.yaml").write_text(yaml.safe_dump(
        {"apiVersion": API, "kind": "AccessPolicy", "metadata": {"name": "mcp-guard"},
         "spec": {"defaultEffect": "allow", "rules": [
             {"name": "no-delete", "match": {"mcp": {"tools": ["delete_*"]}},
              "block": {"message": "deleting files needs a human"}},
             {"name": "no-etc", "match": {"mcp": {"tools": ["read_file"],
                                                 "arguments": [{"path": "$.path", "values": ["/etc/*"]}]}},
              "block": {}},
             {"name": "qa-deploys-deferred", "match": {"mcp": {"tools": ["deploy"], "arguments": [
                 {"path": "$.env", "values": ["qa"]}]}},
              "requireApproval": {"approvers": {"users": ["alice"]}, "mode": "defer"}},
             {"name": "deploy-needs-alice", "match": {"mcp": {"tools": ["deploy"]}},
              "requireApproval": {"approvers": {"users": ["alice"]}, "mode": "hold",
                                  "holdSeconds": 60, "timeoutSeconds": 120}},
             {"name": "keys", "match": {"mcp": {"tools": ["get_secret"]}},
              "mask": {"detectors": ["aws-access-key-id"], "target": "both"}}]}}))
    try:
        for mode in MODES:
            wait_for(lambda m=mode: _listening(ports[m]), 30, f"the MCP server ({mode})")
        with standalone_proxy(conf, root / "proxy.log") as proxy:
            yield proxy, ports, calls, conf
    finally:
        for server in servers:
            server.terminate()
            server.wait(10)


def reached(calls: Path) -> list[dict]:
    return [json.loads(line) for line in calls.read_text().splitlines()]


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, 90))


async def with_session(proxy_port: int, server_port: int, body, sampling=None):
    async with httpx.AsyncClient(proxy=f"http://127.0.0.1:{proxy_port}", trust_env=False,
                                 timeout=httpx.Timeout(30, read=120)) as http, \
            streamable_http_client(f"http://127.0.0.1:{server_port}/mcp", http_client=http) as (read, write, _), \
            ClientSession(read, write, sampling_callback=sampling) as session:
        await session.initialize()
        return await body(session)


@pytest.mark.parametrize("mode", MODES)
def test_list_tools_hides_the_blocked_tool(setup, mode):
    proxy, ports, _, _ = setup

    async def body(session):
        return [t.name for t in (await session.list_tools()).tools]
    names = run(with_session(proxy.port, ports[mode], body))
    assert "delete_file" not in names
    assert {"read_file", "get_secret", "deploy"} <= set(names)  # conditional block, approval: listed


@pytest.mark.parametrize("mode", MODES)
def test_calling_a_hidden_tool_raises_mcp_error_naming_the_rule(setup, mode):
    proxy, ports, calls, _ = setup

    async def body(session):
        with pytest.raises(McpError) as err:
            await session.call_tool("delete_file", {"path": f"/tmp/{mode}"})
        # the session still works after the refusal
        ok = await session.call_tool("read_file", {"path": "/tmp/x"})
        return err.value, ok
    error, ok = run(with_session(proxy.port, ports[mode], body))
    assert error.error.code == -32030
    assert "no-delete" in error.error.message and "deleting files needs a human" in error.error.message
    assert error.error.data["error"] == "chaperone_blocked"
    assert error.error.data["rule"] == {"policy": "laptop/mcp-guard", "name": "no-delete"}
    assert ok.content[0].text == "contents of /tmp/x"
    assert not [c for c in reached(calls) if c["tool"] == "delete_file"]


@pytest.mark.parametrize("mode", MODES)
def test_argument_rule_sees_through_dot_segments(setup, mode):
    proxy, ports, calls, _ = setup

    async def body(session):
        with pytest.raises(McpError) as err:
            await session.call_tool("read_file", {"path": "/tmp/../etc/shadow"})
        return err.value
    error = run(with_session(proxy.port, ports[mode], body))
    assert "no-etc" in error.error.message
    assert not [c for c in reached(calls) if "shadow" in c.get("path", "")]


@pytest.mark.parametrize("mode", MODES)
def test_secret_in_tool_result_is_masked(setup, mode):
    proxy, ports, calls, _ = setup

    async def body(session):
        return await session.call_tool("get_secret", {"name": "prod"})
    result = run(with_session(proxy.port, ports[mode], body))
    text = result.content[0].text
    assert SECRET not in text and "[MASKED" in text and text.startswith("the key of prod is ")
    assert SECRET not in json.dumps(result.model_dump(mode="json"))  # structuredContent too
    assert {"tool": "get_secret", "name": "prod"} in reached(calls)


def test_approved_tool_call_runs(setup):
    proxy, ports, calls, conf = setup

    def approve_when_pending():
        def find():
            out = cli("approvals", "--config-dir", str(conf), "--json")
            assert out.returncode == 0, out.stderr
            return [o for o in json.loads(out.stdout) if o["spec"]["rule"]["name"] == "deploy-needs-alice"]
        pending = wait_for(find, 30, "a pending ApprovalRequest for deploy")
        assert len(pending) == 1
        assert "deploy" in json.dumps(pending[0]["spec"])  # the approver sees the tool
        out = cli("approve", pending[0]["metadata"]["name"], "--config-dir", str(conf), "--as", "alice")
        assert out.returncode == 0, out.stderr

    async def body(session):
        approver = asyncio.create_task(asyncio.to_thread(approve_when_pending))
        result = await session.call_tool("deploy", {"env": "staging"})
        await approver
        return result
    result = run(with_session(proxy.port, ports["sse"], body))
    assert result.content[0].text == "deployed to staging"
    assert {"tool": "deploy", "env": "staging"} in reached(calls)


def _post(proxy_port: int, server_port: int, content: bytes, session: bool = False) -> httpx.Response:
    """A raw POST through the proxy; ``session``: after an initialize handshake (its session id)."""
    headers = {"Content-Type": "application/json", "Accept": "application/json, text/event-stream"}
    with httpx.Client(proxy=f"http://127.0.0.1:{proxy_port}", trust_env=False, timeout=30) as client:
        url = f"http://127.0.0.1:{server_port}/mcp"
        if session:
            init = {"jsonrpc": "2.0", "id": 0, "method": "initialize",
                    "params": {"protocolVersion": "2025-06-18", "capabilities": {},
                               "clientInfo": {"name": "raw", "version": "0"}}}
            answer = client.post(url, json=init, headers=headers)
            headers["Mcp-Session-Id"] = answer.headers["mcp-session-id"]
            client.post(url, json={"jsonrpc": "2.0", "method": "notifications/initialized"}, headers=headers)
        return client.post(url, content=content, headers=headers)


def test_batch_with_a_forbidden_call_is_refused_whole(setup):
    proxy, ports, calls, _ = setup
    batch = [{"jsonrpc": "2.0", "id": 1, "method": "tools/call",
              "params": {"name": "read_file", "arguments": {"path": "/tmp/batch"}}},
             {"jsonrpc": "2.0", "id": 2, "method": "tools/call",
              "params": {"name": "delete_file", "arguments": {"path": "/tmp/batch"}}}]
    resp = _post(proxy.port, ports["json"], json.dumps(batch).encode())
    assert resp.status_code == 200 and resp.headers["X-Chaperone-Refused"] == "blocked"
    answers = resp.json()
    assert [a["id"] for a in answers] == [1, 2]
    assert all(a["error"]["code"] == -32030 and "no-delete" in a["error"]["message"] for a in answers)
    assert not [c for c in reached(calls) if c.get("path") == "/tmp/batch"]


@pytest.mark.parametrize("body", [
    b'{"jsonrpc":"2.0","id":7,"method":"tools/call","params":{"name":"read_file","name":"delete_file",'
    b'"arguments":{"path":"/tmp/dup"}}}',
    b'{"jsonrpc":"2.0","id":7,"method":"tools/call","params":{"name":"read_file",'
    b'"arguments":{"path":"/tmp/dup","path":"/etc/passwd"}}}',
    b'{"jsonrpc": "2.0", "id": 7, "method": "tools/call", "params": {"name": "delete_file"',
])
def test_ambiguous_or_broken_bodies_are_refused(setup, body):
    proxy, ports, calls, _ = setup
    resp = _post(proxy.port, ports["json"], body)
    assert resp.status_code == 400 and resp.json()["error"] == "chaperone_invalid_request"
    assert not [c for c in reached(calls) if c.get("path") in ("/tmp/dup", "/etc/passwd")]


def test_unicode_escaped_tool_name_is_still_blocked(setup):
    proxy, ports, calls, _ = setup
    body = (b'{"jsonrpc":"2.0","id":9,"method":"tools/call","params":{"name":"delete\\u005ffile",'
            b'"arguments":{"path":"/tmp/esc"}}}')
    resp = _post(proxy.port, ports["json"], body)
    assert resp.status_code == 200 and resp.json()["error"]["code"] == -32030
    assert not [c for c in reached(calls) if c.get("path") == "/tmp/esc"]


def recorded_events(conf: Path) -> list[dict]:
    return [json.loads(line) for chunk in sorted((conf / "recordings").rglob("chunk-*.jsonl"))
            for line in chunk.read_text().splitlines()]


def test_recording_names_each_call_and_holds_no_secret(setup):
    proxy, ports, _, conf = setup

    async def body(session):
        await session.call_tool("read_file", {"path": "/tmp/recorded"})
        return await session.call_tool("get_secret", {"name": f"rotate {SECRET}"})
    run(with_session(proxy.port, ports["sse"], body))

    def flushed():
        events = recorded_events(conf)
        # a response, or an error event (the SDK closes an SSE response once it has its result)
        texts = [json.dumps(e) for e in events if e["type"] in ("response", "error")]
        return events if any("contents of /tmp/recorded" in t for t in texts) and \
            any("the key of rotate" in t for t in texts) else None
    events = wait_for(flushed, 20, "the recording of the tool calls")
    requests = [e for e in events if e["type"] == "request" and e["data"]["connectionType"] == "mcp"]
    actions = [e["data"]["action"] for e in requests]
    assert {"name": "mcp:tools/call", "summary": 'mcp tools/call read_file {"path": "/tmp/recorded"}'} in actions
    assert any(a["summary"].startswith("mcp tools/call get_secret") for a in actions)
    flows = {e["flow"] for e in requests if "/tmp/recorded" in e["data"]["action"]["summary"]}
    results = [e for e in events if e["type"] in ("response", "error") and e["flow"] in flows]
    assert results and "contents of /tmp/recorded" in results[0]["data"]["body"]["text"]
    assert SECRET not in json.dumps(events)  # masked in the arguments' summary, body and result


def test_a_lone_surrogate_in_a_tool_name_is_refused_as_json_rpc(setup):
    proxy, ports, _, _ = setup
    body = b'{"jsonrpc":"2.0","id":11,"method":"tools/call","params":{"name":"delete_\\ud800","arguments":{}}}'
    resp = _post(proxy.port, ports["json"], body)
    assert resp.status_code == 200 and resp.json()["error"]["code"] == -32030, resp.text
    assert "no-delete" in resp.json()["error"]["message"]


def test_a_compressed_body_is_judged_decoded_or_refused(setup):
    import gzip

    proxy, ports, calls, _ = setup
    body = gzip.compress(json.dumps({"jsonrpc": "2.0", "id": 12, "method": "tools/call",
                                     "params": {"name": "delete_file", "arguments": {"path": "/tmp/gz"}}}).encode())
    with httpx.Client(proxy=f"http://127.0.0.1:{proxy.port}", trust_env=False, timeout=30) as client:
        resp = client.post(f"http://127.0.0.1:{ports['json']}/mcp", content=body,
                           headers={"Content-Type": "application/json", "Content-Encoding": "gzip",
                                    "Accept": "application/json, text/event-stream"})
    assert resp.headers.get("X-Chaperone-Refused") in ("blocked", "invalid_request"), resp.text
    assert not [c for c in reached(calls) if c.get("path") == "/tmp/gz"]


def test_a_server_request_to_the_clients_model_is_recorded_and_answered(setup):
    from mcp.types import CreateMessageResult, TextContent

    proxy, ports, _, conf = setup

    async def sampling(context, params):
        return CreateMessageResult(role="assistant", model="claude-test",
                                   content=TextContent(type="text", text="forty-two"))

    async def body(session):
        return await session.call_tool("ask_model", {"question": "what is six times seven?"})
    result = run(with_session(proxy.port, ports["sse"], body, sampling=sampling))
    assert result.content[0].text == "the model said: forty-two"

    def recorded():
        events = recorded_events(conf)
        text = json.dumps(events)
        return events if "sampling/createMessage" in text and "forty-two" in text else None
    events = wait_for(recorded, 20, "the sampling exchange in the recording")
    answers = [e for e in events if e["type"] == "request" and
               (e["data"]["action"] or {}).get("name") == "mcp:response"]
    assert answers and "forty-two" in answers[-1]["data"]["body"]["text"]


def test_a_deferred_approval_lets_the_sdks_retry_through(setup):
    """defer: the call is refused with the ApprovalRequest's name; once approved, the SDK's retry
    - a new JSON-RPC id, the same call - passes (the exact digest leaves the id out)."""
    proxy, ports, calls, conf = setup

    async def first(session):
        with pytest.raises(McpError) as err:
            await session.call_tool("deploy", {"env": "qa"})
        return err.value
    error = run(with_session(proxy.port, ports["json"], first))
    assert error.error.code == -32030 and error.error.data["error"] == "chaperone_approval_pending"
    name = error.error.data["approval_request"]["name"]
    assert f"[ApprovalRequest {name}]" in error.error.message
    assert not [c for c in reached(calls) if c.get("env") == "qa"]
    out = cli("approve", name, "--config-dir", str(conf), "--as", "alice")
    assert out.returncode == 0, out.stderr

    async def retry(session):
        await session.call_tool("read_file", {"path": "/tmp/other"})  # ids move on
        return await session.call_tool("deploy", {"env": "qa"})
    result = run(with_session(proxy.port, ports["json"], retry))
    assert result.content[0].text == "deployed to qa"
    assert [c for c in reached(calls) if c.get("env") == "qa"] == [{"tool": "deploy", "env": "qa"}]


@pytest.mark.parametrize("size", [2 * 1024 * 1024, 5 * 1024 * 1024])
def test_a_large_call_is_judged_on_its_messages_or_refused_never_forwarded_unjudged(setup, size):
    """Over the sidecar's streaming size a body could leave before it is read (mitmproxy streams
    it, and streamed it again when told to buffer it past that size). Whatever the sidecar does
    with a large MCP call - read it and judge it, or refuse it - a blocked tool never runs, and
    past the classifier's 4 MiB nothing is forwarded."""
    proxy, ports, calls, _ = setup
    tag = f"/tmp/large-{size}"

    def call(tool: str) -> httpx.Response:
        body = json.dumps({"jsonrpc": "2.0", "id": 21, "method": "tools/call",
                           "params": {"name": tool, "arguments": {"path": tag, "pad": "x" * size}}}).encode()
        return _post(proxy.port, ports["json"], body, session=True)
    delete = call("delete_file")
    assert delete.headers.get("X-Chaperone-Refused") in ("blocked", "invalid_request"), delete.text[:300]
    read = call("read_file")
    if size > 4 * 1024 * 1024:  # refused: unreadable (400) or too large to read first (413)
        assert read.status_code in (400, 413) and read.headers.get("X-Chaperone-Refused"), read.text[:300]
    elif read.headers.get("X-Chaperone-Refused") is None:  # read and judged: allowed, answered
        assert read.json()["result"]["content"][0]["text"] == f"contents of {tag}"
    else:
        assert read.status_code in (400, 413), read.text[:300]
    assert not [c for c in reached(calls) if c["tool"] == "delete_file" and c.get("path") == tag]
    if size > 4 * 1024 * 1024:
        assert not [c for c in reached(calls) if c.get("path") == tag]


def test_the_server_gets_the_connections_token_not_the_agents(setup):
    proxy, ports, calls, conf = setup

    async def body(session):
        return await session.call_tool("read_file", {"path": "/tmp/authed"})
    async def with_fake_token():
        async with httpx.AsyncClient(proxy=f"http://127.0.0.1:{proxy.port}", trust_env=False,
                                     headers={"Authorization": "Bearer agent-made-this-up"},
                                     timeout=httpx.Timeout(30, read=120)) as http, \
                streamable_http_client(f"http://127.0.0.1:{ports['json']}/mcp", http_client=http) as (r, w, _), \
                ClientSession(r, w) as session:
            await session.initialize()
            return await body(session)
    assert run(with_fake_token()).content[0].text == "contents of /tmp/authed"
    assert [c["auth"] for c in reached(calls) if c.get("path") == "/tmp/authed"] == [f"Bearer {TOKEN}"]
    wait_for(lambda: "/tmp/authed" in json.dumps(recorded_events(conf)), 20, "the recording")
    assert TOKEN not in json.dumps(recorded_events(conf))


def _post_2026(proxy_port: int, server_port: int, tool: str, args: dict, name_header: str | None = None,
               version: str = "2026-07-28"):
    """A request as the mcp 2.x SDK sends it on the 2026-07-28 transport: no session, the
    envelope in params._meta, the method and name mirrored in headers."""
    meta = {"io.modelcontextprotocol/protocolVersion": version,
            "io.modelcontextprotocol/clientCapabilities": {}}
    body = {"jsonrpc": "2.0", "id": 31, "method": "tools/call",
            "params": {"name": tool, "arguments": args, "_meta": meta}}
    headers = {"Content-Type": "application/json", "Accept": "application/json, text/event-stream",
               "MCP-Protocol-Version": version, "Mcp-Method": "tools/call",
               "Mcp-Name": name_header if name_header is not None else tool}
    with httpx.Client(proxy=f"http://127.0.0.1:{proxy_port}", trust_env=False, timeout=30) as client:
        return client.post(f"http://127.0.0.1:{server_port}/mcp", json=body, headers=headers)


def _message(resp: httpx.Response) -> dict:
    if resp.headers["content-type"].startswith("text/event-stream"):
        line = next(ln for ln in resp.text.splitlines() if ln.startswith("data:"))
        return json.loads(line[5:])
    return resp.json()


def test_stateless_2026_requests_are_judged_and_their_headers_must_match_the_body(setup):
    proxy, ports, calls, _ = setup
    # the 1.x server knows revisions up to 2025-11-25: the allowed call names that one, with the
    # 2026 routing headers and envelope (the refused ones never reach it)
    ok = _post_2026(proxy.port, ports["stateless"], "read_file", {"path": "/tmp/2026"}, version="2025-11-25")
    assert _message(ok).get("result", {}).get("content", [{}])[0].get("text") == "contents of /tmp/2026", ok.text
    blocked = _post_2026(proxy.port, ports["stateless"], "delete_file", {"path": "/tmp/2026"})
    assert blocked.status_code == 200 and _message(blocked)["error"]["code"] == -32030
    # a gateway routing on Mcp-Name would see read_file; the server would run delete_file
    lie = _post_2026(proxy.port, ports["stateless"], "delete_file", {"path": "/tmp/2026-lie"},
                     name_header="read_file")
    assert lie.status_code == 200 and _message(lie)["error"]["data"]["error"] == "chaperone_invalid_request"
    assert "Mcp-Name header does not match" in _message(lie)["error"]["message"]
    assert not [c for c in reached(calls) if c["tool"] == "delete_file" and c.get("path", "").startswith("/tmp/2026")]
