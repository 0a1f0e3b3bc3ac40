"""The CRDs on a real kube-apiserver: they install, the examples apply, and invalid objects are
refused with the field and reason (OpenAPI schema and CEL rules), as a user would see them
through the real kubectl.
"""

from __future__ import annotations

import copy
import json

import pytest
import yaml

NS = "crd-tests"


@pytest.fixture(scope="module")
def ns(control_plane, crds_installed):
    control_plane.create_namespace(NS)
    return NS


def manifest(**overrides) -> dict:
    return overrides


def policy(rules=None, **spec) -> dict:
    return {
        "apiVersion": "chaperone.dev/v1alpha1", "kind": "AccessPolicy",
        "metadata": {"name": "p"},
        "spec": {"rules": rules if rules is not None else [{"name": "r", "allow": {}}], **spec},
    }


def connection(**spec) -> dict:
    return {
        "apiVersion": "chaperone.dev/v1alpha1", "kind": "ClaudeConnection",
        "metadata": {"name": "c"}, "spec": spec,
    }


def approval(**spec_overrides) -> dict:
    spec = {
        "requester": {"serviceAccount": "system:serviceaccount:crd-tests:coder",
                      "pod": {"namespace": NS, "name": "claude-0"}},
        "connection": "aws-prod",
        "action": {"name": "iam:CreateRole", "summary": "iam:CreateRole role=x"},
        "requestDigest": "sha256:" + "ab" * 32,
        "rule": {"policy": f"{NS}/p", "name": "r"},
        "approvers": {"groups": ["platform-approvers"]},
        "requestedAt": "2026-11-22T10:00:00Z",
        "expiresAt": "2026-11-22T10:10:00Z",
    }
    spec.update(spec_overrides)
    return {"apiVersion": "chaperone.dev/v1alpha1", "kind": "ApprovalRequest",
            "metadata": {"name": "a"}, "spec": spec}


def create(cp, obj: dict, check: bool = False):
    return cp.kubectl("create", "-n", NS, "-f", "-", input=json.dumps(obj), check=check)


def test_crds_are_established_and_served(control_plane, crds_installed):
    out = control_plane.kubectl("api-resources", "--api-group=chaperone.dev", "-o", "wide").stdout
    for plural, short in [("claudeconnections", "cc"), ("accesspolicies", "ap"),
                          ("approvalrequests", "ar")]:
        line = next(l for l in out.splitlines() if l.startswith(plural))
        assert f" {short} " in line and "chaperone.dev/v1alpha1" in line and "true" in line


def test_all_examples_apply(control_plane, crds_installed, repo_root):
    control_plane.kubectl("apply", "-f", str(repo_root / "examples" / "namespace.yaml"))
    control_plane.create_namespace("agents")  # default SA etc. for later pods
    for path in sorted((repo_root / "examples").glob("*.yaml")):
        res = control_plane.kubectl("apply", "--dry-run=server", "-f", str(path), check=False)
        assert res.returncode == 0, f"{path.name}: {res.stderr}"
    res = control_plane.kubectl("apply", "-f", str(repo_root / "examples"), check=False)
    assert res.returncode == 0, res.stderr
    got = json.loads(control_plane.kubectl("get", "cc,ap,ar", "-n", "agents", "-o", "json").stdout)
    kinds = sorted(item["kind"] for item in got["items"])
    assert kinds == sorted(["ClaudeConnection"] * 4 + ["AccessPolicy"] * 2 + ["ApprovalRequest"])
    # Defaults from the schema are filled in by the apiserver.
    ap = json.loads(control_plane.kubectl("get", "ap", "aws-guardrails", "-n", "agents",
                                          "-o", "json").stdout)
    approval_rule = next(r for r in ap["spec"]["rules"] if r["name"] == "new-roles-need-approval")
    assert approval_rule["requireApproval"]["grant"] == {"scope": "exact", "ttlSeconds": 900}


def _two_effects(p):
    p["spec"]["rules"][0]["block"] = {"message": "no"}


INVALID_CREATES = [
    # (id, object, substring of the apiserver's message that names field and reason)
    ("rule-two-effects",
     policy([{"name": "r", "allow": {}, "block": {}}]),
     "spec.rules[0].name: Invalid value: \"object\": a rule needs exactly one effect"),
    ("rule-no-effect",
     policy([{"name": "r", "match": {"methods": ["GET"]}}]),
     "a rule needs exactly one effect"),
    ("default-effect-unknown",
     policy(defaultEffect="maybe"),
     'spec.defaultEffect: Unsupported value: "maybe"'),
    ("duplicate-rule-names",
     policy([{"name": "r", "allow": {}}, {"name": "r", "block": {}}]),
     "spec.rules[1]: Duplicate value"),
    ("rule-name-not-dns-label",
     policy([{"name": "Allow_All", "allow": {}}]),
     "spec.rules[0].name: Invalid value: \"Allow_All\""),
    ("aws-action-without-service",
     policy([{"name": "r", "match": {"aws": {"actions": ["DeleteBucket"]}}, "block": {}}]),
     "spec.rules[0].match.aws.actions[0]: Invalid value: \"DeleteBucket\""),
    ("min-approvals-zero",
     policy([{"name": "r", "requireApproval": {"minApprovals": 0}}]),
     "spec.rules[0].requireApproval.minApprovals: Invalid value: 0: "
     "spec.rules[0].requireApproval.minApprovals in body should be greater than or equal to 1"),
    ("subject-with-two-fields",
     policy(subjects=[{"user": "a", "group": "b"}]),
     "spec.subjects[0]: Too many: 2: must have at most 1 items"),
    ("http-without-hosts",
     connection(type="http", credentials={"source": "none"}),
     "spec.hosts: Invalid value: \"object\": hosts must name at least one host"),
    ("secret-source-without-ref",
     connection(type="aws", credentials={"source": "secret"}),
     "spec.credentials.secretRef: Invalid value: \"object\": secretRef is required when source is secret"),
    ("web-identity-on-http",
     connection(type="http", hosts=["x"], credentials={"source": "webIdentity"}),
     "credentials.source webIdentity is only supported for type aws"),
    ("aws-settings-on-http",
     connection(type="http", hosts=["x"], aws={"region": "us-east-1"}),
     "spec.aws: Invalid value: \"object\": aws settings are only allowed on connections of type aws"),
    ("unknown-connection-type",
     connection(type="ftp"),
     'spec.type: Unsupported value: "ftp"'),
    ("expiry-before-request",
     approval(expiresAt="2026-11-22T09:00:00Z"),
     "spec.expiresAt: Invalid value: \"object\": expiresAt must be after requestedAt"),
    ("decision-without-decided-by",
     approval(decision="Approved"),
     "spec.decidedBy: Invalid value: \"object\": a decision must carry decidedBy"),
    ("bad-digest",
     approval(requestDigest="md5:abc"),
     "spec.requestDigest: Invalid value: \"md5:abc\""),
    ("unknown-decision",
     approval(decision="Maybe", decidedBy="alice"),
     'spec.decision: Unsupported value: "Maybe"'),
    ("review-twice-by-one-user",
     approval(reviews=[{"user": "alice", "decision": "Approved", "time": "2026-11-22T10:01:00Z"},
                       {"user": "alice", "decision": "Approved", "time": "2026-11-22T10:02:00Z"}]),
     "spec.reviews[1]: Duplicate value"),
]


@pytest.mark.parametrize("obj,message", [c[1:] for c in INVALID_CREATES],
                         ids=[c[0] for c in INVALID_CREATES])
def test_invalid_objects_are_rejected_with_field_and_reason(control_plane, ns, obj, message):
    res = create(control_plane, obj)
    assert res.returncode != 0, f"accepted: {json.dumps(obj)}"
    assert message in res.stderr, res.stderr


INVALID_UPDATES = [
    # (id, valid object, merge patch, expected message)
    ("final-decision-cannot-change",
     approval(decision="Approved", decidedBy="alice"),
     {"spec": {"decision": "Denied"}},
     "spec.decision: Invalid value: \"object\": a final decision cannot change"),
    ("decision-cannot-be-removed",
     approval(decision="Denied", decidedBy="alice"),
     {"spec": {"decision": None}},
     "a final decision cannot change"),
    ("action-is-immutable",
     approval(),
     {"spec": {"action": {"summary": "something harmless"}}},
     "spec.action: Invalid value: \"object\": action is immutable"),
    ("requester-is-immutable",
     approval(),
     {"spec": {"requester": {"serviceAccount": "system:serviceaccount:x:y"}}},
     "requester is immutable"),
    ("reviews-cannot-be-removed",
     approval(reviews=[{"user": "alice", "decision": "Approved", "time": "2026-11-22T10:01:00Z"}]),
     {"spec": {"reviews": []}},
     "reviews cannot be removed"),
    # What an approval grants is fixed at creation, even when the webhook is bypassed.
    ("grant-scope-cannot-widen",
     approval(grant={"scope": "exact", "ttlSeconds": 300}),
     {"spec": {"grant": {"scope": "action"}}},
     "spec.grant: Invalid value: \"object\": grant is immutable"),
    ("grant-ttl-cannot-grow",
     approval(grant={"scope": "exact", "ttlSeconds": 300}),
     {"spec": {"grant": {"ttlSeconds": 86400}}},
     "grant is immutable"),
    ("grant-cannot-be-added",
     approval(),
     {"spec": {"grant": {"scope": "action", "ttlSeconds": 86400}}},
     "grant is immutable"),
    ("session-is-immutable",
     approval(sessionID="s-1"),
     {"spec": {"sessionID": "s-2"}},
     "sessionID is immutable"),
    ("connection-type-is-immutable",
     connection(type="http", hosts=["a.example.com"], credentials={"source": "none"}),
     {"spec": {"type": "kubernetes"}},
     "spec.type: Invalid value: \"string\": type is immutable"),
]


@pytest.mark.parametrize("obj,patch,message", [c[1:] for c in INVALID_UPDATES],
                         ids=[c[0] for c in INVALID_UPDATES])
def test_invalid_updates_are_rejected(control_plane, ns, obj, patch, message):
    obj = copy.deepcopy(obj)
    obj["metadata"]["name"] = "upd-" + obj["kind"].lower()
    control_plane.kubectl("delete", obj["kind"], obj["metadata"]["name"], "-n", NS,
                          "--ignore-not-found")
    res = create(control_plane, obj)
    assert res.returncode == 0, res.stderr
    res = control_plane.kubectl("patch", obj["kind"], obj["metadata"]["name"], "-n", NS,
                                "--type=merge", "-p", json.dumps(patch), check=False)
    assert res.returncode != 0, "update accepted"
    assert message in res.stderr, res.stderr


def test_get_ar_shows_on_call_columns(control_plane, ns):
    obj = approval()
    obj["metadata"]["name"] = "columns"
    assert create(control_plane, obj).returncode == 0
    out = control_plane.kubectl("get", "ar", "-n", NS, "columns").stdout
    header, row = out.splitlines()[:2]
    assert header.split() == ["NAME", "REQUESTER", "ACTION", "PHASE", "APPROVALS", "AGE", "EXPIRES"]
    assert "system:serviceaccount:crd-tests:coder" in row and "iam:CreateRole" in row
    wide = control_plane.kubectl("get", "ar", "-n", NS, "columns", "-o", "wide").stdout
    assert wide.splitlines()[0].split()[:4] == ["NAME", "REQUESTER", "ON-BEHALF-OF", "CONNECTION"]
    assert "DECIDED-BY" in wide.splitlines()[0]


def test_get_ar_shows_a_pending_requests_expiry_as_a_readable_time(control_plane, ns):
    """A date column renders a future time as <invalid>; EXPIRES is the RFC 3339 timestamp."""
    import datetime as dt

    soon = dt.datetime.now(dt.timezone.utc).replace(microsecond=0) + dt.timedelta(minutes=10)
    expires = soon.strftime("%Y-%m-%dT%H:%M:%SZ")
    obj = approval(requestedAt=(soon - dt.timedelta(minutes=15)).strftime("%Y-%m-%dT%H:%M:%SZ"),
                   expiresAt=expires)
    obj["metadata"]["name"] = "pending-expiry"
    assert create(control_plane, obj).returncode == 0
    out = control_plane.kubectl("get", "ar", "-n", NS, "pending-expiry").stdout
    header, row = out.splitlines()[:2]
    assert "<invalid>" not in row, out
    assert header.split()[-1] == "EXPIRES" and row.split()[-1] == expires, out


def test_short_names_work(control_plane, ns):
    for short in ("cc", "ap", "ar"):
        assert control_plane.kubectl("get", short, "-n", NS).returncode == 0


def test_kubectl_explain_teaches_the_spec(control_plane, crds_installed):
    out = control_plane.kubectl("explain", "claudeconnection.spec").stdout
    assert "KIND:       ClaudeConnection" in out
    for field in ("type", "hosts", "credentials", "recording", "baseURL", "podSelector"):
        assert f"  {field}\t" in out or f"  {field} " in out, field
    rules = control_plane.kubectl("explain", "accesspolicy.spec.rules.requireApproval").stdout
    assert "Distinct approvals needed" in rules
    assert "Approved or Denied" in control_plane.kubectl(
        "explain", "ar.spec.decision").stdout


def test_developer_cannot_create_approval_requests(control_plane, ns):
    """Plain users have no rights on chaperone kinds unless bound (RBAC is real)."""
    obj = approval()
    obj["metadata"]["name"] = "by-dave"
    res = control_plane.kubectl("create", "-n", NS, "-f", "-", input=json.dumps(obj),
                                user="developer", check=False)
    assert res.returncode != 0 and "forbidden" in res.stderr.lower()
