"""OTLP span encoding without building protobuf objects: the wire bytes written directly.

Why: the OTLP/HTTP exporter encodes each batch by building one Python protobuf object per
span, attribute and value (``encode_spans``) and serialising them. With the ~25 attributes of
a sidecar span that is ~60-90 µs of CPU per span on the 2-core bench machine - the largest
single cost of telemetry per request (docs/benchmarks.md, "per-request CPU"), paid in the
batch processor's thread but on the same cores and under the same GIL as the proxy.

:func:`encode` writes the same ``ExportTraceServiceRequest`` (opentelemetry-proto's
``trace_service.proto``) straight into bytes. Most attribute key/value pairs repeat from
request to request (identity, connection, decision, method, host, port), so each encoded
``KeyValue`` of a hashable value is kept in a bounded cache and a span is mostly a join of
cached pieces. The output parses to a message *equal* to the SDK encoder's for every span the
SDK can produce (``tests/sidecar/runtime/test_otlp_spans.py`` compares them: attributes of
every type, events, links, status, parents, trace state, resources and scopes); an attribute
whose value the OTLP ``AnyValue`` cannot hold (an object, an int beyond int64) is left out
with an error in the log - as the SDK's encoder does.

:class:`OTLPSpanExporter` posts it with :class:`~.otlp_http.OtlpHttpClient` (no ``requests``,
no protobuf in the process: that module says why). Only ``http/protobuf`` uses it; gRPC keeps
the SDK's exporter (its client serialises protobuf objects itself).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export import SpanExporter, SpanExportResult
from opentelemetry.trace import SpanKind

from .otlp_http import OtlpHttpClient
from .otlp_wire import CACHE, FIXED32, FIXED64, Writer, field, varint

__all__ = ["encode", "OTLPSpanExporter"]


_KIND = {kind: b"\x30" + bytes((n,)) for kind, n in (  # Span.kind (field 6), encoded
    (SpanKind.INTERNAL, 1), (SpanKind.SERVER, 2), (SpanKind.CLIENT, 3), (SpanKind.PRODUCER, 4),
    (SpanKind.CONSUMER, 5))}
_HAS_IS_REMOTE, _IS_REMOTE = 0x100, 0x200  # SpanFlags
_FLAGS = b"\x85\x01" + FIXED32(_HAS_IS_REMOTE)  # Span.flags (field 16, fixed32)
_FLAGS_REMOTE = b"\x85\x01" + FIXED32(_HAS_IS_REMOTE | _IS_REMOTE)


class _Writer(Writer):
    """One batch's spans (attributes, scopes and resources from :class:`~.otlp_wire.Writer`)."""

    def span(self, span: ReadableSpan) -> bytes:
        ctx = span.get_span_context()
        assert ctx is not None  # an ended SDK span always has its context
        parent = span.parent
        out = [b"\x0a\x10" + ctx.trace_id.to_bytes(16, "big"),
               b"\x12\x08" + ctx.span_id.to_bytes(8, "big")]
        if ctx.trace_state:
            out.append(field(3, ",".join(f"{k}={v}" for k, v in ctx.trace_state.items()).encode()))
        if parent is not None:
            out.append(b"\x22\x08" + parent.span_id.to_bytes(8, "big"))
        if span.name:
            out.append(field(5, span.name.encode("utf-8")))
        out.append(_KIND[span.kind])
        if span.start_time:
            out.append(b"\x39" + FIXED64(span.start_time))
        if span.end_time:
            out.append(b"\x41" + FIXED64(span.end_time))
        out.append(self.attributes(9, span.attributes))
        if span.dropped_attributes:
            out.append(b"\x50" + varint(span.dropped_attributes))
        for event in span.events:
            body = b"".join((b"\x09" + FIXED64(event.timestamp) if event.timestamp else b"",
                             field(2, event.name.encode("utf-8")) if event.name else b"",
                             self.attributes(3, event.attributes),
                             b"\x20" + varint(event.dropped_attributes)
                             if event.dropped_attributes else b""))
            out.append(field(11, body))
        if span.dropped_events:
            out.append(b"\x60" + varint(span.dropped_events))
        for link in span.links:
            lctx = link.context
            body = b"".join((field(1, lctx.trace_id.to_bytes(16, "big")),
                             field(2, lctx.span_id.to_bytes(8, "big")),
                             self.attributes(4, link.attributes),
                             b"\x28" + varint(link.dropped_attributes)
                             if link.dropped_attributes else b"",
                             b"\x35" + FIXED32(_flags(lctx))))
            out.append(field(13, body))
        if span.dropped_links:
            out.append(b"\x70" + varint(span.dropped_links))
        status = span.status
        if status is not None and not status.description and not status.status_code.value:
            out.append(b"\x7a\x00")  # the SDK always writes the message, empty when UNSET
        elif status is not None:
            body = (field(2, status.description.encode("utf-8")) if status.description else b"") + (
                b"\x18" + varint(status.status_code.value) if status.status_code.value else b"")
            out.append(field(15, body))
        out.append(_FLAGS_REMOTE if parent is not None and parent.is_remote else _FLAGS)
        return b"".join(out)


def _flags(parent: Any) -> int:
    return _HAS_IS_REMOTE | (_IS_REMOTE if parent is not None and parent.is_remote else 0)


def encode(spans: Sequence[ReadableSpan]) -> bytes:
    """The serialised ``ExportTraceServiceRequest`` of ``spans``, grouped by resource, then
    instrumentation scope, as the SDK's encoder groups them."""
    writer = _Writer(CACHE)
    grouped: dict[Any, dict[Any, list[bytes]]] = {}
    for span in spans:
        scope = span.instrumentation_scope or None
        grouped.setdefault(span.resource, {}).setdefault(scope, []).append(field(2, writer.span(span)))
    return writer.grouped(grouped)


class OTLPSpanExporter(SpanExporter):
    """OTLP/HTTP span exporter: :func:`encode`, posted by :class:`~.otlp_http.OtlpHttpClient`
    (``OTEL_EXPORTER_OTLP_[TRACES_]*`` from ``env``, default ``os.environ``)."""

    def __init__(self, endpoint: str, env: Mapping[str, str] | None = None) -> None:
        self.client = OtlpHttpClient("traces", endpoint, env)

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        return SpanExportResult.SUCCESS if self.client.export_batch(encode, spans) else SpanExportResult.FAILURE

    def shutdown(self) -> None:
        self.client.shutdown()

    def force_flush(self, timeout_millis: int = 30000) -> bool:
        return True  # nothing is buffered here
