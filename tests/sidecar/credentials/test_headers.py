"""Header injection for http, anthropic and kubernetes connections."""

from __future__ import annotations

import pytest
from mitmproxy import http

from chaperone_sidecar.credentials.credential_sources import CredentialsUnavailable, TokenSource
from chaperone_sidecar.credentials.headers import (
    HeaderInjector,
    anthropic_injector,
    http_injector,
    kubernetes_injector,
)


def request(*headers: tuple[str, str]) -> http.Request:
    req = http.Request.make("GET", "https://api.example.com/v1/things")
    req.headers = http.Headers([(k.encode(), v.encode()) for k, v in headers])
    return req


@pytest.fixture
def token(tmp_path) -> TokenSource:
    (tmp_path / "token").write_text("real-token-123\n")
    return TokenSource(tmp_path, "token")


def test_http_bearer_replaces_every_agent_value(token):
    req = request(("Authorization", "Bearer agent-fake"), ("authorization", "Basic Zm9v"),
                  ("Accept", "*/*"))
    http_injector(token).apply(req)
    assert req.headers.get_all("authorization") == ["Bearer real-token-123"]
    assert req.headers["accept"] == "*/*"


def test_http_custom_header_and_prefix(token):
    req = request(("X-Api-Token", "agent"), ("Authorization", "Bearer kept"))
    http_injector(token, header="X-Api-Token", prefix="Token ").apply(req)
    assert req.headers.get_all("x-api-token") == ["Token real-token-123"]
    assert req.headers["authorization"] == "Bearer kept"  # only the configured header
    req = request()
    http_injector(token, header="PRIVATE-TOKEN", prefix="").apply(req)
    assert req.headers["private-token"] == "real-token-123"


def test_anthropic_x_api_key(token):
    req = request(("x-api-key", "sk-ant-agent-placeholder"), ("Authorization", "Bearer oauth"),
                  ("anthropic-version", "2023-06-01"))
    anthropic_injector(token).apply(req)
    assert req.headers.get_all("x-api-key") == ["real-token-123"]
    assert "authorization" not in req.headers
    assert req.headers["anthropic-version"] == "2023-06-01"


def test_kubernetes_bearer_strips_impersonation(token):
    req = request(("Authorization", "Bearer agent"), ("Impersonate-User", "admin"),
                  ("Impersonate-Group", "system:masters"), ("Impersonate-Extra-Scopes", "x"),
                  ("Content-Type", "application/json"))
    kubernetes_injector(token).apply(req)
    assert req.headers.get_all("authorization") == ["Bearer real-token-123"]
    assert not [k for k in req.headers if k.lower().startswith("impersonate-")]
    assert req.headers["content-type"] == "application/json"


def test_projected_token_file_rotation(tmp_path):
    path = tmp_path / "serviceaccount" / "token"
    path.parent.mkdir()
    path.write_text("sa-token-v1")
    injector = kubernetes_injector(TokenSource.from_file(path))
    req = request()
    injector.apply(req)
    assert req.headers["authorization"] == "Bearer sa-token-v1"
    path.write_text("sa-token-v2")
    req = request()
    injector.apply(req)
    assert req.headers["authorization"] == "Bearer sa-token-v2"


def test_token_with_line_break_is_refused(tmp_path):
    (tmp_path / "token").write_text("abc\r\nX-Injected: 1")
    req = request(("Authorization", "Bearer agent"))
    with pytest.raises(CredentialsUnavailable, match="line break"):
        http_injector(TokenSource(tmp_path, "token")).apply(req)
    assert req.headers["authorization"] == "Bearer agent"  # untouched: the proxy refuses


def test_missing_token_leaves_request_untouched(tmp_path):
    req = request(("Authorization", "Bearer agent"))
    with pytest.raises(CredentialsUnavailable):
        http_injector(TokenSource(tmp_path, "absent")).apply(req)
    assert req.headers["authorization"] == "Bearer agent"


def test_invalid_header_configuration(token):
    with pytest.raises(ValueError):
        HeaderInjector(token, header="Bad Header")
    with pytest.raises(ValueError):
        HeaderInjector(token, prefix="x\n")
