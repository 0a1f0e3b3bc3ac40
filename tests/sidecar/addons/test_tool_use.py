"""The ToolUse addon, hooks called as mitmproxy calls them, next to the real Mask addon.

Mask runs first (it installs the SSE masker / pass-through as ``flow.response.stream``); ToolUse
must wrap that callable, judge the *masked* text, hold a blocked block until its stop and never
let its input out; a buffered JSON answer is judged after Mask masked it. Every seen block is a
``tool-use`` event and a link candidate; a later flow of the pod gets ``caused_by``.
"""

from __future__ import annotations

import asyncio
import gzip
import json
from typing import Any

import pytest
from mitmproxy import http
from mitmproxy.test import taddons, tflow, tutils

from chaperone_sidecar import flowctx
from chaperone_sidecar.addons.mask import Mask
from chaperone_sidecar.addons.tool_use import ToolUse
from chaperone_sidecar.config import SidecarConfig
from chaperone_sidecar.policy.model import Action, Decision, Identity, MaskSpec
from chaperone_sidecar.services import SidecarServices
from chaperone_sidecar.sources import Sources

KEY_ID = "AKIAIOSFODNN7EXAMPLE"
POD = Identity(service_account="team-a/claude", pod_namespace="team-a", pod_name="agent-0", pod_uid="u1")
RULES = [{"name": "no-rm", "match": {"anthropic": {"toolUses": ["bash"], "toolInputRegex": r"rm\s+-rf"}},
          "block": {"message": "no recursive deletes"}}]


class FakeRecorder:
    def __init__(self) -> None:
        self.events: list[dict[str, Any]] = []

    async def append_many(self, events: list[dict[str, Any]]) -> list[Any]:
        self.events.extend(events)
        return [dict(e) for e in events]


def services(rules: list[dict] | None = None) -> SidecarServices:
    sources = Sources("team-a")
    sources.publish({"connection_objs": [
        {"metadata": {"name": "claude"}, "spec": {"type": "anthropic", "hosts": ["api.anthropic.com"]}}],
        "policy_objs": [{"apiVersion": "chaperone.dev/v1alpha1", "kind": "AccessPolicy",
                         "metadata": {"name": "p", "namespace": "team-a"},
                         "spec": {"defaultEffect": "allow", "rules": RULES if rules is None else rules}}]})
    svc = SidecarServices(config=SidecarConfig(standalone=True), sources=sources)
    svc.recorder = FakeRecorder()  # type: ignore[assignment]
    return svc


@pytest.fixture
def addons():
    svc = services()
    mask, tool_use = Mask(svc), ToolUse(svc)
    with taddons.context(mask, tool_use) as tctx:
        tctx.configure(mask, chaperone_mask_buffer="64k")
        yield svc, mask, tool_use


def llm_flow(svc: SidecarServices, content_type: str, body: bytes | None = None) -> http.HTTPFlow:
    f = tflow.tflow(req=tutils.treq(host="api.anthropic.com", port=443, scheme=b"https", method=b"POST",
                                    path=b"/v1/messages", headers=http.Headers(host="api.anthropic.com")))
    ctx = flowctx.ensure(f)
    ctx.identity = POD
    ctx.connection, ctx.connection_type, ctx.snapshot = "claude", "anthropic", svc.snapshot()
    ctx.action = Action("anthropic", "POST", "https", "api.anthropic.com", 443, "/v1/messages",
                        name="anthropic:messages")
    ctx.decision = Decision("allow", masks=(MaskSpec(detectors=("aws-access-key-id",)),))
    f.response = http.Response.make(200)
    f.response.headers.clear()
    f.response.headers["content-type"] = content_type
    if body is None:
        f.response.headers["transfer-encoding"] = "chunked"
        f.response.raw_content = None
    else:
        f.response.raw_content = body
        f.response.headers["content-length"] = str(len(body))
    return f


def ev(name: str, obj: dict) -> bytes:
    return f"event: {name}\r\ndata: {json.dumps(obj)}\r\n\r\n".encode()


def tool_events(index: int, tid: str, parts: list[str]) -> list[bytes]:
    return [ev("content_block_start", {"type": "content_block_start", "index": index,
                                       "content_block": {"type": "tool_use", "id": tid, "name": "bash", "input": {}}}),
            *[ev("content_block_delta", {"type": "content_block_delta", "index": index,
                                         "delta": {"type": "input_json_delta", "partial_json": p}}) for p in parts],
            ev("content_block_stop", {"type": "content_block_stop", "index": index})]


def stream_events() -> list[bytes]:
    start = {"type": "message_start", "message": {"id": "msg_1", "model": "claude-x", "content": []}}
    return [ev("message_start", start),
            *tool_events(0, "toolu_ok", ['{"command": "aws configure set key ' + KEY_ID[:8], KEY_ID[8:] + '"}']),
            *tool_events(1, "toolu_rm", ['{"command": "rm', ' -rf /tmp/../"}']),
            ev("message_delta", {"type": "message_delta", "delta": {"stop_reason": "tool_use"}}),
            ev("message_stop", {"type": "message_stop"})]


def hooks(f: http.HTTPFlow, mask: Mask, tool_use: ToolUse) -> None:
    mask.responseheaders(f)
    tool_use.responseheaders(f)


def pump(f: http.HTTPFlow, chunks: list[bytes]) -> bytes:
    stream = f.response.stream
    assert callable(stream)
    return b"".join(b"".join(stream(c)) for c in [*chunks, b""])


def test_streamed_answer_judged_after_masking_and_recorded(addons):
    svc, mask, tool_use = addons
    f = llm_flow(svc, "text/event-stream")
    hooks(f, mask, tool_use)
    wire = pump(f, stream_events())
    assert b"rm -rf" not in wire and b"toolu_rm" in wire and b"Chaperone blocked tool_use toolu_rm" in wire
    assert KEY_ID[:8] not in wire.decode() and "[MASKED:aws-access-key-id]" in wire.decode()
    assert b'"stop_reason":"tool_use"' in wire.replace(b" ", b"")  # the allowed block remains
    asyncio.run(tool_use.response(f))
    events = svc.recorder.events  # type: ignore[union-attr]
    assert [(e["type"], e["data"]["id"], e["data"]["replaced"]) for e in events] == [
        ("tool-use", "toolu_ok", False), ("tool-use", "toolu_rm", True)]
    ok, rm = events[0]["data"], events[1]["data"]
    assert "[MASKED:aws-access-key-id]" in ok["input"]["text"] and KEY_ID not in json.dumps(events)
    assert rm["blocked"]["rule"] == {"policy": "team-a/p", "name": "no-rm"} and rm["llmFlow"] == f.id
    assert ok["model"] == "claude-x" and ok["message"] == "msg_1"
    # Mask's capture (what Record stores as the answer) is the model's answer, masked
    assert KEY_ID not in bytes(flowctx.get(f).bodies["response"].data).decode()


def test_a_blocked_input_never_leaks_even_without_masks(addons):
    svc, mask, tool_use = addons
    f = llm_flow(svc, "text/event-stream")
    flowctx.get(f).decision = Decision("allow")  # no masks: Mask installs its pass-through
    hooks(f, mask, tool_use)
    outs = [b"".join(f.response.stream(c)) for c in stream_events()]
    joined = b"".join(outs) + b"".join(f.response.stream(b""))
    assert b"rm -rf" not in joined and b"-rf" not in joined
    assert KEY_ID[:8].encode() in joined and KEY_ID[8:].encode() in joined  # no masks: as sent


def test_compressed_stream_passed_by_mask_is_decoded_before_judging(addons):
    svc, mask, tool_use = addons
    f = llm_flow(svc, "text/event-stream")
    flowctx.get(f).decision = Decision("allow")
    f.response.headers["content-encoding"] = "gzip"
    hooks(f, mask, tool_use)
    assert "content-encoding" not in f.response.headers
    wire = pump(f, [gzip.compress(b"".join(stream_events()))])
    assert b"Chaperone blocked tool_use toolu_rm" in wire and b"rm -rf" not in wire


def test_without_rules_nothing_is_held_but_everything_is_recorded_and_linked():
    svc = services(rules=[])
    mask, tool_use = Mask(svc), ToolUse(svc)
    with taddons.context(mask, tool_use):
        f = llm_flow(svc, "text/event-stream")
        flowctx.get(f).decision = Decision("allow")
        hooks(f, mask, tool_use)
        events = stream_events()
        outs = [b"".join(f.response.stream(c)) for c in events]
        assert outs == events  # byte for byte, event by event: no hold
        f.response.stream(b"")
        asyncio.run(tool_use.response(f))
        assert [e["data"]["id"] for e in svc.recorder.events] == ["toolu_ok", "toolu_rm"]  # type: ignore[union-attr]

        follow = tflow.tflow(req=tutils.treq(host="s3.amazonaws.com", port=443, scheme=b"https", method=b"DELETE",
                                             path=b"/tmp"))
        ctx = flowctx.ensure(follow)
        ctx.identity, ctx.connection_type = POD, "aws"
        ctx.action = Action("http", "POST", "https", "example.com", 443, "/tmp/../", name="http:POST")
        tool_use.request(follow)
        assert ctx.caused_by is not None and ctx.caused_by["toolUseId"] == "toolu_rm"
        other = tflow.tflow()
        octx = flowctx.ensure(other)
        octx.identity = Identity(pod_namespace="team-b", pod_name="x")
        octx.action = ctx.action
        tool_use.request(other)
        assert octx.caused_by is None  # another pod


def test_buffered_json_answer_is_rewritten_after_masking(addons):
    svc, mask, tool_use = addons
    answer = {"id": "msg_2", "type": "message", "model": "claude-x", "stop_reason": "tool_use", "content": [
        {"type": "text", "text": "cleaning"},
        {"type": "tool_use", "id": "toolu_rm", "name": "bash", "input": {"command": f"rm -rf / # {KEY_ID}"}}]}
    f = llm_flow(svc, "application/json", json.dumps(answer).encode())
    hooks(f, mask, tool_use)
    mask.response(f)
    asyncio.run(tool_use.response(f))
    got = json.loads(f.response.content)
    assert got["stop_reason"] == "end_turn" and got["content"][1]["type"] == "text"
    assert "rm -rf" not in f.response.text and int(f.response.headers["content-length"]) == len(f.response.raw_content)
    rec = svc.recorder.events[0]["data"]  # type: ignore[union-attr]
    assert rec["blocked"]["message"] == "no recursive deletes" and "[MASKED:aws-access-key-id]" in rec["input"]["text"]


def test_an_internal_error_withholds_the_answer(addons, monkeypatch):
    svc, mask, tool_use = addons
    f = llm_flow(svc, "text/event-stream")
    mask.responseheaders(f)

    def broken(*args: Any) -> Any:
        raise RuntimeError("bug")

    monkeypatch.setattr("chaperone_sidecar.addons.tool_use.response_rules", broken)
    tool_use.responseheaders(f)  # the rules are unknown: fail closed
    assert f.response.status_code == 502 and flowctx.get(f).refused["error"] == "chaperone_response_unmaskable"
    assert pump(f, stream_events()).startswith(b"{") and b"toolu_rm" not in f.response.content


def test_batch_results_are_judged_line_by_line_streamed_or_buffered(addons):
    svc, mask, tool_use = addons
    line = {"custom_id": "a", "result": {"type": "succeeded", "message": {
        "stop_reason": "tool_use", "content": [{"type": "tool_use", "id": "toolu_rm", "name": "bash",
                                                "input": {"command": "rm -rf /"}}]}}}
    ok = {"custom_id": "b", "result": {"type": "errored", "error": {"type": "overloaded"}}}
    body = (json.dumps(line) + "\n" + json.dumps(ok) + "\n").encode()
    for streamed in (True, False):
        f = llm_flow(svc, "application/binary", None if streamed else body)
        f.request.method, f.request.path = "GET", "/v1/messages/batches/msgbatch_1/results"
        hooks(f, mask, tool_use)
        if streamed:
            wire = pump(f, [body[:50], body[50:]])
        else:
            mask.response(f)
            asyncio.run(tool_use.response(f))
            wire = f.response.content
        first, second = (json.loads(x) for x in wire.splitlines())
        assert first["result"]["message"]["content"][0]["type"] == "text", streamed
        assert first["result"]["message"]["stop_reason"] == "end_turn" and second == ok
        assert b"rm -rf" not in wire


def test_the_window_is_a_proxy_option():
    svc = services()
    addon = ToolUse(svc)
    with taddons.context(addon) as tctx:
        assert svc.tool_uses.window == 120
        tctx.configure(addon, chaperone_tool_use_window=5.0)
        assert svc.tool_uses.window == 5.0
