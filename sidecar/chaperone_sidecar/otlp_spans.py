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
every type, events, links, status, parents, trace state, resources and scopes); anything the
writer does not know (a value type outside the OTLP ``AnyValue`` set) makes the whole batch
fall back to the SDK's encoder, so a batch is never lost to this shortcut.

:class:`FastOTLPSpanExporter` is the OTLP/HTTP exporter with this encoding; the rest (HTTP
client, retries, size limit, the exporter's own metrics) is the SDK's. Only ``http/protobuf``
uses it; gRPC keeps its exporter (its client serialises protobuf objects itself).
"""

from __future__ import annotations

import logging
import struct
from collections.abc import Mapping, Sequence
from typing import Any

from opentelemetry.exporter.otlp.proto.common.trace_encoder import encode_spans
from opentelemetry.exporter.otlp.proto.http import trace_exporter as _http_trace
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export import SpanExportResult
from opentelemetry.trace import SpanKind

__all__ = ["encode", "FastOTLPSpanExporter"]

log = logging.getLogger("chaperone.telemetry")

_KIND = {kind: b"\x30" + bytes((n,)) for kind, n in (  # Span.kind (field 6), encoded
    (SpanKind.INTERNAL, 1), (SpanKind.SERVER, 2), (SpanKind.CLIENT, 3), (SpanKind.PRODUCER, 4),
    (SpanKind.CONSUMER, 5))}
_HAS_IS_REMOTE, _IS_REMOTE = 0x100, 0x200  # SpanFlags
_FIXED64 = struct.Struct("<Q").pack
_DOUBLE = struct.Struct("<d").pack
_FIXED32 = struct.Struct("<I").pack
_FLAGS = b"\x85\x01" + _FIXED32(_HAS_IS_REMOTE)  # Span.flags (field 16, fixed32)
_FLAGS_REMOTE = b"\x85\x01" + _FIXED32(_HAS_IS_REMOTE | _IS_REMOTE)
_CACHE_MAX = 4096  # encoded KeyValues kept (a few hundred bytes each at most: bounded memory)
_CACHEABLE = 256  # a longer string value (a URL with a query ...) is encoded, not cached


class _Unsupported(Exception):
    """A value the writer does not encode: the batch goes to the SDK's encoder."""


def _varint(n: int) -> bytes:
    if n < 0:
        n += 1 << 64  # int64: two's complement, ten bytes
    if n < 0x80:
        return bytes((n,))
    out = bytearray()
    while n >= 0x80:
        out.append((n & 0x7F) | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


_TAGS = {(f, w): _varint(f << 3 | w) for f in range(1, 17) for w in (0, 1, 2, 5)}


def _len(field: int, payload: bytes) -> bytes:
    return _TAGS[field, 2] + _varint(len(payload)) + payload


def _value(value: Any) -> bytes:
    """An ``AnyValue`` message's bytes (its oneof is always written, even when zero)."""
    if value is None:
        return b""
    if isinstance(value, bool):
        return b"\x10\x01" if value else b"\x10\x00"
    if isinstance(value, str):
        return _len(1, value.encode("utf-8"))
    if isinstance(value, int):
        if not -(1 << 63) <= value < (1 << 63):
            raise _Unsupported("int64 out of range")
        return b"\x18" + _varint(value)
    if isinstance(value, float):
        return b"\x21" + _DOUBLE(value)
    if isinstance(value, bytes):
        return _len(7, value)
    if isinstance(value, Sequence):
        return _len(5, b"".join(_len(1, _value(v)) for v in value))
    if isinstance(value, Mapping):
        return _len(6, b"".join(_len(1, _key_value(str(k), v)) for k, v in value.items()))
    raise _Unsupported(type(value).__name__)


def _key_value(key: str, value: Any) -> bytes:
    return _len(1, key.encode("utf-8")) + _len(2, _value(value))


class _Writer:
    """One batch's encoding; the KeyValue cache outlives it (see :func:`encode`)."""

    def __init__(self, cache: dict[tuple[int, str, type, Any], bytes]) -> None:
        self.cache = cache

    def attributes(self, field: int, attributes: Mapping[str, Any] | None) -> bytes:
        if not attributes:
            return b""
        cache = self.cache
        parts: list[bytes] = []
        append = parts.append
        tag = _TAGS[field, 2]
        for key, value in attributes.items():
            kind = type(value)
            # floats are not cached: -0.0 == 0.0 would share one encoding (and they vary anyway)
            if (kind is str and len(value) <= _CACHEABLE) or kind is int or kind is bool:
                ckey = (field, key, kind, value)
                piece = cache.get(ckey)
                if piece is None:
                    piece = tag + _varint(len(kv := _key_value(key, value))) + kv
                    if len(cache) >= _CACHE_MAX:
                        cache.clear()
                    cache[ckey] = piece
            else:
                piece = tag + _varint(len(kv := _key_value(key, value))) + kv
            append(piece)
        return b"".join(parts)

    def span(self, span: ReadableSpan) -> bytes:
        ctx = span.get_span_context()
        assert ctx is not None  # an ended SDK span always has its context
        parent = span.parent
        out = [b"\x0a\x10" + ctx.trace_id.to_bytes(16, "big"),
               b"\x12\x08" + ctx.span_id.to_bytes(8, "big")]
        if ctx.trace_state:
            out.append(_len(3, ",".join(f"{k}={v}" for k, v in ctx.trace_state.items()).encode()))
        if parent is not None:
            out.append(b"\x22\x08" + parent.span_id.to_bytes(8, "big"))
        if span.name:
            out.append(_len(5, span.name.encode("utf-8")))
        out.append(_KIND[span.kind])
        if span.start_time:
            out.append(b"\x39" + _FIXED64(span.start_time))
        if span.end_time:
            out.append(b"\x41" + _FIXED64(span.end_time))
        out.append(self.attributes(9, span.attributes))
        if span.dropped_attributes:
            out.append(b"\x50" + _varint(span.dropped_attributes))
        for event in span.events:
            body = b"".join((b"\x09" + _FIXED64(event.timestamp) if event.timestamp else b"",
                             _len(2, event.name.encode("utf-8")) if event.name else b"",
                             self.attributes(3, event.attributes),
                             b"\x20" + _varint(event.dropped_attributes)
                             if event.dropped_attributes else b""))
            out.append(_len(11, body))
        if span.dropped_events:
            out.append(b"\x60" + _varint(span.dropped_events))
        for link in span.links:
            lctx = link.context
            body = b"".join((_len(1, lctx.trace_id.to_bytes(16, "big")),
                             _len(2, lctx.span_id.to_bytes(8, "big")),
                             self.attributes(4, link.attributes),
                             b"\x28" + _varint(link.dropped_attributes)
                             if link.dropped_attributes else b"",
                             b"\x35" + _FIXED32(_flags(lctx))))
            out.append(_len(13, body))
        if span.dropped_links:
            out.append(b"\x70" + _varint(span.dropped_links))
        status = span.status
        if status is not None and not status.description and not status.status_code.value:
            out.append(b"\x7a\x00")  # the SDK always writes the message, empty when UNSET
        elif status is not None:
            body = (_len(2, status.description.encode("utf-8")) if status.description else b"") + (
                b"\x18" + _varint(status.status_code.value) if status.status_code.value else b"")
            out.append(_len(15, body))
        out.append(_FLAGS_REMOTE if parent is not None and parent.is_remote else _FLAGS)
        return b"".join(out)

    def scope(self, scope: Any) -> bytes:
        if scope is None:
            return b""
        return b"".join((_len(1, scope.name.encode("utf-8")) if scope.name else b"",
                         _len(2, scope.version.encode("utf-8")) if scope.version else b"",
                         self.attributes(3, scope.attributes)))


def _flags(parent: Any) -> int:
    return _HAS_IS_REMOTE | (_IS_REMOTE if parent is not None and parent.is_remote else 0)


_CACHE: dict[tuple[int, str, type, Any], bytes] = {}


def encode(spans: Sequence[ReadableSpan]) -> bytes:
    """The serialised ``ExportTraceServiceRequest`` of ``spans`` (grouped by resource, then
    instrumentation scope, as the SDK's encoder groups them); the SDK's encoder for a batch
    holding a value this writer does not encode."""
    try:
        return _encode(spans)
    except _Unsupported:
        return encode_spans(spans).SerializePartialToString()


def _encode(spans: Sequence[ReadableSpan]) -> bytes:
    writer = _Writer(_CACHE)
    grouped: dict[Any, dict[Any, list[bytes]]] = {}
    for span in spans:
        scope = span.instrumentation_scope or None
        grouped.setdefault(span.resource, {}).setdefault(scope, []).append(_len(2, writer.span(span)))
    out = []
    for resource, scopes in grouped.items():
        body = [_len(1, writer.attributes(1, resource.attributes))]
        for scope, encoded in scopes.items():
            schema = scope.schema_url if scope is not None else None
            body.append(_len(2, _len(1, writer.scope(scope)) + b"".join(encoded)
                             + (_len(3, schema.encode("utf-8")) if schema else b"")))
        if resource.schema_url:
            body.append(_len(3, resource.schema_url.encode("utf-8")))
        out.append(_len(1, b"".join(body)))
    return b"".join(out)


class FastOTLPSpanExporter(_http_trace.OTLPSpanExporter):
    """The SDK's OTLP/HTTP span exporter, encoding with :func:`encode`. ``export`` is the
    SDK's own (opentelemetry-exporter-otlp-proto-http 1.45, pinned in constraints.txt) with
    the encoder call swapped: same size limit, same client, same exporter metrics."""

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        if self._shutdown:
            log.warning("Exporter already shutdown, ignoring batch")
            return SpanExportResult.FAILURE
        with self._metrics.export_operation(len(spans)) as result:
            try:
                serialized = encode(spans)
            except Exception as error:  # noqa: BLE001 - as the SDK's export: a failed batch
                log.error("Failed to encode span batch: %s", error)
                result.error = error
                return SpanExportResult.FAILURE
            if _http_trace._is_request_too_large(serialized, self._max_request_size):
                log.warning("Dropping span batch: serialized size %d bytes exceeds "
                            "max_request_size %d bytes.", len(serialized), self._max_request_size)
                result.error = _http_trace.RequestPayloadTooLargeError(
                    f"Serialized span request size {len(serialized)} bytes exceeds "
                    f"max_request_size {self._max_request_size} bytes.")
                return SpanExportResult.FAILURE
            exported = self._client.export(serialized)
            if not exported.success:
                result.error = exported.error
                result.error_attrs = ({_http_trace.HTTP_RESPONSE_STATUS_CODE: exported.status_code}
                                      if exported.status_code is not None else None)
                return SpanExportResult.FAILURE
        return SpanExportResult.SUCCESS
