"""The per-namespace Redis password Secret the operator keeps (namespaces.ensure ->
kube.ensure_secret), against the real apiserver: created, kept in sync, never someone else's
Secret overwritten."""

from __future__ import annotations

import base64
import json
import uuid
from types import SimpleNamespace

import pytest

from chaperone_operator import kube, namespaces
from chaperone_operator.injection.settings import InjectionSettings
from chaperone_operator.settings import OperatorSettings

pytestmark = pytest.mark.controlplane


@pytest.fixture()
def api(control_plane):
    client = control_plane.api_client()
    yield client
    client.close()


def _data(control_plane, ns: str, name: str = "chaperone-redis") -> dict[str, str]:
    secret = json.loads(control_plane.kubectl("get", "secret", name, "-n", ns, "-o", "json").stdout)
    return {k: base64.b64decode(v).decode() for k, v in secret["data"].items()}


class _Log:
    def __init__(self):
        self.lines = []

    def info(self, msg):
        self.lines.append(msg)

    debug = warning = info


def test_the_password_secret_follows_the_operators_settings(control_plane, api):
    ns = f"redis-secret-{uuid.uuid4().hex[:6]}"
    control_plane.create_namespace(ns)
    injection = InjectionSettings(redis_url="rediss://r:6379/0", redis_secret="chaperone-redis",
                                  redis_tls_ca=True)
    runtime = SimpleNamespace(api=api, injection=injection, ensure_ca=None, now=None,
                              settings=OperatorSettings(manage_sidecar_rbac=False, redis_password="pw-1",
                                                        redis_ca_cert="-----BEGIN CERTIFICATE-----\n"))
    log = _Log()
    namespaces.ensure(runtime, ns, [], log)
    assert _data(control_plane, ns) == {"password": "pw-1", "ca.crt": "-----BEGIN CERTIFICATE-----\n"}
    namespaces.ensure(runtime, ns, [], log)  # unchanged: no write
    assert log.lines == [f"Secret {ns}/chaperone-redis created"]
    runtime.settings = OperatorSettings(manage_sidecar_rbac=False, redis_password="pw-2",
                                        redis_ca_cert="-----BEGIN CERTIFICATE-----\n")
    namespaces.ensure(runtime, ns, [], log)  # rotated in the chart's Secret: follows
    assert _data(control_plane, ns)["password"] == "pw-2"
    assert log.lines[-1] == f"Secret {ns}/chaperone-redis updated"
    assert "pw-2" not in repr(runtime.settings)


def test_a_foreign_secret_of_that_name_is_never_overwritten(control_plane, api):
    ns = f"redis-secret-{uuid.uuid4().hex[:6]}"
    control_plane.create_namespace(ns)
    control_plane.kubectl("create", "secret", "generic", "chaperone-redis", "-n", ns,
                          "--from-literal=password=someone-elses")
    labels = namespaces.MANAGED_LABELS
    assert kube.ensure_secret(api, ns, "chaperone-redis", {"password": "pw"}, labels) == "foreign"
    assert _data(control_plane, ns) == {"password": "someone-elses"}
    # No password configured: nothing is written at all.
    assert namespaces.redis_secret_data(OperatorSettings(), InjectionSettings()) is None
