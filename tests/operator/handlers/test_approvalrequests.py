"""The ApprovalRequest handlers glue the pure rules to kopf: patches, refusals, status, Events."""

from __future__ import annotations

import copy
import datetime as dt
from types import SimpleNamespace

import kopf
import pytest

from chaperone_operator.handlers import approvalrequests as h
from chaperone_operator.main import Runtime
from chaperone_operator.settings import OperatorSettings

NOW = dt.datetime(2030, 1, 1, 12, 0, 0, tzinfo=dt.timezone.utc)
ALICE = {"username": "alice", "groups": ["platform-approvers"]}


def memo(pod=None, **settings):
    runtime = Runtime(OperatorSettings(**settings), injection=None, api=object(), clock=lambda: NOW)
    return SimpleNamespace(runtime=runtime)


def request(**spec) -> dict:
    base = {"requester": {"serviceAccount": "system:serviceaccount:team:agent",
                          "pod": {"namespace": "team", "name": "claude-1"}},
            "approvers": {"groups": ["platform-approvers"]}, "minApprovals": 1,
            "action": {"name": "x", "summary": "do x"},
            "requestedAt": "2030-01-01T11:59:00Z", "expiresAt": "2030-01-01T12:10:00Z"}
    base.update(spec)
    return {"metadata": {"name": "ar", "namespace": "team", "generation": 1}, "spec": base}


def test_mutate_update_stamps_via_kopf_patch():
    old = request()
    new = copy.deepcopy(old)
    new["spec"].update(decision="Approved", decidedBy="mallory")
    patch = kopf.Patch(body=kopf.Body(new))
    h.on_approvalrequest_mutate(operation="UPDATE", body=kopf.Body(new), old=kopf.Body(old),
                                new=kopf.Body(new), userinfo=ALICE, patch=patch, memo=memo())
    ops = {op["path"]: op for op in patch.as_json_patch()}
    assert ops["/spec/decidedBy"]["value"] == "alice"
    assert ops["/spec/reviews"]["value"][0]["user"] == "alice"


def test_mutate_refusal_is_a_403_admission_error():
    old = request()
    new = copy.deepcopy(old)
    new["spec"]["decision"] = "Approved"
    with pytest.raises(kopf.AdmissionError) as err:
        h.on_approvalrequest_mutate(operation="UPDATE", body=kopf.Body(new), old=kopf.Body(old),
                                    new=kopf.Body(new), userinfo={"username": "eve"},
                                    patch=kopf.Patch(body=kopf.Body(new)), memo=memo())
    assert err.value.code == 403 and "eve may not decide this request" in str(err.value)


def test_mutate_create_reads_the_requesting_pod(monkeypatch):
    seen = []
    monkeypatch.setattr(h.kube, "read_pod", lambda api, ns, name: seen.append((ns, name)))
    body = request()
    sidecar = {"username": "system:serviceaccount:team:agent",
               "extra": {"authentication.kubernetes.io/pod-name": ["claude-1"]}}
    with pytest.raises(kopf.AdmissionError, match="does not exist"):
        h.on_approvalrequest_mutate(operation="CREATE", body=kopf.Body(body), old=None,
                                    new=kopf.Body(body), userinfo=sidecar,
                                    patch=kopf.Patch(body=kopf.Body(body)), memo=memo())
    assert seen == [("team", "claude-1")]


def test_validate_rechecks_the_final_object():
    old = request()
    forged = copy.deepcopy(old)
    forged["spec"].update(decision="Approved", decidedBy="alice", decidedAt="2030-01-01T12:00:00Z")
    with pytest.raises(kopf.AdmissionError, match="without a matching stamped review"):
        h.on_approvalrequest_validate(operation="UPDATE", old=kopf.Body(old), new=kopf.Body(forged),
                                      userinfo=ALICE, memo=memo())
    h.on_approvalrequest_validate(operation="UPDATE", old=kopf.Body(old), new=kopf.Body(old),
                                  userinfo=ALICE, memo=memo())


def test_status_event_patches_and_posts_events_once(monkeypatch):
    posted = []
    monkeypatch.setattr(h.kopf, "event", lambda body, **kw: posted.append(kw["reason"]))
    body = request()
    patch = kopf.Patch()
    h.on_approvalrequest_event(type=None, body=kopf.Body(body), status={}, patch=patch, memo=memo())
    assert patch["status"]["phase"] == "Pending" and posted == ["Requested"]
    again = kopf.Patch()
    h.on_approvalrequest_event(type="MODIFIED", body=kopf.Body(body), status=patch["status"],
                               patch=again, memo=memo())
    assert not again and posted == ["Requested"]


def test_pending_filter():
    assert h._pending(body=request())
    assert not h._pending(body=request(decision="Denied"))
    assert not h._pending(body={**request(), "status": {"phase": "Expired"}})
