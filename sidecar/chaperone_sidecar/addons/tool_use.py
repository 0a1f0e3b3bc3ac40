"""ToolUse: what the model asked for - recorded, judged by tool-use rules, linked to what follows.

Three jobs around the ``tool_use`` blocks of an Anthropic Messages answer (``POST
.../v1/messages`` on an ``anthropic`` connection, JSON or SSE, and ``GET
.../messages/batches/<id>/results``, JSON Lines; :mod:`~..tool_use_wire` finds them with the
sidecar's one SSE parser):

1. **Record** each block as a ``tool-use`` session event (id, name, the input as the agent got
   it - masked, cut to the connection's ``recording.maxBodyBytes`` -, model, message id, the LLM
   request's flow id, and the verdict). Appended when the answer ends (``response``/``error``).
2. **Judge** it with the tool-use rules (``match.anthropic.toolUses``/``toolInputRegex``,
   :mod:`~..policy.matching_tool_use`) that apply to the request: a blocked block is replaced by
   a text block before the agent's SDK sees it (:mod:`~..tool_use_wire` says how, and why a text
   block). Without such rules nothing is held or changed: the answer is only observed.
3. **Link**: each block is added, as soon as it is complete, to the pod's candidates in
   ``services.tool_uses`` (:class:`~..tool_use_ledger.ToolUseLedger`); every later flow of the
   pod on a non-anthropic connection is scored against them (in ``requestheaders`` when the body
   may leave early, else ``request`` - before Record writes the request event) and the best
   link becomes ``FlowContext.caused_by``, recorded as ``causedBy``. Evidence, never read by a
   policy decision (docs/tool-use.md).

**Order** (``addons/__init__.py``): after Mask, before Record. Mask may have set
``flow.response.stream`` (the SSE masker, or a pass-through that captures the body for the
recording): this addon **wraps** that callable - it runs Mask's first and judges Mask's output -
so the input that is judged and recorded is the masked one, exactly what the agent would get,
and a blocked input reaches the agent neither masked nor unmasked (everything the agent gets
passes through this wrapper last; Telemetry, after it, only counts bytes). A compressed stream
that Mask passed through untouched is decoded here (``Content-Encoding`` dropped) when rules
apply; observed only, a decoded copy is parsed and the original bytes go on. A buffered answer
is judged in ``response``, after Mask masked it. What Record stores as the answer's body is
Mask's capture - the model's answer as sent upstream, masked; the ``tool-use`` events say which
blocks the agent got replaced.

**Fail closed** (rules apply): a stream that would hold more than
:data:`~..tool_use_wire.MAX_HELD_BYTES` while a tool input is written, an answer that cannot be
decoded, or a parsing failure kill the flow (the agent sees a broken transfer, never a blocked
input); a JSON answer larger than ``MAX_JSON_BYTES`` is refused with 502.

**Decision (window)**: candidates are linkable for ``chaperone_tool_use_window`` seconds (a
mitmproxy option, default 120): an agent runs a tool within seconds of the answer, a long build
within a minute or two; older candidates would mostly add false links.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass, field
from typing import Any

from mitmproxy import ctx as mctx
from mitmproxy import http

from .. import flowctx
from ..log_setup import flow_fields
from ..policy.masking.encoding import MaskingError, StreamDecoder, parse_content_encoding
from ..policy.matching import CompiledRule
from ..policy.matching_tool_use import ToolUse as ToolUseBlock
from ..policy.tool_use import Verdict, judge, response_rules
from ..recording.events import new_event
from ..recording.flow_events import identity_of
from ..services import SidecarServices
from ..tool_use_ledger import DEFAULT_WINDOW, Candidate, action_terms, candidate_text
from ..tool_use_wire import Judged, ToolUseStream, rewrite_batch_line, rewrite_message
from . import refusal
from .streaming import body_leaves_early

__all__ = ["ToolUse", "MAX_JSON_BYTES"]

log = logging.getLogger("chaperone.tool_use")

MAX_JSON_BYTES = 16 * 1024 * 1024  # a non-streamed answer judged whole (Messages answers: KBs)


@dataclass
class _State:
    """This addon's memory of one LLM answer (``FlowContext.tool_use``)."""

    rules: tuple[CompiledRule, ...] = ()
    kind: str = "message"  # or "batch": a message batch's results (JSON Lines)
    judged: list[Judged] = field(default_factory=list)
    recorded: bool = False


def _answer_kind(flow: http.HTTPFlow) -> str:
    """``message`` (POST .../messages), ``batch`` (GET .../messages/batches/<id>/results), ""."""
    path = flow.request.path.split("?", 1)[0].rstrip("/")
    if flow.request.method == "POST" and path.endswith("/messages"):
        return "message"
    if flow.request.method == "GET" and "/messages/batches/" in path and path.endswith("/results"):
        return "batch"
    return ""


def _mime(headers: http.Headers) -> str:
    return headers.get("content-type", "").split(";", 1)[0].strip().lower()


def _chunks(out: Any) -> list[bytes]:
    if out is None:
        return []
    if isinstance(out, (bytes, bytearray)):
        return [bytes(out)] if out else []
    return [bytes(c) for c in out if c]


class ToolUse:
    """Records, judges and links the tool_use blocks of LLM answers."""

    def __init__(self, services: SidecarServices) -> None:
        self.services = services
        self.unrecorded = 0

    def load(self, loader) -> None:
        loader.add_option("chaperone_tool_use_window", float, DEFAULT_WINDOW,
                          "Seconds during which a later action of the pod may be linked to a "
                          "tool_use the model asked for (recorded as causedBy).")

    def configure(self, updated) -> None:
        if "chaperone_tool_use_window" in updated:
            self.services.tool_uses.window = max(0.0, float(mctx.options.chaperone_tool_use_window))

    # ------------------------------------------------------------------ linking actions
    def requestheaders(self, flow: http.HTTPFlow) -> None:
        if body_leaves_early(flow):
            self._link(flow)  # Record writes the request event now

    def request(self, flow: http.HTTPFlow) -> None:
        self._link(flow)

    def _link(self, flow: http.HTTPFlow) -> None:
        ctx = flowctx.get(flow)
        if ctx is None or ctx.connection_type == "anthropic":
            return
        ledger = self.services.tool_uses
        if not ledger.candidates(ctx.identity):
            ctx.caused_by = None
            return
        req = flow.request
        terms = action_terms(ctx.action, req.method, req.pretty_host, req.path.split("?", 1)[0])
        link = ledger.link(ctx.identity, terms)
        ctx.caused_by = link.to_event() if link is not None else None

    # ------------------------------------------------------------------ LLM answers
    def responseheaders(self, flow: http.HTTPFlow) -> None:
        ctx = flowctx.get(flow)
        resp = flow.response
        if ctx is None or resp is None or ctx.refused is not None or ctx.connection_type != "anthropic" \
                or resp.status_code != 200 or not _answer_kind(flow):
            return
        try:
            rules: tuple[CompiledRule, ...] = ()
            if ctx.snapshot is not None and ctx.action is not None:
                rules = response_rules(ctx.snapshot.policies, ctx.action, ctx.identity, ctx.connection)
            ctx.tool_use = _State(rules=rules, kind=_answer_kind(flow))
            self._install(flow, ctx, ctx.tool_use)
        except Exception as exc:  # noqa: BLE001 - fail closed where rules may apply (Pipeline would log and go on)
            state = ctx.tool_use
            if isinstance(state, _State) and not state.rules:
                log.exception("observing tool_use blocks failed; the answer passes unobserved",
                              extra=flow_fields(flow))
                return
            log.exception("judging tool_use blocks failed", extra=flow_fields(flow))
            self._refuse(flow, f"the answer could not be judged ({type(exc).__name__})")
            assert flow.response is not None
            flow.response.stream = _Discard(flow.response.raw_content or b"")

    def _install(self, flow: http.HTTPFlow, ctx: flowctx.FlowContext, state: _State) -> None:
        """Wrap a streamed answer's stream callable (a buffered one is judged in ``response``)."""
        resp = flow.response
        assert resp is not None
        rules = state.rules
        if not resp.stream:
            return  # buffered: judged whole in `response`
        mime = _mime(resp.headers)
        if state.kind == "batch":
            mime = "application/jsonl"  # whatever it is labelled: the SDKs read JSON Lines
        elif mime not in ("text/event-stream", "application/json"):
            return
        try:
            codings = parse_content_encoding(resp.headers.get("content-encoding"))
        except MaskingError as exc:
            if rules:
                self._refuse(flow, f"the answer's Content-Encoding cannot be decoded ({exc})")
                assert flow.response is not None  # the refusal's headers go out instead
                flow.response.stream = _Discard(flow.response.raw_content or b"")
            return
        decoder = StreamDecoder(codings, None if mime == "text/event-stream" else MAX_JSON_BYTES) \
            if codings else None
        hold = bool(rules)
        if hold:
            if codings:
                del resp.headers["content-encoding"]  # what goes out is decoded
            resp.headers.pop("content-length", None)  # a replacement changes the length
            if flow.request.http_version == "HTTP/1.1" and "transfer-encoding" not in resp.headers:
                resp.headers["transfer-encoding"] = "chunked"
        seen = self._seen(flow, ctx, state)
        decide = self._decider(state) if hold else None
        if mime == "text/event-stream":
            resp.stream = _SSEAnswer(flow, resp.stream, decoder, ToolUseStream(decide, seen), hold)
        elif state.kind == "batch":
            resp.stream = _JSONLAnswer(flow, resp.stream, decoder, decide, seen, hold)
        else:
            resp.stream = _JSONAnswer(flow, resp.stream, decoder, decide, seen, hold)

    async def response(self, flow: http.HTTPFlow) -> None:
        ctx = flowctx.get(flow)
        resp = flow.response
        state = ctx.tool_use if ctx is not None else None
        if ctx is None or resp is None or not isinstance(state, _State):
            return
        if not resp.stream and ctx.refused is None and (
                state.kind == "batch" or _mime(resp.headers) == "application/json"):
            try:
                self._judge_buffered(flow, ctx, state)
            except Exception as exc:  # noqa: BLE001 - fail closed where rules apply
                log.exception("judging tool_use blocks failed", extra=flow_fields(flow))
                if state.rules:
                    self._refuse(flow, f"the answer could not be judged ({type(exc).__name__})")
        await self._record(flow, ctx, state)

    async def error(self, flow: http.HTTPFlow) -> None:
        ctx = flowctx.get(flow)
        state = ctx.tool_use if ctx is not None else None
        if ctx is None or not isinstance(state, _State):
            return
        await self._record(flow, ctx, state)

    # ------------------------------------------------------------------ helpers
    def _decider(self, state: _State):
        rules = state.rules

        def decide(tool_use: ToolUseBlock) -> Verdict | None:
            return judge(rules, tool_use)
        return decide

    def _seen(self, flow: http.HTTPFlow, ctx: flowctx.FlowContext, state: _State):
        """Each complete block: kept for the recording, and a link candidate right away (the
        agent may act on it before the answer's stream has ended)."""
        ledger = self.services.tool_uses
        identity = ctx.identity

        def seen(judged: Judged) -> None:
            state.judged.append(judged)
            tool_use = judged.tool_use
            if not tool_use.complete:
                return
            ledger.add(identity, Candidate(id=tool_use.id, name=tool_use.name,
                                           text=candidate_text(tool_use), at=time.monotonic(),
                                           flow=flow.id, model=judged.model, blocked=judged.replaced))
        return seen

    def _judge_buffered(self, flow: http.HTTPFlow, ctx: flowctx.FlowContext, state: _State) -> None:
        resp = flow.response
        assert resp is not None
        try:
            body = resp.get_content(strict=True)
        except ValueError:
            if state.rules:
                self._refuse(flow, "the answer could not be decoded")
            return
        if not body or len(body) > MAX_JSON_BYTES:
            if body and state.rules:
                self._refuse(flow, f"the answer is larger than {MAX_JSON_BYTES} bytes")
            return
        decide = self._decider(state) if state.rules else None
        record = self._seen(flow, ctx, state)
        if state.kind == "batch":
            lines = [rewrite_batch_line(line, decide) for line in body.splitlines(keepends=True)]
            for _, seen in lines:
                for judged in seen:
                    record(judged)
            if any(judged.replaced for _, seen in lines for judged in seen):
                resp.set_content(b"".join(line for line, _ in lines))
            return
        try:
            message = json.loads(body)
        except ValueError:
            return  # not an answer the SDK parses either
        changed, seen = rewrite_message(message, decide)
        for judged in seen:
            record(judged)
        if changed:
            resp.set_content(json.dumps(message, ensure_ascii=False).encode("utf-8"))

    def _refuse(self, flow: http.HTTPFlow, reason: str) -> None:
        log.warning("LLM answer withheld, its tool_use blocks cannot be judged: %s", reason,
                    extra=flow_fields(flow))
        refusal.refuse(flow, "response_unmaskable",
                       f"The model's answer was withheld: {reason}, so its tool_use blocks could "
                       "not be checked against the tool-use rules.",
                       how_to_get_access="Retry the request; ask for a smaller or uncompressed answer.")

    async def _record(self, flow: http.HTTPFlow, ctx: flowctx.FlowContext, state: _State) -> None:
        recorder = self.services.recorder
        if state.recorded or not state.judged or recorder is None or not ctx.recording.enabled:
            return
        state.recorded = True
        limit = ctx.recording.body_limit
        identity = identity_of(ctx.identity)
        events = []
        for judged in state.judged:
            tool_use = judged.tool_use
            data: dict[str, Any] = {
                "id": tool_use.id, "name": tool_use.name, "index": tool_use.index,
                "model": judged.model or None, "message": judged.message_id or None,
                "llmFlow": flow.id, "complete": tool_use.complete, "replaced": judged.replaced,
                "input": _input_of(tool_use, limit),
            }
            if judged.verdict is not None:
                v = judged.verdict
                data["blocked"] = {"rule": {"policy": v.rule.policy, "name": v.rule.rule},
                                   "message": v.message, "reason": v.reason}
            events.append(new_event("tool-use", flow=flow.id, data=data, identity=identity))
        results = await recorder.append_many(events)
        lost = sum(1 for r in results if not isinstance(r, dict))
        if lost:
            self.unrecorded += lost
            log.error("%d tool-use events could not be recorded", lost, extra=flow_fields(flow))


def _input_of(tool_use: ToolUseBlock, limit: int) -> dict[str, Any]:
    """The (masked) input as recorded: JSON text cut to the recording's body limit."""
    raw = tool_use.raw
    if limit <= 0:
        return {"size": len(raw), "omitted": "recording.bodies is none"}
    out: dict[str, Any] = {"text": raw[:limit], "size": len(raw)}
    if len(raw) > limit:
        out["truncated"] = True
    if not tool_use.parsed:
        out["parsed"] = False
    return out


# ============================================================================ stream callables

class _Answer:
    """Base of the stream wrappers: runs the callable found first (Mask's), then this one."""

    def __init__(self, flow: http.HTTPFlow, then: Any, decoder: StreamDecoder | None, hold: bool) -> None:
        self.flow = flow
        self.then = then if callable(then) else None
        self.decoder = decoder
        self.hold = hold
        self.failed = False

    def upstream(self, data: bytes) -> list[bytes]:
        if self.then is None:
            return [data] if data else []
        return _chunks(self.then(data))

    def decoded(self, chunks: list[bytes], final: bool) -> bytes:
        data = b"".join(chunks)
        if self.decoder is None:
            return data
        out = self.decoder.feed(data) if data else b""
        return out + self.decoder.finish() if final else out

    def fail(self, reason: str) -> list[bytes]:
        self.failed = True
        log.warning("LLM answer stream aborted, rest withheld: %s", reason, extra=flow_fields(self.flow))
        if self.flow.killable:
            self.flow.kill()
        return []


class _SSEAnswer(_Answer):
    def __init__(self, flow: http.HTTPFlow, then: Any, decoder: StreamDecoder | None,
                 stream: ToolUseStream, hold: bool) -> None:
        super().__init__(flow, then, decoder, hold)
        self.stream = stream

    def __call__(self, data: bytes) -> list[bytes]:
        if self.failed:
            return []
        chunks = self.upstream(data)
        final = not data
        try:
            out = self.stream.feed(self.decoded(chunks, final), final)
        except Exception as exc:  # noqa: BLE001 - judged streams fail closed, observed ones pass
            if self.hold:
                return self.fail(str(exc))
            log.warning("tool_use observation stopped: %s", exc, extra=flow_fields(self.flow))
            self.stream = ToolUseStream(None, lambda judged: None)
            self.decoder = None
            return chunks
        if not self.hold:
            return chunks
        return [out] if out else []


class _JSONAnswer(_Answer):
    """A non-streamed answer of unknown or large length: collected whole (bounded), judged at
    its end (held only when rules apply; observed from a bounded copy otherwise)."""

    def __init__(self, flow: http.HTTPFlow, then: Any, decoder: StreamDecoder | None, decide: Any,
                 seen: Any, hold: bool) -> None:
        super().__init__(flow, then, decoder, hold)
        self.decide = decide
        self.seen = seen
        self.buf = bytearray()
        self.over = False

    def __call__(self, data: bytes) -> list[bytes]:
        if self.failed:
            return []
        chunks = self.upstream(data)
        final = not data
        try:
            if not self.over:
                self.buf += self.decoded(chunks, final)
        except MaskingError as exc:
            if self.hold:
                return self.fail(str(exc))
            self.over = True
        if len(self.buf) > MAX_JSON_BYTES:
            if self.hold:
                return self.fail(f"the answer is larger than {MAX_JSON_BYTES} bytes")
            self.over, self.buf = True, bytearray()
        if not final:
            return [] if self.hold else chunks
        body, self.buf = bytes(self.buf), bytearray()
        try:
            message = json.loads(body) if body and not self.over else None
        except ValueError:
            message = None
        changed, seen = rewrite_message(message, self.decide)
        for judged in seen:
            self.seen(judged)
        if not self.hold:
            return chunks
        if changed:
            body = json.dumps(message, ensure_ascii=False).encode("utf-8")
        return [body] if body else []


class _JSONLAnswer(_Answer):
    """A message batch's results, JSON Lines: each complete line judged and passed on (a line
    is held only until its end; one longer than ``MAX_JSON_BYTES`` fails closed when rules
    apply, and ends the observation otherwise)."""

    def __init__(self, flow: http.HTTPFlow, then: Any, decoder: StreamDecoder | None, decide: Any,
                 seen: Any, hold: bool) -> None:
        super().__init__(flow, then, decoder, hold)
        self.decide = decide
        self.seen = seen
        self.buf = bytearray()
        self.off = False  # observing stopped (a line too long, an undecodable stream)

    def __call__(self, data: bytes) -> list[bytes]:
        if self.failed:
            return []
        chunks = self.upstream(data)
        if self.off:
            return chunks
        final = not data
        try:
            self.buf += self.decoded(chunks, final)
        except MaskingError as exc:
            if self.hold:
                return self.fail(str(exc))
            self.off, self.buf = True, bytearray()
            return chunks
        out: list[bytes] = []
        while (end := self.buf.find(b"\n")) >= 0 or (final and self.buf):
            cut = end + 1 if end >= 0 else len(self.buf)
            line = bytes(self.buf[:cut])
            del self.buf[:cut]
            new, seen = rewrite_batch_line(line, self.decide)
            for judged in seen:
                self.seen(judged)
            out.append(new)
        if len(self.buf) > MAX_JSON_BYTES:
            if self.hold:
                return self.fail(f"a batch result line is longer than {MAX_JSON_BYTES} bytes")
            self.off, self.buf = True, bytearray()
        if not self.hold:
            return chunks
        return [b"".join(out)] if out else []


class _Discard:
    """The upstream body is dropped in favour of the refusal sent in its place."""

    def __init__(self, body: bytes) -> None:
        self.body = body

    def __call__(self, data: bytes) -> list[bytes]:
        if data or not self.body:
            return []
        body, self.body = self.body, b""
        return [body]
