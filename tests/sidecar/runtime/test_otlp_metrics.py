"""otlp_metrics: the directly written OTLP metrics request parses to the message the SDK's encoder
builds, for data of every kind the SDK produces (sums, gauges, explicit and exponential
histograms, exemplars, delta and cumulative, scopes and resources); the exporter honours the
SDK exporter's temporality and aggregation variables and reaches a real OTLP/HTTP endpoint."""

from __future__ import annotations

from opentelemetry.exporter.otlp.proto.common._internal.metrics_encoder import encode_metrics
from opentelemetry.metrics import Observation
from opentelemetry.proto.collector.metrics.v1.metrics_service_pb2 import ExportMetricsServiceRequest
from opentelemetry.sdk.metrics import (
    Counter,
    Histogram,
    MeterProvider,
    ObservableCounter,
    ObservableGauge,
    UpDownCounter,
)
from opentelemetry.sdk.metrics._internal.exemplar import AlwaysOnExemplarFilter
from opentelemetry.sdk.metrics.export import AggregationTemporality, InMemoryMetricReader
from opentelemetry.sdk.metrics.view import ExponentialBucketHistogramAggregation, View
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.trace import set_span_in_context

from chaperone_sidecar import otlp_metrics
from chaperone_sidecar.telemetry_setup import setup_telemetry

from .otlp_endpoint import otlp_endpoint, url


def record(temporality):
    reader = InMemoryMetricReader(preferred_temporality={Counter: temporality, Histogram: temporality})
    provider = MeterProvider(
        resource=Resource({"service.name": "m", "n": 3, "s": "text"}, schema_url="https://r/1"),
        metric_readers=[reader], exemplar_filter=AlwaysOnExemplarFilter(),
        views=[View(instrument_name="exp*", aggregation=ExponentialBucketHistogramAggregation()),
               View(instrument_name="*")])
    span = TracerProvider().get_tracer("t").start_span("s")
    in_span = set_span_in_context(span)
    plain = provider.get_meter("chaperone.sidecar")
    other = provider.get_meter("other", "1.2", schema_url="https://scope/s", attributes={"s": "text"})
    for meter in (plain, other):
        ints = meter.create_counter("ints", unit="{request}", description="d")
        ints.add(3, {"s": "text", "decision": "allow"})
        ints.add(0, {"zero": True})
        meter.create_counter("floats").add(0.25, {"neg": -5}, context=in_span)
        updown = meter.create_up_down_counter("updown", unit="{x}")
        updown.add(-7, {"list": ["a", "b"]})
        hist = meter.create_histogram("duration", unit="s")
        for v in (0.0, 0.003, 1.5, 12.0, 1e9):
            hist.record(v, {"c": "upstream"}, context=in_span)
        meter.create_histogram("empty.bounds").record(3)  # default boundaries
        exp = meter.create_histogram("exp.duration")
        for v in (0.0, 0.001, 2.0, 2.0, 1e6):
            exp.record(v, {"e": 1})
        meter.create_observable_gauge("gauge", callbacks=[lambda o: [Observation(2.5, {"g": 1}), Observation(-1)]])
        meter.create_observable_counter("obs", callbacks=[lambda o: [Observation(10, {"k": "v"})]])
        meter.create_observable_up_down_counter("nothing", callbacks=[lambda o: []])
        meter.create_gauge("sync.gauge").set(4, {"h": 0.5})
    data = reader.get_metrics_data()
    span.end()
    return data, reader


def test_encoding_equals_the_sdk_encoders_message():
    for temporality in (AggregationTemporality.CUMULATIVE, AggregationTemporality.DELTA):
        data, reader = record(temporality)
        kinds = {type(m.data).__name__ for rm in data.resource_metrics for sm in rm.scope_metrics
                 for m in sm.metrics}
        assert kinds == {"Sum", "Gauge", "Histogram", "ExponentialHistogram"}
        exemplars = [p.exemplars for rm in data.resource_metrics for sm in rm.scope_metrics
                     for m in sm.metrics for p in m.data.data_points if p.exemplars]
        assert any(e.trace_id for ex in exemplars for e in ex)
        for _ in range(2):  # the second time from the KeyValue cache
            got = ExportMetricsServiceRequest.FromString(otlp_metrics.encode(data))
            assert got == encode_metrics(data)
        reader.shutdown()


def test_temporality_and_aggregation_preferences_as_the_sdk_exporter():
    from opentelemetry.exporter.otlp.proto.http.metric_exporter import OTLPMetricExporter as SDK

    for pref in ("cumulative", "DELTA", "lowmemory", "bogus"):
        for aggregation in ("explicit_bucket_histogram", "base2_exponential_bucket_histogram"):
            env = {"OTEL_EXPORTER_OTLP_METRICS_TEMPORALITY_PREFERENCE": pref,
                   "OTEL_EXPORTER_OTLP_METRICS_DEFAULT_HISTOGRAM_AGGREGATION": aggregation}
            ours = otlp_metrics.OTLPMetricExporter("http://127.0.0.1:1/v1/metrics", env)
            import os
            saved = dict(os.environ)
            os.environ.update(env)
            try:
                sdk = SDK(endpoint="http://127.0.0.1:1/v1/metrics")
            finally:
                os.environ.clear()
                os.environ.update(saved)
            assert ours._preferred_temporality == sdk._preferred_temporality
            assert {k: type(v) for k, v in ours._preferred_aggregation.items()} == \
                {k: type(v) for k, v in sdk._preferred_aggregation.items()}
            for cls in (ObservableCounter, ObservableGauge, UpDownCounter):
                assert cls in ours._preferred_temporality


def test_setup_exports_metrics_to_an_otlp_endpoint():
    with otlp_endpoint() as server:
        setup = setup_telemetry({"OTEL_EXPORTER_OTLP_ENDPOINT": url(server),
                                 "OTEL_TRACES_EXPORTER": "none"}, install_global=False,
                                prometheus_registry=None)
        meter = setup.meter()
        meter.create_histogram("chaperone.request.duration", unit="s").record(0.02, {"c": "x"})
        meter.create_counter("chaperone.x").add(2)
        setup.shutdown()
    assert {path for path, _, _ in server.seen} == {"/v1/metrics"}
    sent = ExportMetricsServiceRequest.FromString(server.seen[0][2])
    metrics = {m.name: m for rm in sent.resource_metrics for sm in rm.scope_metrics for m in sm.metrics}
    hist = metrics["chaperone.request.duration"].histogram
    assert hist.aggregation_temporality == 2  # cumulative
    (point,) = hist.data_points
    assert point.count == 1 and list(point.explicit_bounds)[:3] == [0.005, 0.01, 0.025]
    assert point.bucket_counts[2] == 1  # 0.02 s: the seconds buckets of the view
    assert metrics["chaperone.x"].sum.data_points[0].as_int == 2 and metrics["chaperone.x"].sum.is_monotonic
