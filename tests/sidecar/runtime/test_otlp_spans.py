"""otlp_spans: the directly written OTLP request parses to the message the SDK's encoder builds,
for every kind of span the SDK produces; the exporter sends it to a real OTLP/HTTP endpoint
(protobuf and the SDK's encoder are test dependencies only)."""

from __future__ import annotations

import pytest
from opentelemetry.exporter.otlp.proto.common.trace_encoder import encode_spans
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import (
    Link,
    NonRecordingSpan,
    SpanContext,
    SpanKind,
    Status,
    StatusCode,
    TraceFlags,
    TraceState,
    set_span_in_context,
)

from chaperone_sidecar import otlp_spans
from chaperone_sidecar.telemetry_setup import setup_telemetry

from .otlp_endpoint import otlp_endpoint, url


def spans_of_every_shape():
    memory = InMemorySpanExporter()
    # the same key and value in a resource, a scope, a span, an event and a link: each is
    # written under its own field number (a cache keyed without it would mix them up)
    providers = [TracerProvider(resource=Resource.create({"service.name": "a", "k8s.pod.name": "p",
                                                          "s": "text"})),
                 TracerProvider(resource=Resource({"service.name": "b", "n": 3}, schema_url="https://s/1"))]
    for provider in providers:
        provider.add_span_processor(SimpleSpanProcessor(memory))
    attrs = {"s": "text", "empty": "", "unicode": "zäöü✓", "t": True, "f": False, "zero": 0,
             "neg": -5, "big": (1 << 63) - 1, "small": -(1 << 63), "pi": 3.25, "negzero": -0.0,
             "strs": ["a", "", "c"], "ints": [1, -2], "bools": [True, False], "floats": [0.5],
             "long": "x" * 1000, "empty_list": []}
    remote = SpanContext(trace_id=0xABC, span_id=0xDEF, is_remote=True,
                         trace_flags=TraceFlags(1), trace_state=TraceState([("vendor", "v1"), ("b", "2")]))
    local = SpanContext(trace_id=0x123, span_id=0x456, is_remote=False)
    for i, provider in enumerate(providers):
        for scope in (("chaperone.sidecar", None, None), ("other", "1.2", "https://scope/schema")):
            tracer = provider.get_tracer(scope[0], scope[1], schema_url=scope[2],
                                         attributes={"s": "text"} if scope[1] else None)
            for kind in SpanKind:
                s = tracer.start_span(f"op-{kind.name}", kind=kind, attributes=attrs, start_time=10 + i)
                s.end(end_time=20 + i)
            s = tracer.start_span("", context=set_span_in_context(NonRecordingSpan(remote)),
                                  links=[Link(local, {"l": 1, "s": "text"}), Link(remote)],
                                  attributes={"s": "text"})
            s.add_event("ev", {"e": "v", "s": "text"}, timestamp=123)
            s.add_event("noattrs")
            s.set_status(Status(StatusCode.ERROR, "boom"))
            s.end()
            s = tracer.start_span("child", context=set_span_in_context(NonRecordingSpan(local)))
            s.set_status(Status(StatusCode.OK))
            s.end()
            # the SDK's limits drop attributes: the dropped count travels too
            s = tracer.start_span("many", attributes={f"k{j}": j for j in range(200)})
            s.end()
    return memory.get_finished_spans()


def test_encoding_equals_the_sdk_encoders_message():
    spans = spans_of_every_shape()
    assert len(spans) > 20
    expected = encode_spans(spans)
    for _ in range(2):  # the second time from the KeyValue cache
        got = ExportTraceServiceRequest.FromString(otlp_spans.encode(spans))
        assert got == expected
    assert [rs.resource for rs in got.resource_spans] == [rs.resource for rs in expected.resource_spans]
    many = [s for rs in got.resource_spans for ss in rs.scope_spans for s in ss.spans if s.name == "many"]
    assert many and many[0].dropped_attributes_count == 72
    for one in spans:  # and span by span (the cache shared between batches)
        assert ExportTraceServiceRequest.FromString(otlp_spans.encode([one])) == encode_spans([one])


def test_a_value_otlp_cannot_hold_leaves_its_attribute_out_as_the_sdk_encoder_does(monkeypatch):
    spans = spans_of_every_shape()[:3]
    monkeypatch.setattr(spans[1], "_attributes", {"odd": object(), "huge": 1 << 64, "list": [1, object()],
                                                  "ok": "yes"})
    expected = encode_spans(spans)  # the SDK logs and skips "odd", "huge" and "list"
    got = ExportTraceServiceRequest.FromString(otlp_spans.encode(spans))
    assert got == expected
    attrs = [kv.key for kv in got.resource_spans[0].scope_spans[0].spans[1].attributes]
    assert attrs == ["ok"]


def test_setup_exports_with_the_fast_encoder_to_an_otlp_endpoint():
    with otlp_endpoint() as server:
        setup = setup_telemetry({"OTEL_EXPORTER_OTLP_ENDPOINT": url(server),
                                 "OTEL_METRICS_EXPORTER": "none"},
                                install_global=False, prometheus_registry=None)
        processor = setup.tracer_provider._active_span_processor._span_processors[0]
        assert isinstance(processor.span_exporter, otlp_spans.OTLPSpanExporter)
        span = setup.tracer().start_span("GET", kind=SpanKind.SERVER,
                                         attributes={"http.request.method": "GET", "server.port": 443})
        span.end()
        assert setup.tracer_provider.force_flush()
        setup.shutdown()
    assert {(path, {k.lower(): v for k, v in headers.items()}["content-type"]) for path, headers, _ in server.seen} == {
        ("/v1/traces", "application/x-protobuf")}
    sent = ExportTraceServiceRequest.FromString(b"".join(body for _, _, body in server.seen))
    (rs,) = sent.resource_spans
    assert {kv.key: kv.value.string_value for kv in rs.resource.attributes}["service.name"] == "chaperone-sidecar"
    (s,) = rs.scope_spans[0].spans
    assert s.name == "GET" and s.kind == 2
    assert {kv.key: kv.value for kv in s.attributes}["server.port"].int_value == 443


@pytest.mark.parametrize("protocol", ["grpc"])
def test_grpc_keeps_the_sdk_exporter(protocol):
    seen = []

    def loader(module, cls):
        seen.append(module)
        return lambda **kw: InMemorySpanExporter()

    setup_telemetry({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://127.0.0.1:1", "OTEL_EXPORTER_OTLP_PROTOCOL": protocol,
                     "OTEL_METRICS_EXPORTER": "none"}, install_global=False, loader=loader,
                    prometheus_registry=None)
    assert seen == ["opentelemetry.exporter.otlp.proto.grpc.trace_exporter"]
