"""otlp_logs: the directly written OTLP logs request parses to the message the SDK's encoder
builds (bodies of every AnyValue shape, severities, trace context, event names, scopes and
resources, dropped attributes)."""

from __future__ import annotations

from opentelemetry._logs import SeverityNumber
from opentelemetry.exporter.otlp.proto.common._log_encoder import encode_logs
from opentelemetry.proto.collector.logs.v1.logs_service_pb2 import ExportLogsServiceRequest
from opentelemetry.sdk._logs import LoggerProvider, LogRecordLimits
from opentelemetry.sdk._logs.export import InMemoryLogRecordExporter, SimpleLogRecordProcessor
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.trace import set_span_in_context

from chaperone_sidecar import otlp_logs


def records():
    memory = InMemoryLogRecordExporter()
    providers = [LoggerProvider(resource=Resource.create({"service.name": "a", "s": "text"})),
                 LoggerProvider(resource=Resource({"service.name": "b"}, schema_url="https://r/1"),
                                log_record_limits=LogRecordLimits(max_attributes=2))]
    span = TracerProvider().get_tracer("t").start_span("s")
    for provider in providers:
        provider.add_log_record_processor(SimpleLogRecordProcessor(memory))
        for logger in (provider.get_logger("chaperone.ocsf"),
                       provider.get_logger("other", "1.0", "https://scope/s", {"s": "text"})):
            ocsf = {"class_uid": 6003, "metadata": {"uid": "f1", "profiles": ["security_control"]},
                    "time": 1733389200000, "ratio": 0.5, "ok": True, "none": None, "raw": b"\x00\x01",
                    "nested": [{"a": [1, "b"]}], "unicode": "zäöü✓", "empty": {}}
            logger.emit(timestamp=1733389200000 * 1_000_000, body=ocsf,
                        severity_number=SeverityNumber.WARN, severity_text="High",
                        event_name="ocsf.api_activity",
                        attributes={"ocsf.class_uid": 6003, "ocsf.activity_id": 2, "x": "y"})
            logger.emit(body="text body", severity_number=SeverityNumber.INFO, context=set_span_in_context(span))
            logger.emit(body=None)
            logger.emit(body=[1, 2.5, "three"], attributes={"s": "text"})
    span.end()
    return memory.get_finished_logs()


def test_encoding_equals_the_sdk_encoders_message():
    batch = records()
    assert len(batch) == 16 and any(r.dropped_attributes for r in batch)
    assert any(r.log_record.trace_id for r in batch)
    expected = encode_logs(batch)
    for _ in range(2):  # the second time from the KeyValue cache
        assert ExportLogsServiceRequest.FromString(otlp_logs.encode(batch)) == expected
    for one in batch:
        assert ExportLogsServiceRequest.FromString(otlp_logs.encode([one])) == encode_logs([one])
