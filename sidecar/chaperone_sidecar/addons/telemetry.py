"""Telemetry: one OpenTelemetry span and a handful of metrics per flow.

Runs last, so it sees each flow's final state. The tracer and meter come from the services
(``services.tracer``/``services.meter``; the API's no-ops until
:func:`chaperone_sidecar.telemetry_setup.setup_telemetry` installs exporting providers).

**Span** (kind SERVER, named after the classified action, e.g. ``s3:GetObject``; else the
method), created when the flow ends with the flow's own start and end times - no span is kept
open across hooks, so a held approval costs nothing; handed to the SDK's span processors by
:class:`~chaperone_sidecar.flow_spans.FlowSpans` (the same span, without the SDK's ``Span``). Attributes: identity
(``chaperone.identity.*``), ``chaperone.connection``, ``chaperone.action``,
``chaperone.decision``, ``chaperone.rule``, ``chaperone.refused``, ``chaperone.approval.name``
and ``.approved_by``, ``chaperone.grant``, ``chaperone.masked``, ``chaperone.upstream.latency_ms``, on MCP
connections ``mcp.method.name``, ``gen_ai.tool.name``, ``gen_ai.operation.name``
(``execute_tool``), ``jsonrpc.request.id``, ``mcp.protocol.version`` (OpenTelemetry's MCP
conventions; the session id is left out, it is a credential to some servers)
and the HTTP semantic-convention fields (``http.request.method``, ``server.address``,
``url.path``, ``url.full`` - credential-like query parameters ``[REDACTED]`` and the decision's
detectors applied, as the recording has it - ``http.response.status_code``, ``http.request.body.size``,
``http.response.body.size``). Status ERROR for a flow error or a 5xx.

**Semantic conventions followed: OpenTelemetry semconv v1.41.0** - the last release with the
GenAI and MCP conventions in it (since v1.42 they live in open-telemetry/semantic-conventions-genai)
- docs/telemetry.md has the table. AWS connections: ``rpc.system`` and its successor
``rpc.system.name`` ``aws-api``, ``rpc.service`` (the SigV4 signing name, ``s3``: the proxy never
sees the SDK's ``S3``), ``rpc.method`` (the operation), ``cloud.region``, ``aws.s3.bucket`` for
S3, ``aws.request_id``/``aws.extended_request_id`` from the answer. MCP spans are named
``{mcp.method.name} {target}`` (the tool or prompt name; the method alone without one). Kubernetes
connections: ``k8s.namespace.name`` and, for a pod or its subresource, ``k8s.pod.name`` of the
*target* (the sidecar's own pod is the resource's ``k8s.pod.name``). Anthropic ``messages``
(the GenAI inference span): named ``chat {gen_ai.request.model}``, ``gen_ai.operation.name``
``chat``, ``gen_ai.provider.name`` ``anthropic`` (and the deprecated ``gen_ai.system``, which
backends of semconv <= 1.36 still read), ``gen_ai.request.model``, and from the answer
``gen_ai.response.id``, ``gen_ai.response.model``, ``gen_ai.response.finish_reasons``,
``gen_ai.usage.input_tokens`` (Anthropic's ``input_tokens`` plus the cache reads and writes, as
the conventions compute it), ``gen_ai.usage.cache_read.input_tokens``,
``gen_ai.usage.cache_creation.input_tokens``, ``gen_ai.usage.output_tokens``. A streamed
answer is not buffered for them: a tap on the bytes as they leave (:class:`_AnthropicUsage`)
decodes only the ``data:`` lines of the ``message_start`` and ``message_delta`` events (the
usage is in those) and costs a ``bytes.find`` per chunk otherwise; a compressed stream is not
decoded for it (the attributes are then absent). A buffered JSON answer is parsed once.
Prompt and completion content is not put on a span - unless
``OTEL_INSTRUMENTATION_GENAI_CAPTURE_MESSAGE_CONTENT=true`` (chart ``otel.captureGenAIContent``)
asks for ``gen_ai.system_instructions``/``input.messages``/``output.messages``: then from Mask's
masked captures only, the recording's form (:mod:`~chaperone_sidecar.genai_content`).

**Metrics**: ``chaperone.requests`` (counter; attributes decision, outcome, connection;
counted here, observed at collection), ``chaperone.request.duration`` (histogram, s),
``chaperone.upstream.duration`` (histogram, s: request sent -> response headers; both
aggregated by :mod:`~chaperone_sidecar.metric_histograms` when the services have its
``FlowHistograms``, the SDK's histograms otherwise), ``chaperone.approvals.pending`` (observable up-down counter:
flows held for approval now, ``ApprovalService.held``), ``chaperone.recording.backlog`` (observable
gauge, bytes written but not yet shipped; ``chaperone.recording.backlog.segments`` the same in
segments), ``chaperone.recording.dropped`` (observable counter: events lost) and
``chaperone.ocsf.dropped`` (observable counter: recorded events the OCSF export dropped).

**Timing.** ``FlowContext.upstream_started`` is set when the request leaves (the ``request``
hook, or ``requestheaders`` for a streamed body - every other addon ran before, approvals
included) and ``upstream_latency`` at ``responseheaders``. Body sizes: streamed bodies are counted
by a thin wrapper around whatever ``stream`` callable is in place (bytes as sent); buffered
bodies by their length.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Iterable
from typing import Any

from mitmproxy import http
from opentelemetry import metrics, trace
from opentelemetry.trace import SpanKind, Status, StatusCode

from .. import flowctx
from ..flow_spans import FlowSpans
from ..genai_content import request_content, response_content
from ..recording.flow_events import recorded_url
from ..services import SidecarServices

__all__ = ["Telemetry", "METER_NAME", "TRACER_NAME", "genai_response"]

log = logging.getLogger("chaperone.telemetry")

TRACER_NAME = METER_NAME = "chaperone.sidecar"
CAPTURE_CONTENT_ENV = "OTEL_INSTRUMENTATION_GENAI_CAPTURE_MESSAGE_CONTENT"


# chaperone.requests' label sets kept (the SDK's default cardinality limit); beyond, one overflow
# series labelled otel.metric.overflow=true (decisions, outcomes and connections are few).
_MAX_SERIES = 2000
_OVERFLOW = ("", "", "\0overflow")
_LABELS = ("chaperone.decision", "chaperone.outcome", "chaperone.connection")

_USAGE_MARK = b'"message_'  # "message_start" / "message_delta" (and "message_stop")
_MAX_LINE = 1 << 20  # a longer line is skipped, not buffered (memory bound)


class _AnthropicUsage:
    """The GenAI response attributes of a streamed Anthropic answer, read from its SSE lines as
    they pass. Light on purpose: a chunk whose complete lines hold no ``"message_`` costs one
    ``bytes.find`` (no parsing); only the ``data:`` lines of ``message_start`` (id, model,
    input tokens) and ``message_delta`` (stop reason, output tokens) are decoded. The API sends
    each event's JSON on one ``data:`` line; an event split over several is not read (its
    attributes are then absent - a span is never wrong, at worst incomplete)."""

    def __init__(self) -> None:
        self.partial = b""  # the unterminated last line
        self.skipping = False  # inside a line longer than _MAX_LINE: ignored up to its end
        self.attrs: dict[str, Any] = {}

    def feed(self, data: bytes) -> None:
        cut = data.rfind(b"\n")
        if cut < 0:
            if not self.skipping:
                self.partial += data
                if len(self.partial) > _MAX_LINE:
                    self.partial, self.skipping = b"", True
            return
        head = data[:cut] if self.skipping else self.partial + data[:cut]
        if self.skipping:  # the rest of the over-long line is not a line start
            head = head.partition(b"\n")[2] if b"\n" in head else b""
        self.partial, self.skipping = data[cut + 1:], False
        if _USAGE_MARK not in head:
            return
        for line in head.split(b"\n"):
            if line.startswith(b"data:") and _USAGE_MARK in line[:80]:
                try:
                    obj = json.loads(line[5:])
                except ValueError:
                    continue
                if not isinstance(obj, dict):
                    continue
                if obj.get("type") == "message_start":
                    self.attrs.update(genai_response(obj.get("message")))
                elif obj.get("type") == "message_delta":
                    self.attrs.update(genai_response(obj))


def genai_response(obj: Any) -> dict[str, Any]:
    """``gen_ai.response.*``/``gen_ai.usage.*`` from an Anthropic message, ``message_start``'s
    message or a ``message_delta`` event (whose ``delta`` holds the stop reason)."""
    if not isinstance(obj, dict):
        return {}
    out: dict[str, Any] = {}
    if isinstance(obj.get("id"), str):
        out["gen_ai.response.id"] = obj["id"]
    if isinstance(obj.get("model"), str):
        out["gen_ai.response.model"] = obj["model"]
    delta: dict[str, Any] = obj["delta"] if isinstance(obj.get("delta"), dict) else obj
    if isinstance(delta.get("stop_reason"), str):
        out["gen_ai.response.finish_reasons"] = [delta["stop_reason"]]
    usage = obj.get("usage")
    if not isinstance(usage, dict):
        return out

    def count(key: str) -> int | None:
        value = usage.get(key)
        return value if isinstance(value, int) and not isinstance(value, bool) else None

    # Anthropic's input_tokens leaves out the cached ones; the conventions' count includes them.
    inputs = {k: count(k) for k in ("input_tokens", "cache_read_input_tokens",
                                    "cache_creation_input_tokens")}
    if any(v is not None for v in inputs.values()):
        out["gen_ai.usage.input_tokens"] = sum(v or 0 for v in inputs.values())
    if inputs["cache_read_input_tokens"] is not None:
        out["gen_ai.usage.cache_read.input_tokens"] = inputs["cache_read_input_tokens"]
    if inputs["cache_creation_input_tokens"] is not None:
        out["gen_ai.usage.cache_creation.input_tokens"] = inputs["cache_creation_input_tokens"]
    output = count("output_tokens")
    if output is not None:  # message_start's is a placeholder that message_delta replaces
        out["gen_ai.usage.output_tokens"] = output
    return out


class _Counting:
    """Wraps a ``stream`` value (a callable or ``True``) and counts the bytes it lets through;
    ``tap`` sees them too (the GenAI usage of a streamed answer)."""

    def __init__(self, inner: Any, tap: _AnthropicUsage | None = None) -> None:
        self.inner = inner
        self.bytes = 0
        self.tap = tap

    def __call__(self, data: bytes) -> list[bytes]:
        if callable(self.inner):
            out: Any = self.inner(data)
            chunks = [out] if isinstance(out, bytes) else list(out or ())
        else:
            chunks = [data]
        chunks = [c for c in chunks if c]  # b"" would end an HTTP/1 chunked body
        self.bytes += sum(len(c) for c in chunks)
        if self.tap is not None:
            for chunk in chunks:
                self.tap.feed(chunk)
        return chunks


class Telemetry:
    """Spans and metrics per flow (see the module docstring for names and attributes)."""

    def __init__(self, services: SidecarServices) -> None:
        self.services = services
        # Opt-in content on GenAI spans (masked), the variable OTel's GenAI instrumentations use.
        self.capture_content = os.environ.get(
            CAPTURE_CONTENT_ENV, "").strip().lower() in ("true", "1", "yes", "on")
        self.tracer = services.tracer or trace.get_tracer(TRACER_NAME)
        # finished spans straight to the SDK's processors (flow_spans: what start_span + end
        # would hand them, without the SDK's Span and its attribute validation)
        self.spans = FlowSpans(self.tracer)
        meter = services.meter or metrics.get_meter(METER_NAME)
        # chaperone.requests is counted here and observed at collection (see _requests_observed):
        # a dict increment per flow instead of the SDK's measurement pipeline (~11 µs with the
        # OTLP and Prometheus readers). Exported the same: a monotonic cumulative sum.
        self.request_counts: dict[tuple[str, str, str], int] = {}
        meter.create_observable_counter(
            "chaperone.requests", callbacks=[self._requests_observed], unit="{request}",
            description="Requests through the sidecar, by decision and outcome")
        # The two histograms: aggregated by the sidecar and collected by the readers
        # (metric_histograms: a bisect per record instead of the SDK's pipeline, 12-28 µs each);
        # the SDK's own instruments when the services have no FlowHistograms (no meter provider
        # of ours: the API's no-op, or a provider a test or embedder installed).
        self.duration = _histogram(services, meter, "chaperone.request.duration", _LABELS,
                                   "Time from the request's first byte to the end of the response")
        self.upstream = _histogram(services, meter, "chaperone.upstream.duration",
                                   ("chaperone.connection",),
                                   "Upstream latency: request forwarded to response headers received")
        meter.create_observable_up_down_counter(
            "chaperone.approvals.pending", callbacks=[self._pending], unit="{request}",
            description="Requests currently held waiting for an approval")
        meter.create_observable_gauge(
            "chaperone.recording.backlog", callbacks=[self._backlog_bytes], unit="By",
            description="Recorded bytes not yet shipped to the store")
        meter.create_observable_gauge(
            "chaperone.recording.backlog.segments", callbacks=[self._backlog_segments],
            unit="{segment}", description="Closed spool segments not yet shipped")
        meter.create_observable_counter(
            "chaperone.recording.dropped", callbacks=[self._dropped], unit="{event}",
            description="Events that could not be written to the spool")
        meter.create_observable_counter(
            "chaperone.ocsf.dropped", callbacks=[self._ocsf_dropped], unit="{event}",
            description="Recorded events not exported as OCSF (queue full, S3 backlog over its cap)")

    # ------------------------------------------------------------------ observable callbacks
    def _requests_observed(self, options: Any) -> Iterable[metrics.Observation]:
        counts = self.request_counts.copy()  # one C call: atomic against the loop's increments
        return [metrics.Observation(n, {"chaperone.decision": d, "chaperone.outcome": o,
                                        "chaperone.connection": c} if key is not _OVERFLOW
                                    else {"otel.metric.overflow": True})
                for key, n in counts.items() for d, o, c in (key,)]

    def _recorder_metric(self, name: str) -> int | None:
        recorder = self.services.recorder
        return recorder.metrics.snapshot().get(name) if recorder is not None else None

    def _pending(self, options: Any) -> Iterable[metrics.Observation]:
        approvals = self.services.approvals
        return [metrics.Observation(approvals.held)] if approvals is not None else []

    def _backlog_bytes(self, options: Any) -> Iterable[metrics.Observation]:
        value = self._recorder_metric("backlog_bytes")
        return [metrics.Observation(value)] if value is not None else []

    def _backlog_segments(self, options: Any) -> Iterable[metrics.Observation]:
        value = self._recorder_metric("backlog_segments")
        return [metrics.Observation(value)] if value is not None else []

    def _ocsf_dropped(self, options: Any) -> Iterable[metrics.Observation]:
        exporter = self.services.ocsf
        return [metrics.Observation(exporter.metrics()["dropped"])] if exporter is not None else []

    def _dropped(self, options: Any) -> Iterable[metrics.Observation]:
        value = self._recorder_metric("events_dropped")
        return [metrics.Observation(value)] if value is not None else []

    # ------------------------------------------------------------------ hooks
    def requestheaders(self, flow: http.HTTPFlow) -> None:
        if flow.response is not None or not flow.request.stream:
            return
        progress = flowctx.ensure(flow).telemetry
        progress.request = flow.request.stream = _Counting(flow.request.stream)
        self._forwarded(flow)  # a streamed body leaves now

    def request(self, flow: http.HTTPFlow) -> None:
        if flow.response is None:
            self._forwarded(flow)

    def responseheaders(self, flow: http.HTTPFlow) -> None:
        ctx = flowctx.get(flow)
        if ctx is not None and ctx.upstream_started and not ctx.upstream_latency:
            ctx.upstream_latency = time.monotonic() - ctx.upstream_started
        if flow.response is not None and flow.response.stream:
            progress = flowctx.ensure(flow).telemetry
            progress.response = flow.response.stream = _Counting(
                flow.response.stream, _AnthropicUsage() if self._chat(ctx) and _sse(flow.response)
                else None)

    def response(self, flow: http.HTTPFlow) -> None:
        self._finish(flow)

    def error(self, flow: http.HTTPFlow) -> None:
        self._finish(flow)

    # ------------------------------------------------------------------ internals
    @staticmethod
    def _chat(ctx: flowctx.FlowContext | None) -> bool:
        """An Anthropic Messages call (the GenAI ``chat`` operation)."""
        return (ctx is not None and ctx.connection_type == "anthropic" and ctx.action is not None
                and ctx.action.name == "anthropic:messages")

    @staticmethod
    def _forwarded(flow: http.HTTPFlow) -> None:
        ctx = flowctx.ensure(flow)
        if not ctx.upstream_started:
            ctx.upstream_started = time.monotonic()

    def _finish(self, flow: http.HTTPFlow) -> None:
        ctx = flowctx.ensure(flow)
        state = ctx.telemetry
        if state.done:
            return
        state.done = True
        req, resp = flow.request, flow.response
        decision = ctx.decision.effect if ctx.decision is not None else "none"
        refused = str(ctx.refused.get("error", "refused")) if ctx.refused is not None else ""
        outcome = refused.removeprefix("chaperone_") if refused else (
            "error" if flow.error is not None else "forwarded")
        labels = {"chaperone.decision": decision, "chaperone.outcome": outcome,
                  "chaperone.connection": ctx.connection or ""}
        end = (resp.timestamp_end if resp is not None and resp.timestamp_end else None) or time.time()
        start = req.timestamp_start or end
        key = (decision, outcome, ctx.connection or "")
        counts = self.request_counts
        if key in counts or len(counts) < _MAX_SERIES:
            counts[key] = counts.get(key, 0) + 1
        else:  # as the SDK's cardinality limit does: one overflow series
            counts[_OVERFLOW] = counts.get(_OVERFLOW, 0) + 1
        self.duration.record(max(0.0, end - start), key)
        if ctx.upstream_latency:
            self.upstream.record(ctx.upstream_latency, (ctx.connection or "",))
        try:
            self._span(flow, ctx, labels, start, end, state)
        except Exception:  # telemetry must never break a flow
            log.exception("recording a span failed")

    def _span(self, flow: http.HTTPFlow, ctx: flowctx.FlowContext, labels: dict[str, str],
              start: float, end: float, state: flowctx.TelemetryProgress) -> None:
        req, resp = flow.request, flow.response
        ident = ctx.identity
        where = recorded_url(req, ctx)  # as the request event has them (Record worked them out)
        attrs: dict[str, Any] = dict(labels)
        attrs.update({
            "chaperone.identity.service_account": ident.service_account,
            "chaperone.identity.pod": f"{ident.pod_namespace}/{ident.pod_name}" if ident.pod_name else "",
            "chaperone.identity.creator": ident.creator,
            "chaperone.identity.on_behalf_of": ident.on_behalf_of,
            "chaperone.connection.type": ctx.connection_type,
            "chaperone.action": ctx.action.name if ctx.action is not None else "",
            "chaperone.rule": str(ctx.decision.rule) if ctx.decision is not None and
            ctx.decision.rule is not None else "",
            "chaperone.refused": str(ctx.refused.get("error", "")) if ctx.refused is not None else "",
            "chaperone.approval.name": ctx.approval_request,
            "chaperone.grant": ctx.grant,
            "http.request.method": req.method,
            "url.scheme": req.scheme,
            "server.address": where.host,
            "server.port": req.port,
            "url.path": req.path.partition("?")[0],
            "url.full": where.url,
            "network.protocol.version": req.http_version.removeprefix("HTTP/"),
            "http.request.body.size": self._size(req, state.request),
        })
        if ctx.approved_by:
            attrs["chaperone.approval.approved_by"] = list(ctx.approved_by)
        if ctx.masked:
            attrs["chaperone.masked"] = sum(ctx.masked.values())
        if ctx.upstream_latency:
            attrs["chaperone.upstream.latency_ms"] = round(ctx.upstream_latency * 1000, 3)
        mcp = ctx.action.mcp if ctx.action is not None else None
        if mcp is not None:  # OpenTelemetry MCP conventions; a batch of several methods has none
            methods, tools = mcp.methods, mcp.tools
            attrs["mcp.method.name"] = methods[0] if len(methods) == 1 else None
            attrs["gen_ai.tool.name"] = tools[0] if len(tools) == 1 else None
            attrs["gen_ai.operation.name"] = "execute_tool" if methods == ("tools/call",) else None
            attrs["jsonrpc.request.id"] = mcp.calls[0].id if len(mcp.calls) == 1 else None
            attrs["mcp.protocol.version"] = mcp.protocol_version
            prompts = tuple(dict.fromkeys(c.prompt for c in mcp.calls if c.prompt))
            attrs["gen_ai.prompt.name"] = prompts[0] if len(prompts) == 1 else None
        if resp is not None:
            attrs["http.response.status_code"] = resp.status_code
            attrs["http.response.body.size"] = self._size(resp, state.response)
        name = (ctx.action.name if ctx.action is not None and ctx.action.name else req.method)
        if attrs.get("mcp.method.name"):  # MCP: "{mcp.method.name} {target}"
            target = attrs.get("gen_ai.tool.name") or attrs.get("gen_ai.prompt.name")
            name = f"{attrs['mcp.method.name']} {target}" if target else attrs["mcp.method.name"]
        action = ctx.action
        if action is not None and action.aws is not None:
            attrs.update({"rpc.system": "aws-api", "rpc.system.name": "aws-api",
                          "rpc.service": action.aws.service,
                          "rpc.method": action.aws.operation, "cloud.region": action.aws.region})
            if action.aws.service == "s3" and action.aws.resources:
                attrs["aws.s3.bucket"] = action.aws.resources[0].partition("/")[0]
            if resp is not None:
                attrs["aws.request_id"] = (resp.headers.get("x-amzn-requestid") or resp.headers.get(
                    "x-amzn-request-id") or resp.headers.get("x-amz-request-id"))
                attrs["aws.extended_request_id"] = resp.headers.get("x-amz-id-2")
        if action is not None and action.kubernetes is not None:
            kube = action.kubernetes
            attrs["k8s.namespace.name"] = kube.namespace
            if kube.resource == "pods" and kube.name:
                attrs["k8s.pod.name"] = kube.name
        if self._chat(ctx):
            model = action.anthropic.model if action is not None and action.anthropic else ""
            attrs.update({"gen_ai.operation.name": "chat", "gen_ai.provider.name": "anthropic",
                          "gen_ai.system": "anthropic", "gen_ai.request.model": model})
            attrs.update(self._genai_response(flow, state))
            if self.capture_content:
                attrs.update(self._genai_content(flow, ctx))
            name = f"chat {model}" if model else "chat"
        attrs = {k: v for k, v in attrs.items() if v is not None and v != ""}
        status = (Status(StatusCode.ERROR, flow.error.msg) if flow.error is not None else
                  Status(StatusCode.ERROR) if resp is not None and resp.status_code >= 500 else None)
        self.spans.emit(name, SpanKind.SERVER, attrs, int(start * 1e9), int(end * 1e9), status)

    @staticmethod
    def _genai_content(flow: http.HTTPFlow, ctx: flowctx.FlowContext) -> dict[str, Any]:
        """Content as the recording has it: the masked captures, nothing when it records no
        bodies (``recording.bodies: none``) or a capture could not be masked."""
        if not ctx.recording.enabled or ctx.recording.body_limit == 0 or ctx.refused is not None:
            return {}
        out: dict[str, Any] = {}
        request, response = ctx.bodies.get("request"), ctx.bodies.get("response")
        try:
            if request is not None and request.recordable and request.data:
                out.update(request_content(bytes(request.data)))
            if response is not None and response.recordable and response.data \
                    and flow.response is not None:
                out.update(response_content(bytes(response.data), sse=flow.response.headers.get(
                    "content-type", "").startswith("text/event-stream")))
        except Exception:  # content is a courtesy: never break the span over it
            log.exception("GenAI content for a span failed")
        return out

    @staticmethod
    def _genai_response(flow: http.HTTPFlow, state: flowctx.TelemetryProgress) -> dict[str, Any]:
        resp = flow.response
        if resp is None:
            return {}
        counter = state.response
        if isinstance(counter, _Counting) and resp.stream is counter:
            return counter.tap.attrs if counter.tap is not None else {}
        if resp.stream or "json" not in resp.headers.get("content-type", ""):
            return {}
        try:
            return genai_response(json.loads(resp.get_content(strict=False) or b"null"))
        except (ValueError, UnicodeDecodeError):
            return {}

    @staticmethod
    def _size(message: http.Message, counter: _Counting | None) -> int:
        if counter is not None and message.stream is counter:
            return counter.bytes
        return len(message.raw_content or b"")


def _sse(resp: http.Response) -> bool:
    """An uncompressed event stream (a compressed one is not decoded for usage)."""
    return (resp.headers.get("content-type", "").startswith("text/event-stream")
            and resp.headers.get("content-encoding", "identity").strip().lower() == "identity")


class _SdkHistogram:
    """An SDK (or no-op API) histogram behind :class:`~..metric_histograms.FlowHistogram`'s
    ``record(value, key)``."""

    def __init__(self, instrument: Any, names: tuple[str, ...]) -> None:
        self.instrument, self.names = instrument, names

    def record(self, value: float, key: tuple[str, ...]) -> None:
        self.instrument.record(value, dict(zip(self.names, key, strict=True)))


def _histogram(services: SidecarServices, meter: Any, name: str, names: tuple[str, ...],
               description: str) -> Any:
    if services.histograms is not None:
        return services.histograms.histogram(name, "s", description, names)
    return _SdkHistogram(meter.create_histogram(name, unit="s", description=description), names)

