"""The pod webhook hands injection's JSONPatch to kopf, or refuses with injection's reason."""

from __future__ import annotations

import datetime as dt
from types import SimpleNamespace

import jsonpatch
import kopf
import pytest

from chaperone_operator.handlers import pods as h
from chaperone_operator.injection.settings import InjectionSettings
from chaperone_operator.main import Runtime
from chaperone_operator.settings import OperatorSettings


def memo():
    return SimpleNamespace(runtime=Runtime(OperatorSettings(), InjectionSettings(), api=object(),
                                           clock=lambda: dt.datetime(2030, 1, 1, tzinfo=dt.timezone.utc)))


def pod(**spec) -> dict:
    return {"apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": "p", "namespace": "team", "labels": {"chaperone.dev/inject": "true"}},
            "spec": {"containers": [{"name": "claude", "image": "c"}], **spec}}


def test_mutate_applies_the_injection_patch(monkeypatch):
    monkeypatch.setattr(h.kube, "list_objects", lambda api, plural, ns, **kw: [])
    body = pod()
    patch = kopf.Patch(body=kopf.Body(body))
    h.on_pod_mutate(body=kopf.Body(body), userinfo={"username": "dave"}, patch=patch, memo=memo())
    mutated = jsonpatch.apply_patch(body, patch.as_json_patch())
    assert "chaperone-sidecar" in [c["name"] for c in mutated["spec"]["initContainers"]]
    assert mutated["spec"]["automountServiceAccountToken"] is False


def test_mutate_refuses_what_injection_refuses(monkeypatch):
    monkeypatch.setattr(h.kube, "list_objects", lambda api, plural, ns, **kw: [])
    body = pod(hostNetwork=True)
    with pytest.raises(kopf.AdmissionError, match="Chaperone cannot inject this pod: spec.hostNetwork"):
        h.on_pod_mutate(body=kopf.Body(body), userinfo={}, patch=kopf.Patch(body=kopf.Body(body)),
                        memo=memo())


def test_pod_events_reconcile_the_namespace_on_arrival_and_departure_only(monkeypatch):
    calls = []
    monkeypatch.setattr(h.kube, "list_pods", lambda api, ns, sel: [])
    monkeypatch.setattr(h.kube, "list_objects", lambda api, plural, ns: [
        {"metadata": {"name": "c"}, "status": {"injectedPods": 1}}])
    monkeypatch.setattr(h.kube, "patch_status", lambda api, plural, ns, name, status: calls.append(status))
    monkeypatch.setattr(h.namespaces, "ensure", lambda runtime, ns, pods, logger: calls.append(ns))
    running = {"metadata": {"namespace": "team"}, "status": {"phase": "Running"}}
    h.on_pod_event(type="MODIFIED", body=running, memo=memo(), logger=None)
    assert calls == []
    h.on_pod_event(type="DELETED", body=running, memo=memo(), logger=None)
    assert calls == ["team", {"injectedPods": 0}]


def test_mutate_lists_connections_from_the_watch_cache(monkeypatch):
    """resourceVersion=0: pod admission must not wait for a quorum read of etcd (bench/)."""
    calls = []
    monkeypatch.setattr(h.kube, "list_objects",
                        lambda api, plural, ns, **kw: calls.append((plural, ns, kw)) or [])
    body = pod()
    h.on_pod_mutate(body=kopf.Body(body), userinfo={"username": "dave"},
                    patch=kopf.Patch(body=kopf.Body(body)), memo=memo())
    assert calls == [("claudeconnections", "team", {"from_cache": True})]
