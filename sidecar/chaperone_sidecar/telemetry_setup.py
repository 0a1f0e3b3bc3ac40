"""OpenTelemetry providers for the sidecar, configured by the standard ``OTEL_*`` variables.

Spans and metrics leave the process when an endpoint is set (``OTEL_EXPORTER_OTLP_ENDPOINT``,
or the per-signal ``OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`` / ``OTEL_EXPORTER_OTLP_METRICS_ENDPOINT``;
the webhook sets the first from the operator's ``CHAPERONE_OTEL_ENDPOINT``). Over
``http/protobuf`` (the default) the exporters are the sidecar's own - :mod:`.otlp_spans`,
:mod:`.otlp_metrics`, posted by :mod:`.otlp_http` - so no exporter package is needed; ``grpc``
needs ``opentelemetry-exporter-otlp-proto-grpc`` (not in the image: add it to an image of your
own). Without an endpoint no tracer provider is installed and the tracing API stays the no-op
it is by default - the addon's calls cost next to nothing.

Honoured variables: ``OTEL_SDK_DISABLED``, ``OTEL_TRACES_EXPORTER`` / ``OTEL_METRICS_EXPORTER``
(``none`` switches a signal off; anything else means OTLP), ``OTEL_EXPORTER_OTLP_PROTOCOL`` and
the per-signal ``..._PROTOCOL`` (``http/protobuf`` or ``grpc``),
``OTEL_EXPORTER_OTLP_[SIGNAL_]HEADERS``/``_TIMEOUT``/``_COMPRESSION``/``_CERTIFICATE``/
``_CLIENT_CERTIFICATE``/``_CLIENT_KEY`` (read from the same ``env`` as the endpoint,
:mod:`.otlp_http`), ``OTEL_EXPORTER_OTLP_METRICS_TEMPORALITY_PREFERENCE`` and ``..._DEFAULT_HISTOGRAM_AGGREGATION``,
and - read by the SDK itself - ``OTEL_SERVICE_NAME`` (default ``chaperone-sidecar``),
``OTEL_RESOURCE_ATTRIBUTES``, ``OTEL_TRACES_SAMPLER``, ``OTEL_BSP_*`` (batch span processor) and
``OTEL_METRIC_EXPORT_INTERVAL``.

Spans go through a ``BatchSpanProcessor`` (export in its own thread: the event loop never
waits on the collector); metrics through a ``PeriodicExportingMetricReader``.

Prometheus: metrics are also always readable as Prometheus text on the health port's
``/metrics`` (the help text of ``--health-port`` promises it, and a scrape needs no collector in
the cluster). A meter provider is therefore installed even without an OTLP endpoint, with
opentelemetry-exporter-prometheus's ``PrometheusMetricReader`` - a pull reader: nothing is
exported until a scrape asks - registered in prometheus_client's process-wide registry, which
also carries prometheus_client's ``process_*`` metrics (RSS, CPU, open fds). Only
``OTEL_SDK_DISABLED`` switches it off; ``OTEL_METRICS_EXPORTER=none`` concerns the OTLP push
export alone (the Prometheus endpoint is the sidecar's own, not an OTel auto-configured
exporter). The cost of an always-on SDK, measured on the 2-core CI machine: +2.1 MB idle RSS
of a standalone proxy process (83.5 vs 81.3 MB, median of 3; the SDK's metrics package, the
exporter and prometheus_client). Per request the counter and the two histograms cost a dict
increment and two bisects: the addon counts ``chaperone.requests`` itself and the histograms
are aggregated by :mod:`.metric_histograms`, whose points every reader built here carries
(``TelemetrySetup.histograms``) - the SDK's measurement pipeline took 12-28 us per record.

``TelemetrySetup.metrics`` says whether metrics are *pushed* over OTLP; ``prometheus`` whether
the ``/metrics`` reader is there.
"""

from __future__ import annotations

import functools
import importlib
import logging
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from opentelemetry.exporter.prometheus import PrometheusMetricReader
from opentelemetry.sdk.metrics import Histogram, MeterProvider
from opentelemetry.sdk.metrics.export import MetricReader, PeriodicExportingMetricReader
from opentelemetry.sdk.metrics.view import ExplicitBucketHistogramAggregation, View
from prometheus_client import REGISTRY, CollectorRegistry
from prometheus_client.exposition import choose_encoder

from .metric_histograms import FlowHistograms, HistogramsReader

__all__ = ["TelemetrySetup", "setup_telemetry", "prometheus_exposition", "DEFAULT_SERVICE_NAME"]

log = logging.getLogger("chaperone.telemetry")

DEFAULT_SERVICE_NAME = "chaperone-sidecar"

# protocol -> (trace exporter module, metric exporter module); classes are OTLPSpanExporter and
# OTLPMetricExporter in both. http/protobuf: ours (no protobuf, no requests; otlp_http says why).
_EXPORTERS = {
    "http/protobuf": ("chaperone_sidecar.otlp_spans", "chaperone_sidecar.otlp_metrics"),
    "grpc": ("opentelemetry.exporter.otlp.proto.grpc.trace_exporter",
             "opentelemetry.exporter.otlp.proto.grpc.metric_exporter"),
}
_CLASSES = ("OTLPSpanExporter", "OTLPMetricExporter")

# The SDK's default histogram buckets (0, 5, 10, 25 ... 10000) are for milliseconds; the
# sidecar's durations are in seconds (as the HTTP semantic conventions want), so every request
# would land in the 5 s bucket. These are the conventions' boundaries for
# http.server.request.duration.
SECONDS_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0)
_VIEWS = (View(instrument_type=Histogram, instrument_unit="s",
               aggregation=ExplicitBucketHistogramAggregation(boundaries=SECONDS_BUCKETS)),)
METER_SCOPE = "chaperone.sidecar"


class _PeriodicReader(HistogramsReader, PeriodicExportingMetricReader):
    """The periodic OTLP reader, carrying the per-flow histograms (metric_histograms)."""


class _PrometheusReader(HistogramsReader, PrometheusMetricReader):
    """The ``/metrics`` reader, carrying the per-flow histograms (metric_histograms)."""


@dataclass
class TelemetrySetup:
    """What was set up; ``shutdown()`` flushes and stops (call it at process exit)."""

    tracer_provider: Any = None
    meter_provider: Any = None
    notes: list[str] = field(default_factory=list)  # why a signal is not exported
    otlp_metrics: bool = False
    prometheus_reader: PrometheusMetricReader | None = None
    # the per-flow histograms, aggregated by the sidecar (metric_histograms; None: no metrics)
    histograms: FlowHistograms | None = None

    @property
    def tracing(self) -> bool:
        return self.tracer_provider is not None

    @property
    def metrics(self) -> bool:
        """Metrics are pushed over OTLP."""
        return self.otlp_metrics

    @property
    def prometheus(self) -> bool:
        """Metrics are readable on ``/metrics`` (:func:`prometheus_exposition`)."""
        return self.prometheus_reader is not None

    def tracer(self, name: str = METER_SCOPE) -> Any:
        from opentelemetry import trace

        provider = self.tracer_provider or trace.get_tracer_provider()
        return provider.get_tracer(name)

    def meter(self, name: str = METER_SCOPE) -> Any:
        from opentelemetry import metrics

        provider = self.meter_provider or metrics.get_meter_provider()
        return provider.get_meter(name)

    def shutdown(self) -> None:
        for provider in (self.tracer_provider, self.meter_provider):
            if provider is None:
                continue
            try:
                provider.shutdown()
            except Exception:  # never fail a shutdown on telemetry
                log.exception("shutting down telemetry failed")


def _truthy(value: str | None) -> bool:
    return (value or "").strip().lower() in ("true", "1", "yes", "on")


def _load_exporter(module: str, cls: str) -> Callable[..., Any] | None:
    """The exporter class, or None when its package is not installed."""
    try:
        return getattr(importlib.import_module(module), cls)
    except ImportError:
        return None


def _resource(env: Mapping[str, str], attributes: Mapping[str, str] | None) -> Any:
    from opentelemetry.sdk.resources import Resource

    attrs = {k: v for k, v in (attributes or {}).items() if v}
    # OTEL_SERVICE_NAME / OTEL_RESOURCE_ATTRIBUTES win over our default service name.
    named = env.get("OTEL_SERVICE_NAME") or "service.name=" in env.get("OTEL_RESOURCE_ATTRIBUTES", "")
    if not named:
        attrs["service.name"] = DEFAULT_SERVICE_NAME
    return Resource.create(attrs)


def _signal(env: Mapping[str, str], signal: str, index: int, notes: list[str],
            loader: Callable[[str, str], Any]) -> Callable[[], Any] | None:
    """A factory of the exporter for ``signal`` (traces|metrics) when it should export, else
    None. The endpoint is passed explicitly: the exporters would otherwise read
    ``os.environ`` themselves and ignore the ``env`` this set-up was given."""
    upper = signal.upper()
    if env.get(f"OTEL_{upper}_EXPORTER", "otlp").strip().lower() == "none":
        notes.append(f"{signal}: OTEL_{upper}_EXPORTER=none")
        return None
    endpoint = env.get(f"OTEL_EXPORTER_OTLP_{upper}_ENDPOINT") or env.get("OTEL_EXPORTER_OTLP_ENDPOINT")
    if not endpoint:
        notes.append(f"{signal}: no OTEL_EXPORTER_OTLP_ENDPOINT")
        return None
    protocol = (env.get(f"OTEL_EXPORTER_OTLP_{upper}_PROTOCOL") or
                env.get("OTEL_EXPORTER_OTLP_PROTOCOL") or "http/protobuf").strip().lower()
    if protocol not in _EXPORTERS:
        notes.append(f"{signal}: unsupported OTLP protocol {protocol!r}")
        return None
    exporter = loader(_EXPORTERS[protocol][index], _CLASSES[index])
    if exporter is None:
        package = ("opentelemetry-exporter-otlp-proto-grpc" if protocol == "grpc"
                   else _EXPORTERS[protocol][index])
        notes.append(f"{signal}: {package} is not installed")
        return None
    if protocol == "grpc":
        return functools.partial(exporter, endpoint=endpoint)  # it reads os.environ itself
    if not env.get(f"OTEL_EXPORTER_OTLP_{upper}_ENDPOINT"):
        # The generic endpoint is a base URL: OTLP/HTTP appends the signal's path to it.
        endpoint = endpoint.rstrip("/") + f"/v1/{signal}"
    return functools.partial(exporter, endpoint=endpoint, env=env)


def _build(factory: Callable[[], Any] | None, signal: str, notes: list[str]) -> Any:
    """The exporter, or None (noted) when its settings are unusable (an endpoint that is not an
    http(s) URL, a certificate file that does not load): the proxy runs on, unexported, as it
    did when the SDK's exporter failed each export over such settings."""
    if factory is None:
        return None
    try:
        return factory()
    except (ValueError, OSError) as exc:
        notes.append(f"{signal}: {exc}")
        log.error("telemetry %s not exported: %s", signal, exc)
        return None


def prometheus_exposition(accept: str = "", registry: CollectorRegistry = REGISTRY) -> tuple[bytes, str]:
    """(body, content type) of a scrape of ``registry``: the text format, or OpenMetrics when
    the scraper's ``Accept`` asks for it (prometheus_client's negotiation). Collecting runs the
    observable instruments' callbacks, as the periodic OTLP reader does in its own thread:
    call it off the event loop."""
    encoder, content_type = choose_encoder(accept)
    return encoder(registry), content_type


def setup_telemetry(env: Mapping[str, str] | None = None, *,
                    attributes: Mapping[str, str] | None = None, install_global: bool = True,
                    loader: Callable[[str, str], Any] = _load_exporter,
                    prometheus_registry: CollectorRegistry | None = REGISTRY) -> TelemetrySetup:
    """Build the tracer and meter providers the ``OTEL_*`` variables ask for (see module doc).

    ``attributes`` are extra resource attributes (``k8s.pod.name`` ...). With
    ``install_global`` the providers become the API's global ones, so tracers and meters
    obtained earlier through ``opentelemetry.trace``/``metrics`` start exporting too.
    ``prometheus_registry`` receives the Prometheus reader (None: no reader); ``shutdown()``
    takes it out again.
    """
    env = os.environ if env is None else env
    setup = TelemetrySetup()
    if _truthy(env.get("OTEL_SDK_DISABLED")):
        setup.notes.append("OTEL_SDK_DISABLED")
        return setup
    span_exporter = _build(_signal(env, "traces", 0, setup.notes, loader), "traces", setup.notes)
    metric_exporter = _build(_signal(env, "metrics", 1, setup.notes, loader), "metrics", setup.notes)
    resource = _resource(env, attributes)
    if span_exporter is not None:
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor

        setup.tracer_provider = TracerProvider(resource=resource)
        setup.tracer_provider.add_span_processor(BatchSpanProcessor(span_exporter))
    readers: list[MetricReader] = []
    histograms = FlowHistograms(resource, METER_SCOPE, SECONDS_BUCKETS)
    if metric_exporter is not None:
        periodic = _PeriodicReader(metric_exporter)
        periodic.attach(histograms)
        readers.append(periodic)
        setup.otlp_metrics = True
    if prometheus_registry is not None:
        # target_info carries the resource attributes (pod, namespace, node) as Prometheus does.
        setup.prometheus_reader = _PrometheusReader(registry=prometheus_registry)
        setup.prometheus_reader.attach(histograms)
        readers.append(setup.prometheus_reader)
    if readers:
        setup.meter_provider = MeterProvider(resource=resource, metric_readers=readers, views=_VIEWS)
        setup.histograms = histograms
    if install_global:
        from opentelemetry import metrics, trace

        if setup.tracer_provider is not None:
            trace.set_tracer_provider(setup.tracer_provider)
        if setup.meter_provider is not None:
            metrics.set_meter_provider(setup.meter_provider)
    for note in setup.notes:
        log.info("telemetry not exported: %s", note)
    return setup
