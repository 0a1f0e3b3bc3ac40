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


# -- readable by the agent's own client (kubectl, botocore) -----------------------------------

K8S_ACTION = Action("kubernetes", "DELETE", "https", "kubernetes.default.svc", 443,
                    "/api/v1/namespaces/victim", name="kubernetes:delete/namespaces",
                    summary="delete namespaces victim")
K8S_RULE = RuleRef("team-a/cluster-readonly", "never-delete-namespaces")


def kube_flow(decision=None):
    f = tflow.tflow(req=tutils.treq(host="kubernetes.default.svc", port=443, method=b"DELETE",
                                    path=b"/api/v1/namespaces/victim"))
    ctx = flowctx.ensure(f)
    ctx.connection, ctx.connection_type, ctx.action = "cluster", "kubernetes", K8S_ACTION
    ctx.decision = decision
    return f


@pytest.mark.parametrize("kind, reason", [
    ("blocked", "Forbidden"), ("rate_limited", "TooManyRequests"),
    ("approval_unavailable", "ServiceUnavailable"), ("invalid_request", "BadRequest"),
    ("unauthenticated", "Unauthorized"), ("approval_pending", "Forbidden"),
])
def test_kubernetes_refusal_is_also_a_metav1_status(kind, reason):
    f = kube_flow(Decision("block", rule=K8S_RULE, message="Agents may not delete namespaces."))
    body = refusal.refuse(f, kind, "Agents may not delete namespaces.")
    sent = json.loads(f.response.content)
    assert sent == body and flowctx.get(f).refused == body
    assert f.response.headers["Content-Type"] == "application/json"  # client-go needs it
    # What client-go's dynamicCodec looks at, then json.Unmarshal into metav1.Status:
    assert (sent["kind"], sent["apiVersion"], sent["status"]) == ("Status", "v1", "Failure")
    assert sent["metadata"] == {} and sent["code"] == f.response.status_code
    assert sent["reason"] == reason
    # kubectl prints Status.message: it says what, which rule and how to get access.
    assert sent["message"].startswith("Agents may not delete namespaces.")
    assert "never-delete-namespaces" in sent["message"] and "team-a/cluster-readonly" in sent["message"]
    assert "delete namespaces victim" in sent["message"]
    assert sent["how_to_get_access"] in sent["message"]
    # The Chaperone shape is all still there.
    assert tuple(sent)[:5] == FIXED and sent["error"] == f"chaperone_{kind}"
    assert sent["rule"] == {"policy": "team-a/cluster-readonly", "name": "never-delete-namespaces"}
    assert sent["action"]["name"] == "kubernetes:delete/namespaces"


def test_kubernetes_status_fields_have_metav1_types():
    f = kube_flow()
    body = refusal.refuse(f, "rate_limited", "slow down", rule=None,
                          headers={"Retry-After": "7"}, retry_after_seconds=7)
    assert isinstance(body["code"], int) and isinstance(body["reason"], str)
    assert body["details"] == {"retryAfterSeconds": 7} and body["retry_after_seconds"] == 7
    assert f.response.headers["Retry-After"] == "7"


def test_kubernetes_approval_pending_message_names_request_and_command():
    f = kube_flow(Decision("require_approval", rule=K8S_RULE, message="Needs a human"))
    command = "kubectl chaperone approve ar-123 -n team-a"
    body = refusal.refuse(
        f, "approval_pending", "Needs a human: ApprovalRequest ar-123 in namespace team-a is "
        "waiting for alice.", how_to_get_access=f"Ask an approver (alice) to approve it by "
        f"running: {command} - then retry the same request.",
        approval_request={"name": "ar-123", "namespace": "team-a", "expires_at": ""},
        approve_command=command)
    assert "ApprovalRequest ar-123" in body["message"] and command in body["message"]
    assert body["approve_command"] == command and body["reason"] == "Forbidden"


def test_kubernetes_keeps_a_clashing_reason_as_refusal_reason():
    f = kube_flow(Decision("require_approval", rule=K8S_RULE))
    body = refusal.refuse(f, "approval_denied", "ApprovalRequest ar-1 was denied by alice",
                          reason="denied by alice: not on a Friday")
    assert body["reason"] == "Forbidden"
    assert body["refusal_reason"] == "denied by alice: not on a Friday"


def test_other_connection_types_are_unchanged():
    f = make_flow()
    flowctx.ensure(f).connection_type = "http"
    body = refusal.refuse(f, "blocked", "no", rule=RULE)
    assert set(body) == set(FIXED)
    assert "x-amzn-ErrorType" not in f.response.headers


def aws_flow(protocol, service="secretsmanager", operation="GetSecretValue"):
    from chaperone_sidecar.policy.model import AWSAction
    f = make_flow()
    ctx = flowctx.ensure(f)
    ctx.connection, ctx.connection_type = "aws-prod", "aws"
    ctx.action = Action("aws", "POST", "https", f"{service}.us-east-1.amazonaws.com", 443, "/",
                        name=f"{service}:{operation}", summary=f"{service}:{operation}",
                        aws=AWSAction(service, "us-east-1", operation, protocol))
    ctx.decision = Decision("block", rule=RULE, message="Secrets are off limits")
    return f


def _botocore_call(service, operation, params, response):
    """Call ``operation`` with a real botocore client whose HTTP layer returns ``response``."""
    import botocore.session
    from botocore.awsrequest import AWSResponse
    from botocore.config import Config

    class Raw:
        def stream(self, **_):
            yield response.content

    client = botocore.session.get_session().create_client(
        service, region_name="us-east-1", aws_access_key_id="AKIDEXAMPLE",
        aws_secret_access_key="secret", config=Config(retries={"total_max_attempts": 1}))
    client.meta.events.register(
        "before-send", lambda request, **_: AWSResponse(
            request.url, response.status_code, dict(response.headers), Raw()))
    return getattr(client, operation)(**params)


@pytest.mark.parametrize("kind, code", [("blocked", "AccessDeniedException"),
                                        ("rate_limited", "ThrottlingException"),
                                        ("credentials_unavailable", "ServiceUnavailableException")])
def test_aws_json_protocol_refusal_is_a_botocore_client_error(kind, code):
    from botocore.exceptions import ClientError
    f = aws_flow("json")
    body = refusal.refuse(f, kind, "Secrets are off limits")
    assert body["__type"] == code and f.response.headers["x-amzn-ErrorType"] == code
    assert tuple(body)[:5] == FIXED and body["error"] == f"chaperone_{kind}"
    assert body["message"] == "Secrets are off limits"  # unchanged for AWS
    with pytest.raises(ClientError) as err:
        _botocore_call("secretsmanager", "get_secret_value", {"SecretId": "db"}, f.response)
    assert err.value.response["Error"]["Code"] == code
    assert err.value.response["Error"]["Message"] == "Secrets are off limits"
    # "An error occurred (AccessDeniedException) when calling the GetSecretValue operation: ..."
    # (botocore adds "(reached max retries: N)" before the colon for retryable codes)
    text = str(err.value)
    assert text.startswith(f"An error occurred ({code}) when calling the GetSecretValue operation")
    assert text.endswith(": Secrets are off limits")


def test_aws_rest_json_refusal_is_a_botocore_client_error():
    from botocore.exceptions import ClientError
    f = aws_flow("rest-json", "lambda", "ListFunctions")
    refusal.refuse(f, "blocked", "No lambdas")
    with pytest.raises(ClientError) as err:
        _botocore_call("lambda", "list_functions", {}, f.response)
    assert err.value.response["Error"] == {"Code": "AccessDeniedException", "Message": "No lambdas"}


def test_aws_xml_protocols_keep_the_json_body_and_get_headers():
    """The body stays JSON for query/ec2/rest-xml; botocore cannot parse it as XML."""
    from botocore.exceptions import ClientError
    f = aws_flow("rest-xml", "s3", "DeleteBucket")
    body = refusal.refuse(f, "blocked", "Deleting buckets needs a human")
    assert "__type" not in body and set(body) == set(FIXED)
    assert f.response.headers["x-amzn-ErrorType"] == "AccessDenied"
    reason = f.response.headers["X-Chaperone-Reason"]
    assert reason == ("chaperone_blocked: Deleting buckets needs a human "
                      "(rule 'no-delete' of AccessPolicy team-a/s3)")
    with pytest.raises(ClientError) as err:  # what botocore makes of it: the HTTP status only
        _botocore_call("s3", "delete_bucket", {"Bucket": "logs"}, f.response)
    assert err.value.response["Error"]["Code"] == "403"
    assert err.value.response["ResponseMetadata"]["HTTPHeaders"]["x-chaperone-reason"] == reason


def test_aws_reason_header_is_one_ascii_line():
    f = aws_flow("query", "iam", "ListUsers")
    refusal.refuse(f, "blocked", "Zugriff\nverweigert – “x”" + "y" * 1000)
    reason = f.response.headers["X-Chaperone-Reason"]
    assert reason.isascii() and "\n" not in reason and len(reason) <= 512
    assert f.response.headers["x-amzn-ErrorType"] == "AccessDenied"
