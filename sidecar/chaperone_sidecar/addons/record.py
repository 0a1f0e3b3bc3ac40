"""Record: every flow becomes session events - request, decision, approval, response or error.

One session per sidecar process: ``session-start`` when mitmproxy is ``running``, ``session-end``
and the signed manifest at ``done`` (``Recorder.start``/``Recorder.close``). Events go through
the recorder's async ``append`` (a queue and one writer thread: the event loop never waits on
disk). Per flow, in the recording's hash chain:

1. ``request``, ``decision`` and - when an approval was involved - ``approval``, appended
   **before the request is forwarded**: in ``request`` (Record runs after Enforce, Approve,
   InjectCredentials and Mask), or in ``requestheaders`` when the body may leave before
   ``request`` fires (:func:`~.streaming.body_leaves_early`: it streams, or its length is
   unknown and mitmproxy may start streaming it while reading it); its masked copy is then
   added to the ``response`` event as ``requestBody``. If such a body was read after all and
   Enforce judged the request again with it, a second ``decision`` event records the new
   decision before the request leaves.
2. ``response`` (status, headers, masked body, what was masked, timings) or ``error``.

**What is stored.** Bodies come only from what Mask captured (:func:`.mask.captured`): the masked
form, decoded when compressed, cut to the connection's ``recording.maxBodyBytes`` (``bodies:
truncated``, the default), whole up to :data:`FULL_BODY_CAP` (``full``) or not at all (``none``).
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
is forwarded* with 503 ``chaperone_recording_unavailable``; a buffered response whose event
cannot be written is withheld the same way (the agent learns the request was sent). A streamed
request cannot be answered with a response by mitmproxy once its body streams (setting
``flow.response`` then breaks the HTTP layer), so it is killed instead; one of unknown length
that is not streaming yet is refused (its body is read and dropped). ``best-effort``: the flow
continues, ``unrecorded`` counts the lost events and the recorder reports the gap in the chain.
``recording.enabled: false`` records nothing for that connection.
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
from dataclasses import dataclass
from typing import Any, Mapping

from mitmproxy import http

from .. import flowctx
from ..logging import flow_fields
from ..policy.model import Identity
from ..recording import SpoolUnavailable, encode_body, new_event
from .mask import BodyCapture, captured, masker_for
from .streaming import body_leaves_early

__all__ = ["Record", "RecordingSettings", "recording_settings", "FULL_BODY_CAP", "REDACTED",
           "redact_headers", "redact_url", "redact_text", "identity_of", "body_of"]

log = logging.getLogger("chaperone.record")

FULL_BODY_CAP = 16 * 1024 * 1024  # ``bodies: full`` still stops here (the CRD's maxBodyBytes max)
REDACTED = "[REDACTED]"
_STATE = "chaperone.record"
_SENSITIVE = re.compile(
    r"authorization|token|secret|passw|pwd|api[-_]?key|cookie|session|credential|signature|"
    r"^key$|^sig$|auth", re.IGNORECASE)


# ============================================================================ settings

@dataclass(frozen=True)
class RecordingSettings:
    """A connection's ``spec.recording`` (CRD defaults when absent)."""

    enabled: bool = True
    bodies: str = "truncated"  # full | truncated | none
    max_body_bytes: int = 65536
    mode: str = ""  # strict | best-effort; "" = the recorder's own mode (no connection)

    @property
    def body_limit(self) -> int:
        """Bytes of each (masked) body kept in the recording."""
        if not self.enabled or self.bodies == "none":
            return 0
        if self.bodies == "full":
            return FULL_BODY_CAP
        return max(0, min(self.max_body_bytes, FULL_BODY_CAP))

    @classmethod
    def from_spec(cls, spec: Mapping[str, Any] | None) -> "RecordingSettings":
        spec = spec if isinstance(spec, Mapping) else {}
        bodies = spec.get("bodies", "truncated")
        size = spec.get("maxBodyBytes", 65536)
        mode = spec.get("mode", "strict")
        return cls(enabled=spec.get("enabled", True) is not False,
                   bodies=bodies if bodies in ("full", "truncated", "none") else "truncated",
                   max_body_bytes=size if isinstance(size, int) and size >= 0 else 65536,
                   mode=mode if mode in ("strict", "best-effort") else "strict")


_NO_CONNECTION = RecordingSettings()


def recording_settings(flow: Any, services: Any, ctx: flowctx.FlowContext | None = None
                       ) -> RecordingSettings:
    """The recording settings of the flow's connection (from the flow's snapshot)."""
    ctx = ctx or flowctx.get(flow)
    if ctx is None or not ctx.connection:
        return _NO_CONNECTION
    from .route import SNAPSHOT_KEY

    snapshot = flow.metadata.get(SNAPSHOT_KEY)
    if snapshot is None and hasattr(services, "snapshot"):
        try:
            snapshot = services.snapshot()
        except Exception:  # no sources (unit tests of a lone addon)
            snapshot = None
    conn = snapshot.connection(ctx.connection) if snapshot is not None else None
    spec = conn.spec if conn is not None else {}
    return RecordingSettings.from_spec(spec.get("recording") if isinstance(spec, Mapping) else None)


# ============================================================================ redaction

def _injected_header(flow: Any, services: Any, ctx: flowctx.FlowContext | None) -> str:
    """The header an http connection injects its token into (spec.credentials.header)."""
    if ctx is None or not ctx.connection:
        return ""
    from .route import SNAPSHOT_KEY

    snapshot = flow.metadata.get(SNAPSHOT_KEY)
    conn = snapshot.connection(ctx.connection) if snapshot is not None else None
    creds = (conn.spec.get("credentials") or {}) if conn is not None else {}
    header = creds.get("header") if isinstance(creds, Mapping) else None
    return header.lower() if isinstance(header, str) else ""


def redact_headers(headers: http.Headers, extra: str = "", masker: Any = None) -> list[list[str]]:
    """Headers as ``[[name, value], ...]``: credential-like values redacted, the others
    masked (``Masker.mask_values``: values seen clean before are not scanned again, the rest
    in one joined scan)."""
    out = []
    kept: list[int] = []
    for name, value in headers.items(multi=True):
        if _SENSITIVE.search(name) or (extra and name.lower() == extra):
            value = REDACTED
        else:
            kept.append(len(out))
        out.append([name, value])
    if masker is None or not masker.active or not kept:
        return out
    for i, value in zip(kept, masker.mask_values([out[i][1] for i in kept])):
        out[i][1] = value
    return out


def redact_url(url: str, masker: Any = None) -> str:
    """The URL with credential-like query parameters redacted (presigned URLs, ?token=...)."""
    base, sep, query = url.partition("?")
    if sep:
        parts = []
        for part in query.split("&"):
            name, eq, _ = part.partition("=")
            parts.append(f"{name}={REDACTED}" if eq and _SENSITIVE.search(name) else part)
        url = base + "?" + "&".join(parts)
    if masker is not None and masker.active:
        url = masker.mask_str(url)[0]
    return url


_QUERY_PARAM = re.compile(r"([?&])([^=&\s\"'#]+)=([^&\s\"'#]*)")


def redact_text(text: str) -> str:
    """Credential-like query parameters inside free text (a request line in a summary)."""
    return _QUERY_PARAM.sub(
        lambda m: f"{m[1]}{m[2]}={REDACTED}" if _SENSITIVE.search(m[2]) else m[0], text)


def identity_of(identity: Identity) -> dict[str, Any] | None:
    """The flow's identity in the recording's vocabulary (``recording.events.Identity``)."""
    sa_ns, _, sa_name = identity.service_account.rpartition("/")
    out: dict[str, Any] = {
        "namespace": identity.pod_namespace or sa_ns, "pod": identity.pod_name,
        "podUID": identity.pod_uid, "serviceAccount": sa_name, "creator": identity.creator,
        "onBehalfOf": identity.on_behalf_of,
    }
    if identity.on_behalf_of_groups:
        out["onBehalfOfGroups"] = list(identity.on_behalf_of_groups)
    out = {k: v for k, v in out.items() if v}
    return out or None


def body_of(capture: BodyCapture | None, raw_size: int, settings: RecordingSettings,
            what: str) -> dict[str, Any] | None:
    """A body as stored in an event (only ever the masked capture)."""
    if capture is None:
        if not raw_size:
            return None
        return {"size": raw_size, "omitted": f"the {what} body was not masked, so it is not recorded"}
    if not capture.recordable:
        omitted = {"size": capture.size, "omitted": "; ".join(capture.notes) or "not recordable"}
        return {**omitted, "binary": True} if capture.binary else omitted
    if not capture.size and not capture.data:
        return None
    if settings.body_limit == 0:
        return {"size": capture.size, "omitted": "recording.bodies is none"}
    stored = encode_body(bytes(capture.data[: settings.body_limit]))
    assert stored is not None
    stored["size"] = capture.size
    if capture.truncated or capture.size > settings.body_limit:
        stored["truncated"] = True
    if capture.counts:
        stored["masked"] = dict(capture.counts)
    if capture.binary:
        stored["binary"] = True
    if capture.streamed:
        stored["streamed"] = True
    if capture.notes:
        stored["notes"] = list(capture.notes)
    return stored


def _ms(seconds: float | None) -> int | None:
    return int(round(seconds * 1000)) if seconds is not None and seconds >= 0 else None


# ============================================================================ addon

class Record:
    """Appends each flow's events to the session recording (``services.recorder``)."""

    def __init__(self, services: Any) -> None:
        self.services = services
        self.unrecorded = 0  # events lost (best-effort flows)
        self.refused = 0  # flows refused or withheld because recording failed (strict)

    @property
    def recorder(self) -> Any:
        return getattr(self.services, "recorder", None)

    # ------------------------------------------------------------------ session lifecycle
    async def running(self) -> None:
        rec = self.recorder
        if rec is None:
            return
        config = getattr(self.services, "config", None)
        data: dict[str, Any] = {}
        if config is not None:
            data = {"mode": config.mode, "standalone": config.standalone,
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
        if not shipped and getattr(rec, "_shipper", None) is not None:
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
    def _state(self, flow: http.HTTPFlow) -> dict[str, Any]:
        return flow.metadata.setdefault(_STATE, {})

    async def _before_forward(self, flow: http.HTTPFlow, *, streamed: bool) -> None:
        state = self._state(flow)
        if state.get("request") or self.recorder is None:
            return
        state["request"] = True
        ctx = flowctx.ensure(flow)
        settings = recording_settings(flow, self.services, ctx)
        if not settings.enabled:
            state["off"] = True
            return
        state["streamed_request"] = streamed
        state["decided"] = (ctx.decision, ctx.refused)
        events = [self._request_event(flow, ctx, settings, streamed)]
        if ctx.decision is not None or ctx.refused is not None:
            events.append(self._decision_event(flow, ctx))
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
        from .refusal import refuse

        refuse(flow, "recording_unavailable")
        log.error("recording unavailable (strict): request refused", extra=flow_fields(flow))

    async def _rejudged(self, flow: http.HTTPFlow) -> None:
        """Recorded in ``requestheaders`` but the body was read after all: a decision that
        changed since (Enforce judged again with the body) is recorded before the request
        leaves."""
        state = self._state(flow)
        if not state.get("streamed_request") or state.get("off") or flow.request.stream \
                or self.recorder is None:
            return
        ctx = flowctx.ensure(flow)
        decision, refused = state.get("decided", (None, None))
        if ctx.decision is decision and ctx.refused is refused:
            return
        state["decided"] = (ctx.decision, ctx.refused)
        lost = await self._append(flow, [self._decision_event(flow, ctx)])
        settings = recording_settings(flow, self.services, ctx)
        if lost and self._strict(settings) and flow.response is None:
            self._refuse_request(flow)

    async def _end(self, flow: http.HTTPFlow, kind: str) -> None:
        state = self._state(flow)
        if state.get("end") or state.get("off") or self.recorder is None:
            return
        state["end"] = True
        ctx = flowctx.ensure(flow)
        settings = recording_settings(flow, self.services, ctx)
        if not settings.enabled:
            return
        events = []
        if not state.get("request"):  # the request hook never ran (e.g. a client error)
            state["request"] = True
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
        from .refusal import refuse

        refuse(flow, "recording_unavailable",
               "The request was forwarded, but its response cannot be recorded, so Chaperone "
               "withheld it (strict recording). Check whether the request took effect before "
               "repeating it.")
        log.error("recording unavailable (strict): response withheld", extra=flow_fields(flow))

    def _strict(self, settings: RecordingSettings) -> bool:
        mode = settings.mode or getattr(getattr(self.recorder, "config", None), "mode", "strict")
        return mode == "strict"

    async def _append(self, flow: http.HTTPFlow, events: list[dict[str, Any]]) -> int:
        """Append events in order; the number that could not be written."""
        recorder = self.recorder
        if hasattr(recorder, "append_many"):  # one queueing for all, no task per event
            results = await recorder.append_many(events)
        else:
            results = await asyncio.gather(*(recorder.append(e) for e in events),
                                           return_exceptions=True)
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
        return masker_for(masks, None) if masks else None

    def _request_event(self, flow: http.HTTPFlow, ctx: flowctx.FlowContext,
                       settings: RecordingSettings, streamed: bool) -> dict[str, Any]:
        req = flow.request
        masker = self._masker(ctx)
        data: dict[str, Any] = {
            "method": req.method,
            "url": redact_url(req.pretty_url, masker),
            "httpVersion": req.http_version,
            "headers": redact_headers(req.headers, _injected_header(flow, self.services, ctx),
                                      masker),
            "connection": ctx.connection or None,
            "connectionType": ctx.connection_type or None,
            "action": ({"name": ctx.action.name, "summary": redact_text(ctx.action.summary)}
                       if ctx.action is not None else None),
        }
        if streamed:
            data["body"] = {"streamed": True, "recordedIn": "response"}
        else:
            data["body"] = body_of(captured(flow, "request"), len(req.raw_content or b""),
                                   settings, "request")
        return self._event("request", flow, ctx, data)

    def _decision_event(self, flow: http.HTTPFlow, ctx: flowctx.FlowContext) -> dict[str, Any]:
        d = ctx.decision
        data: dict[str, Any] = {
            "effect": d.effect if d is not None else None,
            "rule": ({"policy": d.rule.policy, "name": d.rule.rule}
                     if d is not None and d.rule is not None else None),
            "message": d.message if d is not None else "",
        }
        if d is not None and d.masks:
            data["masks"] = [{"detectors": list(m.detectors), "fields": list(m.fields),
                              "target": m.target,
                              "source": str(m.source) if m.source else None} for m in d.masks]
        if ctx.refused is not None:
            data["refused"] = ctx.refused.get("error")
            data["refusalMessage"] = redact_text(str(ctx.refused.get("message", "")))
        return self._event("decision", flow, ctx, data)

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
        return self._event("approval", flow, ctx, data)

    def _response_event(self, flow: http.HTTPFlow, ctx: flowctx.FlowContext,
                        settings: RecordingSettings, state: Mapping[str, Any]) -> dict[str, Any]:
        resp = flow.response
        assert resp is not None
        masker = self._masker(ctx)
        if ctx.refused is not None:  # Chaperone's own answer: stored as sent
            capture = BodyCapture(settings.body_limit or FULL_BODY_CAP)
            text = (resp.raw_content or b"").decode("utf-8", "replace")
            capture.set(redact_text(text).encode("utf-8"))
        else:
            capture = captured(flow, "response")
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
        if state.get("streamed_request"):
            data["requestBody"] = body_of(captured(flow, "request"), 0, settings, "request")
        return self._event("response", flow, ctx, data)

    def _error_event(self, flow: http.HTTPFlow, ctx: flowctx.FlowContext,
                     settings: RecordingSettings, state: Mapping[str, Any]) -> dict[str, Any]:
        data: dict[str, Any] = {
            "message": flow.error.msg if flow.error is not None else "flow ended without a response",
            "phase": "response" if flow.response is not None else "request",
            "durationMs": _ms(time.time() - flow.request.timestamp_start),
        }
        if flow.response is not None:
            data["status"] = flow.response.status_code
        if state.get("streamed_request"):
            data["requestBody"] = body_of(captured(flow, "request"), 0, settings, "request")
        return self._event("error", flow, ctx, data)
