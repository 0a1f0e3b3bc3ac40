"""Admission through the REAL apiserver, with the real kubectl as each test-bed persona.

The operator runs as a process (tests/operator/conftest.py) behind the chart's webhook
configurations. Personas: admin (system:masters), alice and bob (platform-approvers), dave
(developers); the sidecar is the agent pod's service account with a pod-bound token.
"""

from __future__ import annotations

import copy
import datetime as dt
import json
import ssl
import time
import urllib.error
import urllib.request

import pytest

from chaperone_sidecar.policy.compiler import PolicyErrors, compile_policy

pytestmark = pytest.mark.controlplane

AR = "approvalrequests.chaperone.dev"


def ts(delta_seconds: float = 0) -> str:
    when = dt.datetime.now(dt.timezone.utc) + dt.timedelta(seconds=delta_seconds)
    return when.strftime("%Y-%m-%dT%H:%M:%SZ")


# ---------------------------------------------------------------------------- fixtures

@pytest.fixture(scope="module")
def agent(running_operator):
    """A namespace with an injected agent pod created by dave, and its sidecar's identity."""
    op, cp = running_operator, running_operator.cp
    ns = op.namespace("approvals")
    cp.kubectl("create", "serviceaccount", "agent", "-n", ns)
    cp.kubectl("create", "serviceaccount", "helper", "-n", ns)
    # dave may create pods here; dave and the helper SA may also patch requests (so that the
    # webhook, not RBAC, is what refuses their self-approval).
    # (The built-in edit/admin roles are aggregated by kube-controller-manager, absent here.)
    cp.kubectl("create", "role", "pod-creator", "--verb=create,get", "--resource=pods", "-n", ns)
    cp.kubectl("create", "rolebinding", "dave-pods", "--role=pod-creator", "--user=dave", "-n", ns)
    cp.kubectl("create", "rolebinding", "approvers", "--clusterrole=chaperone-approver",
               "--user=dave", f"--serviceaccount={ns}:helper", "-n", ns)
    op.wait_for(lambda: cp.kubectl("auth", "can-i", "create", "pods", "-n", ns, user="developer",
                                   check=False).stdout.strip() == "yes", what="dave's RoleBinding")
    op.create({"apiVersion": "v1", "kind": "Pod",
               "metadata": {"name": "claude-1", "namespace": ns,
                            "labels": {"chaperone.dev/inject": "true"}},
               "spec": {"serviceAccountName": "agent",
                        "containers": [{"name": "claude", "image": "claude-code:test"}]}},
              user="developer")
    pod = op.get("pod", "claude-1", "-n", ns)
    op.wait_for(lambda: _binding_subjects(op, ns) == [{"kind": "ServiceAccount", "name": "agent",
                                                        "namespace": ns}],
                what="the operator to bind chaperone-sidecar to the agent's service account")
    sidecar = op.pod_token_kubeconfig(ns, "agent", "claude-1", pod["metadata"]["uid"])
    return {"ns": ns, "pod": pod, "sidecar": sidecar,
            "helper": cp.serviceaccount_kubeconfig(ns, "helper"),
            "unbound": cp.serviceaccount_kubeconfig(ns, "agent")}


def _binding_subjects(op, ns):
    res = op.cp.kubectl("get", "rolebinding", "chaperone-sidecar", "-n", ns, "-o", "json", check=False)
    return json.loads(res.stdout).get("subjects") if res.returncode == 0 else None


def request(agent, name: str, **spec) -> dict:
    ns = agent["ns"]
    body = {
        "requester": {"serviceAccount": f"system:serviceaccount:{ns}:agent",
                      "pod": {"namespace": ns, "name": "claude-1"}},
        "connection": "aws",
        "action": {"name": "iam:CreateRole", "summary": "iam:CreateRole role/deployer"},
        "requestDigest": "sha256:" + "ab" * 32,
        "rule": {"policy": f"{ns}/aws", "name": "iam-writes"},
        "approvers": {"groups": ["platform-approvers"]},
        "requestedAt": ts(-1), "expiresAt": ts(600),
    }
    body.update(spec)
    return {"apiVersion": "chaperone.dev/v1alpha1", "kind": "ApprovalRequest",
            "metadata": {"name": name, "namespace": ns}, "spec": body}


def open_request(op, agent, name: str, **spec) -> dict:
    op.create(request(agent, name, **spec), user=agent["sidecar"])
    return op.get(AR, name, "-n", agent["ns"])


def patch(op, agent, name: str, spec: dict, user):
    return op.cp.kubectl("patch", AR, name, "-n", agent["ns"], "--type=merge",
                         "-p", json.dumps({"spec": spec}), user=user, check=False)


def refused(res, message: str) -> None:
    assert res.returncode != 0, res.stdout
    assert "denied the request" in res.stderr and message in res.stderr, res.stderr


# ---------------------------------------------------------------------------- pods

def test_labelled_pod_is_injected_and_unlabelled_pod_untouched(running_operator, agent):
    op = running_operator
    injected = agent["pod"]
    inits = [c["name"] for c in injected["spec"].get("initContainers", [])]
    assert "chaperone-sidecar" in inits
    assert "chaperone.dev/status" in injected["metadata"]["annotations"]
    assert json.loads(injected["metadata"]["annotations"]["chaperone.dev/creator"])["username"] == "dave"
    # The agent container gets no API token at all (only the sidecar holds one).
    assert injected["spec"]["automountServiceAccountToken"] is False
    claude = next(c for c in injected["spec"]["containers"] if c["name"] == "claude")
    assert not [m for m in claude.get("volumeMounts", [])
                if m["mountPath"].startswith("/var/run/secrets/kubernetes.io")]
    plain = {"apiVersion": "v1", "kind": "Pod",
             "metadata": {"name": "plain", "namespace": agent["ns"]},
             "spec": {"containers": [{"name": "app", "image": "busybox"}]}}
    op.create(plain)
    stored = op.get("pod", "plain", "-n", agent["ns"])
    assert [c["name"] for c in stored["spec"]["containers"]] == ["app"]
    assert not stored["spec"].get("initContainers")
    assert "chaperone.dev/status" not in (stored["metadata"].get("annotations") or {})


def test_sidecar_rbac_is_exactly_what_it_needs(running_operator, agent):
    cp, ns = running_operator.cp, agent["ns"]

    def can(verb, resource, who=agent["sidecar"]):
        return cp.kubectl("auth", "can-i", verb, resource, "-n", ns, user=who, check=False).stdout.strip()

    for verb in ("create", "get", "list", "watch"):
        assert can(verb, AR) == "yes"
    for resource in ("claudeconnections.chaperone.dev", "accesspolicies.chaperone.dev"):
        assert can("get", resource) == "yes" and can("create", resource) == "no"
    for verb, resource in (("patch", AR), ("delete", AR), ("get", "secrets"), ("create", "pods"),
                           ("get", "pods")):
        assert can(verb, resource) == "no", (verb, resource)
    other = running_operator.namespace("elsewhere")
    assert cp.kubectl("auth", "can-i", "create", AR, "-n", other, user=agent["sidecar"],
                      check=False).stdout.strip() == "no"


def test_unknown_webhook_paths_fail_closed(running_operator):
    """kopf would allow a review for a path that names no handler; the operator answers 404."""
    context = ssl.create_default_context(cafile=str(running_operator.ca_file))
    review = json.dumps({"apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview",
                         "request": {"uid": "1"}}).encode()
    for path in ("/pod-mutat", "/"):
        req = urllib.request.Request(running_operator.url + path, data=review, method="POST",
                                     headers={"Content-Type": "application/json"})
        with pytest.raises(urllib.error.HTTPError) as err:
            urllib.request.urlopen(req, context=context, timeout=10)
        assert err.value.code == 404


# ---------------------------------------------------------------------------- creating requests

def test_sidecar_creates_a_request_stamped_with_pod_uid_and_creator(running_operator, agent):
    ar = open_request(running_operator, agent, "create-ok")
    assert ar["spec"]["requester"]["pod"]["uid"] == agent["pod"]["metadata"]["uid"]
    assert ar["spec"]["requester"]["creator"] == "dave"
    assert "decision" not in ar["spec"] and "reviews" not in ar["spec"]


def test_only_the_sidecar_may_create(running_operator, agent):
    op = running_operator
    refused(op.create(request(agent, "by-admin"), check=False),
            "only Chaperone sidecars may create ApprovalRequests: 'admin' is not a service account")
    by_dave = op.create(request(agent, "by-dave"), user="developer", check=False)
    assert by_dave.returncode != 0 and "forbidden" in by_dave.stderr  # RBAC: approvers never create
    refused(op.create(request(agent, "unbound"), user=agent["unbound"], check=False),
            "did not authenticate with a pod-bound token")
    other_pod = request(agent, "other-pod")
    other_pod["spec"]["requester"]["pod"]["name"] = "claude-2"
    refused(op.create(other_pod, user=agent["sidecar"], check=False),
            "spec.requester.pod.name 'claude-2' is not the pod the token is bound to ('claude-1')")


def test_create_with_a_decision_or_reviews_is_refused(running_operator, agent):
    op = running_operator
    refused(op.create(request(agent, "pre-decided", decision="Approved", decidedBy="alice"),
                      user=agent["sidecar"], check=False),
            "a new ApprovalRequest must not carry spec.decidedBy, spec.decision")
    reviews = [{"user": "alice", "decision": "Approved", "time": ts()}]
    refused(op.create(request(agent, "pre-reviewed", reviews=reviews), user=agent["sidecar"], check=False),
            "a new ApprovalRequest must not carry spec.reviews")


# ---------------------------------------------------------------------------- deciding

def test_alice_approves_and_is_stamped_even_when_claiming_to_be_mallory(running_operator, agent):
    op = running_operator
    open_request(op, agent, "approve-1")
    res = patch(op, agent, "approve-1", {"decision": "Approved", "decidedBy": "mallory",
                                         "decidedAt": "2000-01-01T00:00:00Z", "reason": "ok"},
                user="approver")
    assert res.returncode == 0, res.stderr
    spec = op.get(AR, "approve-1", "-n", agent["ns"])["spec"]
    assert spec["decision"] == "Approved" and spec["decidedBy"] == "alice"
    assert spec["decidedAt"] != "2000-01-01T00:00:00Z"
    assert [(r["user"], r["decision"], r.get("reason")) for r in spec["reviews"]] == [
        ("alice", "Approved", "ok")]
    assert "platform-approvers" in spec["reviews"][0]["groups"]
    # changing a final decision
    refused(patch(op, agent, "approve-1", {"decision": "Denied"}, user="approver2"),
            "this request is final: Approved by alice")
    status = op.wait_for(lambda: (s := op.get(AR, "approve-1", "-n", agent["ns"]).get("status", {}))
                         .get("phase") == "Approved" and s, what="status Approved")
    assert status["approvals"] == "1/1" and status["message"].startswith("approved by alice at ")

    def events():
        items = op.get("events", "-n", agent["ns"], "--field-selector",
                       "involvedObject.name=approve-1")["items"]
        return {e["reason"]: e["message"] for e in items} if len(items) >= 2 else None

    seen = op.wait_for(events, what="Requested and Approved events")
    assert seen["Approved"].startswith("approved by alice at ") and "Requested" in seen


def test_two_of_two_alice_then_bob(running_operator, agent):
    op, ns = running_operator, agent["ns"]
    open_request(op, agent, "two-of-two", minApprovals=2)
    assert patch(op, agent, "two-of-two", {"decision": "Approved"}, user="approver").returncode == 0
    spec = op.get(AR, "two-of-two", "-n", ns)["spec"]
    assert "decision" not in spec and [r["user"] for r in spec["reviews"]] == ["alice"]
    op.wait_for(lambda: op.get(AR, "two-of-two", "-n", ns).get("status", {}).get("approvals") == "1/2",
                what="status 1/2")
    refused(patch(op, agent, "two-of-two", {"decision": "Approved"}, user="approver"),
            "alice already reviewed this request (Approved at")
    assert patch(op, agent, "two-of-two", {"decision": "Approved"}, user="approver2").returncode == 0
    spec = op.get(AR, "two-of-two", "-n", ns)["spec"]
    assert spec["decision"] == "Approved" and spec["decidedBy"] == "bob"
    assert [r["user"] for r in spec["reviews"]] == ["alice", "bob"]
    status = op.wait_for(lambda: (s := op.get(AR, "two-of-two", "-n", ns).get("status", {}))
                         .get("phase") == "Approved" and s, what="status Approved 2/2")
    assert status["approvals"] == "2/2"


def test_self_approval_is_refused(running_operator, agent):
    op = running_operator
    open_request(op, agent, "self", approvers={"users": ["dave", f"system:serviceaccount:{agent['ns']}:helper"]})
    refused(patch(op, agent, "self", {"decision": "Approved"}, user="developer"),
            "dave may not decide this request: self-approval (dave created the requesting pod)")
    refused(patch(op, agent, "self", {"decision": "Approved"}, user=agent["helper"]),
            f"system:serviceaccount:{agent['ns']}:helper may not decide this request: self-approval "
            f"(system:serviceaccount:{agent['ns']}:helper is a service account of the requesting namespace")
    on_behalf = request(agent, "on-behalf")
    on_behalf["spec"]["requester"]["onBehalfOf"] = "alice"
    op.create(on_behalf, user=agent["sidecar"])
    refused(patch(op, agent, "on-behalf", {"decision": "Approved"}, user="approver"),
            "alice may not decide this request: self-approval (the agent acted on behalf of alice)")
    assert patch(op, agent, "on-behalf", {"decision": "Approved"}, user="approver2").returncode == 0
    # The agent's own identity has no patch right at all (RBAC refuses before admission).
    own = patch(op, agent, "self", {"decision": "Approved"}, user=agent["sidecar"])
    assert own.returncode != 0 and "forbidden" in own.stderr


def test_approver_not_named_by_the_request_is_refused(running_operator, agent):
    op = running_operator
    open_request(op, agent, "only-alice", approvers={"users": ["alice"]})
    refused(patch(op, agent, "only-alice", {"decision": "Approved"}, user="approver2"),
            "bob may not decide this request: not named by spec.approvers (users alice)")
    refused(patch(op, agent, "only-alice", {"decision": "Denied"}, user="admin"),
            "admin may not decide this request: not named by spec.approvers")


def test_forged_reviews_and_other_edits_are_refused(running_operator, agent):
    op = running_operator
    open_request(op, agent, "edits")
    refused(patch(op, agent, "edits", {"reviews": [{"user": "alice", "decision": "Approved", "time": ts()}]},
                  user="approver"),
            "spec.reviews are stamped by admission and cannot be set by clients")
    refused(patch(op, agent, "edits", {"decision": "Approved", "grant": {"scope": "action", "ttlSeconds": 86400}},
                  user="approver"),
            "a decision may only set spec.decision and spec.reason; spec.grant changed too")
    refused(patch(op, agent, "edits", {"sessionID": "other"}, user="approver"),
            "spec.sessionID cannot change after creation (alice tried)")
    denied = patch(op, agent, "edits", {"decision": "Denied", "reason": "no"}, user="approver2")
    assert denied.returncode == 0, denied.stderr
    refused(patch(op, agent, "edits", {"decision": "Approved"}, user="approver"),
            "this request is final: Denied by bob")


def test_the_requesting_sidecar_cannot_widen_a_pending_grant(running_operator, agent):
    """Even a sidecar service account that was (mis)granted patch rights cannot widen what a
    pending request grants: scope exact -> action, a longer TTL, a grant added afterwards, or
    another session. Refused by the real apiserver's admission, as the sidecar's own token."""
    op, cp, ns = running_operator, running_operator.cp, agent["ns"]
    open_request(op, agent, "widen", grant={"scope": "exact", "ttlSeconds": 300})
    open_request(op, agent, "widen-bare")  # opened without a grant
    cp.kubectl("create", "role", "ar-patcher", "--verb=patch,update",
               "--resource=approvalrequests.chaperone.dev", "-n", ns)
    cp.kubectl("create", "rolebinding", "sidecar-patches", "--role=ar-patcher",
               f"--serviceaccount={ns}:agent", "-n", ns)
    try:
        op.wait_for(lambda: cp.kubectl("auth", "can-i", "patch", AR, "-n", ns,
                                       f"--as=system:serviceaccount:{ns}:agent",
                                       check=False).stdout.strip() == "yes",
                    what="the sidecar's patch RoleBinding")
        for name, spec in (("widen", {"grant": {"scope": "action"}}),
                           ("widen", {"grant": {"ttlSeconds": 86400}}),
                           ("widen-bare", {"grant": {"scope": "action", "ttlSeconds": 86400}}),
                           ("widen", {"sessionID": "another-session"})):
            res = patch(op, agent, name, spec, user=agent["sidecar"])
            field = "spec.grant" if "grant" in spec else "spec.sessionID"
            refused(res, f"{field} cannot change after creation (the requesting sidecar tried)")
        stored = op.get(AR, "widen", "-n", ns)["spec"]
        assert stored["grant"] == {"scope": "exact", "ttlSeconds": 300}
        assert "grant" not in op.get(AR, "widen-bare", "-n", ns)["spec"]
    finally:
        cp.kubectl("delete", "rolebinding", "sidecar-patches", "-n", ns, check=False)


def _deletion_events(cp, ns: str, name: str) -> list[dict]:
    events = json.loads(cp.kubectl("get", "events", "-n", ns, "-o", "json",
                                   "--field-selector", f"involvedObject.name={name}").stdout)
    return [e for e in events["items"] if e.get("reason") == "DeletedPending"]


def test_deleting_a_pending_request_records_who_deleted_it_once(running_operator, agent):
    op, cp, ns = running_operator, running_operator.cp, agent["ns"]
    # alice gets delete rights here (the chart's approver role has none): the webhook must not
    # change who may delete, only record who did.
    cp.kubectl("create", "role", "ar-deleter", "--verb=delete", f"--resource={AR}", "-n", ns)
    cp.kubectl("create", "rolebinding", "alice-deletes", "--role=ar-deleter", "--user=alice", "-n", ns)
    op.wait_for(lambda: cp.kubectl("auth", "can-i", "delete", AR, "-n", ns, user="approver",
                                   check=False).stdout.strip() == "yes", what="alice's delete RoleBinding")
    open_request(op, agent, "doomed")
    op.wait_for(lambda: op.get(AR, "doomed", "-n", ns).get("status", {}).get("phase") == "Pending",
                what="status Pending")
    # a server-side dry run by someone else deletes nothing and must not be blamed
    cp.kubectl("delete", AR, "doomed", "-n", ns, "--dry-run=server")
    cp.kubectl("delete", AR, "doomed", "-n", ns, "--wait=true", user="approver")

    event = op.wait_for(lambda: _deletion_events(cp, ns, "doomed"), what="the DeletedPending Event")[0]
    assert event["type"] == "Warning" and event["message"].startswith("deleted while pending at ")
    assert " by alice (groups: platform-approvers, system:authenticated) " in event["message"]
    assert f"system:serviceaccount:{ns}:agent: iam:CreateRole role/deployer" in event["message"]
    time.sleep(3)  # the watch's DELETED has arrived by now; it must not post a second Event
    events = _deletion_events(cp, ns, "doomed")
    assert len(events) == 1 and events[0].get("count", 1) == 1, [e["message"] for e in events]


def test_admin_deleting_a_decided_request_is_housekeeping(running_operator, agent):
    op, cp, ns = running_operator, running_operator.cp, agent["ns"]
    open_request(op, agent, "decided")
    assert patch(op, agent, "decided", {"decision": "Denied"}, user="approver").returncode == 0
    op.wait_for(lambda: op.get(AR, "decided", "-n", ns).get("status", {}).get("phase") == "Denied",
                what="status Denied")
    cp.kubectl("delete", AR, "decided", "-n", ns, "--wait=true")
    open_request(op, agent, "decided-2")  # a later pending deletion proves the watch caught up
    cp.kubectl("delete", AR, "decided-2", "-n", ns, "--wait=true")
    event = op.wait_for(lambda: _deletion_events(cp, ns, "decided-2"), what="DeletedPending")[0]
    assert " by admin (groups: system:masters, system:authenticated) " in event["message"]
    time.sleep(2)
    assert _deletion_events(cp, ns, "decided") == []


def test_request_expires_at_its_deadline_and_can_no_longer_be_decided(running_operator, agent):
    op, ns = running_operator, agent["ns"]
    open_request(op, agent, "expiring", expiresAt=ts(4))
    status = op.wait_for(lambda: (s := op.get(AR, "expiring", "-n", ns).get("status", {}))
                         .get("phase") == "Expired" and s, timeout=30, what="status Expired")
    assert status["message"].startswith("expired at ")
    refused(patch(op, agent, "expiring", {"decision": "Approved"}, user="approver"),
            "it can no longer be decided")
    op.wait_for(lambda: "chaperone.dev/operator" not in (
        op.get(AR, "expiring", "-n", ns)["metadata"].get("finalizers") or []),
        what="the operator's finalizer to go once the expiry daemon is done")


# ---------------------------------------------------------------------------- policies, connections

BAD_POLICY = {
    "apiVersion": "chaperone.dev/v1alpha1", "kind": "AccessPolicy",
    "metadata": {"name": "broken"},
    "spec": {"rules": [
        {"name": "ok", "allow": {}, "match": {"hosts": ["api.github.com"]}},
        {"name": "bad-regex", "block": {}, "match": {"pathRegex": "(unclosed"}},
        {"name": "bad-glob", "block": {}, "match": {"paths": ["no-slash"]}},
        {"name": "bad-host", "allow": {}, "match": {"hosts": ["https://api.github.com"]}},
    ]},
}


def test_policy_with_errors_is_refused_with_every_field_path(running_operator, agent):
    op = running_operator
    policy = copy.deepcopy(BAD_POLICY)
    policy["metadata"]["namespace"] = agent["ns"]
    with pytest.raises(PolicyErrors) as expected:
        compile_policy(policy)
    res = op.apply(policy, check=False)
    assert res.returncode != 0
    assert f"AccessPolicy {agent['ns']}/broken is invalid" in res.stderr
    for error in expected.value.errors:
        assert str(error) in res.stderr
    assert "spec.rules[1].match.pathRegex: invalid regular expression" in res.stderr
    assert 'spec.rules[2].match.paths[0]: invalid path glob "no-slash"' in res.stderr
    assert "spec.rules[3].match.hosts[0]: invalid host glob" in res.stderr


def test_valid_policy_gets_status(running_operator, agent):
    op, ns = running_operator, agent["ns"]
    policy = copy.deepcopy(BAD_POLICY)
    policy["metadata"] = {"name": "good", "namespace": ns}
    policy["spec"]["rules"] = policy["spec"]["rules"][:1]
    op.apply(policy)
    status = op.wait_for(lambda: op.get("accesspolicy", "good", "-n", ns).get("status"),
                         what="AccessPolicy status")
    assert status["ruleCount"] == 1 and status["observedGeneration"] == 1
    assert [(c["type"], c["status"], c["reason"]) for c in status["conditions"]] == [
        ("Valid", "True", "Compiled")]


def test_connection_with_errors_is_refused(running_operator, agent):
    conn = {"apiVersion": "chaperone.dev/v1alpha1", "kind": "ClaudeConnection",
            "metadata": {"name": "bad", "namespace": agent["ns"]},
            "spec": {"type": "http", "hosts": ["https://api.example.com/x", "ok.example.com:99999"],
                     "baseURL": "https://user:pw@api.example.com"}}
    res = running_operator.apply(conn, check=False)
    refused(res, f"ClaudeConnection {agent['ns']}/bad is invalid")
    assert "spec.hosts[0]: invalid host glob" in res.stderr
    assert "spec.hosts[1]: invalid port '99999'" in res.stderr
    assert "spec.baseURL: must not embed credentials" in res.stderr
