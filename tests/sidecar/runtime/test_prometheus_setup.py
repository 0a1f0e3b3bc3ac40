"""The Prometheus reader of :func:`setup_telemetry`: on without any OTLP endpoint, off only with
``OTEL_SDK_DISABLED``, durations in second-sized buckets, exposition negotiated."""

from __future__ import annotations

from prometheus_client import CollectorRegistry
from prometheus_client.parser import text_string_to_metric_families

from chaperone_sidecar.telemetry_setup import prometheus_exposition, setup_telemetry


def families(registry, accept=""):
    body, content_type = prometheus_exposition(accept, registry)
    return content_type, body.decode()


def test_metrics_are_readable_without_an_otlp_endpoint():
    registry = CollectorRegistry()
    setup = setup_telemetry({}, install_global=False, prometheus_registry=registry,
                            attributes={"k8s.pod.name": "agent-0"})
    try:
        assert setup.prometheus and not setup.metrics  # pulled, not pushed
        meter = setup.meter()
        meter.create_counter("chaperone.requests", unit="{request}").add(2, {"chaperone.decision": "allow"})
        meter.create_histogram("chaperone.request.duration", unit="s").record(0.03, {"chaperone.decision": "allow"})
        content_type, text = families(registry)
        assert content_type.startswith("text/plain; version=")
        parsed = {f.name: f for f in text_string_to_metric_families(text)}
        counter = parsed["chaperone_requests"]
        assert counter.type == "counter"
        assert [(s.labels["chaperone_decision"], s.value) for s in counter.samples
                if s.name == "chaperone_requests_total"] == [("allow", 2.0)]
        buckets = {s.labels["le"]: s.value for s in parsed["chaperone_request_duration_seconds"].samples
                   if s.name.endswith("_bucket")}
        assert buckets["0.025"] == 0 and buckets["0.05"] == 1 and buckets["+Inf"] == 1
        info = [s for f in parsed.values() for s in f.samples if s.name == "target_info"]
        assert info and info[0].labels["k8s_pod_name"] == "agent-0"  # the resource, as Prometheus wants
    finally:
        setup.shutdown()
    assert families(registry)[1] == ""  # shutdown takes the reader out of the registry


def test_otlp_none_keeps_prometheus_and_sdk_disabled_switches_it_off():
    registry = CollectorRegistry()
    setup = setup_telemetry({"OTEL_METRICS_EXPORTER": "none", "OTEL_EXPORTER_OTLP_ENDPOINT": "http://c:4318"},
                            install_global=False, prometheus_registry=registry, loader=lambda m, c: None)
    try:
        assert setup.prometheus and not setup.metrics
    finally:
        setup.shutdown()
    setup = setup_telemetry({"OTEL_SDK_DISABLED": "true"}, install_global=False, prometheus_registry=registry)
    assert not setup.prometheus and setup.meter_provider is None


def test_openmetrics_when_asked():
    registry = CollectorRegistry()
    setup = setup_telemetry({}, install_global=False, prometheus_registry=registry)
    try:
        setup.meter().create_counter("chaperone.requests").add(1)
        content_type, text = families(registry, "application/openmetrics-text; version=1.0.0")
        assert content_type.startswith("application/openmetrics-text")
        assert "\nchaperone_requests_total{" in text and text.endswith("# EOF\n")
    finally:
        setup.shutdown()
