"""The pure ApprovalRequest admission rules: who may create, who may decide, what is stamped."""

from __future__ import annotations

import copy
import datetime as dt
import json

import jsonpatch
import pytest

from chaperone_operator.approvals import (
    SidecarIdentityRule, UserInfo, Verdict, admit_create, admit_update,
    recheck, self_approval,
)
from chaperone_sidecar.timefmt import format_rfc3339, parse_rfc3339

NOW = dt.datetime(2030, 1, 1, 12, 0, 0, tzinfo=dt.timezone.utc)
SA = "system:serviceaccount:team:agent"
POD_UID = "11111111-2222-3333-4444-555555555555"
SIDECAR = UserInfo(SA, ("system:serviceaccounts", "system:serviceaccounts:team", "system:authenticated"),
                   {"authentication.kubernetes.io/pod-name": ("claude-1",),
                    "authentication.kubernetes.io/pod-uid": (POD_UID,)})
ALICE = UserInfo("alice", ("platform-approvers", "system:authenticated"))
BOB = UserInfo("bob", ("platform-approvers", "system:authenticated"))
CAROL = UserInfo("carol", ("sre", "system:authenticated"))
DAVE = UserInfo("dave", ("developers", "system:authenticated"))


def request(**spec_overrides) -> dict:
    spec = {
        "requester": {"serviceAccount": SA, "pod": {"namespace": "team", "name": "claude-1"},
                      "creator": "dave"},
        "connection": "aws", "action": {"name": "iam:CreateRole", "summary": "create role x"},
        "requestDigest": "sha256:" + "0" * 64, "rule": {"policy": "team/p", "name": "r"},
        "approvers": {"groups": ["platform-approvers"], "users": ["carol"]},
        "minApprovals": 1, "grant": {"scope": "exact", "ttlSeconds": 900},
        "requestedAt": "2030-01-01T11:59:00Z", "expiresAt": "2030-01-01T12:10:00Z",
    }
    spec.update(spec_overrides)
    return {"apiVersion": "chaperone.dev/v1alpha1", "kind": "ApprovalRequest",
            "metadata": {"name": "ar-1", "namespace": "team", "generation": 1}, "spec": spec}


def injected_pod(**meta) -> dict:
    pod = {"metadata": {"name": "claude-1", "namespace": "team", "uid": POD_UID,
                        "annotations": {"chaperone.dev/status": "{}",
                                        "chaperone.dev/creator": json.dumps({"username": "dave"})}},
           "spec": {"serviceAccountName": "agent"}}
    pod["metadata"].update(meta)
    return pod


def applied(obj: dict, verdict: Verdict) -> dict:
    assert verdict.allowed, verdict.message
    return jsonpatch.apply_patch(obj, list(verdict.patch))


def decide(obj: dict, user: UserInfo, decision: str = "Approved", now=NOW, **extra) -> Verdict:
    new = copy.deepcopy(obj)
    new["spec"].update(decision=decision, **extra)
    return admit_update(obj, new, user, now)


# ---------------------------------------------------------------------------- CREATE

def test_sidecar_of_an_injected_pod_may_create_and_gets_uid_and_creator_stamped():
    obj = request()
    obj["spec"]["requester"]["creator"] = "someone-else"
    verdict = admit_create(obj, SIDECAR, NOW, pod=injected_pod())
    out = applied(obj, verdict)
    assert out["spec"]["requester"]["pod"]["uid"] == POD_UID
    assert out["spec"]["requester"]["creator"] == "dave"


@pytest.mark.parametrize("user, message", [
    (DAVE, "only Chaperone sidecars may create ApprovalRequests: 'dave' is not a service account"),
    (UserInfo("system:serviceaccount:other:agent"), "belongs to namespace 'other'"),
    (UserInfo("system:serviceaccount:team:other-sa", extra=SIDECAR.extra),
     "spec.requester.serviceAccount must be the creating identity"),
])
def test_create_by_anyone_but_the_requesting_sidecar_is_refused(user, message):
    verdict = admit_create(request(), user, NOW, pod=injected_pod())
    assert not verdict.allowed and message in verdict.message


def test_create_needs_a_pod_bound_token_for_the_named_pod():
    unbound = UserInfo(SA, SIDECAR.groups)
    assert "did not authenticate with a pod-bound token" in admit_create(
        request(), unbound, NOW, pod=injected_pod()).message
    obj = request()
    obj["spec"]["requester"]["pod"]["name"] = "claude-2"
    assert "is not the pod the token is bound to ('claude-1')" in admit_create(
        obj, SIDECAR, NOW, pod=injected_pod()).message
    obj = request()
    obj["spec"]["requester"]["pod"]["uid"] = "other"
    assert "is not the uid of the pod the token is bound to" in admit_create(
        obj, SIDECAR, NOW, pod=injected_pod()).message


def test_create_needs_an_existing_injected_pod_running_as_the_service_account():
    assert "does not exist" in admit_create(request(), SIDECAR, NOW, pod=None).message
    plain = injected_pod(annotations={})
    assert "is not a Chaperone-injected pod" in admit_create(request(), SIDECAR, NOW, pod=plain).message
    other_sa = injected_pod()
    other_sa["spec"]["serviceAccountName"] = "default"
    assert "runs as service account 'default'" in admit_create(
        request(), SIDECAR, NOW, pod=other_sa).message
    recreated = injected_pod(uid="new-uid")
    assert "has uid 'new-uid'" in admit_create(request(), SIDECAR, NOW, pod=recreated).message


def test_rule_can_relax_pod_checks_for_out_of_cluster_sidecars():
    rule = SidecarIdentityRule(require_pod_bound_token=False, require_injected_pod=False)
    assert admit_create(request(), UserInfo(SA), NOW, rule=rule).allowed


@pytest.mark.parametrize("field", ["decision", "decidedBy", "decidedAt", "reviews", "reason"])
def test_create_with_any_part_of_a_decision_is_refused(field):
    value = [{"user": "x", "decision": "Approved", "time": "2030-01-01T00:00:00Z"}] \
        if field == "reviews" else "Approved"
    verdict = admit_create(request(**{field: value}), SIDECAR, NOW, pod=injected_pod())
    assert not verdict.allowed
    assert f"a new ApprovalRequest must not carry spec.{field}" in verdict.message


def test_create_without_approvers_or_already_expired_is_refused():
    assert "must name at least one user or group" in admit_create(
        request(approvers={}), SIDECAR, NOW, pod=injected_pod()).message
    assert "is not in the future" in admit_create(
        request(expiresAt="2030-01-01T12:00:00Z"), SIDECAR, NOW, pod=injected_pod()).message


def test_create_drops_client_status():
    obj = request()
    obj["status"] = {"phase": "Approved"}
    assert "status" not in applied(obj, admit_create(obj, SIDECAR, NOW, pod=injected_pod()))


# ---------------------------------------------------------------------------- deciding

def test_approval_is_stamped_from_userinfo_overwriting_client_values():
    obj = request()
    forged = dict(decidedBy="mallory", decidedAt="2000-01-01T00:00:00Z", reason="looks fine",
                  reviews=[{"user": "mallory", "decision": "Approved", "time": "2000-01-01T00:00:00Z"}])
    spec = applied(decide_new(obj, **forged), decide(obj, ALICE, **forged))["spec"]
    assert spec["decision"] == "Approved"
    assert spec["decidedBy"] == "alice" and spec["decidedAt"] == "2030-01-01T12:00:00Z"
    assert spec["reason"] == "looks fine"
    assert spec["reviews"] == [{"user": "alice", "groups": list(ALICE.groups), "decision": "Approved",
                                "time": "2030-01-01T12:00:00Z", "reason": "looks fine"}]


def decide_new(obj: dict, decision: str = "Approved", **extra) -> dict:
    new = copy.deepcopy(obj)
    new["spec"].update(decision=decision, **extra)
    return new


def test_approver_named_by_user_and_denial_are_final():
    spec = applied(decide_new(request()), decide(request(), CAROL))["spec"]
    assert spec["decidedBy"] == "carol"
    spec = applied(decide_new(request(), "Denied"), decide(request(), ALICE, "Denied"))["spec"]
    assert spec["decision"] == "Denied" and spec["decidedBy"] == "alice"


def test_two_of_two_first_approval_is_recorded_and_the_decision_removed_again():
    obj = request(minApprovals=2)
    first = applied(decide_new(obj), decide(obj, ALICE))
    assert "decision" not in first["spec"] and "decidedBy" not in first["spec"]
    assert [r["user"] for r in first["spec"]["reviews"]] == ["alice"]
    again = decide(first, ALICE)
    assert not again.allowed and "alice already reviewed this request (Approved at" in again.message
    second = applied(decide_new(first), decide(first, BOB))
    assert second["spec"]["decision"] == "Approved" and second["spec"]["decidedBy"] == "bob"
    assert [r["user"] for r in second["spec"]["reviews"]] == ["alice", "bob"]


def test_one_denial_after_a_partial_approval_is_final():
    obj = request(minApprovals=2)
    first = applied(decide_new(obj), decide(obj, ALICE))
    denied = applied(decide_new(first, "Denied"), decide(first, BOB, "Denied"))
    assert denied["spec"]["decision"] == "Denied" and denied["spec"]["decidedBy"] == "bob"


@pytest.mark.parametrize("user, why", [
    (DAVE, "dave created the requesting pod"),
    (UserInfo(SA), f"{SA} is the requesting pod's service account"),
    (UserInfo("system:serviceaccount:team:sibling", ("system:serviceaccounts:team",)),
     "system:serviceaccount:team:sibling is a service account of the requesting namespace 'team'"),
])
def test_self_approval_is_refused(user, why):
    verdict = decide(request(approvers={"users": [user.username]}), user)
    assert not verdict.allowed
    assert verdict.message == f"{user.username} may not decide this request: self-approval ({why})"


def test_on_behalf_of_user_cannot_approve_even_as_an_approver():
    obj = request()
    obj["spec"]["requester"]["onBehalfOf"] = "alice"
    assert "self-approval (the agent acted on behalf of alice)" in decide(obj, ALICE).message
    assert self_approval(obj["spec"], "team", BOB) is None


def test_user_not_named_by_approvers_is_refused():
    verdict = decide(request(), UserInfo("eve", ("developers",)))
    assert verdict.message == ("eve may not decide this request: not named by spec.approvers "
                               "(users carol; groups platform-approvers)")


def test_final_decision_cannot_change_nor_the_request():
    final = applied(decide_new(request()), decide(request(), ALICE))
    verdict = decide(final, BOB, "Denied")
    assert not verdict.allowed
    assert verdict.message.startswith("this request is final: Approved by alice at 2030-01-01T12:00:00Z")
    touched = copy.deepcopy(final)
    touched["spec"]["sessionID"] = "s2"
    assert "this request is final" in admit_update(final, touched, UserInfo(SA), NOW).message
    # Re-sending the same decision is a no-op (what a late approver's merge patch amounts to).
    assert admit_update(final, copy.deepcopy(final), BOB, NOW) == Verdict.allow()


def test_deciding_at_or_after_expiry_is_refused():
    verdict = decide(request(), ALICE, now=parse_rfc3339("2030-01-01T12:10:00Z"))
    assert verdict.message == ("this request expired at 2030-01-01T12:10:00Z; it can no longer be decided "
                               "(the agent has to ask again)")
    expired = request()
    expired["status"] = {"phase": "Expired"}
    assert "expired" in decide(expired, ALICE).message


def test_invalid_decision_value_and_extra_spec_edits_are_refused():
    assert "spec.decision must be Approved or Denied, got 'Maybe'" in decide(request(), ALICE, "Maybe").message
    verdict = decide(request(), ALICE, grant={"scope": "action", "ttlSeconds": 86400})
    assert verdict.message == ("a decision may only set spec.decision and spec.reason; spec.grant "
                               "changed too")


def test_edits_without_a_decision():
    obj = request()
    forged = copy.deepcopy(obj)
    forged["spec"]["reviews"] = [{"user": "alice", "decision": "Approved", "time": "2030-01-01T12:00:00Z"}]
    assert admit_update(obj, forged, ALICE, NOW).message == (
        "spec.reviews are stamped by admission and cannot be set by clients")
    reason = copy.deepcopy(obj)
    reason["spec"]["reason"] = "x"
    assert "spec.reason can only be given together with spec.decision" in admit_update(
        obj, reason, ALICE, NOW).message
    session = copy.deepcopy(obj)
    session["spec"]["sessionID"] = "s2"
    assert admit_update(obj, session, ALICE, NOW).message == (
        "spec.sessionID cannot change after creation (alice tried): only spec.decision (with "
        "spec.reason) is set later, by an approver")
    assert not admit_update(obj, session, UserInfo(SA), NOW).allowed
    # The requesting sidecar cannot widen what a pending request grants (scope, TTL), nor add
    # a grant to a request opened without one.
    for grant in ({"scope": "action", "ttlSeconds": 900}, {"scope": "exact", "ttlSeconds": 86400}):
        wider = copy.deepcopy(obj)
        wider["spec"]["grant"] = grant
        verdict = admit_update(obj, wider, UserInfo(SA), NOW)
        assert verdict.message == ("spec.grant cannot change after creation (the requesting "
                                   "sidecar tried): only spec.decision (with spec.reason) is set "
                                   "later, by an approver"), grant
    bare = copy.deepcopy(obj)
    del bare["spec"]["grant"]
    assert not admit_update(bare, obj, UserInfo(SA), NOW).allowed
    conn = copy.deepcopy(obj)
    conn["spec"]["connection"] = "other"
    assert "spec.connection cannot change after creation" in admit_update(obj, conn, UserInfo(SA), NOW).message


def test_metadata_only_updates_pass_untouched():
    obj = request()
    new = copy.deepcopy(obj)
    new["metadata"]["finalizers"] = ["chaperone.dev/operator"]
    assert admit_update(obj, new, UserInfo("system:serviceaccount:chaperone-system:op"), NOW) == Verdict.allow()


# ---------------------------------------------------------------------------- recheck

def test_recheck_accepts_what_the_mutation_stamped():
    obj = request(minApprovals=2)
    first = applied(decide_new(obj), decide(obj, ALICE))
    assert recheck("UPDATE", obj, first, ALICE, NOW) is None
    second = applied(decide_new(first), decide(first, BOB))
    assert recheck("UPDATE", first, second, BOB, NOW) is None
    assert recheck("CREATE", None, request(), SIDECAR, NOW) is None


def test_recheck_catches_forgeries_slipped_in_after_mutation():
    obj = request()
    stamped = applied(decide_new(obj), decide(obj, ALICE))
    assert "stamped with the deciding user 'mallory'" in recheck("UPDATE", obj, stamped, UserInfo("mallory"), NOW)
    late = NOW + dt.timedelta(hours=1)
    assert "admission time" in recheck("UPDATE", obj, stamped, ALICE, late)
    forged = copy.deepcopy(stamped)
    forged["spec"]["decidedBy"] = "mallory"
    assert "decidedBy/decidedAt of the deciding user" in recheck("UPDATE", obj, forged, ALICE, NOW)
    no_review = copy.deepcopy(obj)
    no_review["spec"].update(decision="Approved", decidedBy="alice", decidedAt=format_rfc3339(NOW))
    assert "without a matching stamped review" in recheck("UPDATE", obj, no_review, ALICE, NOW)
    rewritten = copy.deepcopy(stamped)
    rewritten["spec"]["reviews"] = []
    assert "append-only" in recheck("UPDATE", stamped, rewritten, ALICE, NOW)
    assert "must not carry spec.decision" in recheck("CREATE", None, request(decision="Approved"), SIDECAR, NOW)


def test_userinfo_from_admission_and_time_helpers():
    info = UserInfo.from_admission({"username": SA, "groups": ["a"], "extra": {"k": ["v"]}})
    assert info.service_account() == ("team", "agent") and info.extra_value("k") == "v"
    assert UserInfo.from_admission(None).service_account() is None
    assert parse_rfc3339("nonsense") is None and format_rfc3339(parse_rfc3339("2030-01-01T12:00:00Z")) == \
        "2030-01-01T12:00:00Z"
