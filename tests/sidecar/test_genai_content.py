"""GenAI content attributes (opt-in): Anthropic request/answer -> semconv v1.37 message JSON."""

from __future__ import annotations

import json

from chaperone_sidecar.genai_content import MAX_CHARS, request_content, response_content

SSE_ANSWER = (
    b'event: message_start\ndata: {"type":"message_start","message":{"id":"msg_01","type":"message",'
    b'"role":"assistant","model":"m","content":[],"stop_reason":null,"usage":{"input_tokens":2}}}\n\n'
    b'event: content_block_start\ndata: {"type":"content_block_start","index":0,'
    b'"content_block":{"type":"text","text":""}}\n\n'
    b'event: content_block_delta\ndata: {"type":"content_block_delta","index":0,'
    b'"delta":{"type":"text_delta","text":"COMPLETION-"}}\n\n'
    b'event: content_block_delta\ndata: {"type":"content_block_delta","index":0,'
    b'"delta":{"type":"text_delta","text":"SECRET"}}\n\n'
    b'event: content_block_start\ndata: {"type":"content_block_start","index":1,'
    b'"content_block":{"type":"tool_use","id":"t1","name":"bash","input":{}}}\n\n'
    b'event: content_block_delta\ndata: {"type":"content_block_delta","index":1,'
    b'"delta":{"type":"input_json_delta","partial_json":"{\\"command\\": "}}\n\n'
    b'event: content_block_delta\ndata: {"type":"content_block_delta","index":1,'
    b'"delta":{"type":"input_json_delta","partial_json":"\\"ls\\"}"}}\n\n'
    b'event: message_delta\ndata: {"type":"message_delta","delta":{"stop_reason":"tool_use"},'
    b'"usage":{"output_tokens":5}}\n\n')


def test_request_becomes_system_instructions_and_input_messages():
    body = json.dumps({"model": "m", "system": "be brief", "messages": [
        {"role": "user", "content": "hi [MASKED:jwt]"},
        {"role": "assistant", "content": [{"type": "tool_use", "id": "t1", "name": "bash",
                                           "input": {"command": "ls"}}]},
        {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "t1", "content": "a b"},
                                     {"type": "image", "source": {"data": "QUJD"}}]}]}).encode()
    out = request_content(body)
    assert json.loads(out["gen_ai.system_instructions"]) == [{"type": "text", "content": "be brief"}]
    messages = json.loads(out["gen_ai.input.messages"])
    assert messages[0] == {"role": "user", "parts": [{"type": "text", "content": "hi [MASKED:jwt]"}]}
    assert messages[1]["parts"] == [{"type": "tool_call", "id": "t1", "name": "bash",
                                     "arguments": {"command": "ls"}}]
    assert messages[2]["parts"] == [{"type": "tool_call_response", "id": "t1", "response": "a b"},
                                    {"type": "image"}]  # no image data
    assert request_content(b"not json") == {}


def test_streamed_answer_is_assembled():
    out = json.loads(response_content(SSE_ANSWER, sse=True)["gen_ai.output.messages"])
    assert out == [{"role": "assistant", "parts": [
        {"type": "text", "content": "COMPLETION-SECRET"},
        {"type": "tool_call", "id": "t1", "name": "bash", "arguments": {"command": "ls"}}],
        "finish_reason": "tool_use"}]


def test_json_answer_and_bounds():
    body = json.dumps({"type": "message", "role": "assistant", "stop_reason": "end_turn",
                       "content": [{"type": "text", "text": "x" * (MAX_CHARS * 2)}]}).encode()
    text = response_content(body, sse=False)["gen_ai.output.messages"]
    assert len(text) <= MAX_CHARS + 20 and text.endswith("...[truncated]")
    assert response_content(b'{"type":"error","error":{}}', sse=False) == {}
