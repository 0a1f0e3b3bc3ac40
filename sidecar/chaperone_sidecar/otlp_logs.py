"""OTLP logs encoding and the OTLP/HTTP log exporter, without protobuf objects.

Why hand-written: the OCSF export's OTLP sink (``recording/ocsf_export.py``) would otherwise
load the SDK's OTLP/HTTP log exporter - protobuf, opentelemetry-proto and ``requests`` (~3 MB
RSS; :mod:`.otlp_http` says what was measured) - and build a protobuf object per key of each
~2 KB OCSF event. :func:`encode` writes the ``ExportLogsServiceRequest``
(opentelemetry-proto's ``logs_service.proto``) straight into bytes from the SDK's
``ReadableLogRecord``\\ s, grouped by resource and scope as the SDK's ``encode_logs`` groups
them; ``tests/sidecar/runtime/test_otlp_logs.py`` checks it parses to a message *equal* to the
SDK encoder's.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from opentelemetry.sdk._logs import ReadableLogRecord
from opentelemetry.sdk._logs.export import LogRecordExporter, LogRecordExportResult

from .otlp_http import OtlpHttpClient
from .otlp_wire import CACHE, FIXED32, FIXED64, Writer, field, value, varint

__all__ = ["encode", "OTLPLogExporter"]



class _Writer(Writer):
    def record(self, readable: ReadableLogRecord) -> bytes:
        rec = readable.log_record
        severity = getattr(rec.severity_number, "value", None)
        flags = int(rec.trace_flags or 0)
        return b"".join((
            b"\x09" + FIXED64(rec.timestamp) if rec.timestamp else b"",
            b"\x10" + varint(severity) if severity else b"",
            field(3, rec.severity_text.encode("utf-8")) if rec.severity_text else b"",
            field(5, value(rec.body)),  # the SDK always sets the body, an empty AnyValue for None
            self.attributes(6, rec.attributes),
            b"\x38" + varint(readable.dropped_attributes) if readable.dropped_attributes else b"",
            b"\x45" + FIXED32(flags) if flags else b"",
            field(9, rec.trace_id.to_bytes(16, "big")) if rec.trace_id else b"",
            field(10, rec.span_id.to_bytes(8, "big")) if rec.span_id else b"",
            b"\x59" + FIXED64(rec.observed_timestamp) if rec.observed_timestamp else b"",
            field(12, rec.event_name.encode("utf-8")) if rec.event_name else b""))


def encode(batch: Sequence[ReadableLogRecord]) -> bytes:
    """The serialised ``ExportLogsServiceRequest`` of ``batch``."""
    writer = _Writer(CACHE)
    grouped: dict[Any, dict[Any, list[bytes]]] = {}
    for readable in batch:
        scope = readable.instrumentation_scope or None
        grouped.setdefault(readable.resource, {}).setdefault(scope, []).append(
            field(2, writer.record(readable)))
    return writer.grouped(grouped)


class OTLPLogExporter(LogRecordExporter):
    """OTLP/HTTP log exporter: :func:`encode`, posted by :class:`~.otlp_http.OtlpHttpClient`
    (``OTEL_EXPORTER_OTLP_[LOGS_]*`` from ``env``, default ``os.environ``)."""

    def __init__(self, endpoint: str, env: Mapping[str, str] | None = None) -> None:
        self.client = OtlpHttpClient("logs", endpoint, env)

    def export(self, batch: Sequence[ReadableLogRecord]) -> LogRecordExportResult:
        ok = self.client.export_batch(encode, batch)
        return LogRecordExportResult.SUCCESS if ok else LogRecordExportResult.FAILURE

    def shutdown(self) -> None:
        self.client.shutdown()

    def force_flush(self, timeout_millis: int = 30000) -> bool:
        return True  # nothing is buffered here
