"""MCP tool results in SSE events (JSON-RPC messages, one per event): the secret in
``result.content[].text`` and ``structuredContent`` is masked whatever the chunking and however
the JSON escapes it, and the event stays JSON the MCP client parses."""

from __future__ import annotations

import json

import pytest

from chaperone_sidecar.addons.mask import masker_for, stream_masker
from chaperone_sidecar.policy.model import MaskSpec

SECRET = "AKIAIOSFODNN7EXAMPLE"


def masked(stream: bytes, chunk: int) -> bytes:
    masker = masker_for((MaskSpec(detectors=("aws-access-key-id",)),), "response")
    sm = stream_masker(masker, "text/event-stream", None, max_decoded_bytes=1 << 20)
    out = b"".join(b"".join(sm(stream[i:i + chunk])) for i in range(0, len(stream), chunk))
    return out + b"".join(sm(b""))


def result_event(text_json: bytes) -> bytes:
    return (b'event: message\r\nid: 1\r\ndata: {"jsonrpc":"2.0","id":4,"result":{"content":[{"type":"text",'
            b'"text":' + text_json + b'}],"structuredContent":{"result":' + text_json + b'},"isError":false}}\r\n\r\n')


@pytest.mark.parametrize("text", [
    json.dumps(f"the key is {SECRET}").encode(),
    b'"the key is AKIA\\u0049OSFODNN7EXAMPLE"',  # escaped inside the JSON string
    b'"the key is \\u0041\\u004b\\u0049\\u0041IOSFODNN7EXAMPLE"',
])
@pytest.mark.parametrize("chunk", [1, 7, 4096])
def test_the_secret_in_a_tool_result_event_is_masked(text, chunk):
    progress = b'event: message\ndata: {"jsonrpc":"2.0","method":"notifications/progress","params":{}}\n\n'
    out = masked(progress + result_event(text), chunk)
    events = [e for e in out.replace(b"\r\n", b"\n").split(b"\n\n") if e]
    assert b"notifications/progress" in events[0]
    data = json.loads(events[1].split(b"data: ", 1)[1])
    assert data["id"] == 4
    for value in (data["result"]["content"][0]["text"], data["result"]["structuredContent"]["result"]):
        assert SECRET not in value and value.startswith("the key is [MASKED:aws-access-key-id]")
