"""What an idle sidecar has loaded (issue 16: idle RSS): per-protocol libraries stay out of a
pod until a connection of their type exists, and what no idle sidecar uses stays out too.

A real sidecar process of the benchmark's full profile (bench/chaperone_proc.py: the runtime
and services of ``chaperone proxy``, 50-rule policy with AWS action rules, masking with every
detector, recording shipped to the test bed's S3 server, telemetry exported over OTLP/HTTP)
reports ``sys.modules`` once it is ready and idle (``--report-modules``). Before issue 16 it
held botocore (loader and signer), pglast, scramp and asn1crypto whatever its connections were.
With a postgres and an aws connection in the same config they are loaded - the loading point
works (the first postgres/aws flows themselves: test_postgres.py, test_clients.py).

Session 5 (docs/benchmarks.md "Idle RSS, session 5"): jsonschema and its dependencies load only
for a policy that does not conform to the CRD (then they do, and the policy's error is worded
as before); mitmproxy's option-file YAML (ruamel) and aioquic's certificate-name check
(service_identity, pyasn1) are deferred by lean_imports; the masking database is compiled in
a child process, so Hyperscan's compiler is not resident; start-up's caches and freed heap are
given back once the proxy is ready (startup_memory). Redis loads only with a Redis URL.
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
ALWAYS_OUT = ("boto3", "s3transfer", "kubernetes", "kopf", "chaperone_operator", "aiohttp", "joserfc", "redis")
# jsonschema: only for a policy that does not conform; the deferred modules' code (lean_imports)
SCHEMA_ERRORS_ONLY = ("jsonschema", "referencing", "rpds", "jsonschema_specifications", "attrs")
OCSF_ONLY = ("chaperone_sidecar.recording.ocsf", "chaperone_sidecar.recording.ocsf_export")
DEFERRED_RUN = ("ruamel.yaml.main", "_ruamel_yaml", "service_identity.cryptography", "pyasn1", "zstandard.backend_c")


@pytest.fixture(scope="module")
def bench_env(tmp_path_factory):
    env, closers = run.setup_env(tmp_path_factory.mktemp("idle"), ["chaperone-full"], "asyncio")
    try:
        yield env
    finally:
        for close in reversed(closers):
            close()


def _idle_modules(env, workdir: Path, extra_connections: list[dict] = ()) -> set[str]:
    return set(_idle_report(env, workdir, extra_connections)["modules"])


def _idle_report(env, workdir: Path, extra_connections: list[dict] = (), extra_policies: list[dict] = (),
                 extra_env: dict[str, str] | None = None) -> dict:
    conf = chaperone_config.write_config(workdir / "config", "full", upstream_ca=env.upstream.ca_file,
                                         interception_ca_dir=env.ca_dir)
    for conn in extra_connections:
        (conf / "connections" / f"{conn['metadata']['name']}.yaml").write_text(json.dumps(conn))
    for pol in extra_policies:
        (conf / "policies" / f"{pol['metadata']['name']}.yaml").write_text(json.dumps(pol))
    report = workdir / "modules.json"
    child_env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "OTEL_", "CHAPERONE_"))}
    child_env.update(
        PYTHONPATH=os.pathsep.join(str(REPO / p) for p in ("sidecar", "operator", "testbed", "")),
        BENCH_S3_BUCKET=env.s3_bucket, BENCH_S3_PREFIX="idle/", BENCH_S3_ENDPOINT=env.s3.endpoint_url,
        BENCH_S3_REGION=env.s3.region, BENCH_S3_ACCESS_KEY=env.s3.access_key,
        BENCH_S3_SECRET_KEY=env.s3.secret_key, BENCH_OTLP_ENDPOINT=env.upstream.otlp_endpoint)
    child_env.update(extra_env or {})
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
        result = json.loads(report.read_text())
    finally:
        proc.send_signal(signal.SIGTERM)
        code = proc.wait(30)
        log.close()
    assert code == 0, (workdir / "sidecar.log").read_text()[-3000:]
    return result


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


@pytest.fixture(scope="module")
def idle_report(bench_env, tmp_path_factory):
    return _idle_report(bench_env, tmp_path_factory.mktemp("idle-report"))


def test_idle_full_profile_runs_no_unused_mitmproxy_dependency(idle_report):
    modules = set(idle_report["modules"])
    assert "mitmproxy.optmanager" in modules and "aioquic.tls" in modules
    assert _loaded(modules, DEFERRED_RUN) == []


def test_idle_full_profile_has_not_got_hyperscans_compiler_resident(idle_report):
    """The masking database is on (every detector), compiled in a child: Hyperscan's scanner
    pages are resident (the system's libhs.so.5 and the wheel's extension, ~1.2 MB), its
    compiler's are not (~5.3 MB)."""
    resident = sum(size for path, size in idle_report["mappings"].items()
                   if "/hyperscan/" in path or "/libhs.so" in path)
    assert 0 < resident < 3 << 20, resident


def test_idle_full_profile_has_given_back_start_up_caches(idle_report):
    """pyparsing's own source, read into linecache while mitmproxy imports it, is dropped."""
    assert idle_report["linecache"] == []


def test_idle_full_profile_froze_its_start_up_heap_out_of_collections(idle_report):
    """startup_memory.release ran once the proxy was ready: what start-up left alive (modules,
    policies, the masking engine: tens of thousands of objects) is in the permanent
    generation, which no collection walks."""
    assert idle_report["gc"]["frozen"] > 20_000, idle_report["gc"]


def test_idle_full_profile_runs_its_helper_threads_under_sched_batch(idle_report):
    """The threads the event loop hands work to (the spool writer: running once recording
    started) yield to it (helper_threads); the event loop's own thread keeps the default."""
    threads = idle_report["threads"]
    assert threads["MainThread"] == "other", threads
    assert threads["chaperone-spool"] == "batch", threads
    assert {name: p for name, p in threads.items() if name.startswith("chaperone")} == \
        {name: "batch" for name in threads if name.startswith("chaperone")}, threads


def test_jsonschema_loads_only_for_a_policy_that_does_not_conform(idle_report, bench_env, tmp_path):
    assert "chaperone_sidecar.policy.schema" in idle_report["modules"]
    assert _loaded(set(idle_report["modules"]), SCHEMA_ERRORS_ONLY) == []
    bad = {"apiVersion": chaperone_config.API, "kind": "AccessPolicy", "metadata": {"name": "bad"},
           "spec": {"connections": [chaperone_config.CONNECTION],
                    "rules": [{"name": "r", "match": {"methods": ["get"]}, "allow": {}}]}}
    report = _idle_report(bench_env, tmp_path, extra_policies=[bad])
    assert _loaded(set(report["modules"]), ("jsonschema", "referencing", "rpds")) == ["jsonschema", "referencing",
                                                                                     "rpds"]
    log = (tmp_path / "sidecar.log").read_text()
    assert "AccessPolicy bench/bad is invalid; its traffic is blocked: spec.rules[0].match.methods[0]: " in log
    assert "must match the regular expression ^[A-Z]+$" in log


def test_the_ocsf_mapping_loads_only_with_a_sink(idle_report, bench_env, tmp_path):
    assert _loaded(set(idle_report["modules"]), OCSF_ONLY) == []
    report = _idle_report(bench_env, tmp_path, extra_env={"CHAPERONE_OCSF_FILE": str(tmp_path / "ocsf.jsonl")})
    assert _loaded(set(report["modules"]), OCSF_ONLY) == sorted(OCSF_ONLY)
