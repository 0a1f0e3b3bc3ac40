"""ApprovalRequest status and Events derived from the spec and the clock."""

from __future__ import annotations

import datetime as dt

from chaperone_operator.approval_status import decision_events, desired_status

NOW = dt.datetime(2030, 1, 1, 12, 0, 0, tzinfo=dt.timezone.utc)


def obj(**spec) -> dict:
    base = {"requester": {"serviceAccount": "system:serviceaccount:team:agent"},
            "action": {"name": "iam:CreateRole", "summary": "create role x"},
            "approvers": {"groups": ["platform-approvers"]}, "minApprovals": 2,
            "expiresAt": "2030-01-01T12:10:00Z"}
    base.update(spec)
    return {"metadata": {"generation": 3}, "spec": base}


def review(user, decision="Approved"):
    return {"user": user, "decision": decision, "time": "2030-01-01T12:00:00Z"}


def test_pending_then_partial_then_approved():
    pending = desired_status(obj(), NOW)
    assert pending == {"phase": "Pending", "approvals": "0/2", "observedGeneration": 3,
                       "message": "waiting for 2 more approval(s) from groups platform-approvers "
                                  "until 2030-01-01T12:10:00Z"}
    assert decision_events(obj(), None, pending) == [
        ("Normal", "Requested", "system:serviceaccount:team:agent asks to: create role x; "
                                "approvers: groups platform-approvers")]
    partial_obj = obj(reviews=[review("alice")])
    partial = desired_status(partial_obj, NOW)
    assert (partial["phase"], partial["approvals"]) == ("Pending", "1/2")
    assert decision_events(partial_obj, pending, partial) == [("Normal", "Reviewed", "alice approved (1/2)")]
    assert decision_events(partial_obj, partial, partial) == []
    done_obj = obj(reviews=[review("alice"), review("bob")], decision="Approved", decidedBy="bob",
                   decidedAt="2030-01-01T12:01:00Z", reason="ok")
    done = desired_status(done_obj, NOW)
    assert done["phase"] == "Approved" and done["approvals"] == "2/2"
    assert done["message"] == "approved by bob at 2030-01-01T12:01:00Z: ok"
    assert decision_events(done_obj, partial, done) == [("Normal", "Approved", done["message"])]
    # Both reviews arriving between two observations still yield one event each.
    assert [e[1] for e in decision_events(done_obj, pending, done)] == ["Reviewed", "Approved"]


def test_denied_and_expired():
    denied_obj = obj(reviews=[review("alice", "Denied")], decision="Denied", decidedBy="alice",
                     decidedAt="2030-01-01T12:01:00Z")
    denied = desired_status(denied_obj, NOW)
    assert denied["phase"] == "Denied" and denied["approvals"] == "0/2"
    assert decision_events(denied_obj, {"phase": "Pending", "approvals": "0/2"}, denied) == [
        ("Warning", "Denied", "denied by alice at 2030-01-01T12:01:00Z")]
    late = NOW + dt.timedelta(minutes=10)
    expired = desired_status(obj(), late)
    assert expired["phase"] == "Expired"
    assert expired["message"] == "expired at 2030-01-01T12:10:00Z without a decision"
    assert decision_events(obj(), {"phase": "Pending", "approvals": "0/2"}, expired) == [
        ("Warning", "Expired", expired["message"])]
    # A decided request never becomes Expired afterwards.
    assert desired_status(denied_obj, late)["phase"] == "Denied"


def test_deleting_a_pending_request_is_recorded_a_decided_one_is_housekeeping():
    from chaperone_operator.approval_status import deletion_event
    from chaperone_operator.approvals import UserInfo

    kind, reason, message = deletion_event(obj(), NOW)
    assert (kind, reason) == ("Warning", "DeletedPending")
    assert message.startswith("deleted while pending at 2030-01-01T12:00:00Z by an unknown user "
                              "(not seen by admission; see the apiserver audit log) (undecided request "
                              "from system:serviceaccount:team:agent: create role x)")
    deleter = UserInfo("alice", ("platform-approvers", "system:authenticated"))
    _, _, named = deletion_event(obj(), NOW, deleter)
    assert named.startswith("deleted while pending at 2030-01-01T12:00:00Z by alice (groups: "
                            "platform-approvers, system:authenticated) (undecided request from "
                            "system:serviceaccount:team:agent: create role x)")
    assert deletion_event(obj(decision="Denied", decidedBy="alice"), NOW, deleter) is None
    assert deletion_event(obj(decision="Denied", decidedBy="alice"), NOW) is None
    assert deletion_event(obj(), NOW + dt.timedelta(minutes=11)) is None  # expired already
