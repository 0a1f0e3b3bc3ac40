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
  - the OpenTelemetry SDK as ``setup_telemetry`` builds it from ``OTEL_*`` (a
    ``BatchSpanProcessor`` and a ``PeriodicExportingMetricReader``) with the OTLP/HTTP
    exporters (the ``otlp`` extra) sending to the bench upstream's OTLP sink - the collector
    stand-in (``BENCH_OTLP_ENDPOINT``).

``--without telemetry`` leaves the SDK out (the ablation that attributes the full profile's
cost). ``--loop`` is the product's own setting (``CHAPERONE_EVENT_LOOP``: uvloop is what the
sidecar picks by default, asyncio the standard loop); both profiles start like ``chaperone
proxy`` does (:func:`chaperone_sidecar.lean_imports.install`, then the chosen loop).
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
    """The sidecar's own OpenTelemetry set-up (:func:`~chaperone_sidecar.telemetry_setup.
    setup_telemetry`, as the injected sidecar runs it) exporting over OTLP/HTTP to the bench
    upstream's sink (``BENCH_OTLP_ENDPOINT``); returns the providers for shutdown.

    A missing OTLP exporter package is an error, not a silent no-op: "full" would otherwise
    measure the API's no-op tracer.
    """
    from chaperone_sidecar.telemetry_setup import setup_telemetry

    env = {**os.environ, "OTEL_EXPORTER_OTLP_ENDPOINT": os.environ["BENCH_OTLP_ENDPOINT"]}
    setup = setup_telemetry(env, attributes={"k8s.pod.name": "bench", "k8s.namespace.name": "bench"})
    if setup.tracer_provider is None or setup.meter_provider is None:
        raise SystemExit(f"chaperone-full needs OTLP export: {'; '.join(setup.notes)}")
    return [setup.tracer_provider, setup.meter_provider]


def _s3_recorder(config):
    """The session recorder shipping to the S3 server named by BENCH_S3_* (as injected)."""
    from chaperone_sidecar.recording import Recorder
    from chaperone_sidecar.recording.events import SessionIdentity
    from chaperone_sidecar.recording.shipper import S3Store
    from chaperone_sidecar.recording.spool import SpoolConfig

    env = os.environ
    store = S3Store(env["BENCH_S3_BUCKET"], prefix=env.get("BENCH_S3_PREFIX", ""),
                    endpoint_url=env["BENCH_S3_ENDPOINT"], region_name=env.get("BENCH_S3_REGION", "us-east-1"),
                    aws_access_key_id=env["BENCH_S3_ACCESS_KEY"],
                    aws_secret_access_key=env["BENCH_S3_SECRET_KEY"])
    identity = SessionIdentity(namespace=config.pod_namespace, pod="bench", pod_uid="", service_account="",
                        creator=config.creator)
    return Recorder(SpoolConfig(Path(config.spool_dir)), namespace=config.pod_namespace, pod="bench",
                    identity=identity, store=store)


def run_full(args: argparse.Namespace) -> int:
    from chaperone_sidecar import lean_imports

    lean_imports.install()  # first, as chaperone_sidecar.proxy.run does
    from chaperone_sidecar.config import SidecarConfig
    from chaperone_sidecar.log_setup import configure_logging
    from chaperone_sidecar.proxy import ProxyRuntime, event_loop_factory
    from chaperone_sidecar.services import build_services

    providers = [] if "telemetry" in args.without else _telemetry()
    config = SidecarConfig.from_files(args.config_dir, port=args.port, health_port=args.health_port)
    configure_logging(config.log_level)

    async def main() -> int:
        services = await build_services(config, recorder=False)
        services.recorder = _s3_recorder(config)
        return await ProxyRuntime(config, services).run()

    factory, _ = event_loop_factory(config.event_loop)
    try:
        with asyncio.Runner(loop_factory=factory) as runner:
            return runner.run(main())
    finally:
        for provider in providers:
            provider.shutdown()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--profile", choices=("minimal", "full"), required=True)
    parser.add_argument("--loop", choices=("asyncio", "uvloop"), default="uvloop")
    parser.add_argument("--config-dir", required=True)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--health-port", type=int, required=True)
    parser.add_argument("--without", action="append", default=[], choices=("recording", "masking", "telemetry"),
                        help="full profile minus a feature (recording and masking are in the config directory)")
    args = parser.parse_args(argv)
    os.environ["CHAPERONE_EVENT_LOOP"] = args.loop  # read by SidecarConfig.from_files
    if args.profile == "full":
        return run_full(args)
    from chaperone_sidecar.sidecar_cli import main as chaperone_main

    return chaperone_main(["proxy", "--config-dir", args.config_dir, "--port", str(args.port),
                           "--health-port", str(args.health_port)])


if __name__ == "__main__":
    sys.exit(main())
