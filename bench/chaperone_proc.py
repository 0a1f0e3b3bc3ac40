"""Run ``chaperone proxy`` for the benchmark, as a minimal or a full deployment.

``python bench/chaperone_proc.py --profile minimal|full --loop asyncio|uvloop --config-dir D
--port P --health-port H``

* **minimal** is exactly the product's ``chaperone proxy`` command
  (``chaperone_sidecar.sidecar_cli.main(["proxy", ...])``): the config directory holds one
  connection with recording off and a one-rule allow-all policy; telemetry is what the product
  does without an OTLP endpoint (metrics served on ``/metrics``, no span export).
* **full** is the same runtime (:class:`chaperone_sidecar.proxy.ProxyRuntime` with the services
  of :func:`~chaperone_sidecar.services.build_services`) with two things standalone mode does
  not configure by itself, set up here the way the injected sidecar has them:

  - recording shipped to S3 (``AioS3Store`` on the test bed's moto server; bucket, endpoint and
    keys from ``BENCH_S3_*``) instead of a local directory, built like ``services._make_recorder``;
  - the OpenTelemetry SDK as the services build it from ``OTEL_*`` (a ``BatchSpanProcessor``,
    a ``PeriodicExportingMetricReader`` and the ``/metrics`` Prometheus reader) with the
    OTLP/HTTP exporters (the ``otlp`` extra) sending to the bench upstream's OTLP sink - the
    collector stand-in (``BENCH_OTLP_ENDPOINT``).

``--without telemetry`` leaves the SDK out (the ablation that attributes the full profile's
cost). ``--loop`` is the product's own setting (``CHAPERONE_EVENT_LOOP``: uvloop is what the
sidecar picks by default, asyncio the standard loop); both profiles start like ``chaperone
proxy`` does (:func:`chaperone_sidecar.lean_imports.install`, then the chosen loop).

``--report-modules FILE`` (full profile): once the proxy is ready and has idled a second, write
``{"rss": VmRSS bytes, "modules": sorted(sys.modules)}`` to FILE - what an idle sidecar has
loaded, for the idle-RSS analysis in docs/benchmarks.md and for
``tests/sidecar/integration/test_idle_modules.py`` (which heavy libraries stay out until a
connection of their type exists); also the resident bytes of each mapped file (``mappings``) and
the files :mod:`linecache` holds. Under ``PYTHONTRACEMALLOC=1`` the report also holds
``traced``: the bytes Python allocated, by package (``bench/idle_rss.py --tracemalloc``).
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import os
import sys
import threading
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
for _sub in ("sidecar", "operator", "testbed"):
    if str(REPO / _sub) not in sys.path:
        sys.path.insert(0, str(REPO / _sub))


def _telemetry_env(without: bool) -> None:
    """Configure the sidecar's own OpenTelemetry set-up (``build_services`` runs
    :func:`~chaperone_sidecar.telemetry_setup.setup_telemetry` from ``os.environ``, as the
    injected sidecar does) to export over OTLP/HTTP to the bench upstream's sink
    (``BENCH_OTLP_ENDPOINT``), or switch the SDK off (``--without telemetry``, which also turns
    off the ``/metrics`` reader the product always has).
    """
    if without:
        os.environ["OTEL_SDK_DISABLED"] = "true"
        return
    os.environ["OTEL_EXPORTER_OTLP_ENDPOINT"] = os.environ["BENCH_OTLP_ENDPOINT"]


def _s3_recorder(config):
    """The session recorder shipping to the S3 server named by BENCH_S3_* (as injected)."""
    from chaperone_sidecar.recording import Recorder
    from chaperone_sidecar.recording.events import SessionIdentity
    from chaperone_sidecar.recording.s3http import AioS3Store
    from chaperone_sidecar.recording.spool import SpoolConfig

    env = os.environ
    store = AioS3Store(env["BENCH_S3_BUCKET"], prefix=env.get("BENCH_S3_PREFIX", ""),
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

    _telemetry_env("telemetry" in args.without)
    config = SidecarConfig.from_files(args.config_dir, port=args.port, health_port=args.health_port)
    configure_logging(config.log_level)

    async def main() -> int:
        services = await build_services(config, recorder=False)
        services.recorder = _s3_recorder(config)
        runtime = ProxyRuntime(config, services)
        if args.report_modules:
            report = asyncio.get_running_loop().create_task(_report_modules(runtime, Path(args.report_modules)))
        try:
            return await runtime.run()
        finally:
            if args.report_modules:
                report.cancel()

    factory, _ = event_loop_factory(config.event_loop)
    with asyncio.Runner(loop_factory=factory) as runner:
        return runner.run(main())  # the services' closers flush and shut the providers down


async def _report_modules(runtime, out: Path) -> None:
    """Write the idle process's RSS and loaded modules once it is ready (``--report-modules``)."""
    await runtime.ready.wait()
    await asyncio.sleep(1.0)
    rss = next((int(line.split()[1]) * 1024 for line in Path("/proc/self/status").read_text().splitlines()
                if line.startswith("VmRSS:")), 0)
    import linecache

    report: dict = {"rss": rss, "modules": sorted(sys.modules), "order": list(sys.modules),
                    "mappings": _resident_mappings(), "linecache": sorted(linecache.cache),
                    "gc": {"frozen": gc.get_freeze_count()}, "threads": _thread_policies()}
    if os.environ.get("PYTHONTRACEMALLOC"):  # bench/idle_rss.py --tracemalloc
        report["traced"] = _traced_by_package()
    tmp = out.with_suffix(".tmp")
    tmp.write_text(json.dumps(report))
    tmp.replace(out)


def _thread_policies() -> dict[str, str]:
    """Each live thread's scheduling policy by name (``other`` or ``batch``: helper_threads)."""
    names = {os.SCHED_OTHER: "other", os.SCHED_BATCH: "batch"}
    return {t.name: names.get(os.sched_getscheduler(t.native_id), "?") for t in threading.enumerate()
            if t.native_id is not None}


def _resident_mappings(least: int = 256 << 10) -> dict[str, int]:
    """Resident bytes of each mapped file (shared libraries, extension modules) holding at
    least ``least`` (``/proc/self/smaps``)."""
    out: dict[str, int] = {}
    mapping = ""
    for line in Path("/proc/self/smaps").read_text().splitlines():
        parts = line.split()
        if parts and "-" in parts[0] and not parts[0].endswith(":"):
            mapping = parts[5] if len(parts) > 5 and parts[5].startswith("/") else ""
        elif mapping and parts[:1] == ["Rss:"]:
            out[mapping] = out.get(mapping, 0) + int(parts[1]) * 1024
    return {name: size for name, size in out.items() if size >= least}


def _traced_by_package() -> dict[str, int]:
    """Bytes Python allocated and still holds, by where: the top-level package of a third-party
    file, the module path of a chaperone_sidecar file, ``stdlib:<module>`` for the standard
    library. (tracemalloc imports pickle: only imported here, not in the measured process.)"""
    import tracemalloc

    out: dict[str, int] = {}
    for stat in tracemalloc.take_snapshot().statistics("filename"):
        name = stat.traceback[0].filename
        if "site-packages/" in name:
            key = name.split("site-packages/", 1)[1].split("/", 1)[0]
        elif "/chaperone_sidecar/" in name:
            key = "chaperone_sidecar/" + name.split("/chaperone_sidecar/", 1)[1]
        elif "/lib/python3" in name:
            key = "stdlib:" + name.split("/lib/python3", 1)[1].split("/", 2)[1]
        else:
            key = name
        out[key] = out.get(key, 0) + stat.size
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--profile", choices=("minimal", "full"), required=True)
    parser.add_argument("--loop", choices=("asyncio", "uvloop"), default="uvloop")
    parser.add_argument("--config-dir", required=True)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--health-port", type=int, required=True)
    parser.add_argument("--without", action="append", default=[], choices=("recording", "masking", "telemetry"),
                        help="full profile minus a feature (recording and masking are in the config directory)")
    parser.add_argument("--report-modules", default=None, metavar="FILE",
                        help="full profile: write RSS and sys.modules to FILE once ready and idle")
    args = parser.parse_args(argv)
    os.environ["CHAPERONE_EVENT_LOOP"] = args.loop  # read by SidecarConfig.from_files
    if args.profile == "full":
        return run_full(args)
    from chaperone_sidecar.sidecar_cli import main as chaperone_main

    return chaperone_main(["proxy", "--config-dir", args.config_dir, "--port", str(args.port),
                           "--health-port", str(args.health_port)])


if __name__ == "__main__":
    sys.exit(main())
