"""Which service accounts get the sidecar role, and the upstream-CA check."""

from __future__ import annotations

from chaperone_operator import namespaces


def pod(sa=None, injected=True, phase="Pending", deleting=False):
    meta = {"annotations": {"chaperone.dev/status": "{}"} if injected else {}}
    if deleting:
        meta["deletionTimestamp"] = "2030-01-01T00:00:00Z"
    return {"metadata": meta, "spec": {"serviceAccountName": sa} if sa else {}, "status": {"phase": phase}}


def test_sidecar_service_accounts_are_those_of_live_injected_pods():
    pods = [pod("claude"), pod(), pod("spoofed", injected=False), pod("done", phase="Failed"),
            pod("gone", deleting=True), pod("claude")]
    assert namespaces.sidecar_service_accounts(pods) == {"claude", "default"}


def test_upstream_ca_found(monkeypatch):
    store = {("ConfigMap", "ca"): {"data": {"ca.crt": "x"}}, ("Secret", "sec"): {"data": {"k": "eA=="}}}
    monkeypatch.setattr(namespaces.kube, "read_configmap", lambda api, ns, n: store.get(("ConfigMap", n)))
    monkeypatch.setattr(namespaces.kube, "read_secret", lambda api, ns, n: store.get(("Secret", n)))
    assert namespaces.upstream_ca_found(None, "ns", None)
    assert namespaces.upstream_ca_found(None, "ns", {"name": "ca", "key": "ca.crt"})
    assert not namespaces.upstream_ca_found(None, "ns", {"name": "ca", "key": "other"})
    assert namespaces.upstream_ca_found(None, "ns", {"kind": "Secret", "name": "sec", "key": "k"})
    assert not namespaces.upstream_ca_found(None, "ns", {"kind": "Secret", "name": "missing", "key": "k"})
