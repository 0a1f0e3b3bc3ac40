"""OCSF mapping: recorded events -> OCSF 1.8.0 API Activity (6003), validated against the JSON
Schema compiled from the OCSF sources (tests/sidecar/recording/ocsf/, hack/gen-ocsf-schema.py)."""

from __future__ import annotations

import json
from pathlib import Path

import jsonschema
import pytest

from chaperone_sidecar.recording.ocsf import FlowEvents, activity_of, api_activity

SCHEMA = json.loads((Path(__file__).parent / "ocsf" / "api_activity-1.8.0.schema.json").read_text())
VALIDATOR = jsonschema.Draft202012Validator(SCHEMA)

IDENTITY = {"namespace": "team-a", "pod": "agent-0", "podUID": "u-1", "serviceAccount": "claude",
            "creator": "alice"}


def validate(event: dict) -> None:
    errors = sorted(VALIDATOR.iter_errors(event), key=lambda e: list(e.path))
    assert not errors, "\n".join(f"{list(e.path)}: {e.message}" for e in errors[:5])


def request(flow="f1", *, decision=None, action=("s3:DeleteBucket", "delete bucket b"),
            method="DELETE", url="https://s3.amazonaws.com/b?X-Amz-Signature=[REDACTED]",
            ctype="aws"):
    data = {"method": method, "url": url, "httpVersion": "HTTP/1.1",
            "headers": [["Host", "s3.amazonaws.com"], ["Authorization", "[REDACTED]"],
                        ["User-Agent", "aws-cli/2"]],
            "connection": "aws-prod", "connectionType": ctype,
            "action": {"name": action[0], "summary": action[1]}, "body": None}
    if decision is not None:
        data["decision"] = decision
    return {"type": "request", "flow": flow, "identity": IDENTITY, "session": "s-1", "seq": 3,
            "time": "2026-12-04T18:00:00.000000Z", "data": data}


def response(flow="f1", status=204, refused=None):
    return {"type": "response", "flow": flow, "identity": IDENTITY, "session": "s-1", "seq": 5,
            "time": "2026-12-04T18:00:00.250000Z",
            "data": {"status": status, "reason": "No Content", "headers": [], "refused": refused,
                     "masked": {}, "durationMs": 250, "upstreamLatencyMs": 200}}


BLOCK = {"effect": "block", "rule": {"policy": "team-a/prod", "name": "no-delete"},
         "message": "no deletes", "refused": "chaperone_blocked"}


def test_allowed_flow_maps_to_a_valid_delete_activity():
    event = api_activity(request(decision={"effect": "allow", "rule": None, "message": ""}),
                         response())
    validate(event)
    assert (event["class_uid"], event["category_uid"], event["activity_id"], event["type_uid"]) == \
        (6003, 6, 4, 600304)
    assert event["disposition_id"] == 1 and event["status_id"] == 1 and event["severity_id"] == 1
    assert event["api"]["operation"] == "s3:DeleteBucket"
    assert event["api"]["service"] == {"name": "s3"}
    assert event["metadata"]["uid"] == "f1" and event["metadata"]["correlation_uid"] == "s-1"
    assert event["metadata"]["product"] == {"name": "Chaperone", "vendor_name": "Chaperone"}
    assert event["actor"]["user"]["name"] == "alice"
    assert event["actor"]["invoked_by"] == "system:serviceaccount:team-a:claude"
    assert event["time"] == 1796407200000 and event["duration"] == 250
    assert event["dst_endpoint"] == {"hostname": "s3.amazonaws.com", "port": 443,
                                     "svc_name": "aws-prod"}


def test_blocked_flow_is_blocked_with_its_policy_and_failure_status():
    event = api_activity(request(decision=BLOCK), response(status=403, refused="chaperone_blocked"))
    validate(event)
    assert event["disposition_id"] == 2 and event["disposition"] == "Blocked"
    assert event["status_id"] == 2 and event["status_detail"] == "chaperone_blocked"
    assert event["severity_id"] == 3
    assert event["policy"]["name"] == "team-a/prod"
    assert event["policy"]["data"] == {"rule": "no-delete", "effect": "block"}


def test_approved_flow_is_approved_and_names_the_approver():
    approval = {"type": "approval", "flow": "f1",
                "data": {"name": "ar-1", "state": "approved", "approver": "carol"}}
    event = api_activity(request(decision={"effect": "require_approval", "rule": {
        "policy": "team-a/prod", "name": "ask"}, "message": ""}), response(), [approval])
    validate(event)
    assert event["disposition_id"] == 8 and event["severity_id"] == 2
    assert event["unmapped"]["chaperone"]["approval"]["approver"] == "carol"


def test_error_event_and_pending_approval():
    error = {"type": "error", "flow": "f1", "time": "2026-12-04T18:00:01.000000Z",
             "data": {"message": "connection reset", "phase": "request"}}
    event = api_activity(request(), error)
    validate(event)
    assert event["status_id"] == 2 and event["status_detail"] == "connection reset"
    pending = api_activity(request(decision={"effect": "require_approval", "refused":
                                             "chaperone_approval_pending"}),
                           response(status=403, refused="chaperone_approval_pending"))
    validate(pending)
    assert pending["disposition_id"] == 14


def test_no_credentials_reach_the_event():
    """Only the recording's redacted form is mapped: the [REDACTED] values stay redacted and
    no body is exported."""
    req = request()
    req["data"]["body"] = {"text": "SECRET-BODY"}
    text = json.dumps(api_activity(req, response()))
    assert "SECRET-BODY" not in text
    assert "[REDACTED]" in text  # the Authorization header and the signature, as recorded


def test_actor_without_creator_is_the_service_account_and_with_oidc_the_end_user():
    req = request()
    req["identity"] = {"namespace": "team-a", "pod": "agent-0", "serviceAccount": "claude"}
    event = api_activity(req, response())
    validate(event)
    assert event["actor"]["user"] == {"name": "system:serviceaccount:team-a:claude",
                                      "uid": "system:serviceaccount:team-a:claude",
                                      "type_id": 4, "type": "Service"}
    req["identity"] = {**IDENTITY, "onBehalfOf": "bob", "onBehalfOfGroups": ["devs"]}
    event = api_activity(req, response())
    validate(event)
    assert event["actor"]["user"]["name"] == "bob"
    assert event["actor"]["user"]["groups"] == [{"name": "devs"}]


@pytest.mark.parametrize(("action", "method", "ctype", "expected"), [
    ("s3:GetObject", "GET", "aws", 2), ("s3:PutObject", "PUT", "aws", 1),
    ("ec2:TerminateInstances", "POST", "aws", 4), ("iam:UpdateRole", "POST", "aws", 3),
    ("dynamodb:BatchGetItem", "POST", "aws", 2), ("dynamodb:BatchWriteItem", "POST", "aws", 3),
    ("ec2:StopInstances", "POST", "aws", 3),
    ("kubernetes:delete/namespaces", "DELETE", "kubernetes", 4),
    ("kubernetes:list/pods", "GET", "kubernetes", 2),
    ("kubernetes:patch/deployments", "PATCH", "kubernetes", 3),
    ("mcp:tools/call", "POST", "mcp", 99), ("mcp:tools/list", "POST", "mcp", 2),
    ("git:push", "POST", "http", 3), ("git:fetch", "POST", "http", 2),
    ("anthropic:messages", "POST", "anthropic", 1),
    ("http:GET", "GET", "http", 2), ("http:DELETE", "DELETE", "http", 4),
    ("http:BREW", "BREW", "http", 99),
])
def test_activity_of(action, method, ctype, expected):
    assert activity_of(action, method, ctype) == expected


def test_schema_rejects_what_ocsf_does_not_allow():
    """The vendored schema is not a rubber stamp: a missing required attribute, a misspelt one
    and an out-of-range enum each fail."""
    good = api_activity(request(), response())
    for broken in ({k: v for k, v in good.items() if k != "actor"},
                   {**good, "dispositon_id": 1},
                   {**good, "disposition_id": 42},
                   {**good, "metadata": {"product": {"name": "x"}}}):
        assert list(VALIDATOR.iter_errors(broken)), broken


def test_flow_events_pair_and_bound_memory():
    pairs = FlowEvents(limit=2)
    assert pairs.add([request("a")]) == []
    [event] = pairs.add([response("a")])
    assert event["metadata"]["uid"] == "a"
    assert pairs.add([response("never-requested")]) == []
    pairs.add([request("b"), request("c"), request("d")])
    assert len(pairs.pending) == 2 and pairs.orphaned == 1


def test_one_unmappable_flow_does_not_cost_the_others():
    pairs = FlowEvents()
    bad = request("bad")
    bad["data"]["url"] = "https://host:99999/x"  # urlsplit refuses the port
    out = pairs.add([bad, request("good"), response("bad"), response("good")])
    assert [e["metadata"]["uid"] for e in out] == ["good"] and pairs.failed == 1
