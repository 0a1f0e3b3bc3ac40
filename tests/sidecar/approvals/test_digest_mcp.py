"""Exact approval digests of MCP calls: what the call does, not its JSON-RPC framing."""

from __future__ import annotations

import json

from chaperone_sidecar.approvals.digest import action_resources, mcp_payload, request_digest
from chaperone_sidecar.policy.classify import classify
from chaperone_sidecar.policy.model import HTTPRequest


def digest(message) -> str:
    body = message if isinstance(message, bytes) else json.dumps(message).encode()
    req = HTTPRequest("POST", "https", "mcp.local", 443, "/mcp", headers=(("content-type", "application/json"),),
                      body=body)
    return request_digest(req, payload=mcp_payload(classify(req, "mcp")))


def call(i, args, meta=None):
    params = {"name": "deploy", "arguments": args, **({"_meta": meta} if meta else {})}
    return {"jsonrpc": "2.0", "id": i, "method": "tools/call", "params": params}


def test_a_retry_with_a_new_id_progress_token_and_key_order_is_the_same_call():
    first = digest(call(1, {"env": "prod", "force": False}))
    assert digest(call(7, {"force": False, "env": "prod"}, meta={"progressToken": 7})) == first


def test_other_arguments_tool_or_batching_are_other_calls():
    first = digest(call(1, {"env": "prod"}))
    assert digest(call(1, {"env": "staging"})) != first
    assert digest(call(1, {"env": "prod", "force": True})) != first
    assert digest([call(1, {"env": "prod"})]) != first
    other = call(1, {"env": "prod"})
    other["params"]["name"] = "deploy2"
    assert digest(other) != first


def test_lone_surrogates_digest_without_raising_and_resources_name_the_tool():
    assert digest(b'{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"x\\ud800"}}').startswith("sha256:")
    req = HTTPRequest("POST", "https", "mcp.local", 443, "/mcp", body=json.dumps(call(1, {"env": "prod"})).encode())
    assert action_resources(classify(req, "mcp")) == ("tools/call:deploy",)
