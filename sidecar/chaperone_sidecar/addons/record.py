"""Record: every flow becomes session events - request, decision, approval, response or error.

One session per sidecar process: ``session-start`` when mitmproxy is ``running``, ``session-end``
and the signed manifest at ``done`` (``Recorder.start``/``Recorder.close``). Events go through
the recorder's async ``append`` (a queue and one writer thread: the event loop never waits on
disk). Per flow, in the recording's hash chain:

1. ``request`` - with the policy decision in it (``data.decision``: effect, rule, message,
   masks, refusal; a separate ``decision`` event until issue 16, which readers still accept)
   - and, when an approval was involved, ``approval``, appended **before the request is
   forwarded**: in ``request`` (Record runs after Enforce, Approve, InjectCredentials and
   Mask), or in ``requestheaders`` when the body may leave before ``request`` fires
   (:func:`~.streaming.body_leaves_early`: it streams, or its length is unknown and mitmproxy
   may start streaming it while reading it); its masked copy is then added to the
   ``response`` event as ``requestBody``. If such a body was read after all and Enforce
   judged the request again with it, a ``decision`` event records the new decision before
   the request leaves.
2. ``response`` (status, headers, masked body, what was masked, timings) or ``error``.

**What is stored** (built by :mod:`chaperone_sidecar.recording.flow_events`). Bodies come only
from what Mask captured (``FlowContext.bodies``): the masked form, decoded when compressed,
cut to the connection's ``recording.maxBodyBytes`` (``bodies: truncated``, the default;
``FlowContext.recording``, set by Route), whole up to
:data:`~chaperone_sidecar.flowctx.FULL_BODY_CAP` (``full``) or not at all (``none``).
A body without a capture (Mask did not run) or one Mask could not mask is recorded as
``{"size": n, "omitted": reason}`` - never unmasked. Credentials are never recorded: header
values whose name looks like a credential (``Authorization``, ``X-Api-Key``, cookies, tokens,
the connection's own injection header ...) and such query parameters (``X-Amz-Signature`` ...)
are replaced by ``[REDACTED]``; the flow's detectors run over the other header values and the
URL (every mask of the decision, whatever its ``target``: these values are only recorded).
Refusals are Chaperone's own JSON and are recorded as sent (credential-like query parameters
in them redacted).

**Recording modes** (the connection's ``recording.mode``; the recorder's own mode for flows
without a connection). ``strict``: an event that cannot be written refuses the flow *before it
is forwarded* with 503 ``chaperone_recording_unavailable`` and ``Retry-After: 5`` (nothing was
sent, so retrying is safe; a full spool heals by itself once S3 drains it, see
docs/recording.md); a buffered response whose event cannot be written is withheld the same way,
without ``Retry-After`` (the agent learns the request was sent and must not blindly repeat it). A streamed
request cannot be answered with a response by mitmproxy once its body streams (setting
``flow.response`` then breaks the HTTP layer), so it is killed instead; one of unknown length
that is not streaming yet is refused (its body is read and dropped). ``best-effort``: the flow
continues, ``unrecorded`` counts the lost events and the recorder reports the gap in the chain.
``recording.enabled: false`` records nothing for that connection.
"""

from __future__ import annotations

import functools
import logging
import time
from collections.abc import Mapping
from typing import Any

from mitmproxy import http

from .. import flowctx
from ..flowctx import FULL_BODY_CAP, BodyCapture, RecordingSettings
from ..log_setup import flow_fields
from ..policy.model import MaskSpec
from ..recording.events import new_event
from ..recording.flow_events import body_of, detectors, identity_of, recorded_url, redact_headers, redact_text
from ..recording.spool import SpoolUnavailable
from ..services import SidecarServices
from .refusal import refuse
from .streaming import body_leaves_early

__all__ = ["Record"]

log = logging.getLogger("chaperone.record")

RECORDING_RETRY_AFTER = "5"  # seconds; Retry-After of a request refused by strict recording


def _ms(seconds: float | None) -> int | None:
    return int(round(seconds * 1000)) if seconds is not None and seconds >= 0 else None


@functools.lru_cache(maxsize=256)
def _masks_data(masks: tuple[MaskSpec, ...]) -> tuple[dict[str, Any], ...]:
    """A decision's masks as recorded (the specs are frozen and shared by the flows a rule
    matches: built once; callers copy)."""
    return tuple({"detectors": list(m.detectors), "fields": list(m.fields), "target": m.target,
                  "source": str(m.source) if m.source else None} for m in masks)


def _injected_header(ctx: flowctx.FlowContext) -> str:
    """The header an http connection injects its token into (spec.credentials.header)."""
    if not ctx.connection or ctx.snapshot is None:
        return ""
    conn = ctx.snapshot.connection(ctx.connection)
    creds = (conn.spec.get("credentials") or {}) if conn is not None else {}
    header = creds.get("header") if isinstance(creds, Mapping) else None
    return header.lower() if isinstance(header, str) else ""


# ============================================================================ addon

class Record:
    """Appends each flow's events to the session recording (``services.recorder``)."""

    def __init__(self, services: SidecarServices) -> None:
        self.services = services
        self.unrecorded = 0  # events lost (best-effort flows)
        self.refused = 0  # flows refused or withheld because recording failed (strict)

    @property
    def recorder(self) -> Any:
        return self.services.recorder

    # ------------------------------------------------------------------ session lifecycle
    async def running(self) -> None:
        rec = self.recorder
        if rec is None:
            return
        config = self.services.config
        data: dict[str, Any] = {"mode": config.mode, "standalone": config.standalone,
                                "connections": [m.name for m in config.connection_mounts]}
        try:
            await rec.start(data=data)
        except SpoolUnavailable as exc:
            log.error("the recording spool cannot be written: %s (strict connections refuse "
                      "traffic until it can)", exc)

    async def done(self) -> None:
        rec = self.recorder
        if rec is None:
            return
        try:
            shipped = await rec.close("sidecar stopped")
        except Exception:
            log.exception("closing the recording failed")
            return
        if not shipped and rec.ships:
            log.warning("the recording was not fully shipped; the spool keeps the rest for the "
                        "next start")

    # ------------------------------------------------------------------ hooks
    async def requestheaders(self, flow: http.HTTPFlow) -> None:
        if flow.response is None and body_leaves_early(flow):
            await self._before_forward(flow, streamed=True)  # the body may leave before `request`

    async def request(self, flow: http.HTTPFlow) -> None:
        await self._rejudged(flow)
        await self._before_forward(flow, streamed=False)

    async def response(self, flow: http.HTTPFlow) -> None:
        await self._end(flow, "response")

    async def error(self, flow: http.HTTPFlow) -> None:
        await self._end(flow, "error")

    # ------------------------------------------------------------------ recording
    async def _before_forward(self, flow: http.HTTPFlow, *, streamed: bool) -> None:
        ctx = flowctx.ensure(flow)
        state = ctx.record
        if state.request or self.recorder is None:
            return
        state.request = True
        settings = ctx.recording
        if not settings.enabled:
            state.off = True
            return
        state.streamed_request = streamed
        state.decided = (ctx.decision, ctx.refused)
        events = [self._request_event(flow, ctx, settings, streamed)]
        if ctx.decision is not None or ctx.refused is not None:
            # the decision travels in the request event (one seal per flow less; issue 16)
            events[0]["data"]["decision"] = self._decision_data(ctx)
        if ctx.approval_request or ctx.grant or (
                ctx.decision is not None and ctx.decision.effect == "require_approval"):
            events.append(self._approval_event(flow, ctx))
        lost = await self._append(flow, events)
        if not lost or not self._strict(settings) or flow.response is not None:
            return
        self._refuse_request(flow)

    def _refuse_request(self, flow: http.HTTPFlow) -> None:
        """Strict recording: the request must not leave unrecorded."""
        self.refused += 1
        if flow.request.stream:
            log.error("recording unavailable (strict): killing a streamed request before it is "
                      "forwarded", extra=flow_fields(flow))
            flow.kill()
            return
        # Nothing left, so a retry is safe: Retry-After lets SDKs that honour it (anthropic,
        # openai) wait and retry by themselves. The recorder retries every write, so the
        # first retry after space frees (or S3 drains the spool) goes through - no restart.
        refuse(flow, "recording_unavailable", headers={"Retry-After": RECORDING_RETRY_AFTER},
               retry_after_seconds=int(RECORDING_RETRY_AFTER))
        log.error("recording unavailable (strict): request refused", extra=flow_fields(flow))

    async def _rejudged(self, flow: http.HTTPFlow) -> None:
        """Recorded in ``requestheaders`` but the body was read after all: a decision that
        changed since (Enforce judged again with the body) is recorded before the request
        leaves."""
        ctx = flowctx.ensure(flow)
        state = ctx.record
        if not state.streamed_request or state.off or flow.request.stream \
                or self.recorder is None:
            return
        decision, refused = state.decided
        if ctx.decision is decision and ctx.refused is refused:
            return
        state.decided = (ctx.decision, ctx.refused)
        lost = await self._append(flow, [self._decision_event(flow, ctx)])
        settings = ctx.recording
        if lost and self._strict(settings) and flow.response is None:
            self._refuse_request(flow)

    async def _end(self, flow: http.HTTPFlow, kind: str) -> None:
        ctx = flowctx.ensure(flow)
        state = ctx.record
        if state.end or state.off or self.recorder is None:
            return
        state.end = True
        settings = ctx.recording
        if not settings.enabled:
            return
        events = []
        if not state.request:  # the request hook never ran (e.g. a client error)
            state.request = True
            events.append(self._request_event(flow, ctx, settings, False))
        if kind == "response" and flow.response is not None:
            events.append(self._response_event(flow, ctx, settings, state))
        else:
            events.append(self._error_event(flow, ctx, settings, state))
        lost = await self._append(flow, events)
        if not lost or not self._strict(settings) or kind != "response" or flow.response is None:
            return
        if flow.response.stream or ctx.refused is not None:
            return  # already sent (streamed), or Chaperone's own refusal
        self.refused += 1
        refuse(flow, "recording_unavailable",
               "The request was forwarded, but its response cannot be recorded, so Chaperone "
               "withheld it (strict recording). Check whether the request took effect before "
               "repeating it.")
        log.error("recording unavailable (strict): response withheld", extra=flow_fields(flow))

    def _strict(self, settings: RecordingSettings) -> bool:
        recorder = self.recorder
        mode = settings.mode or (recorder.config.mode if recorder is not None else "strict")
        return mode == "strict"

    async def _append(self, flow: http.HTTPFlow, events: list[dict[str, Any]]) -> int:
        """Append events in order; the number that could not be written."""
        recorder = self.recorder
        assert recorder is not None  # every caller returned early without one
        results = await recorder.append_many(events)  # one queueing for all, no task per event
        if self.services.ocsf is not None:  # OCSF export: the sealed form, else as built (lost)
            self.services.ocsf.submit([r if isinstance(r, dict) else e
                                       for r, e in zip(results, events, strict=True)])
        lost = 0
        for result in results:
            if isinstance(result, dict):
                continue
            lost += 1
            if isinstance(result, BaseException) and not isinstance(
                    result, (SpoolUnavailable, RuntimeError)):
                log.error("recording an event failed: %r", result, extra=flow_fields(flow))
        if lost:
            self.unrecorded += lost
        return lost

    # ------------------------------------------------------------------ events
    def _event(self, type_: str, flow: http.HTTPFlow, ctx: flowctx.FlowContext,
               data: dict[str, Any]) -> dict[str, Any]:
        return new_event(type_, flow=flow.id, data=data, identity=identity_of(ctx.identity))

    @staticmethod
    def _masker(ctx: flowctx.FlowContext) -> Any:
        """Detectors for header values and URLs: every mask of the decision, whatever its
        target (these are recorded, not forwarded, so a response-only mask applies too)."""
        masks = ctx.decision.masks if ctx.decision is not None else ()
        return detectors(masks) if masks else None

    def _request_event(self, flow: http.HTTPFlow, ctx: flowctx.FlowContext,
                       settings: RecordingSettings, streamed: bool) -> dict[str, Any]:
        req = flow.request
        masker = self._masker(ctx)
        data: dict[str, Any] = {
            "method": req.method,
            "url": recorded_url(req, ctx).url,  # shared with Telemetry (flowctx.RequestURL)
            "httpVersion": req.http_version,
            "headers": redact_headers(req.headers, _injected_header(ctx), masker),
            "connection": ctx.connection or None,
            "connectionType": ctx.connection_type or None,
            # The summary can quote arguments (MCP tool calls, exec commands): masked like
            # the headers, so a secret the body masks does not survive in the summary.
            "action": ({"name": ctx.action.name, "summary": redact_text(
                masker.mask_values([ctx.action.summary])[0] if masker is not None and masker.active
                else ctx.action.summary)}
                       if ctx.action is not None else None),
        }
        if ctx.caused_by is not None:  # ToolUse's link to what the model asked for
            data["causedBy"] = ctx.caused_by
        if streamed:
            data["body"] = {"streamed": True, "recordedIn": "response"}
        else:
            data["body"] = body_of(ctx.bodies.get("request"), len(req.raw_content or b""),
                                   settings, "request")
        return self._event("request", flow, ctx, data)

    def _decision_event(self, flow: http.HTTPFlow, ctx: flowctx.FlowContext) -> dict[str, Any]:
        """A decision that changed after the request event was written (judged again with a
        body read after all): an event of its own."""
        return self._event("decision", flow, ctx, self._decision_data(ctx))

    @staticmethod
    def _decision_data(ctx: flowctx.FlowContext) -> dict[str, Any]:
        d = ctx.decision
        data: dict[str, Any] = {
            "effect": d.effect if d is not None else None,
            "rule": ({"policy": d.rule.policy, "name": d.rule.rule}
                     if d is not None and d.rule is not None else None),
            "message": d.message if d is not None else "",
        }
        if d is not None and d.masks:
            data["masks"] = [dict(m, detectors=list(m["detectors"]), fields=list(m["fields"]))
                             for m in _masks_data(d.masks)]
        if ctx.refused is not None:
            data["refused"] = ctx.refused.get("error")
            data["refusalMessage"] = redact_text(str(ctx.refused.get("message", "")))
        return data

    def _approval_event(self, flow: http.HTTPFlow, ctx: flowctx.FlowContext) -> dict[str, Any]:
        if ctx.refused is not None:
            state = str(ctx.refused.get("error", "refused")).removeprefix("chaperone_")
        else:
            state = "granted" if ctx.grant else "approved"
        # `state` and `approver` are what docs/recording.md and `sessions replay` read.
        data = {"name": ctx.approval_request or None, "state": state,
                "approver": ", ".join(ctx.approved_by) or None,
                "approvedBy": list(ctx.approved_by), "grant": ctx.grant or None,
                "digest": ctx.request_digest or None}
        if ctx.refused_grants:  # a forged/altered/replayed grant was tried: the attempt
            data["refusedGrants"] = list(ctx.refused_grants)
        return self._event("approval", flow, ctx, data)

    def _response_event(self, flow: http.HTTPFlow, ctx: flowctx.FlowContext,
                        settings: RecordingSettings, state: flowctx.RecordProgress) -> dict[str, Any]:
        resp = flow.response
        assert resp is not None
        masker = self._masker(ctx)
        capture: BodyCapture | None
        if ctx.refused is not None:  # Chaperone's own answer: stored as sent
            capture = BodyCapture(settings.body_limit or FULL_BODY_CAP)
            text = (resp.raw_content or b"").decode("utf-8", "replace")
            capture.set(redact_text(text).encode("utf-8"))
        else:
            capture = ctx.bodies.get("response")
        streamed = bool(resp.stream)
        data: dict[str, Any] = {
            "status": resp.status_code,
            "reason": resp.reason,
            "httpVersion": resp.http_version,
            "headers": redact_headers(resp.headers, "", masker),
            "body": body_of(capture, 0 if streamed else len(resp.raw_content or b""), settings,
                            "response"),
            "streamed": streamed,
            "masked": dict(ctx.masked),
            "refused": ctx.refused.get("error") if ctx.refused is not None else None,
            "durationMs": _ms((resp.timestamp_end or time.time()) - flow.request.timestamp_start),
            "upstreamLatencyMs": _ms(ctx.upstream_latency) if ctx.upstream_latency else None,
        }
        if flow.error is not None:
            data["error"] = flow.error.msg
        if state.streamed_request:
            data["requestBody"] = body_of(ctx.bodies.get("request"), 0, settings, "request")
        return self._event("response", flow, ctx, data)

    def _error_event(self, flow: http.HTTPFlow, ctx: flowctx.FlowContext,
                     settings: RecordingSettings, state: flowctx.RecordProgress) -> dict[str, Any]:
        data: dict[str, Any] = {
            "message": flow.error.msg if flow.error is not None else "flow ended without a response",
            "phase": "response" if flow.response is not None else "request",
            "durationMs": _ms(time.time() - flow.request.timestamp_start),
        }
        if flow.response is not None:
            data["status"] = flow.response.status_code
        if state.streamed_request:
            data["requestBody"] = body_of(ctx.bodies.get("request"), 0, settings, "request")
        capture = ctx.bodies.get("response")
        if flow.response is not None and capture is not None and capture.streamed:
            # What reached the client before the stream broke off - e.g. an MCP client closes
            # the SSE response as soon as it has its JSON-RPC result: that result is recorded.
            data["body"] = body_of(capture, 0, settings, "response")
        return self._event("error", flow, ctx, data)
