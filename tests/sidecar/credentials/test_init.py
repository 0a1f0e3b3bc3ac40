"""The facade: CredentialInjector.for_connection builds the right injector from a spec."""

from __future__ import annotations

import pytest
from mitmproxy import http

from chaperone_sidecar.credentials import CredentialInjector
from chaperone_sidecar.credentials.aws_sigv4 import AWSResigner
from chaperone_sidecar.credentials.credential_sources import StaticAWSSource, WebIdentitySource
from chaperone_sidecar.credentials.headers import HeaderInjector

from .conftest import AgentHarness, aws_spec


def secret_spec(kind: str, **credentials) -> dict:
    return {"type": kind, "hosts": ["api.example.com"],
            "credentials": {"source": "secret", "secretRef": {"name": "s"}, **credentials}}


def request(*headers: tuple[str, str]) -> http.Request:
    req = http.Request.make("GET", "https://api.example.com/x")
    req.headers = http.Headers([(k.encode(), v.encode()) for k, v in headers])
    return req


@pytest.fixture
def secret_dir(tmp_path):
    (tmp_path / "token").write_text("tok-default")
    (tmp_path / "apikey").write_text("tok-custom")
    return tmp_path


def test_http_from_spec(secret_dir):
    injector = CredentialInjector.for_connection(
        secret_spec("http", header="X-Key", prefix="",
                    secretRef={"name": "s", "tokenKey": "apikey"}), secret_dir)
    req = request(("X-Key", "agent"))
    assert injector.apply(req) is None
    assert req.headers["x-key"] == "tok-custom"


def test_http_defaults_and_whole_object(secret_dir):
    obj = {"apiVersion": "chaperone.dev/v1alpha1", "kind": "ClaudeConnection",
           "spec": secret_spec("http")}
    req = request()
    CredentialInjector.for_connection(obj, secret_dir).apply(req)
    assert req.headers["authorization"] == "Bearer tok-default"


def test_anthropic_from_spec(secret_dir):
    req = request(("x-api-key", "agent"), ("authorization", "Bearer agent"))
    CredentialInjector.for_connection(
        {"type": "anthropic", "credentials": {"source": "secret", "secretRef": {"name": "s"},
                                              "prefix": "ignored "}}, secret_dir).apply(req)
    assert req.headers["x-api-key"] == "tok-default" and "authorization" not in req.headers


def test_kubernetes_secret_or_projected_token(secret_dir, tmp_path_factory):
    req = request(("Authorization", "Bearer agent"))
    CredentialInjector.for_connection(secret_spec("kubernetes"), secret_dir).apply(req)
    assert req.headers["authorization"] == "Bearer tok-default"

    projected = tmp_path_factory.mktemp("sa") / "token"
    projected.write_text("projected-sa-token")
    spec = {"type": "kubernetes", "hosts": ["kubernetes.default.svc"]}  # no credentials block
    req = request(("Authorization", "Bearer agent"))
    CredentialInjector.for_connection(spec, None, token_file=projected).apply(req)
    assert req.headers["authorization"] == "Bearer projected-sa-token"


def test_source_none_passes_through():
    injector = CredentialInjector.for_connection(
        {"type": "http", "hosts": ["h"], "credentials": {"source": "none"}}, None)
    req = request(("Authorization", "Bearer agent"))
    assert injector.apply(req) is None
    assert req.headers["authorization"] == "Bearer agent"


def test_aws_kinds(secret_dir, tmp_path):
    static = CredentialInjector.for_connection(aws_spec("http://127.0.0.1:1"), secret_dir)
    assert isinstance(static.injector, AWSResigner)
    assert isinstance(static.injector.credentials, StaticAWSSource)
    web = CredentialInjector.for_connection(
        {"type": "aws", "credentials": {"source": "webIdentity"},
         "aws": {"roleArn": "arn:aws:iam::123456789012:role/r", "sessionName": "fixed"}},
        tmp_path)
    assert isinstance(web.source, WebIdentitySource) and web.source.session_name == "fixed"
    anonymous = CredentialInjector.for_connection({"type": "aws"}, None)
    assert anonymous.injector.credentials is None


def test_aws_end_to_end_through_facade(moto_auth, aws_secret_dir):
    injector = CredentialInjector.for_connection(aws_spec(moto_auth.endpoint_url), aws_secret_dir)
    ident = AgentHarness(injector).client("sts").get_caller_identity()
    assert ident["Arn"].endswith(":user/chaperone-sidecar")


@pytest.mark.parametrize("spec, message", [
    ({"type": "ftp"}, "unknown connection type"),
    ({"type": "aws", "credentials": {"source": "webIdentity"}}, "roleArn"),
    (secret_spec("http"), "mount directory"),
    ({"type": "http", "hosts": ["h"], "credentials": {"source": "webIdentity"}}, "not supported"),
])
def test_invalid_specs(spec, message):
    with pytest.raises(ValueError, match=message):
        CredentialInjector.for_connection(spec, None)


def test_repr_has_no_secret(secret_dir):
    injector = CredentialInjector.for_connection(secret_spec("http"), secret_dir)
    injector.apply(request())
    assert "tok-default" not in repr(injector)
    assert isinstance(injector.injector, HeaderInjector)
