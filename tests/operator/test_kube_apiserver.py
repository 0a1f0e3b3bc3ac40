"""The operator's own API calls (chaperone_operator.kube) against the real apiserver."""

from __future__ import annotations

import subprocess
import uuid

import pytest
import yaml

from chaperone_operator import kube

pytestmark = pytest.mark.controlplane

PEERING_CRD = "clusterkopfpeerings.kopf.dev"


@pytest.fixture()
def api(control_plane):
    client = control_plane.api_client()
    yield client
    client.close()


def test_role_binding_is_created_updated_and_deleted(control_plane, api):
    ns = f"kube-{uuid.uuid4().hex[:6]}"
    control_plane.create_namespace(ns)
    labels = {"app.kubernetes.io/managed-by": "test"}
    assert kube.ensure_role_binding(api, ns, "rb", "view", [], labels) == "unchanged"
    assert kube.ensure_role_binding(api, ns, "rb", "view", ["b", "a", "a"], labels) == "created"
    assert kube.ensure_role_binding(api, ns, "rb", "view", ["a", "b"], labels) == "unchanged"
    assert kube.ensure_role_binding(api, ns, "rb", "view", ["a"], labels) == "updated"
    stored = yaml.safe_load(control_plane.kubectl("get", "rolebinding", "rb", "-n", ns, "-o", "yaml").stdout)
    assert stored["subjects"] == [{"kind": "ServiceAccount", "name": "a", "namespace": ns}]
    assert kube.ensure_role_binding(api, ns, "rb", "view", [], labels) == "deleted"
    assert kube.read_pod(api, ns, "missing") is None and kube.read_secret(api, ns, "missing") is None
    control_plane.kubectl("delete", "namespace", ns, "--wait=false")


def test_cluster_peering_object_needs_its_crd(control_plane, api, helm_bin, repo_root):
    assert control_plane.kubectl("get", "crd", PEERING_CRD, check=False).returncode != 0
    assert kube.ensure_cluster_peering(api, "chaperone-test") is False
    # The peering CRD exactly as the chart renders it for several replicas (operator.peering).
    rendered = subprocess.run([helm_bin, "template", "chaperone", str(repo_root / "charts" / "chaperone"),
                               "--set", "operator.peering.enabled=true", "--show-only", "templates/peering.yaml"],
                              capture_output=True, text=True, check=True).stdout
    crd = next(d for d in yaml.safe_load_all(rendered) if d and d["kind"] == "CustomResourceDefinition")
    control_plane.kubectl("apply", "-f", "-", input=yaml.safe_dump(crd))
    try:
        control_plane.kubectl("wait", "--for=condition=Established", f"crd/{PEERING_CRD}", "--timeout=30s")
        assert kube.ensure_cluster_peering(api, "chaperone-test") is True
        assert kube.ensure_cluster_peering(api, "chaperone-test") is True  # already there
        control_plane.kubectl("get", "clusterkopfpeering", "chaperone-test")
    finally:
        control_plane.kubectl("delete", "crd", PEERING_CRD, "--wait=true")


def test_list_objects_from_cache_reads_the_watch_cache(control_plane, api, crds_installed):
    ns = f"cache-{uuid.uuid4().hex[:6]}"
    control_plane.create_namespace(ns)
    control_plane.kubectl("apply", "-n", ns, "-f", "-", input=yaml.safe_dump({
        "apiVersion": "chaperone.dev/v1alpha1", "kind": "ClaudeConnection",
        "metadata": {"name": "c1"}, "spec": {"type": "anthropic"}}))
    assert [o["metadata"]["name"] for o in kube.list_objects(api, "claudeconnections", ns)] == ["c1"]
    import time
    deadline = time.monotonic() + 10  # the cache is eventually consistent: poll, never sleep blind
    while time.monotonic() < deadline:
        cached = kube.list_objects(api, "claudeconnections", ns, from_cache=True)
        if cached:
            break
        time.sleep(0.05)
    assert [o["metadata"]["name"] for o in cached] == ["c1"]
