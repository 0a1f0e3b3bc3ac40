"""Canonical request digest, action key and ApprovalRequest names."""

from __future__ import annotations

import re

import pytest

from chaperone_sidecar.approvals.digest import (
    DIGEST_RE, action_key, action_resources, canonical_query, request_digest, request_name,
)
from chaperone_sidecar.policy.model import (
    Action, AWSAction, HTTPRequest, KubernetesAction,
)

DNS1123 = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")


def aws_request(**overrides) -> HTTPRequest:
    fields = dict(
        method="POST", scheme="https", host="iam.amazonaws.com", port=443, path="/", query="",
        headers=(("Content-Type", "application/x-www-form-urlencoded; charset=utf-8"),
                 ("X-Amz-Date", "20250101T000000Z"),
                 ("Authorization", "AWS4-HMAC-SHA256 Credential=AKIA/x, Signature=abc"),
                 ("amz-sdk-invocation-id", "11111111-2222"),
                 ("amz-sdk-request", "attempt=1; max=3"),
                 ("User-Agent", "aws-cli/2.0"),
                 ("X-Amz-Security-Token", "tok1")),
        body=b"Action=CreateRole&RoleName=admin&Version=2010-05-08")
    fields.update(overrides)
    return HTTPRequest(**fields)


def test_format_is_sha256_hex():
    assert DIGEST_RE.match(request_digest(aws_request()))


def test_retry_with_new_signature_date_and_sdk_ids_has_the_same_digest():
    retry = aws_request(headers=(
        ("user-agent", "aws-cli/2.1 retry"),
        ("amz-sdk-request", "attempt=2; max=3"),
        ("amz-sdk-invocation-id", "99999999-0000"),
        ("authorization", "AWS4-HMAC-SHA256 Credential=AKIA/y, Signature=def"),
        ("x-amz-date", "20250101T000105Z"),
        ("x-amz-security-token", "tok2"),
        ("content-type", "application/x-www-form-urlencoded;  charset=utf-8"),  # header order, case, spaces
    ))
    assert request_digest(retry) == request_digest(aws_request())


@pytest.mark.parametrize("change", [
    {"method": "PUT"}, {"scheme": "http"}, {"host": "sts.amazonaws.com"}, {"port": 8443},
    {"path": "/x"}, {"query": "a=1"}, {"body": b"Action=DeleteRole&RoleName=admin"},
    {"headers": (("content-type", "application/json"),)},
])
def test_what_the_request_does_changes_the_digest(change):
    assert request_digest(aws_request(**change)) != request_digest(aws_request())


def test_x_amz_target_is_significant():
    base = aws_request(headers=(("x-amz-target", "DynamoDB_20120810.GetItem"),))
    other = aws_request(headers=(("x-amz-target", "DynamoDB_20120810.DeleteTable"),))
    assert request_digest(base) != request_digest(other)


def test_host_case_and_trailing_dot_do_not_matter():
    assert request_digest(aws_request(host="IAM.amazonaws.com.")) == request_digest(aws_request())


def test_query_order_and_encoding_do_not_matter():
    a = aws_request(query="b=2&a=1&a=0")
    b = aws_request(query="a=0&a=%31&b=2")
    assert request_digest(a) == request_digest(b)
    assert canonical_query("b=2&a=1") == [("a", "1"), ("b", "2")]


def test_presigned_url_signature_params_are_ignored():
    q1 = ("X-Amz-Algorithm=AWS4-HMAC-SHA256&X-Amz-Credential=AKIA%2F1&X-Amz-Date=20250101T000000Z"
          "&X-Amz-Expires=300&X-Amz-SignedHeaders=host&X-Amz-Signature=aaa&versionId=7")
    q2 = ("versionId=7&X-Amz-Algorithm=AWS4-HMAC-SHA256&X-Amz-Credential=AKIA%2F2"
          "&X-Amz-Date=20250101T010000Z&X-Amz-Expires=600&X-Amz-SignedHeaders=host&X-Amz-Signature=bbb")
    assert request_digest(aws_request(method="GET", query=q1)) == \
        request_digest(aws_request(method="GET", query=q2))
    assert request_digest(aws_request(method="GET", query="versionId=7")) == \
        request_digest(aws_request(method="GET", query=q1))
    assert request_digest(aws_request(method="GET", query="versionId=8")) != \
        request_digest(aws_request(method="GET", query=q1))


def _chunked(payload: bytes, sig: str) -> bytes:
    return (f"{len(payload):x};chunk-signature={sig}\r\n".encode() + payload + b"\r\n"
            + f"0;chunk-signature={sig}\r\n\r\n".encode())


def test_aws_chunked_uploads_digest_the_payload_not_the_chunk_signatures():
    headers = (("content-encoding", "aws-chunked"),
               ("x-amz-content-sha256", "STREAMING-AWS4-HMAC-SHA256-PAYLOAD"))
    first = aws_request(method="PUT", path="/bucket/key", headers=headers,
                        body=_chunked(b"hello world", "a" * 64))
    retry = aws_request(method="PUT", path="/bucket/key", headers=headers,
                        body=_chunked(b"hello world", "b" * 64))
    other = aws_request(method="PUT", path="/bucket/key", headers=headers,
                        body=_chunked(b"HELLO world", "a" * 64))
    plain = aws_request(method="PUT", path="/bucket/key", headers=(), body=b"hello world")
    assert request_digest(first) == request_digest(retry) == request_digest(plain)
    assert request_digest(other) != request_digest(first)


def test_header_and_body_boundary_is_unambiguous():
    # moving bytes between a significant header and the body must change the digest
    a = aws_request(headers=(("content-type", "a"),), body=b"bc")
    b = aws_request(headers=(("content-type", "ab"),), body=b"c")
    assert request_digest(a) != request_digest(b)


def _aws_action(resources=("admin",), op="CreateRole") -> Action:
    aws = AWSAction("iam", "us-east-1", op, "query", tuple(resources))
    return Action("aws", "POST", "https", "iam.amazonaws.com", 443, "/", name=aws.action, aws=aws)


def test_action_key_same_action_same_key_even_with_different_requests():
    assert action_key("aws-prod", _aws_action()) == action_key("aws-prod", _aws_action())
    assert DIGEST_RE.match(action_key("aws-prod", _aws_action()))


@pytest.mark.parametrize("other", [
    ("aws-dev", _aws_action()),
    ("aws-prod", _aws_action(resources=("other-role",))),
    ("aws-prod", _aws_action(op="DeleteRole")),
])
def test_action_key_changes_with_connection_name_or_resources(other):
    assert action_key(*other) != action_key("aws-prod", _aws_action())


def test_http_action_resources_name_the_target_so_an_action_grant_is_not_any_get():
    a = Action("http", "GET", "https", "api.example.com", 443, "/a", name="http:GET")
    b = Action("http", "GET", "https", "api.example.com", 443, "/b", name="http:GET")
    assert action_resources(a) == ("api.example.com:443/a",)
    assert action_key("c", a) != action_key("c", b)


def test_kubernetes_action_resources():
    kube = KubernetesAction("delete", "", "v1", "namespaces", "", "", "prod")
    act = Action("kubernetes", "DELETE", "https", "k8s", 443, "/api/v1/namespaces/prod",
                 name="kubernetes:delete/namespaces", kubernetes=kube)
    assert action_resources(act) == ("core/namespaces:/prod",)


@pytest.mark.parametrize("action_name", [
    "iam:CreateRole", "kubernetes:delete/namespaces", "http:GET", "", "!!!",
    "s3:" + "VeryLongOperationName" * 10, "ÜNICODE:Äction",
])
def test_request_names_are_dns1123_labels(action_name):
    digest = request_digest(aws_request())
    name = request_name(action_name, digest)
    assert len(name) <= 63 and DNS1123.match(name), name
    assert digest[7:17] in name


def test_request_names_are_readable_and_unique():
    digest = request_digest(aws_request())
    names = {request_name("iam:CreateRole", digest) for _ in range(50)}
    assert len(names) == 50
    assert all(n.startswith(f"iam-createrole-{digest[7:17]}-") for n in names)
