"""OTLP metrics encoding and the OTLP/HTTP metric exporter, without protobuf objects.

Why hand-written: the SDK's OTLP/HTTP metric exporter needs protobuf, opentelemetry-proto and
``requests`` in the process (~3 MB RSS in every exporting sidecar; :mod:`.otlp_http` says what
was measured), for a request of a dozen metrics every minute. :func:`encode` writes the
``ExportMetricsServiceRequest`` (opentelemetry-proto's ``metrics_service.proto``) straight into
bytes from the SDK's ``MetricsData``: sums, gauges, explicit-bucket and exponential
histograms, exemplars, scopes and resources, grouped as the SDK's ``encode_metrics`` groups
them. ``tests/sidecar/runtime/test_otlp_metrics.py`` checks that it parses to a message
*equal* to the SDK encoder's for data of every kind the SDK produces.

:class:`OTLPMetricExporter` is the SDK's OTLP metric exporter's behaviour with this encoding
and :class:`~.otlp_http.OtlpHttpClient`: ``OTEL_EXPORTER_OTLP_METRICS_TEMPORALITY_PREFERENCE``
(``cumulative``, ``delta``, ``lowmemory``) and ``..._DEFAULT_HISTOGRAM_AGGREGATION``
(``explicit_bucket_histogram``, ``base2_exponential_bucket_histogram``) read as the SDK's
``OTLPMetricExporterMixin`` reads them.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from typing import Any

from opentelemetry.sdk.metrics import (
    Counter,
    Histogram,
    ObservableCounter,
    ObservableGauge,
    ObservableUpDownCounter,
    UpDownCounter,
)
from opentelemetry.sdk.metrics.export import (
    AggregationTemporality,
    ExponentialHistogram,
    Gauge,
    MetricExporter,
    MetricExportResult,
    MetricsData,
    Sum,
)
from opentelemetry.sdk.metrics.export import Histogram as HistogramData
from opentelemetry.sdk.metrics.view import (
    Aggregation,
    ExplicitBucketHistogramAggregation,
    ExponentialBucketHistogramAggregation,
)

from .otlp_http import OtlpHttpClient
from .otlp_wire import CACHE, DOUBLE, FIXED64, SFIXED64, Writer, field, varint

__all__ = ["encode", "OTLPMetricExporter"]

log = logging.getLogger("chaperone.telemetry")


def _number(v: int | float, as_double: int, as_int: int) -> bytes:
    """The ``as_double``/``as_int`` oneof (written even when zero); ints as sfixed64."""
    if isinstance(v, int):  # bool included, as the SDK's isinstance test
        return bytes(((as_int << 3) | 1,)) + SFIXED64(int(v))
    return bytes(((as_double << 3) | 1,)) + DOUBLE(v)


def _fixed64(number: int, v: int | None) -> bytes:
    return bytes(((number << 3) | 1,)) + FIXED64(v) if v else b""


def _double(number: int, v: float | None) -> bytes:
    """A proto3 ``optional double`` (present when set, zero included)."""
    return bytes(((number << 3) | 1,)) + DOUBLE(v) if v is not None else b""


class _Writer(Writer):
    def exemplars(self, number: int, exemplars: Any) -> bytes:
        out = []
        for ex in exemplars or ():
            if not isinstance(ex.value, (int, float)):
                raise ValueError("Exemplar value must be an int or float")
            body = [self.attributes(7, ex.filtered_attributes), _fixed64(2, ex.time_unix_nano),
                    _number(ex.value, 3, 6)]
            if ex.span_id is not None and ex.trace_id is not None:
                body.append(field(4, ex.span_id.to_bytes(8, "big")))
                body.append(field(5, ex.trace_id.to_bytes(16, "big")))
            out.append(field(number, b"".join(body)))
        return b"".join(out)

    def number_point(self, point: Any, start: bool) -> bytes:
        return b"".join((self.attributes(7, point.attributes),
                         _fixed64(2, point.start_time_unix_nano) if start else b"",
                         _fixed64(3, point.time_unix_nano), _number(point.value, 4, 6),
                         self.exemplars(5, point.exemplars)))

    def histogram_point(self, p: Any) -> bytes:
        counts = b"".join(FIXED64(c) for c in p.bucket_counts)
        bounds = b"".join(DOUBLE(b) for b in p.explicit_bounds)
        return b"".join((self.attributes(9, p.attributes), _fixed64(2, p.start_time_unix_nano),
                         _fixed64(3, p.time_unix_nano), _fixed64(4, p.count), _double(5, p.sum),
                         field(6, counts) if counts else b"", field(7, bounds) if bounds else b"",
                         self.exemplars(8, p.exemplars), _double(11, p.min), _double(12, p.max)))

    def exponential_point(self, p: Any) -> bytes:
        def buckets(number: int, b: Any) -> bytes:
            if not b.bucket_counts:
                return b""
            counts = b"".join(varint(c) for c in b.bucket_counts)
            return field(number, (b"\x08" + varint(_zigzag(b.offset)) if b.offset else b"")
                         + field(2, counts))

        return b"".join((self.attributes(1, p.attributes), _fixed64(2, p.start_time_unix_nano),
                         _fixed64(3, p.time_unix_nano), _fixed64(4, p.count), _double(5, p.sum),
                         b"\x30" + varint(_zigzag(p.scale)) if p.scale else b"",
                         _fixed64(7, p.zero_count), buckets(8, p.positive), buckets(9, p.negative),
                         b"\x50" + varint(p.flags) if p.flags else b"",
                         self.exemplars(11, p.exemplars), _double(12, p.min), _double(13, p.max)))

    def metric(self, metric: Any) -> bytes:
        head = b"".join((field(1, metric.name.encode("utf-8")) if metric.name else b"",
                         field(2, metric.description.encode("utf-8")) if metric.description else b"",
                         field(3, metric.unit.encode("utf-8")) if metric.unit else b""))
        data = metric.data
        points = data.data_points
        if not points:  # the SDK sets the data oneof only from inside its loop over points
            if not isinstance(data, (Gauge, Sum, HistogramData, ExponentialHistogram)):
                log.warning("unsupported data type %s", type(data).__name__)
            return head
        temporality = b"\x10" + varint(int(getattr(data, "aggregation_temporality", 0) or 0))
        if isinstance(data, Gauge):
            body = b"".join(field(1, self.number_point(p, False)) for p in points)
            return head + field(5, body)
        if isinstance(data, HistogramData):
            body = b"".join(field(1, self.histogram_point(p)) for p in points)
            return head + field(9, body + temporality)
        if isinstance(data, Sum):
            body = b"".join(field(1, self.number_point(p, True)) for p in points)
            return head + field(7, body + temporality + (b"\x18\x01" if data.is_monotonic else b""))
        if isinstance(data, ExponentialHistogram):
            body = b"".join(field(1, self.exponential_point(p)) for p in points)
            return head + field(10, body + temporality)
        log.warning("unsupported data type %s", type(data).__name__)
        return head


def _zigzag(n: int) -> int:
    return (n << 1) ^ (n >> 63)


def encode(data: MetricsData) -> bytes:
    """The serialised ``ExportMetricsServiceRequest`` of ``data``."""
    writer = _Writer(CACHE)
    resources: dict[Any, dict[Any, list[bytes]]] = {}
    for rm in data.resource_metrics:
        scopes: dict[Any, list[bytes]] = {}
        resources[rm.resource] = scopes  # a repeated resource replaces, as in the SDK's encoder
        for sm in rm.scope_metrics:
            scopes[sm.scope] = [field(2, writer.metric(m)) for m in sm.metrics]
    return writer.grouped(resources)


def _temporality(env: Mapping[str, str]) -> dict[type, AggregationTemporality]:
    cumulative, delta = AggregationTemporality.CUMULATIVE, AggregationTemporality.DELTA
    preference = env.get("OTEL_EXPORTER_OTLP_METRICS_TEMPORALITY_PREFERENCE", "CUMULATIVE").upper().strip()
    if preference not in ("CUMULATIVE", "DELTA", "LOWMEMORY"):
        log.warning("Unrecognized OTEL_EXPORTER_OTLP_METRICS_TEMPORALITY_PREFERENCE value found: "
                    "%s, using CUMULATIVE", preference)
    counters = delta if preference in ("DELTA", "LOWMEMORY") else cumulative
    return {Counter: counters, UpDownCounter: cumulative, Histogram: counters,
            ObservableCounter: delta if preference == "DELTA" else cumulative,
            ObservableUpDownCounter: cumulative, ObservableGauge: cumulative}


def _aggregation(env: Mapping[str, str]) -> dict[type, Aggregation]:
    name = "OTEL_EXPORTER_OTLP_METRICS_DEFAULT_HISTOGRAM_AGGREGATION"
    choice = env.get(name, "explicit_bucket_histogram")
    if choice == "base2_exponential_bucket_histogram":
        return {Histogram: ExponentialBucketHistogramAggregation()}
    if choice != "explicit_bucket_histogram":
        log.warning("Invalid value for %s: %s, using explicit bucket histogram aggregation",
                    name, choice)
    return {Histogram: ExplicitBucketHistogramAggregation()}


class OTLPMetricExporter(MetricExporter):
    """OTLP/HTTP metric exporter: :func:`encode`, posted by :class:`~.otlp_http.OtlpHttpClient`
    (``OTEL_EXPORTER_OTLP_[METRICS_]*`` from ``env``, default ``os.environ``)."""

    def __init__(self, endpoint: str, env: Mapping[str, str] | None = None) -> None:
        env = os.environ if env is None else env
        super().__init__(preferred_temporality=_temporality(env),
                         preferred_aggregation=_aggregation(env))
        self.client = OtlpHttpClient("metrics", endpoint, env)

    def export(self, metrics_data: MetricsData, timeout_millis: float = 10_000,
               **kwargs: Any) -> MetricExportResult:
        return MetricExportResult.SUCCESS if self.client.export_batch(encode, metrics_data) \
            else MetricExportResult.FAILURE

    def force_flush(self, timeout_millis: float = 10_000) -> bool:
        return True  # nothing is buffered here

    def shutdown(self, timeout_millis: float = 30_000, **kwargs: Any) -> None:
        self.client.shutdown()
