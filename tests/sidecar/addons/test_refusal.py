"""refusal: one JSON shape for every refusal, set as flow.response so nothing is forwarded."""

from __future__ import annotations

import json

import pytest
from mitmproxy.test import tflow, tutils

from chaperone_sidecar import flowctx
from chaperone_sidecar.addons import refusal
from chaperone_sidecar.policy.model import Action, Decision, RuleRef

RULE = RuleRef("team-a/s3", "no-delete")
ACTION = Action("aws", "DELETE", "https", "logs.s3.amazonaws.com", 443, "/", name="s3:DeleteBucket",
                summary="s3:DeleteBucket logs (us-east-1)")
FIXED = ("error", "message", "rule", "action", "how_to_get_access")


def make_flow(path=b"/x?y=1"):
    return tflow.tflow(req=tutils.treq(host="api.example.com", port=8443, path=path))


@pytest.mark.parametrize("kind, status", sorted(refusal.KINDS.items()))
def test_every_kind_has_the_fixed_fields_and_headers(kind, status):
    f = make_flow()
    body = refusal.refuse(f, kind, rule=None)
    assert f.response.status_code == status
    assert f.response.headers["Content-Type"] == "application/json"
    assert f.response.headers[refusal.HEADER] == kind
    assert f.response.headers["Cache-Control"] == "no-store"
    assert json.loads(f.response.content) == body
    assert tuple(body)[:5] == FIXED
    assert body["error"] == f"chaperone_{kind}" and body["message"] and body["how_to_get_access"]
    assert flowctx.get(f).refused == body


def test_blocked_body_names_rule_and_classified_action():
    f = make_flow()
    ctx = flowctx.ensure(f)
    ctx.action, ctx.connection = ACTION, "aws-prod"
    ctx.decision = Decision("block", rule=RULE, message="Deleting buckets needs a human")
    body = refusal.refuse(f, "blocked", ctx.decision.message)
    assert body == {
        "error": "chaperone_blocked",
        "message": "Deleting buckets needs a human",
        "rule": {"policy": "team-a/s3", "name": "no-delete"},
        "action": {"name": "s3:DeleteBucket", "summary": "s3:DeleteBucket logs (us-east-1)",
                   "connection": "aws-prod"},
        "how_to_get_access": body["how_to_get_access"],
    }
    assert "AccessPolicy team-a/s3" in body["how_to_get_access"]


def test_without_classification_the_request_line_stands_in():
    f = make_flow()
    body = refusal.refuse(f, "no_connection", "nope", rule=None, host="api.example.com")
    assert body["action"] == {"name": "", "summary": "GET http://api.example.com:8443/x?y=1",
                              "connection": ""}
    assert body["rule"] is None and body["host"] == "api.example.com"


def test_extra_fields_and_headers():
    f = make_flow()
    body = refusal.refuse(f, "rate_limited", "slow down", rule=RULE,
                          headers={"Retry-After": "7"}, retry_after_seconds=7)
    assert f.response.status_code == 429 and f.response.headers["Retry-After"] == "7"
    assert body["retry_after_seconds"] == 7 and body["rule"]["name"] == "no-delete"
    assert "Wait" in body["how_to_get_access"]


def test_status_override_and_explicit_guidance():
    f = make_flow()
    body = refusal.refuse(f, "blocked", "too big", status=413, how_to_get_access="send less")
    assert f.response.status_code == 413 and body["how_to_get_access"] == "send less"


def test_rule_defaults_to_the_decision_rule():
    f = make_flow()
    flowctx.ensure(f).decision = Decision("require_approval", rule=RULE)
    assert refusal.refuse(f, "approval_denied")["rule"] == {"policy": "team-a/s3", "name": "no-delete"}


def test_unknown_kind_and_fixed_field_clash_are_errors():
    with pytest.raises(ValueError, match="unknown refusal kind"):
        refusal.build("nope")
    with pytest.raises(ValueError, match="fixed"):
        refusal.build("blocked", message="m", **{"error": "x"})  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="unknown refusal kind"):
        refusal.make_response("nope", {})


def test_build_is_json_serialisable_with_unicode():
    body = refusal.build("blocked", "Zugriff verweigert – Regel “x”", action=ACTION, connection="c")
    response = refusal.make_response("blocked", body)
    assert json.loads(response.content)["message"] == "Zugriff verweigert – Regel “x”"


def test_response_unmaskable_is_a_kind_and_leaves_the_sent_request_alone():
    """Mask's 502 is one of the shared kinds; refusing a *response* keeps the request's stream
    function (the body already went upstream through it)."""
    assert refusal.KINDS["response_unmaskable"] == 502
    f = make_flow()
    tee = lambda data: [data] if data else []  # noqa: E731 - a request stream function
    f.request.stream = tee
    f.response = tutils.tresp()  # the upstream's response, being replaced
    body = refusal.refuse(f, "response_unmaskable", rule=None)
    assert f.response.status_code == 502 and body["error"] == "chaperone_response_unmaskable"
    assert "was sent" in body["message"] and "already took effect" in body["how_to_get_access"]
    assert f.request.stream is tee
