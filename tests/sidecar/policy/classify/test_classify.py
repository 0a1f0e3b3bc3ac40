"""``classify``: dispatch by connection type, and totality on anything an agent can send."""

from __future__ import annotations

import json

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import chaperone_sidecar.policy.classify as classify_package
from chaperone_sidecar.policy.classify import CONNECTION_TYPES, classify
from chaperone_sidecar.policy.model import Action, HTTPRequest

AUTH = ("AWS4-HMAC-SHA256 Credential=AKIDEXAMPLE/20240101/us-east-1/{}/aws4_request, "
        "SignedHeaders=host, Signature=00")


def test_dispatch_fills_exactly_one_typed_part():
    request = HTTPRequest("DELETE", "https", "s3.amazonaws.com", 443, "/my-bucket", "",
                          (("Authorization", AUTH.format("s3")),))
    aws = classify(request, "aws")
    assert aws.aws is not None and aws.kubernetes is None and aws.anthropic is None
    assert (aws.name, aws.summary) == ("s3:DeleteBucket", "s3:DeleteBucket bucket=my-bucket (us-east-1)")

    kube = classify(HTTPRequest("DELETE", "https", "k8s", 443, "/api/v1/namespaces/prod"), "kubernetes")
    assert kube.kubernetes is not None and kube.aws is None and kube.anthropic is None

    body = json.dumps({"model": "claude-x", "messages": []}).encode()
    claude = classify(HTTPRequest("POST", "https", "api.anthropic.com", 443, "/v1/messages", body=body),
                      "anthropic")
    assert claude.anthropic is not None and claude.aws is None and claude.kubernetes is None
    assert (claude.name, claude.summary) == ("anthropic:messages", "anthropic:messages model=claude-x")

    plain = classify(request, "http")
    assert plain.aws is plain.kubernetes is plain.anthropic is None
    assert plain.name == "http:DELETE"


def test_generic_fields_are_filled_for_every_type():
    request = HTTPRequest("get", "https", "Host.Example", 8443, "/p", "q=1")
    for connection_type in CONNECTION_TYPES:
        action = classify(request, connection_type)
        assert (action.connection_type, action.method, action.scheme, action.host, action.port,
                action.path, action.query) == (connection_type, "GET", "https", "host.example", 8443,
                                               "/p", "q=1")
        assert action.name and action.summary


@pytest.mark.parametrize("connection_type", ["ssh", "", None, 3, ["aws"]])
def test_unknown_connection_type_is_classified_as_http(connection_type):
    action = classify(HTTPRequest("GET", "https", "example.com", 443, "/"), connection_type)
    assert action.connection_type == "http" and action.name == "http:GET"
    assert any("unknown connection type" in e for e in action.errors)


@pytest.mark.parametrize("connection_type, target", [
    ("aws", "classify_aws"), ("kubernetes", "classify_kubernetes"), ("anthropic", "classify_anthropic"),
])
def test_a_failing_typed_classifier_yields_the_generic_action(monkeypatch, connection_type, target):
    def explode(*_args, **_kwargs):
        raise RuntimeError("boom " + "x" * 1000)

    monkeypatch.setattr(classify_package, target, explode)
    action = classify(HTTPRequest("POST", "https", "example.com", 443, "/v1/messages"), connection_type)
    assert action.connection_type == connection_type
    assert action.name == "http:POST" and action.summary == "POST example.com/v1/messages"
    assert len(action.errors) == 1 and action.errors[0].startswith(f"{connection_type} classifier failed")
    assert len(action.errors[0]) <= 300


def test_not_even_a_request():
    for connection_type in CONNECTION_TYPES:
        action = classify(object(), connection_type)  # type: ignore[arg-type]
        assert isinstance(action, Action) and action.errors and action.name


# --- totality: whatever bytes the proxy hands over -------------------------------------------

def _proxy_text(raw: bytes) -> str:
    # mitmproxy exposes method, path and header fields as bytes decoded utf-8/surrogateescape
    return raw.decode("utf-8", "surrogateescape")


def _mixed(realistic: list[str]):
    """Realistic fragments (to reach deep code paths) mixed with arbitrary decoded bytes."""
    return st.one_of(st.sampled_from(realistic), st.binary(max_size=80).map(_proxy_text),
                     st.text(max_size=40))


_methods = _mixed(["GET", "POST", "PUT", "PATCH", "DELETE", "HEAD", "OPTIONS", "get"])
_hosts = _mixed([
    "s3.amazonaws.com", "my.bucket.s3.us-east-1.amazonaws.com", "iam.amazonaws.com",
    "secretsmanager.us-east-1.amazonaws.com", "123.s3-control.us-east-1.amazonaws.com",
    "abc.execute-api.us-east-1.amazonaws.com", "x.lambda-url.us-east-1.on.aws", "127.0.0.1",
    "api.anthropic.com", "kubernetes.default.svc", "S3.AmazonAWS.com.", "", ".", "s3-.amazonaws.com",
])
_path_heads = [
    "/", "", "/b", "/b/k", "/b/k/", "//", "/%", "/%zz", "/%2F%2F", "/api/v1/namespaces/ns/pods/p/exec",
    "/api/v1/watch", "/apis/apps/v1/watch/namespaces", "/api", "/apis/g/v/namespaces",
    "/v1/messages", "/v1/messages/batches", "/v1/messages/count_tokens",
    "/service/GraniteServiceVersion20100801/operation/", "/2015-03-31/functions/f/invocations",
    "/2013-04-01/hostedzone/Z/rrset/", "/restapis/a/resources/b",
]
_paths = st.builds(lambda head, tail: head + tail, st.sampled_from(_path_heads),
                   st.one_of(st.just(""), st.binary(max_size=40).map(_proxy_text)))
_queries = _mixed([
    "", "Action=CreateRole&RoleName=r", "Action=", "Action=A&Action=B", "watch=true", "watch",
    "fieldSelector=metadata.name%3D", "fieldSelector=metadata.name==a,b", "uploads", "list-type=2",
    "X-Amz-Credential=a%2Fb%2Fc%2Fs3%2Faws4_request&X-Amz-Signature=0", "X-Amz-Credential=",
    "AWSAccessKeyId=a&Signature=b", "analytics&id=", "partNumber=1&uploadId=u", "command=sh&command=",
    "%", "&&==&", "a=%ff%fe",
])
_signing = st.sampled_from(["s3", "iam", "sts", "lambda", "secretsmanager", "monitoring", "execute-api",
                            "rds", "sqs", "s3express", "nope", "", "/", "bedrock"])
_header_values = {
    "Authorization": st.one_of(_signing.map(AUTH.format), _mixed([
        "Credential=", "Credential=a/b/aws4_request", "AWS4-ECDSA-P256-SHA256 Credential=a/b/s3/aws4_request",
        "AWS AKID:sig", "Bearer x"])),
    "X-Amz-Target": _mixed(["secretsmanager.GetSecretValue", "DynamoDB_20120810.PutItem", ".", "a.",
                            ".b", "AmazonSQS.SendMessage"]),
    "Content-Type": _mixed(["application/x-www-form-urlencoded", "application/json", ""]),
    "x-amz-copy-source": _mixed(["/src/key?versionId=1", "%", ""]),
    "X-Amz-Region-Set": _mixed(["*", "us-east-1,us-west-2"]),
    "Smithy-Protocol": st.just("rpc-v2-cbor"),
}
_headers = st.lists(
    st.one_of(
        st.sampled_from(sorted(_header_values)).flatmap(
            lambda name: st.tuples(st.just(name), _header_values[name])),
        st.tuples(st.binary(max_size=20).map(_proxy_text), st.binary(max_size=40).map(_proxy_text)),
    ),
    max_size=6,
).map(tuple)
_json_values = st.recursive(
    st.one_of(st.none(), st.booleans(), st.integers(), st.text(max_size=10)),
    lambda children: st.one_of(st.lists(children, max_size=4),
                               st.dictionaries(st.sampled_from(
                                   ["model", "stream", "tools", "messages", "content", "type", "name",
                                    "requests", "params", "SecretId", "TableName", "x"]), children,
                                   max_size=5)),
    max_leaves=25,
)
_bodies = st.one_of(
    st.binary(max_size=200),
    _json_values.map(lambda v: json.dumps(v).encode()),
    _mixed(["Action=CreateRole&RoleName=r", "Action=DeleteObjects", "<Delete><Key>a</Key></Delete>"])
    .map(lambda s: s.encode("utf-8", "surrogateescape")),
)
_requests = st.builds(
    HTTPRequest,
    method=_methods,
    scheme=_mixed(["https", "http", ""]),
    host=_hosts,
    port=st.integers(min_value=0, max_value=65535),
    path=_paths,
    query=_queries,
    headers=_headers,
    body=_bodies,
)


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(request=_requests, connection_type=st.sampled_from(CONNECTION_TYPES))
def test_classify_never_raises(request, connection_type):
    action = classify(request, connection_type)
    assert isinstance(action, Action)
    assert action.connection_type == connection_type
    assert isinstance(action.name, str) and action.name
    assert isinstance(action.summary, str) and action.summary
    assert all(isinstance(e, str) for e in action.errors)
    # The catch-all is the last line of defence; no input tested here should need it.
    assert not any("classifier failed" in e for e in action.errors), action.errors
    typed = {"aws": action.aws, "kubernetes": action.kubernetes, "anthropic": action.anthropic}
    for kind, part in typed.items():
        assert (part is not None) == (kind == connection_type)


# Inputs sized to turn any quadratic scan into minutes; linear code takes well under a second.
# The bound is loose on purpose (shared CI machines): it catches complexity, not speed.
_AUTH_S3 = (("Authorization", AUTH.format("s3")),)
ADVERSARIAL = [
    ("unclosed-xml-keys", HTTPRequest("POST", "https", "b.s3.amazonaws.com", 443, "/", "delete",
                                      _AUTH_S3, b"<Key>" * 1_600_000), "aws"),
    ("long-host", HTTPRequest("GET", "https", "a.s3.us-east-1" * 5000 + ".amazonaws.com", 443, "/"),
     "aws"),
    ("deep-path", HTTPRequest("GET", "https", "s3.amazonaws.com", 443, "/b/" + "x/" * 500_000, "",
                              _AUTH_S3), "aws"),
    ("many-query-params", HTTPRequest("GET", "https", "s3.amazonaws.com", 443, "/b",
                                      "&".join(f"k{i}=v" for i in range(100_000)), _AUTH_S3), "aws"),
    ("deep-json", HTTPRequest("POST", "https", "api.anthropic.com", 443, "/v1/messages",
                              body=b'{"messages":' + b"[" * 500_000 + b"]" * 500_000 + b"}"),
     "anthropic"),
    ("long-k8s-path", HTTPRequest("GET", "https", "k", 443, "/api/v1/" + "a/" * 500_000,
                                  "fieldSelector=" + "metadata.name=a," * 100_000), "kubernetes"),
]


@pytest.mark.parametrize("request_, connection_type",
                         [pytest.param(r, c, id=i) for i, r, c in ADVERSARIAL])
def test_adversarial_sizes_stay_linear(request_, connection_type):
    import time

    started = time.perf_counter()
    action = classify(request_, connection_type)
    assert time.perf_counter() - started < 20
    assert action.name and not any("classifier failed" in e for e in action.errors)
