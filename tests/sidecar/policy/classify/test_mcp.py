"""The MCP classifier: JSON-RPC bodies -> MCPAction, and what it refuses to guess."""

from __future__ import annotations

import base64
import json

import pytest

from chaperone_sidecar.policy.classify import classify
from chaperone_sidecar.policy.classify.mcp import MAX_BODY
from chaperone_sidecar.policy.model import HTTPRequest


def action(body, method="POST", headers=()):
    raw = body if isinstance(body, bytes) else json.dumps(body).encode()
    return classify(HTTPRequest(method, "http", "mcp.local", 8000, "/mcp", headers=tuple(headers),
                                body=raw), "mcp")


def call(i, name, args=None, **extra):
    params = {"name": name, **({"arguments": args} if args is not None else {}), **extra}
    return {"jsonrpc": "2.0", "id": i, "method": "tools/call", "params": params}


def test_tools_call_name_arguments_and_summary():
    a = action(call(1, "delete_file", {"path": "/etc/x"}),
               headers=[("Mcp-Session-Id", "s-1"), ("MCP-Protocol-Version", "2025-06-18")])
    assert a.name == "mcp:tools/call"
    assert a.summary == 'mcp tools/call delete_file {"path": "/etc/x"}'
    (c,) = a.mcp.calls
    assert (c.method, c.id, c.tool, c.arguments) == ("tools/call", "1", "delete_file", '{"path":"/etc/x"}')
    assert a.mcp.session_id == "s-1" and a.mcp.protocol_version == "2025-06-18" and not a.mcp.invalid


def test_summary_is_bounded():
    a = action(call(1, "write_file", {"content": "x" * 10_000}))
    assert len(a.summary) < 400 and "..." in a.summary


def test_batch_keeps_every_call_and_mixed_methods_name_a_batch():
    a = action([{"jsonrpc": "2.0", "id": 1, "method": "tools/list"}, call(2, "delete_file", {"path": "/"}),
                {"jsonrpc": "2.0", "method": "notifications/initialized"}])
    assert a.name == "mcp:batch" and a.mcp.batch
    assert [c.method for c in a.mcp.calls] == ["tools/list", "tools/call", "notifications/initialized"]
    assert a.mcp.tools == ("delete_file",)


def test_unicode_escapes_are_decoded_like_the_server_does():
    a = action(b'{"jsonrpc":"2.0","id":1,"method":"tools\\/call","params":{"name":"delete\\u005ffile"}}')
    assert a.mcp.calls[0].tool == "delete_file" and a.name == "mcp:tools/call"


@pytest.mark.parametrize("body, why", [
    (b'{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"read","name":"delete"}}', "duplicate key"),
    (b'{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"x","arguments":{"a":1,"a":2}}}',
     "duplicate key"),
    (b"not json", "not JSON"),
    (b'{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"x","arguments":{"n":NaN}}}', "not JSON"),
    (b"\xff\xfe", "UTF-8"),
    (b"[]", "empty JSON-RPC batch"),
    (b'{"jsonrpc":"1.0","id":1,"method":"tools/call"}', "JSON-RPC 2.0"),
    (b'{"jsonrpc":"2.0","id":true,"method":"ping"}', "id must be"),
    (b'{"jsonrpc":"2.0","id":1,"method":"tools/call","params":[1]}', "params must be an object"),
    (b'{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":["x"]}}', "string params.name"),
    (b'{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"x","arguments":"rm"}}', "must be an object"),
    (b'[{"jsonrpc":"2.0","id":1,"method":"ping"},{"jsonrpc":"2.0","id":1,"method":"ping"}]', "share an id"),
    (b"", "empty"),
    # a key spelled with an escape is the same key once decoded: still a duplicate
    (b'{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"read","na\\u006de":"delete"}}',
     "duplicate key"),
    (b'[[{"jsonrpc":"2.0","id":1,"method":"ping"}]]', "not a JSON object"),
    (b'\xef\xbb\xbf{"jsonrpc":"2.0","id":1,"method":"ping"}', "not JSON"),
    (b"[" * 100_000 + b"]" * 100_000, "too deep"),
])
def test_what_cannot_be_read_unambiguously_is_invalid(body, why):
    a = action(body)
    assert why in a.mcp.invalid and a.name == "mcp:invalid"


def test_oversize_body_is_invalid():
    a = action(call(1, "x", {"blob": "a" * MAX_BODY}))
    assert "larger than" in a.mcp.invalid


def test_stateless_headers_must_match_the_body():
    good = [("Mcp-Method", "tools/call"), ("Mcp-Name", "read_file"), ("MCP-Protocol-Version", "2026-07-28")]
    meta = {"_meta": {"io.modelcontextprotocol/protocolVersion": "2026-07-28"}}
    assert not action(call(1, "read_file", {}, **meta), headers=good).mcp.invalid
    lie = [("Mcp-Method", "tools/call"), ("Mcp-Name", "read_file")]
    assert "Mcp-Name" in action(call(1, "delete_file", {}), headers=lie).mcp.invalid
    assert "Mcp-Method" in action(call(1, "x"), headers=[("Mcp-Method", "tools/list")]).mcp.invalid
    encoded = "=?base64?" + base64.b64encode("löschen".encode()).decode() + "?="
    assert not action(call(1, "löschen"), headers=[("Mcp-Name", encoded)]).mcp.invalid
    a = action(call(1, "read_file", {}, **meta))
    assert a.mcp.protocol_version == "2026-07-28" and a.mcp.session_id == ""


def test_get_stream_response_and_resource():
    assert action(b"", method="GET").name == "mcp:stream"
    resp = action({"jsonrpc": "2.0", "id": 5, "result": {"content": []}})
    assert resp.name == "mcp:response" and resp.mcp.calls[0].method == ""
    read = action({"jsonrpc": "2.0", "id": 2, "method": "resources/read", "params": {"uri": "file:///etc/passwd"}})
    assert read.mcp.calls[0].uri == "file:///etc/passwd" and read.name == "mcp:resources/read"
