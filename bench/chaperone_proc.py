"""Run ``chaperone proxy`` for the benchmark, as a minimal or a full deployment.

``python bench/chaperone_proc.py --profile minimal|full --loop asyncio|uvloop --config-dir D
--port P --health-port H``

* **minimal** is exactly the product's ``chaperone proxy`` command
  (``chaperone_sidecar.sidecar_cli.main(["proxy", ...])``): the config directory holds one
  connection with recording off and a one-rule allow-all policy; telemetry is the API's no-op.
* **full** is the same runtime (:class:`chaperone_sidecar.proxy.ProxyRuntime` with the services
  of :func:`~chaperone_sidecar.services.build_services`) with two things standalone mode does
  not configure by itself, set up here the way the injected sidecar has them:

  - recording shipped to S3 (``S3Store`` on the test bed's moto server; bucket, endpoint and
    keys from ``BENCH_S3_*``) instead of a local directory, built like ``services._make_recorder``;
  - the OpenTelemetry SDK: a ``TracerProvider`` with a ``BatchSpanProcessor`` and a
    ``MeterProvider`` with a ``PeriodicExportingMetricReader``, both exporting with the SDK's
    console exporters into ``/dev/null`` (no collector on this machine; the spans and metrics
    are still built, batched and serialised in the exporter threads, as with OTLP).

``--without telemetry`` leaves the SDK out (the ablation that attributes the full profile's
cost). ``--loop uvloop`` installs uvloop's event-loop policy first (the runtime uses ``asyncio.run``,
so mitmproxy's master then runs on uvloop).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
for _sub in ("sidecar", "operator", "testbed"):
    if str(REPO / _sub) not in sys.path:
        sys.path.insert(0, str(REPO / _sub))


def _telemetry() -> list:
    """Global SDK providers exporting to /dev/null; returns them for shutdown."""
    from opentelemetry import metrics, trace
    from opentelemetry.sdk.metrics import MeterProvider
    from opentelemetry.sdk.metrics.export import ConsoleMetricExporter, PeriodicExportingMetricReader
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor, ConsoleSpanExporter

    # BENCH_OTEL_OUT: a file instead of /dev/null (the smoke test reads the spans back).
    sink = open(os.environ.get("BENCH_OTEL_OUT") or os.devnull, "w")  # noqa: SIM115 - process lifetime
    resource = Resource.create({"service.name": "chaperone-sidecar", "k8s.pod.name": "bench"})
    tracer_provider = TracerProvider(resource=resource)
    tracer_provider.add_span_processor(BatchSpanProcessor(ConsoleSpanExporter(out=sink)))
    reader = PeriodicExportingMetricReader(ConsoleMetricExporter(out=sink),
                                           export_interval_millis=int(os.environ.get(
                                               "OTEL_METRIC_EXPORT_INTERVAL", "10000")))
    meter_provider = MeterProvider(resource=resource, metric_readers=[reader])
    trace.set_tracer_provider(tracer_provider)
    metrics.set_meter_provider(meter_provider)
    return [tracer_provider, meter_provider]


def _s3_recorder(config):
    """The session recorder shipping to the S3 server named by BENCH_S3_* (as injected)."""
    from chaperone_sidecar.recording import Recorder, S3Store, SpoolConfig
    from chaperone_sidecar.recording.events import Identity

    env = os.environ
    store = S3Store(env["BENCH_S3_BUCKET"], prefix=env.get("BENCH_S3_PREFIX", ""),
                    endpoint_url=env["BENCH_S3_ENDPOINT"], region_name=env.get("BENCH_S3_REGION", "us-east-1"),
                    aws_access_key_id=env["BENCH_S3_ACCESS_KEY"],
                    aws_secret_access_key=env["BENCH_S3_SECRET_KEY"])
    identity = Identity(namespace=config.pod_namespace, pod="bench", pod_uid="", service_account="",
                        creator=config.creator)
    return Recorder(SpoolConfig(Path(config.spool_dir)), namespace=config.pod_namespace, pod="bench",
                    identity=identity, store=store)


def run_full(args: argparse.Namespace) -> int:
    from chaperone_sidecar.config import SidecarConfig
    from chaperone_sidecar.logging import configure_logging
    from chaperone_sidecar.proxy import ProxyRuntime
    from chaperone_sidecar.services import build_services

    providers = [] if "telemetry" in args.without else _telemetry()
    config = SidecarConfig.from_files(args.config_dir, port=args.port, health_port=args.health_port)
    configure_logging(config.log_level)

    async def main() -> int:
        services = await build_services(config, recorder=False)
        services.recorder = _s3_recorder(config)
        return await ProxyRuntime(config, services).run()

    try:
        return asyncio.run(main())
    finally:
        for provider in providers:
            provider.shutdown()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--profile", choices=("minimal", "full"), required=True)
    parser.add_argument("--loop", choices=("asyncio", "uvloop"), default="asyncio")
    parser.add_argument("--config-dir", required=True)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--health-port", type=int, required=True)
    parser.add_argument("--without", action="append", default=[], choices=("recording", "masking", "telemetry"),
                        help="full profile minus a feature (recording and masking are in the config directory)")
    args = parser.parse_args(argv)
    if args.loop == "uvloop":
        import uvloop

        asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    if args.profile == "full":
        return run_full(args)
    from chaperone_sidecar.sidecar_cli import main as chaperone_main

    return chaperone_main(["proxy", "--config-dir", args.config_dir, "--port", str(args.port),
                           "--health-port", str(args.health_port)])


if __name__ == "__main__":
    sys.exit(main())
