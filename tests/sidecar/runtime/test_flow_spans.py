"""flow_spans: a flow's span handed to the processors directly is the span the SDK's
start_span + end hands them - ids, parent, sampling, trace state, flags, attributes (plain,
sequences, limits), status, times, scope and resource; OTLP-encoded the same - and whatever the
shortcut cannot mirror (another span processor, a disabled tracer) goes through the SDK."""

from __future__ import annotations

import pytest
from opentelemetry import context as context_api
from opentelemetry import trace
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import SpanLimits, SpanProcessor, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.sdk.trace.id_generator import IdGenerator
from opentelemetry.sdk.trace.sampling import (
    ALWAYS_OFF,
    ALWAYS_ON,
    Decision,
    ParentBased,
    Sampler,
    SamplingResult,
    TraceIdRatioBased,
)
from opentelemetry.trace import NonRecordingSpan, SpanContext, SpanKind, Status, StatusCode, TraceFlags, TraceState

from chaperone_sidecar import otlp_spans
from chaperone_sidecar.flow_spans import FlowSpans


class Ids(IdGenerator):
    """Deterministic ids, so both paths draw the same ones."""

    def __init__(self):
        self.n = 0

    def generate_span_id(self):
        self.n += 1
        return 0x1000 + self.n

    def generate_trace_id(self):
        self.n += 1
        return (self.n * 0x9E3779B97F4A7C15 << 32) & ((1 << 128) - 1) or 1

    def is_trace_id_random(self):
        return True


class Tagging(Sampler):
    def should_sample(self, parent_context, trace_id, name, kind=None, attributes=None, links=None, trace_state=None):
        return SamplingResult(Decision.RECORD_AND_SAMPLE, {**(attributes or {}), "sampler.tag": "t"},
                              TraceState([("s", "1")]))

    def get_description(self):
        return "tagging"


ATTRS = {"chaperone.decision": "allow", "server.port": 443, "ratio": 0.5, "ok": True,
         "url.full": "https://api.github.com/" + "x" * 40}
REMOTE = SpanContext(0xABC, 0xDEF, is_remote=True, trace_flags=TraceFlags(1),
                     trace_state=TraceState([("vendor", "v1")]))
UNSAMPLED = SpanContext(0xABC, 0xDEF, is_remote=True, trace_flags=TraceFlags(0))
CASES = [
    ("plain", ATTRS, None, None),
    ("sequence", {**ATTRS, "chaperone.approval.approved_by": ["carol", "dave"]}, None, None),
    ("error", ATTRS, Status(StatusCode.ERROR, "upstream reset"), None),
    ("5xx", ATTRS, Status(StatusCode.ERROR), None),
    ("unset", ATTRS, Status(StatusCode.UNSET), None),
    ("child of a remote parent", ATTRS, None, REMOTE),
    ("unsampled parent", ATTRS, None, UNSAMPLED),
    ("many", {f"k{i}": i for i in range(200)}, None, None),
    ("odd value", {**ATTRS, "none": None, "": "empty key"}, None, None),
]


def run(sampler, limits, direct: bool):
    spans = InMemorySpanExporter()
    provider = TracerProvider(resource=Resource.create({"service.name": "t"}), sampler=sampler,
                              id_generator=Ids(), span_limits=limits)
    provider.add_span_processor(SimpleSpanProcessor(spans))
    tracer = provider.get_tracer("chaperone.sidecar")
    flow_spans = FlowSpans(tracer)
    assert flow_spans.direct
    flow_spans.direct = direct  # False: the SDK's own start_span + end
    for name, attrs, status, parent in CASES:
        ctx = trace.set_span_in_context(NonRecordingSpan(parent)) if parent else None
        token = context_api.attach(ctx) if ctx else None
        try:
            flow_spans.emit(name, SpanKind.SERVER, dict(attrs), 1_000, 2_000, status)
        finally:
            if token is not None:
                context_api.detach(token)
    return spans.get_finished_spans()


def shape(span):
    ctx = span.context
    return (span.name, ctx.trace_id, ctx.span_id, int(ctx.trace_flags), ctx.trace_state.to_header(),
            ctx.is_remote, span.parent, dict(span.attributes), span.dropped_attributes, span.kind,
            span.status.status_code, span.status.description, span.start_time, span.end_time,
            span.instrumentation_scope, span.resource, tuple(span.events), tuple(span.links))


@pytest.mark.parametrize("sampler", [ParentBased(ALWAYS_ON), ALWAYS_ON, ALWAYS_OFF, TraceIdRatioBased(0.5),
                                     Tagging()], ids=lambda s: s.get_description())
@pytest.mark.parametrize("limits", [SpanLimits(), SpanLimits(max_span_attribute_length=5),
                                    SpanLimits(max_span_attributes=4, max_span_attribute_length=5)],
                         ids=["default limits", "value length limit", "count and length limits"])
def test_direct_spans_equal_the_sdk_spans(sampler, limits):
    direct, sdk = run(sampler, limits, True), run(sampler, limits, False)
    assert [shape(s) for s in direct] == [shape(s) for s in sdk]
    if sdk:
        assert ExportTraceServiceRequest.FromString(otlp_spans.encode(direct)) == \
            ExportTraceServiceRequest.FromString(otlp_spans.encode(sdk))
    if sampler is ALWAYS_ON and limits.max_span_attributes == 128:
        assert [s.name for s in direct] == [c[0] for c in CASES]  # every case reached the processor
        assert {s.parent.span_id for s in direct if s.parent} == {0xDEF}


def test_another_processor_or_a_disabled_tracer_goes_through_the_sdk():
    started = []

    class Watching(SpanProcessor):
        def on_start(self, span, parent_context=None):
            started.append(span.name)

    provider = TracerProvider()
    provider.add_span_processor(Watching())
    FlowSpans(provider.get_tracer("t")).emit("s", SpanKind.SERVER, {"a": 1}, 1, 2)
    assert started == ["s"]  # its on_start ran: the SDK's path
    noop = FlowSpans(trace.NoOpTracer())
    assert not noop.direct
    noop.emit("s", SpanKind.SERVER, {"a": 1}, 1, 2)


def test_default_sampler_without_a_parent_is_answered_without_its_call():
    """ParentBased(ALWAYS_ON) (the SDK's default) and ALWAYS_ON sample every span without a
    parent: emit does not call them then (issue 16), and the spans still equal the SDK's
    (test_direct_spans_equal_the_sdk_spans); a subclass of ParentBased or a span with a parent
    is asked as before."""
    calls = []

    class Counting(ParentBased):
        def should_sample(self, *args, **kwargs):
            calls.append("subclass")
            return super().should_sample(*args, **kwargs)

    for sampler, asked in ((ParentBased(ALWAYS_ON), 0), (ALWAYS_ON, 0), (Counting(ALWAYS_ON), 3)):
        provider = TracerProvider(sampler=sampler)
        spans = InMemorySpanExporter()
        provider.add_span_processor(SimpleSpanProcessor(spans))
        tracer = provider.get_tracer("t")
        original = type(sampler).should_sample
        counted = []

        def counting(self, *args, _original=original, _counted=counted, **kwargs):
            _counted.append(1)
            return _original(self, *args, **kwargs)

        type(sampler).should_sample = counting
        try:
            flow_spans = FlowSpans(tracer)
            for _ in range(3):
                flow_spans.emit("s", SpanKind.SERVER, {"a": 1}, 1, 2)
            parent = SpanContext(0xABC, 0xDEF, is_remote=True, trace_flags=TraceFlags(TraceFlags.SAMPLED))
            token = context_api.attach(trace.set_span_in_context(NonRecordingSpan(parent)))
            try:
                flow_spans.emit("child", SpanKind.SERVER, {"a": 1}, 1, 2)
            finally:
                context_api.detach(token)
        finally:
            type(sampler).should_sample = original
        assert len(counted) == asked + 1  # the span with a parent: always asked
        got = spans.get_finished_spans()
        assert [s.name for s in got] == ["s", "s", "s", "child"]
        assert all(s.context.trace_flags.sampled and s.context.trace_state.to_header() == "" for s in got)
        assert got[-1].context.trace_id == 0xABC and got[-1].parent.span_id == 0xDEF
