"""Mask on streamed LLM answers, hooks called as mitmproxy calls them: an Anthropic event
stream and an NDJSON stream whose secrets are split across events/records reach the agent and
the recording (the ``BodyCapture`` Record stores) masked, as valid SSE / JSON lines."""

from __future__ import annotations

import asyncio
import json

import pytest
from mitmproxy import http
from mitmproxy.test import taddons, tflow, tutils

from chaperone_sidecar import flowctx
from chaperone_sidecar.addons.mask import Mask
from chaperone_sidecar.config import SidecarConfig
from chaperone_sidecar.policy.model import Action, Decision, Identity, MaskSpec
from chaperone_sidecar.services import SidecarServices
from chaperone_sidecar.sources import Sources

SECRET = "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY"
HALVES = (SECRET[:20], SECRET[20:])

def _hook(result) -> None:
    """Run a Mask hook to its end: it returns a coroutine when it masks off the event loop
    (a large or compressed body, ``mask.OFFLOAD_BYTES``), which mitmproxy awaits."""
    if result is not None:
        asyncio.run(result)



def services() -> SidecarServices:
    sources = Sources("team-a")
    sources.publish({"connection_objs": [
        {"metadata": {"name": "claude"}, "spec": {"type": "anthropic", "hosts": ["api.anthropic.com"],
                                                  "recording": {"maxBodyBytes": 65536}}}],
        "policy_objs": []})
    return SidecarServices(config=SidecarConfig(standalone=True), sources=sources)


@pytest.fixture
def mask():
    addon = Mask(services())
    with taddons.context(addon) as tctx:
        tctx.configure(addon, chaperone_mask_buffer="64k")
        yield addon


def flow_with(content_type: str) -> http.HTTPFlow:
    f = tflow.tflow(req=tutils.treq(host="api.anthropic.com", port=443, scheme=b"https", method=b"POST",
                                    path=b"/v1/messages", headers=http.Headers(host="api.anthropic.com")))
    ctx = flowctx.ensure(f)
    ctx.identity = Identity(service_account="team-a/claude", pod_namespace="team-a", pod_name="agent-0")
    ctx.connection, ctx.connection_type = "claude", "anthropic"
    ctx.action = Action("anthropic", "POST", "https", "api.anthropic.com", 443, "/v1/messages",
                        name="anthropic:messages")
    ctx.decision = Decision("allow", masks=(MaskSpec(detectors=("aws-secret-key",)),))
    f.response = http.Response.make(200)
    f.response.headers.clear()
    f.response.headers["content-type"] = content_type
    f.response.headers["transfer-encoding"] = "chunked"
    f.response.raw_content = None
    return f


def through(f: http.HTTPFlow, chunks: list[bytes]) -> list[bytes]:
    """Each chunk through the stream callable, then b"" (the end); what the agent got per call."""
    stream = f.response.stream
    assert callable(stream), "the response was not streamed"
    got = []
    for chunk in [*chunks, b""]:
        out = stream(chunk)
        assert isinstance(out, list) and all(isinstance(c, bytes) and c for c in out)
        got.append(b"".join(out))
    return got


def sse(name: str, obj: dict) -> bytes:
    return f"event: {name}\r\ndata: {json.dumps(obj)}\r\n\r\n".encode()  # CRLF, as servers may


def test_anthropic_stream_split_secret_is_masked_for_agent_and_recording(mask):
    f = flow_with("text/event-stream; charset=utf-8")
    mask.responseheaders(f)
    events = [
        sse("message_start", {"type": "message_start", "message": {"id": "m", "content": []}}),
        sse("content_block_start", {"type": "content_block_start", "index": 0,
                                    "content_block": {"type": "text", "text": ""}}),
        sse("content_block_delta", {"type": "content_block_delta", "index": 0, "delta": {
            "type": "text_delta", "text": "Hello. aws_secret_access_key = " + HALVES[0]}}),
        sse("content_block_delta", {"type": "content_block_delta", "index": 0, "delta": {
            "type": "text_delta", "text": HALVES[1] + " bye"}}),
        sse("content_block_stop", {"type": "content_block_stop", "index": 0}),
        sse("message_stop", {"type": "message_stop"}),
    ]
    got = through(f, events)
    agent = b"".join(got)
    for half in HALVES:
        assert half.encode() not in agent
    assert b'"text":"Hello. "' in got[2]  # text before a word that may start a secret: at once
    blocks = agent.replace(b"\r\n", b"\n").strip().split(b"\n\n")
    objs = [json.loads(b"\n".join(line[5:].strip() for line in block.split(b"\n") if line.startswith(b"data:")))
            for block in blocks]
    assert [o["type"] for o in objs] == ["message_start", "content_block_start", "content_block_delta",  # "bye"
                                         "content_block_delta", "content_block_delta", "content_block_stop", "message_stop"]
    text = "".join(o["delta"]["text"] for o in objs if o["type"] == "content_block_delta")
    assert text == "Hello. aws_secret_access_key = [MASKED:aws-secret-key] bye"
    _hook(mask.response(f))
    capture = flowctx.get(f).bodies.get("response")
    assert capture.streamed and capture.complete and capture.counts == {"aws-secret-key": 1}
    assert bytes(capture.data) == agent  # the recording holds exactly what the agent got
    assert flowctx.get(f).masked == {"aws-secret-key": 1}
    assert "content-length" not in f.response.headers


def test_ndjson_records_are_masked_for_agent_and_recording(mask):
    f = flow_with("application/x-ndjson")
    mask.responseheaders(f)
    recs = [{"response": "aws_secret_access_key = " + HALVES[0], "done": False},
            {"response": HALVES[1] + " ok", "done": False}, {"response": "", "done": True}]
    agent = b"".join(through(f, [json.dumps(r).encode() + b"\n" for r in recs]))
    assert all(h.encode() not in agent for h in HALVES)
    out = [json.loads(line) for line in agent.splitlines()]
    assert "".join(r["response"] for r in out) == "aws_secret_access_key = [MASKED:aws-secret-key] ok"
    assert out[-1]["done"] is True
    _hook(mask.response(f))
    assert bytes(flowctx.get(f).bodies.get("response").data) == agent
