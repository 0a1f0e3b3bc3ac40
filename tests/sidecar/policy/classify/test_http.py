"""Generic HTTP classification: fields, normalisation, name and summary."""

from __future__ import annotations

import pytest

from chaperone_sidecar.policy.classify import classify
from chaperone_sidecar.policy.classify.http import sanitize
from chaperone_sidecar.policy.model import HTTPRequest

CASES = [
    ("get", HTTPRequest("GET", "https", "api.example.com", 443, "/v1/x"),
     "http:GET", "GET api.example.com/v1/x"),
    ("query-shown", HTTPRequest("POST", "https", "api.example.com", 443, "/v1/x", "a=1&b=2"),
     "http:POST", "POST api.example.com/v1/x?a=1&b=2"),
    ("non-default-port", HTTPRequest("GET", "http", "127.0.0.1", 8080, "/"),
     "http:GET", "GET 127.0.0.1:8080/"),
    ("default-http-port", HTTPRequest("GET", "http", "example.com", 80, "/"),
     "http:GET", "GET example.com/"),
    ("https-on-80", HTTPRequest("GET", "https", "example.com", 80, "/"),
     "http:GET", "GET example.com:80/"),
    ("lowercase-method", HTTPRequest("delete", "https", "api.example.com", 443, "/v1/x"),
     "http:DELETE", "DELETE api.example.com/v1/x"),
    ("host-normalised", HTTPRequest("GET", "https", "API.Example.COM.", 443, "/x"),
     "http:GET", "GET api.example.com/x"),
    ("empty-path", HTTPRequest("GET", "https", "example.com", 443, ""),
     "http:GET", "GET example.com/"),
    ("asterisk-form", HTTPRequest("OPTIONS", "https", "example.com", 443, "*"),
     "http:OPTIONS", "OPTIONS example.com/*"),
]


@pytest.mark.parametrize("request_, name, summary", [pytest.param(r, n, s, id=i) for i, r, n, s in CASES])
def test_generic_fields_name_and_summary(request_, name, summary):
    action = classify(request_, "http")
    assert (action.name, action.summary) == (name, summary)
    assert action.connection_type == "http"
    assert action.method == request_.method.upper()
    assert action.host == request_.host.lower().rstrip(".")
    assert (action.scheme, action.port, action.path, action.query) == (
        request_.scheme, request_.port, request_.path, request_.query)
    assert action.aws is action.kubernetes is action.anthropic is None
    assert action.errors == ()


def test_path_and_query_are_kept_verbatim():
    request = HTTPRequest("GET", "https", "example.com", 443, "/a%2Fb/../c", "x=%20&y")
    action = classify(request, "http")
    assert (action.path, action.query) == ("/a%2Fb/../c", "x=%20&y")


def test_summary_is_bounded():
    request = HTTPRequest("GET", "https", "example.com", 443, "/" + "p" * 5000, "q=" + "v" * 5000)
    summary = classify(request, "http").summary
    assert len(summary) <= 300 and summary.endswith("…")


@pytest.mark.parametrize("field, value", [
    ("method", b"GET"), ("host", None), ("path", 42), ("query", ["a"]), ("port", "443"),
    ("port", "not-a-port"), ("port", None), ("body", "text body"), ("body", None),
    ("body", bytearray(b"x")), ("headers", "not headers"), ("headers", [("a", "b", "c")]),
    ("headers", [(b"Host", b"x")]), ("headers", None), ("scheme", 1.5),
])
def test_badly_typed_fields_are_coerced_and_noted(field, value):
    good = HTTPRequest("GET", "https", "example.com", 443, "/", "", (("Host", "example.com"),), b"")
    request = HTTPRequest(**{**good.__dict__, field: value})
    errors: list[str] = []
    clean = sanitize(request, errors)
    assert isinstance(clean.method, str) and isinstance(clean.host, str)
    assert isinstance(clean.path, str) and isinstance(clean.query, str)
    assert isinstance(clean.port, int) and isinstance(clean.body, bytes)
    assert all(isinstance(k, str) and isinstance(v, str) for k, v in clean.headers)
    if field != "headers" or value != [(b"Host", b"x")]:
        assert errors
    for connection_type in ("http", "aws", "kubernetes", "anthropic"):
        action = classify(request, connection_type)
        assert action.name and action.summary


# ---------------------------------------------------------------------------- method override

def test_override_method_reads_every_override_spelling():
    from chaperone_sidecar.policy.classify.http import override_method

    def req(method="POST", headers=(), query=""):
        return HTTPRequest(method, "https", "api.example.com", 443, "/x", query, tuple(headers))

    assert override_method(req()) == ("POST", "")
    for name in ("X-HTTP-Method-Override", "x-http-method", "X-Method-Override"):
        assert override_method(req(headers=((name, " delete "),))) == ("DELETE", "")
    assert override_method(req(query="a=1&_method=DELETE")) == ("DELETE", "")
    assert override_method(req(headers=(("X-HTTP-Method", "DELETE"),), query="_method=delete")) == ("DELETE", "")
    method, problem = override_method(req(headers=(("X-HTTP-Method", "GET"),), query="_method=DELETE"))
    assert method == "" and "conflicting" in problem
    method, problem = override_method(req(headers=(("X-HTTP-Method", "DEL ETE"),)))
    assert method == "" and "invalid" in problem
