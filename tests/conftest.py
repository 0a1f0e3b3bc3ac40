"""Shared pytest fixtures: the real test bed (control plane, Redis, S3), one per session.

Rule: a component that cannot start FAILS the run (pytest.fail), it is never skipped. A skipped
integration test reads as green in CI while testing nothing; under CI=true that is a hard
requirement, and locally failing loudly is just as useful.
"""

from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path

import pytest
from hypothesis import settings

REPO_ROOT = Path(__file__).resolve().parent.parent

if importlib.util.find_spec("chaperone_testbed") is None:  # not pip-installed: the source tree
    sys.path.insert(0, str(REPO_ROOT / "testbed"))

from chaperone_testbed.controlplane import ControlPlane  # noqa: E402 - after the sys.path fallback
from chaperone_testbed.services import RedisServer, S3Server, TestbedError  # noqa: E402

IN_CI = os.environ.get("CI", "").lower() == "true"

# Property tests (hypothesis): under CI every run draws the same examples (derandomize), so
# whether a change lands does not depend on which random examples a run happened to draw - two
# masking bugs were found that way and blocked an unrelated landing. New examples are drawn by
# local runs (random by default) and by `make fuzz` (several seeds over the property tests);
# a bug found there becomes an explicit regression test.
settings.register_profile("ci", derandomize=True)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE") or ("ci" if IN_CI else "default"))


def _start(component, what: str):
    try:
        return component.start()
    except TestbedError as exc:
        error = exc  # fail outside the except block: no "during handling..." chain in reports
    getattr(component, "close", component.stop)()  # remove its temp dir (the log tail is in error)
    where = " (CI=true: missing infrastructure is a failure)" if IN_CI else ""
    pytest.fail(f"test bed: {what} could not start{where}:\n{error}", pytrace=False)


@pytest.fixture(scope="session")
def repo_root() -> Path:
    return REPO_ROOT


@pytest.fixture(scope="session")
def control_plane(repo_root):
    cp = ControlPlane(build_script=repo_root / "hack" / "build-control-plane.sh")
    yield _start(cp, "control plane (etcd + kube-apiserver)")
    cp.stop()


@pytest.fixture(scope="session")
def redis_server():
    server = RedisServer()
    yield _start(server, "redis-server")
    server.close()


@pytest.fixture(scope="session")
def postgres_server():
    """A real PostgreSQL server (Debian package; SCRAM logins, TLS): the postgres connection's
    upstream. Missing binaries fail the run like any other component."""
    from chaperone_testbed.postgres import PostgresServer

    server = PostgresServer()
    yield _start(server, "PostgreSQL server")
    server.close()


@pytest.fixture(scope="session")
def s3_server():
    server = S3Server()
    yield _start(server, "S3 (moto) server")
    server.close()


CRD_NAMES = ("claudeconnections.chaperone.dev", "accesspolicies.chaperone.dev",
             "approvalrequests.chaperone.dev")


@pytest.fixture(scope="session")
def crds_installed(control_plane, repo_root):
    """The chaperone.dev CRDs from crds/ (the single source), applied, Established and serving.

    `kubectl wait` fails outright when a CRD has no status yet, and a just-established CRD can
    still answer 429 "storage is (re)initializing": poll both until the kinds can be listed.
    """
    import time

    control_plane.kubectl("apply", "-f", str(repo_root / "crds"))
    deadline = time.monotonic() + 60
    pending = set(CRD_NAMES)
    while pending and time.monotonic() < deadline:
        for name in sorted(pending):
            status, crd = control_plane.api(
                "GET", f"/apis/apiextensions.k8s.io/v1/customresourcedefinitions/{name}")
            conditions = (crd.get("status") or {}).get("conditions") or [] if status == 200 else []
            established = any(c.get("type") == "Established" and c.get("status") == "True"
                              for c in conditions)
            plural = name.split(".", 1)[0]
            if established and control_plane.api(
                    "GET", f"/apis/chaperone.dev/v1alpha1/{plural}?limit=1")[0] == 200:
                pending.discard(name)
        if pending:
            time.sleep(0.2)
    if pending:
        pytest.fail(f"CRDs not serving after 60s: {sorted(pending)}", pytrace=False)
    return repo_root / "crds"
