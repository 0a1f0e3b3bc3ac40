"""The per-flow histograms (``chaperone.request.duration``, ``chaperone.upstream.duration``),
aggregated by the sidecar and handed to the SDK's metric readers at collection.

Why not the SDK's ``Histogram.record``: it runs the whole measurement pipeline per call (a
``Measurement``, the attribute set frozen and hashed, a view match and a lock per reader) -
12-28 µs of CPU per record with the OTLP and the Prometheus reader on the 2-core bench machine,
two records per flow (docs/benchmarks.md, "Telemetry, session 5"); the SDK has no bound
instruments and no observable histogram. :meth:`FlowHistogram.record` is a ``bisect`` and a few
list updates per reader (~2 µs).

Same data as the SDK's explicit-bucket aggregation: bucket ``i`` counts values ``<= bounds[i]``
(``bisect_left``), sum, count, min and max; each reader gets its own state with its own
temporality - cumulative (a series reported from its first value on, start time its first
value's) or delta (only series that changed since the reader's last collection, starting then
- or at their first value before a first collection - with that interval's min and max) - as
the reader's ``_instrument_class_temporality[Histogram]`` asks, so
``OTEL_EXPORTER_OTLP_METRICS_TEMPORALITY_PREFERENCE`` holds. At most 2000 attribute sets per
histogram, then one overflow series ``otel.metric.overflow=true`` (the SDK's default
cardinality limit). No exemplars: the SDK's default ``trace_based`` filter records none for
these either (no span is current when a flow ends).

:class:`HistogramsReader` mixes into a ``MetricReader``: the histograms' points are appended to
the ``MetricsData`` the SDK collected (under the ``chaperone.sidecar`` scope) before the reader
exports it or the Prometheus reader translates it - the ``/metrics`` names, buckets and labels
are the Prometheus reader's own translation, as before.
"""

from __future__ import annotations

import math
import threading
import time
from bisect import bisect_left
from collections.abc import Sequence
from typing import Any

from opentelemetry.sdk.metrics import Histogram
from opentelemetry.sdk.metrics.export import (
    AggregationTemporality,
    HistogramDataPoint,
    Metric,
    MetricsData,
    ResourceMetrics,
    ScopeMetrics,
)
from opentelemetry.sdk.metrics.export import Histogram as HistogramData
from opentelemetry.sdk.util.instrumentation import InstrumentationScope

__all__ = ["FlowHistograms", "FlowHistogram", "HistogramsReader", "MAX_SERIES"]

MAX_SERIES = 2000
_OVERFLOW: tuple[Any, ...] = ("\0overflow",)


class _State:
    """One reader's view of one histogram: series key -> [bucket counts..., the interval's sum,
    min, max, the sum of the intervals before] and each series' start time. The sum is kept per
    collection interval and added to the earlier ones at collection, in the SDK's order (the
    same float, not one rounded differently)."""

    def __init__(self, delta: bool) -> None:
        self.delta = delta
        self.series: dict[tuple[Any, ...], list[Any]] = {}
        self.starts: dict[tuple[Any, ...], int] = {}  # first value's time (delta: this interval's)
        self.last_collection: int | None = None


class FlowHistogram:
    """An explicit-bucket histogram whose attributes are ``names`` (values given as a tuple)."""

    def __init__(self, name: str, unit: str, description: str, names: Sequence[str],
                 bounds: Sequence[float]) -> None:
        self.name, self.unit, self.description = name, unit, description
        self.names = tuple(names)
        self.bounds = tuple(bounds)
        self.states: dict[int, _State] = {}  # id(reader) -> its state
        self.lock = threading.Lock()

    def record(self, value: float, key: tuple[Any, ...]) -> None:
        """One measurement for the attribute values ``key`` (in the order of ``names``)."""
        index = bisect_left(self.bounds, value)
        nb = len(self.bounds) + 1
        with self.lock:
            for state in self.states.values():
                series = state.series
                row = series.get(key)
                if row is None:
                    if len(series) >= MAX_SERIES and key is not _OVERFLOW:
                        self.record_overflow(state, index, value)
                        continue
                    row = series[key] = [0] * nb + [0, math.inf, -math.inf, 0]
                    state.starts.setdefault(key, time.time_ns())
                row[index] += 1
                row[nb] += value
                if value < row[nb + 1]:
                    row[nb + 1] = value
                if value > row[nb + 2]:
                    row[nb + 2] = value

    def record_overflow(self, state: _State, index: int, value: float) -> None:
        nb = len(self.bounds) + 1
        row = state.series.get(_OVERFLOW)
        if row is None:
            row = state.series[_OVERFLOW] = [0] * nb + [0, math.inf, -math.inf, 0]
            state.starts.setdefault(_OVERFLOW, time.time_ns())
        row[index] += 1
        row[nb] += value
        row[nb + 1] = min(row[nb + 1], value)
        row[nb + 2] = max(row[nb + 2], value)

    def collect(self, reader: Any, now: int) -> Metric | None:
        """The reader's points (None when it has none), delta state reset."""
        with self.lock:
            state = self.states[id(reader)]
            if state.delta:  # as the SDK's delta storage: reset, starting at the last collection
                series, state.series = state.series, {}
                starts, state.starts = state.starts, {}
                start = state.last_collection
            else:
                nb = len(self.bounds) + 1
                for row in state.series.values():  # the SDK's _previous_sum = sum_ + _previous_sum
                    row[nb + 3] = row[nb] + row[nb + 3]
                    row[nb] = 0
                series = {k: v[:nb] + [v[nb + 3]] + v[nb + 1:nb + 3] for k, v in state.series.items()}
                starts, start = dict(state.starts), None
            state.last_collection = now
        if not series:
            return None
        nb = len(self.bounds) + 1
        points = []
        for key, row in series.items():
            counts = tuple(row[:nb])
            attributes = ({"otel.metric.overflow": True} if key is _OVERFLOW
                          else dict(zip(self.names, key, strict=True)))
            points.append(HistogramDataPoint(
                attributes=attributes,
                start_time_unix_nano=start if start is not None else starts.get(key, now),
                time_unix_nano=now, count=sum(counts), sum=row[nb], bucket_counts=counts,
                explicit_bounds=self.bounds, min=row[nb + 1], max=row[nb + 2], exemplars=[]))
        temporality = AggregationTemporality.DELTA if state.delta else AggregationTemporality.CUMULATIVE
        return Metric(name=self.name, description=self.description, unit=self.unit,
                      data=HistogramData(data_points=points, aggregation_temporality=temporality))


class FlowHistograms:
    """The sidecar's per-flow histograms and the readers that collect them."""

    def __init__(self, resource: Any, scope: str, bounds: Sequence[float]) -> None:
        self.resource = resource
        self.scope = InstrumentationScope(scope)
        self.bounds = tuple(bounds)
        self.histograms: dict[str, FlowHistogram] = {}
        self.readers: dict[int, bool] = {}  # id(reader) -> delta

    def histogram(self, name: str, unit: str, description: str, names: Sequence[str]) -> FlowHistogram:
        """The histogram ``name`` (created once; a second call returns the same)."""
        hist = self.histograms.get(name)
        if hist is None:
            hist = self.histograms[name] = FlowHistogram(name, unit, description, names, self.bounds)
            for reader, delta in self.readers.items():
                hist.states[reader] = _State(delta)
        return hist

    def register(self, reader: Any) -> None:
        # keyed by the SDK's internal instrument classes (_Histogram subclasses Histogram)
        by_class = getattr(reader, "_instrument_class_temporality", {})
        delta = any(issubclass(cls, Histogram) and temporality is AggregationTemporality.DELTA
                    for cls, temporality in by_class.items())
        self.readers[id(reader)] = delta
        for hist in self.histograms.values():
            with hist.lock:
                hist.states[id(reader)] = _State(delta)

    def merge(self, reader: Any, data: MetricsData) -> MetricsData:
        """``data`` with this reader's histogram points added under the sidecar's scope."""
        if id(reader) not in self.readers:
            return data
        now = time.time_ns()
        extra = [m for m in (h.collect(reader, now) for h in self.histograms.values()) if m is not None]
        if not extra:
            return data
        resources = list(data.resource_metrics)
        at = next((i for i, rm in enumerate(resources) if rm.resource == self.resource), None)
        if at is None:
            resources.append(ResourceMetrics(resource=self.resource, scope_metrics=[
                ScopeMetrics(scope=self.scope, metrics=extra, schema_url="")],
                schema_url=self.resource.schema_url))
            return MetricsData(resource_metrics=resources)
        rm = resources[at]
        scopes = list(rm.scope_metrics)
        si = next((i for i, sm in enumerate(scopes) if sm.scope == self.scope), None)
        if si is None:
            scopes.append(ScopeMetrics(scope=self.scope, metrics=extra, schema_url=""))
        else:
            sm = scopes[si]
            scopes[si] = ScopeMetrics(scope=sm.scope, metrics=[*sm.metrics, *extra],
                                      schema_url=sm.schema_url)
        resources[at] = ResourceMetrics(resource=rm.resource, scope_metrics=scopes,
                                        schema_url=rm.schema_url)
        return MetricsData(resource_metrics=resources)


class HistogramsReader:
    """Mixed into a ``MetricReader`` (before it in the bases): what it receives at collection
    (``_receive_metrics``, the SDK's extension point) carries the :class:`FlowHistograms`'
    points too. A collection the SDK finds empty is not received at all; nothing is lost then:
    a delta state is reset only when merged, so the next received collection reports it (in the
    sidecar ``chaperone.requests`` has a point whenever these histograms do, so that does not
    happen)."""

    flow_histograms: FlowHistograms | None = None

    def attach(self, histograms: FlowHistograms) -> None:
        self.flow_histograms = histograms
        histograms.register(self)

    def _receive_metrics(self, metrics_data: MetricsData, timeout_millis: float = 10_000,
                         **kwargs: Any) -> None:
        if self.flow_histograms is not None:
            metrics_data = self.flow_histograms.merge(self, metrics_data)
        super()._receive_metrics(metrics_data, timeout_millis, **kwargs)  # type: ignore[misc]
