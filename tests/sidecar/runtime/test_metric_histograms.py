"""metric_histograms: the sidecar-aggregated histograms give each reader the same points as the
SDK's explicit-bucket histogram fed the same values (cumulative and delta readers, the
cardinality overflow), and /metrics shows them as the Prometheus reader shows an SDK histogram."""

from __future__ import annotations

from opentelemetry.sdk.metrics import Histogram, MeterProvider
from opentelemetry.sdk.metrics.export import AggregationTemporality, InMemoryMetricReader
from opentelemetry.sdk.metrics.view import ExplicitBucketHistogramAggregation, View
from opentelemetry.sdk.resources import Resource
from prometheus_client import CollectorRegistry

from chaperone_sidecar.metric_histograms import FlowHistograms, HistogramsReader
from chaperone_sidecar.telemetry_setup import SECONDS_BUCKETS, prometheus_exposition, setup_telemetry

NAMES = ("chaperone.decision", "chaperone.connection")


class Reader(HistogramsReader, InMemoryMetricReader):
    pass


def points(reader, times=None):
    out = {}
    data = reader.get_metrics_data()
    for rm in data.resource_metrics if data is not None else ():
        for sm in rm.scope_metrics:
            for m in sm.metrics:
                out[m.name] = (m.data.aggregation_temporality, {
                    tuple(sorted(p.attributes.items())): (p.count, p.sum, tuple(p.bucket_counts),
                                                          tuple(p.explicit_bounds), p.min, p.max)
                    for p in m.data.data_points})
                for p in m.data.data_points:
                    assert 0 < p.start_time_unix_nano <= p.time_unix_nano
                    if times is not None:
                        times.setdefault(m.name, []).append((p.start_time_unix_nano, p.time_unix_nano))
    return out


def provider():
    resource = Resource.create({"service.name": "t"})
    histograms = FlowHistograms(resource, "chaperone.sidecar", SECONDS_BUCKETS)
    cumulative = Reader()
    delta = Reader(preferred_temporality={Histogram: AggregationTemporality.DELTA})
    for reader in (cumulative, delta):
        reader.attach(histograms)
    meters = MeterProvider(resource=resource, metric_readers=[cumulative, delta], views=[
        View(instrument_type=Histogram, aggregation=ExplicitBucketHistogramAggregation(SECONDS_BUCKETS))])
    sdk = meters.get_meter("chaperone.sidecar").create_histogram("sdk", unit="s", description="d")
    ours = histograms.histogram("ours", "s", "d", NAMES)
    return meters, sdk, ours, cumulative, delta


def record(sdk, ours, value, key):
    sdk.record(value, dict(zip(NAMES, key, strict=True)))
    ours.record(value, key)


def test_same_points_as_the_sdk_histogram_for_cumulative_and_delta_readers():
    meters, sdk, ours, cumulative, delta = provider()
    # bucket edges (a value equal to a bound counts in that bound's bucket), zero, beyond the last
    for value in (0.0, 0.005, 0.0051, 0.01, 0.3, 10.0, 10.5, 1e6):
        record(sdk, ours, value, ("allow", "github"))
    record(sdk, ours, 0.02, ("block", "github"))
    first: dict = {}
    for reader in (cumulative, delta):
        got = points(reader, first if reader is delta else None)
        assert got["ours"] == got["sdk"] and got["ours"][1]
    # the second interval: only one series moves; delta reports it alone, with that interval's min/max
    record(sdk, ours, 0.7, ("allow", "github"))
    record(sdk, ours, 0.6, ("allow", "github"))
    second: dict = {}
    got_c, got_d = points(cumulative), points(delta, second)
    # a delta point starts at the previous collection (as the SDK's: each its own collection's time)
    assert second["ours"][0][0] == first["ours"][0][1] and second["sdk"][0][0] == first["sdk"][0][1]
    assert got_c["ours"] == got_c["sdk"] and len(got_c["ours"][1]) == 2
    assert got_d["ours"] == got_d["sdk"] and len(got_d["ours"][1]) == 1
    assert got_d["ours"][0] == AggregationTemporality.DELTA
    (only,) = got_d["ours"][1].values()
    assert only[0] == 2 and (only[4], only[5]) == (0.6, 0.7)
    # nothing new: delta has no point, as the SDK
    assert "ours" not in points(delta) and "sdk" not in points(delta)
    meters.shutdown()


def test_cardinality_overflow_as_the_sdk():
    meters, sdk, ours, cumulative, delta = provider()
    for i in range(2100):
        record(sdk, ours, 0.001 * (i % 7), ("allow", f"c{i}"))
    got = points(cumulative)
    assert got["ours"] == got["sdk"]
    assert ((("otel.metric.overflow", True),) in got["ours"][1])
    meters.shutdown()


def test_prometheus_exposition_as_an_sdk_histogram():
    registry = CollectorRegistry()
    setup = setup_telemetry({}, install_global=False, prometheus_registry=registry)
    assert setup.histograms is not None
    ours = setup.histograms.histogram("ours.duration", "s", "Latency", ("chaperone.connection",))
    sdk = setup.meter().create_histogram("sdk.duration", unit="s", description="Latency")
    for value in (0.003, 0.03, 0.3, 3.0, 30.0):
        ours.record(value, ("github",))
        sdk.record(value, {"chaperone.connection": "github"})
    text = prometheus_exposition(registry=registry)[0].decode()
    setup.shutdown()
    lines = text.splitlines()
    mine = sorted(line.replace("ours_duration", "X") for line in lines if "ours_duration" in line)
    theirs = sorted(line.replace("sdk_duration", "X") for line in lines if "sdk_duration" in line)
    assert mine == theirs and any('le="0.005"' in line for line in mine)
