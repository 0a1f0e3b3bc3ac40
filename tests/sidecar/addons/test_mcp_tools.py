"""McpTools with mitmproxy's test flows: tools/list results lose the tools the policy blocks."""

from __future__ import annotations

import json

from mitmproxy import http
from mitmproxy.test import taddons, tflow, tutils

from chaperone_sidecar import flowctx
from chaperone_sidecar.addons.mcp_tools import McpTools
from chaperone_sidecar.config import SidecarConfig
from chaperone_sidecar.policy.classify import classify
from chaperone_sidecar.policy.model import HTTPRequest, Identity
from chaperone_sidecar.services import SidecarServices
from chaperone_sidecar.snapshot import build_snapshot
from chaperone_sidecar.sources import Sources

POLICY = {"apiVersion": "chaperone.dev/v1alpha1", "kind": "AccessPolicy",
          "metadata": {"name": "p", "namespace": "ns"},
          "spec": {"defaultEffect": "allow", "rules": [
              {"name": "no-delete", "match": {"mcp": {"tools": ["delete_*"]}}, "block": {}},
              {"name": "no-etc", "match": {"mcp": {"tools": ["read_file"], "arguments": [
                  {"path": "$.path", "values": ["/etc/*"]}]}}, "block": {}}]}}
TOOLS = {"jsonrpc": "2.0", "id": 1, "result": {"tools": [{"name": "read_file"}, {"name": "delete_file"}]}}
LIST = b'{"jsonrpc":"2.0","id":1,"method":"tools/list"}'


def flow(body: bytes, response: http.Response, policy=POLICY, method="POST") -> http.HTTPFlow:
    f = tflow.tflow(req=tutils.treq(host="mcp.local", port=443, scheme=b"https", method=method.encode(),
                                    path=b"/mcp", content=body))
    ctx = flowctx.ensure(f)
    ctx.identity, ctx.connection, ctx.connection_type = Identity(), "files", "mcp"
    ctx.action = classify(HTTPRequest(method, "https", "mcp.local", 443, "/mcp", body=body), "mcp")
    ctx.snapshot = build_snapshot([], [policy], namespace="ns")
    assert len(ctx.snapshot.policies) == 1
    f.response = response
    return f


def addon() -> McpTools:
    return McpTools(SidecarServices(config=SidecarConfig(standalone=True), sources=Sources("ns")))


def names(content: bytes) -> list[str]:
    doc = json.loads(content)
    return [t["name"] for t in (doc[0] if isinstance(doc, list) else doc)["result"]["tools"]]


def test_json_list_loses_only_unconditionally_blocked_tools():
    f = flow(LIST, http.Response.make(200, json.dumps(TOOLS).encode(), {"content-type": "application/json"}))
    with taddons.context():
        a = addon()
        a.responseheaders(f)
        a.response(f)
    assert names(f.response.content) == ["read_file"]  # read_file is blocked on /etc only


def test_batch_response_is_filtered_for_the_list_request_only():
    body = b'[{"jsonrpc":"2.0","id":1,"method":"tools/list"},{"jsonrpc":"2.0","id":2,"method":"ping"}]'
    other = {"jsonrpc": "2.0", "id": 2, "result": {"tools": [{"name": "delete_file"}]}}  # not a list answer
    f = flow(body, http.Response.make(200, json.dumps([TOOLS, other]).encode(),
                                      {"content-type": "application/json"}))
    with taddons.context():
        addon().response(f)
    doc = json.loads(f.response.content)
    assert [t["name"] for t in doc[0]["result"]["tools"]] == ["read_file"]
    assert doc[1] == other


def test_sse_stream_is_wrapped_after_the_stream_found_first():
    seen = []

    def mask_stream(data: bytes):  # stands for Mask's callable: it must keep running
        seen.append(data)
        return [data.replace(b"#", b"*")] if data else []
    event = b"event: message\ndata: " + json.dumps({**TOOLS, "note": "###"}).encode() + b"\n\n"
    resp = http.Response.make(200, b"", {"content-type": "text/event-stream"})
    f = flow(LIST, resp)
    resp.stream = mask_stream
    with taddons.context():
        addon().responseheaders(f)
    out = b"".join(b"".join(resp.stream(event[i:i + 7])) for i in range(0, len(event), 7))
    out += b"".join(resp.stream(b""))
    assert b"delete_file" not in out and b"read_file" in out and b'"note": "***"' in out
    assert b"".join(seen) == event  # Mask saw every byte


def test_other_methods_and_refused_flows_are_left_alone():
    call = b'{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"x"}}'
    f = flow(call, http.Response.make(200, json.dumps(TOOLS).encode(), {"content-type": "application/json"}))
    with taddons.context():
        addon().response(f)
    assert names(f.response.content) == ["read_file", "delete_file"]
    g = flow(LIST, http.Response.make(200, json.dumps(TOOLS).encode(), {"content-type": "application/json"}))
    flowctx.get(g).refused = {"error": "chaperone_blocked"}
    with taddons.context():
        addon().response(g)
    assert names(g.response.content) == ["read_file", "delete_file"]


def test_default_block_hides_every_tool_not_allowed():
    strict = {**POLICY, "spec": {"defaultEffect": "block", "rules": [
        {"name": "reads", "match": {"mcp": {"tools": ["read_*"]}}, "allow": {}},
        {"name": "the-rest", "match": {"mcp": {"methods": ["tools/list", "initialize"]}}, "allow": {}}]}}
    f = flow(LIST, http.Response.make(200, json.dumps(TOOLS).encode(), {"content-type": "application/json"}),
             policy=strict)
    with taddons.context():
        addon().response(f)
    assert names(f.response.content) == ["read_file"]


def test_a_replay_on_the_get_stream_is_filtered_whatever_its_id():
    """Last-Event-ID resumption (or the legacy transport) delivers a POST's tools/list result on
    the GET stream: it is filtered there too, for any id."""
    resp = http.Response.make(200, b"", {"content-type": "text/event-stream"})
    f = flow(b"", resp, method="GET")
    with taddons.context():
        addon().responseheaders(f)
    replay = {**TOOLS, "id": "not-in-this-request"}
    event = b"id: 9\ndata: " + json.dumps(replay).encode() + b"\n\n"
    out = b"".join(resp.stream(event)) + b"".join(resp.stream(b""))
    assert b"delete_file" not in out and b"read_file" in out
