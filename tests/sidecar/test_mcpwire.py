"""mcpwire: JSON-RPC refusals and tools/list filtering (JSON and SSE, split anywhere)."""

from __future__ import annotations

import json

from chaperone_sidecar.mcpwire import REFUSAL_CODE, SSEToolsFilter, filter_tools_json, jsonrpc_refusal

BODY = {"error": "chaperone_blocked", "message": "no", "rule": {"policy": "ns/p", "name": "r"},
        "action": {"summary": "mcp tools/call delete_file"}, "how_to_get_access": "ask"}
LIST = {"jsonrpc": "2.0", "id": 3, "result": {"tools": [{"name": "read_file"}, {"name": "delete_file"},
                                                       {"title": "no name"}]}}


def hidden(name):
    return name.startswith("delete")


def test_refusal_answers_every_request_id():
    single = json.loads(jsonrpc_refusal(['"a"'], False, BODY))
    assert single["id"] == "a" and single["error"]["code"] == REFUSAL_CODE
    assert "rule 'r' of AccessPolicy ns/p" in single["error"]["message"] and single["error"]["data"] == BODY
    batch = json.loads(jsonrpc_refusal(["1", "2", ""], True, BODY))
    assert [e["id"] for e in batch] == [1, 2]
    assert jsonrpc_refusal(["", ""], True, BODY) is None  # notifications only: plain refusal


def test_json_list_is_filtered_only_for_its_request_id():
    out, removed = filter_tools_json(json.dumps(LIST).encode(), frozenset({"3"}), hidden)
    assert [t["name"] for t in json.loads(out)["result"]["tools"]] == ["read_file"]
    assert removed == ["delete_file", "<unnamed>"]
    same, removed = filter_tools_json(json.dumps(LIST).encode(), frozenset({"4"}), hidden)
    assert removed == [] and b"delete_file" in same


def test_sse_event_split_byte_by_byte_is_filtered():
    stream = (b"event: message\r\nid: 7\r\ndata: " + json.dumps(LIST).encode() + b"\r\n\r\n"
              b": ping\n\nevent: message\ndata: {\"jsonrpc\":\"2.0\",\"method\":\"notifications/progress\"}\n\n")
    f = SSEToolsFilter(frozenset({"3"}), hidden)
    out = b"".join(b"".join(f(stream[i:i + 1])) for i in range(len(stream))) + b"".join(f(b""))
    assert b"delete_file" not in out and b"read_file" in out
    assert b"event: message\nid: 7\ndata: " in out and b"notifications/progress" in out and b": ping\n\n" in out


def test_sse_multi_line_data_is_joined_before_parsing():
    text = json.dumps(LIST, indent=1).encode().replace(b"\n", b"\ndata: ")
    f = SSEToolsFilter(frozenset({"3"}), hidden)
    out = b"".join(f(b"data: " + text + b"\n\n")) + b"".join(f(b""))
    assert b"delete_file" not in out and b"read_file" in out


def test_a_large_event_in_small_chunks_costs_linear_time():
    """The server picks the chunking: a 6 MiB event in 4 KiB reads must not be rescanned and
    recopied on every read (that was 33 s, quadratic; now about 0.3 s)."""
    import time

    big = {"jsonrpc": "2.0", "id": 3, "result": {"tools": [{"name": f"t{i}", "description": "y" * 2000}
                                                           for i in range(3000)] + [{"name": "delete_file"}]}}
    event = b"data: " + json.dumps(big).encode() + b"\n\n"
    f = SSEToolsFilter(frozenset({"3"}), hidden)
    start = time.monotonic()
    out = [c for i in range(0, len(event), 4096) for c in f(event[i:i + 4096])] + f(b"")
    assert time.monotonic() - start < 10
    assert b"delete_file" not in b"".join(out) and f.removed == ["delete_file"]
