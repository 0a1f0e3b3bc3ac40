"""The control plane behaves like a real cluster: authn personas, RBAC, TokenRequest, admission.

These pin down what every higher-level Chaperone test relies on, so a broken test bed shows up
here, named, instead of as a confusing operator or webhook failure.
"""

from __future__ import annotations

import json
import subprocess
import time
import uuid

import pytest

from chaperone_testbed.controlplane import KubectlError

pytestmark = pytest.mark.controlplane


def _ns(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


def _whoami(cp, user) -> dict:
    return json.loads(cp.kubectl("auth", "whoami", "-o", "json", user=user).stdout)["status"][
        "userInfo"
    ]


def test_apiserver_ready_and_versioned(control_plane):
    status, _ = control_plane.api("GET", "/readyz")
    assert status == 200
    assert control_plane.kubectl("get", "--raw", "/readyz").stdout.strip() == "ok"
    version = json.loads(control_plane.kubectl("version", "-o", "json").stdout)
    assert version["serverVersion"]["gitVersion"] == "v1.33.13"
    assert control_plane.url.startswith("https://127.0.0.1:")
    assert control_plane.ca_path.is_file() and control_plane.kubeconfig_path.is_file()


@pytest.mark.parametrize(
    "context, username, group",
    [
        ("admin", "admin", "system:masters"),
        ("approver", "alice", "platform-approvers"),
        ("approver2", "bob", "platform-approvers"),
        ("developer", "dave", "developers"),
    ],
)
def test_whoami_per_persona(control_plane, context, username, group):
    info = _whoami(control_plane, context)
    assert info["username"] == username
    assert set(info["groups"]) == {group, "system:authenticated"}


def test_rbac_is_enforced(control_plane):
    denied = control_plane.kubectl(
        "get", "secrets", "-n", "kube-system", user="developer", check=False
    )
    assert denied.returncode != 0
    assert "forbidden" in denied.stderr.lower()
    assert 'User "dave"' in denied.stderr
    # check=True surfaces the same refusal as an exception that carries kubectl's stderr.
    with pytest.raises(KubectlError, match="forbidden"):
        control_plane.kubectl("get", "secrets", "-n", "kube-system", user="approver")
    control_plane.kubectl("get", "secrets", "-n", "kube-system", user="admin")


def test_serviceaccount_kubeconfig_is_who_it_claims(control_plane):
    ns = _ns("tb-sa")
    ref = control_plane.serviceaccount_kubeconfig(ns, "agent")
    info = _whoami(control_plane, ref)
    assert info["username"] == f"system:serviceaccount:{ns}:agent"
    assert {"system:serviceaccounts", f"system:serviceaccounts:{ns}"} <= set(info["groups"])
    # The file stands alone (current-context set): what a child process given KUBECONFIG sees.
    res = subprocess.run(
        [control_plane.kubectl_binary, "auth", "whoami", "-o", "json"],
        # HOME inside the workdir: kubectl's HTTP cache must not land in ~ (or in cwd).
        env={"PATH": "/usr/bin:/bin", "HOME": str(control_plane.workdir), **ref.env()},
        capture_output=True, text=True, check=True,
    )
    assert json.loads(res.stdout)["status"]["userInfo"]["username"] == info["username"]
    # A fresh ServiceAccount has no grants: RBAC applies to tokens as to certificates.
    denied = control_plane.kubectl("get", "pods", "-n", ns, user=ref, check=False)
    assert denied.returncode != 0 and "forbidden" in denied.stderr.lower()
    # Idempotent: a second call reuses the ServiceAccount and mints a new token.
    again = control_plane.serviceaccount_kubeconfig(ns, "agent")
    assert _whoami(control_plane, again)["username"] == info["username"]


def test_pod_create_and_read_back(control_plane):
    from kubernetes import client

    ns = _ns("tb-pod")
    control_plane.create_namespace(ns)
    pod = {
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": "web", "namespace": ns, "labels": {"app": "web"}},
        "spec": {"containers": [{"name": "app", "image": "registry.invalid/app:1"}]},
    }
    control_plane.kubectl("apply", "-f", "-", input=json.dumps(pod))
    api = client.CoreV1Api(control_plane.admin_client())
    got = api.read_namespaced_pod("web", ns)
    assert got.metadata.labels == {"app": "web"}
    assert got.spec.containers[0].image == "registry.invalid/app:1"
    # The ServiceAccount admission plugin ran (it is enabled) and found the default SA.
    assert got.spec.service_account_name == "default"
    assert any(v.name.startswith("kube-api-access-") for v in got.spec.volumes)
    assert got.status.phase == "Pending"  # nothing schedules or runs pods here


def test_namespace_lifecycle_without_controller_manager(control_plane):
    ns = _ns("tb-life")
    control_plane.kubectl("create", "namespace", ns)
    # The emulated serviceaccount/root-ca controllers populate a namespace made by anyone.
    deadline = time.monotonic() + 10
    while control_plane.kubectl("get", "sa", "default", "-n", ns, check=False).returncode:
        assert time.monotonic() < deadline, "default ServiceAccount never appeared"
        time.sleep(0.2)
    control_plane.kubectl("get", "configmap", "kube-root-ca.crt", "-n", ns)
    control_plane.kubectl("create", "configmap", "x", "-n", ns, "--from-literal=a=b")
    # ...and the emulated namespace controller lets deletion finish instead of hanging.
    control_plane.kubectl("delete", "namespace", ns, "--timeout=30s")
    gone = control_plane.kubectl("get", "namespace", ns, check=False)
    assert gone.returncode != 0 and "NotFound" in gone.stderr
