"""What an idle sidecar has loaded (issue 16: idle RSS): per-protocol libraries stay out of a
pod until a connection of their type exists.

A real sidecar process of the benchmark's full profile (bench/chaperone_proc.py: the runtime
and services of ``chaperone proxy``, 50-rule policy with AWS action rules, masking with every
detector, recording shipped to the test bed's S3 server, telemetry exported over OTLP/HTTP)
reports ``sys.modules`` once it is ready and idle (``--report-modules``). Before issue 16 it
held botocore (loader and signer), pglast, scramp and asn1crypto whatever its connections were.
With a postgres and an aws connection in the same config they are loaded - the loading point
works (the first postgres/aws flows themselves: test_postgres.py, test_clients.py).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[3]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from bench import chaperone_config, run  # noqa: E402
from chaperone_testbed.services import free_port  # noqa: E402

# top-level packages (and botocore's signer) a pod loads only for a connection of that type
POSTGRES_ONLY = ("pglast", "scramp", "asn1crypto")
AWS_ONLY = ("botocore", "dateutil", "urllib3.contrib.pyopenssl")  # botocore's signer brings the others
ALWAYS_OUT = ("boto3", "s3transfer", "kubernetes", "kopf", "chaperone_operator", "aiohttp", "joserfc")


@pytest.fixture(scope="module")
def bench_env(tmp_path_factory):
    env, closers = run.setup_env(tmp_path_factory.mktemp("idle"), ["chaperone-full"], "asyncio")
    try:
        yield env
    finally:
        for close in reversed(closers):
            close()


def _idle_modules(env, workdir: Path, extra_connections: list[dict] = ()) -> set[str]:
    conf = chaperone_config.write_config(workdir / "config", "full", upstream_ca=env.upstream.ca_file,
                                         interception_ca_dir=env.ca_dir)
    for conn in extra_connections:
        (conf / "connections" / f"{conn['metadata']['name']}.yaml").write_text(json.dumps(conn))
    report = workdir / "modules.json"
    child_env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "OTEL_", "CHAPERONE_"))}
    child_env.update(
        PYTHONPATH=os.pathsep.join(str(REPO / p) for p in ("sidecar", "operator", "testbed", "")),
        BENCH_S3_BUCKET=env.s3_bucket, BENCH_S3_PREFIX="idle/", BENCH_S3_ENDPOINT=env.s3.endpoint_url,
        BENCH_S3_REGION=env.s3.region, BENCH_S3_ACCESS_KEY=env.s3.access_key,
        BENCH_S3_SECRET_KEY=env.s3.secret_key, BENCH_OTLP_ENDPOINT=env.upstream.otlp_endpoint)
    log = (workdir / "sidecar.log").open("w")
    proc = subprocess.Popen([sys.executable, str(REPO / "bench" / "chaperone_proc.py"), "--profile", "full",
                             "--config-dir", str(conf), "--port", str(free_port()),
                             "--health-port", str(free_port()), "--report-modules", str(report)],
                            env=child_env, stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 60
        while not report.exists():
            assert proc.poll() is None, (workdir / "sidecar.log").read_text()[-3000:]
            assert time.monotonic() < deadline, "no module report within 60 s"
            time.sleep(0.2)
        modules = set(json.loads(report.read_text())["modules"])
    finally:
        proc.send_signal(signal.SIGTERM)
        code = proc.wait(30)
        log.close()
    assert code == 0, (workdir / "sidecar.log").read_text()[-3000:]
    return modules


def _loaded(modules: set[str], names: tuple[str, ...]) -> list[str]:
    return sorted(n for n in names if n in modules)


def test_idle_full_profile_loads_no_protocol_library_it_has_no_connection_for(bench_env, tmp_path):
    modules = _idle_modules(bench_env, tmp_path)
    assert "chaperone_sidecar.addons.mask" in modules and "chaperone_sidecar.postgres.server" in modules
    assert _loaded(modules, POSTGRES_ONLY + AWS_ONLY + ALWAYS_OUT) == []
    assert not any(m.startswith(("botocore.", "pglast.")) for m in modules)
    assert "chaperone_sidecar.postgres.engine" not in modules
    assert "chaperone_sidecar.credentials.aws_sigv4" not in modules
    assert _loaded(modules, ("requests", "google.protobuf")) == []  # OTLP export: otlp_http, otlp_wire


def test_a_postgres_and_an_aws_connection_load_their_engines(bench_env, tmp_path):
    api = chaperone_config.API
    pg = {"apiVersion": api, "kind": "ClaudeConnection", "metadata": {"name": "db"},
          "spec": {"type": "postgres", "postgres": {"host": "127.0.0.1", "port": free_port(), "database": "d",
                                                   "user": "u", "listenPort": free_port()}}}
    aws = {"apiVersion": api, "kind": "ClaudeConnection", "metadata": {"name": "cloud"},
           "spec": {"type": "aws", "hosts": ["*.amazonaws.com"], "aws": {"region": "us-east-1"}}}
    modules = _idle_modules(bench_env, tmp_path, [pg, aws])
    assert _loaded(modules, POSTGRES_ONLY + AWS_ONLY) == sorted(POSTGRES_ONLY + AWS_ONLY)
    assert {"chaperone_sidecar.postgres.engine", "chaperone_sidecar.credentials.aws_sigv4",
            "botocore.auth"} <= modules
    assert _loaded(modules, ALWAYS_OUT) == []
