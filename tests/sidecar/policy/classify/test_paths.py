"""The canonical path: one form for every classifier and the matcher; ambiguity refused.

Every variant an agent can write for ``/admin`` is either canonicalised to ``/admin`` (and then
judged as ``/admin`` by every connection type) or refused - never judged as something else.
"""

from __future__ import annotations

import pytest

from chaperone_sidecar.policy.classify import classify
from chaperone_sidecar.policy.classify.paths import PathRules, canonical_path, path_rules
from chaperone_sidecar.policy.compiler import compile_policy
from chaperone_sidecar.policy.evaluator import evaluate
from chaperone_sidecar.policy.matching import CompiledPolicySet
from chaperone_sidecar.policy.model import HTTPRequest, Identity

# Spelled differently, the same path to servers that normalise (CPython http.server, nginx,
# RFC 3986): judged as /admin.
SAME_AS_ADMIN = ["/admin", "//admin", "///admin", "/./admin", "/x/../admin", "/x/y/../../admin",
                 "/../admin", "/%2e%2e/admin", "/%2E/admin", "/.%2e/admin", "/%61dmin",
                 "/%61%64%6D%69%6E", "/x/%2e%2e/admin", "//x//..//admin"]

# Ambiguous between servers: refused, and the message names what would allow it.
AMBIGUOUS = [
    ("/admin;x=1", "allowSemicolon"), ("/..;/admin", "allowSemicolon"), ("/x/..;/admin", "allowSemicolon"),
    ("/%2Fadmin", "allowEncodedSlash"), ("/x%2f..%2fadmin", "allowEncodedSlash"),
    ("/%252Fadmin", "allowDoubleEncoding"), ("/%2561dmin", "allowDoubleEncoding"),
    ("/admin.", "allowTrailingDotOrSpace"), ("/admin%20", "allowTrailingDotOrSpace"),
    ("/admin%2e", "allowTrailingDotOrSpace"), ("/admin../x", "allowTrailingDotOrSpace"),
    ("/admin\\", "allowBackslash"), ("/x\\..\\admin", "allowBackslash"), ("/x%5c..%5cadmin", "allowBackslash"),
    ("/admin%00", None), ("/admin%0a", None), ("/admin\x00", None), ("/adm\tin", None),
    ("/admin%7f", None), ("/adm%in", None), ("/admin%", None), ("/admin#/../public", None),
    ("/x/%c0%ae%c0%ae/admin", None), ("/x/%e0%80%ae/admin", None), ("/%ff", None),
]


@pytest.mark.parametrize("path", SAME_AS_ADMIN)
def test_spellings_of_admin_are_admin(path):
    assert canonical_path(path) == ("/admin", "")


@pytest.mark.parametrize("path, field", AMBIGUOUS)
def test_ambiguous_paths_are_refused_with_the_field_that_would_allow_them(path, field):
    canonical, problem = canonical_path(path)
    assert canonical == path and problem.startswith(f"the request path {path!r} is ambiguous")
    if field:
        assert f"spec.pathNormalization.{field}: true" in problem
    else:
        assert "never forwarded" in problem


@pytest.mark.parametrize("path, field", [(p, f) for p, f in AMBIGUOUS if f])
def test_a_connection_may_allow_each_ambiguity(path, field):
    rules = path_rules("http", {"pathNormalization": {field: True}})
    canonical, problem = canonical_path(path, rules)
    assert problem == ""
    assert canonical != "/admin" or path in ("/x%2f..%2fadmin",)  # never silently made /admin
    assert canonical_path(canonical, rules) == (canonical, "")  # idempotent


def test_allowed_escapes_stay_data_and_unreserved_ones_are_decoded_once():
    rules = PathRules(allow_encoded_slash=True, allow_double_encoding=True)
    assert canonical_path("/a%2fb/%7Euser", rules) == ("/a%2Fb/~user", "")
    assert canonical_path("/%2541", rules) == ("/%2541", "")  # decoded once: "%41", not "A"
    assert canonical_path("/x%2F..%2Fadmin", rules) == ("/x%2F..%2Fadmin", "")  # one segment


@pytest.mark.parametrize("path, canonical", [
    ("/", "/"), ("", ""), ("*", "*"), ("/a/b/", "/a/b/"), ("/a/.", "/a/"), ("/a/..", "/"),
    ("/v1/file.txt", "/v1/file.txt"), ("/q%3Fx", "/q%3Fx"), ("/%c3%a9", "/%C3%A9"),
    ("/a/%2e", "/a/"), ("/ADMIN", "/ADMIN"),
])
def test_plain_paths(path, canonical):
    assert canonical_path(path) == (canonical, "")
    assert canonical_path(canonical) == (canonical, "")


def test_aws_keeps_segments_literal_and_allows_what_s3_keys_hold():
    aws = path_rules("aws")
    # S3 keys are literal: a//b, a/./b and a/../b are other objects than a/b.
    assert canonical_path("/bucket/a//b/./c/../d", aws) == ("/bucket/a//b/./c/../d", "")
    assert canonical_path("/bucket/%61rn%3Ax%2Fy", aws) == ("/bucket/arn%3Ax%2Fy", "")
    assert canonical_path("/bucket/100%2541.", aws) == ("/bucket/100%2541.", "")
    assert canonical_path("/bucket/k;x", aws)[1]  # no AWS SDK sends ";" unencoded
    assert canonical_path("/bucket/k%00", aws)[1]


def test_path_rules_read_the_connection_spec():
    assert path_rules("http") == PathRules()
    assert path_rules("kubernetes", {"pathNormalization": {}}) == PathRules()
    rules = path_rules("http", {"pathNormalization": {"allowSemicolon": True, "caseInsensitive": True,
                                                      "allowBackslash": "yes"}})
    assert rules.allow_semicolon and rules.case_insensitive and not rules.allow_backslash
    assert not path_rules("aws", {"pathNormalization": {"allowEncodedSlash": False}}).allow_encoded_slash


# ---------------------------------------------------------------------------- every classifier

def _request(path, method="GET", host="api.example.com", headers=()):
    path, _, query = path.partition("?")
    return HTTPRequest(method, "https", host, 443, path, query, tuple(headers))


@pytest.mark.parametrize("path", SAME_AS_ADMIN)
def test_every_connection_type_classifies_the_canonical_path(path):
    for ctype in ("http", "kubernetes", "anthropic"):
        action = classify(_request(path), ctype)
        assert action.path == "/admin" and action.errors == (), (ctype, action)
    if "admin" not in path:
        return  # an encoded spelling of the word itself
    kube = classify(_request(path.replace("admin", "api/v1/namespaces/prod")), "kubernetes")
    assert kube.kubernetes.resource == "namespaces" and kube.kubernetes.name == "prod", kube
    claude = classify(_request(path.replace("admin", "v1/messages"), "POST", "api.anthropic.com"),
                      "anthropic")
    assert claude.name == "anthropic:messages", claude


def test_kubernetes_resources_cannot_hide_behind_dots_or_slashes():
    for path in ("/api/v1/namespaces/ns/pods/p/x/../exec", "//api//v1/namespaces/ns/pods/p//exec",
                 "/api/v1/namespaces/ns/pods/p/%65xec"):
        action = classify(_request(path), "kubernetes")
        assert action.name == "kubernetes:create/pods/exec", (path, action)


def test_aws_rest_classifies_the_decoded_path():
    req = HTTPRequest("DELETE", "https", "s3.us-east-1.amazonaws.com", 443, "/%62ucket", "",
                      (("Authorization", "AWS4-HMAC-SHA256 Credential=AKIDEXAMPLE/20260101/us-east-1/s3/"
                                          "aws4_request, SignedHeaders=host, Signature=00"),))
    assert classify(req, "aws").name == "s3:DeleteBucket"
    assert classify(req, "aws").aws.resources == ("bucket",)
    assert classify(req, "aws").path == "/bucket"


def test_an_ambiguous_path_is_classified_as_sent_and_says_why():
    action = classify(_request("/admin;x=1"), "http")
    assert action.path == "/admin;x=1"
    assert any("ambiguous" in e for e in action.errors)


# ---------------------------------------------------------------------------- matching

def _policies(rules, default="allow"):
    obj = {"apiVersion": "chaperone.dev/v1alpha1", "kind": "AccessPolicy",
           "metadata": {"name": "p", "namespace": "ns"},
           "spec": {"defaultEffect": default, "rules": rules}}
    return CompiledPolicySet([compile_policy(obj, "ns")])


def _decide(policies, path, rules=None):
    action = classify(_request(path), "http", rules)
    return evaluate(policies, action, Identity(), "api").effect


@pytest.mark.parametrize("path", SAME_AS_ADMIN)
def test_a_rule_on_admin_blocks_every_spelling(path):
    pols = _policies([{"name": "no-admin", "match": {"paths": ["/admin"]}, "block": {}}])
    assert _decide(pols, path) == "block"
    regex = _policies([{"name": "no-admin", "match": {"pathRegex": "^/admin$"}, "block": {}}])
    assert _decide(regex, path) == "block"


def test_case_insensitive_connections_match_paths_ignoring_case():
    pols = _policies([{"name": "no-admin", "match": {"paths": ["/Admin/*"]}, "block": {}}])
    regex = _policies([{"name": "no-admin", "match": {"pathRegex": "^/admin"}, "block": {}}])
    folded = path_rules("http", {"pathNormalization": {"caseInsensitive": True}})
    assert _decide(pols, "/ADMIN/users", folded) == "block"
    assert _decide(regex, "/ADMIN/users", folded) == "block"
    assert _decide(pols, "/ADMIN/users") == "allow"  # case-sensitive by default (RFC 3986)
    assert _decide(pols, "/Admin/users") == "block"
    # an allow rule is not widened to other cases on a case-sensitive connection
    allow = _policies([{"name": "public", "match": {"paths": ["/public/*"]}, "allow": {}}], "block")
    assert _decide(allow, "/PUBLIC/x") == "block"
    assert _decide(allow, "/PUBLIC/x", folded) == "allow"


def test_double_encoding_hidden_behind_encoded_hex_digits_is_still_refused():
    # "%25%36%31" decodes (unreserved digits) to "%2561": a server decoding twice sees "a".
    for path in ("/%25%36%31dmin", "/%25%3261dmin", "/%2525%36%31dmin"):
        assert "double encoding" in canonical_path(path)[1], path


@pytest.mark.parametrize("connection_type", ["http", "aws", "kubernetes", "anthropic"])
@pytest.mark.parametrize("path", ["/a\udcc0\udcae/admin", "/%2F\udc80", "/%41\udcff"])
def test_raw_bytes_that_are_not_utf8_are_refused_not_crashed_on(connection_type, path):
    # mitmproxy hands over a path's non-UTF-8 bytes as lone surrogates (surrogateescape); an
    # overlong "\xc0\xae" is "." to some servers. Refused for every connection type, never a
    # classifier crash (Hypothesis found "/%2F%2F\udc80" crashing the percent decoder).
    canonical, problem = canonical_path(path, path_rules(connection_type))
    assert canonical == path and "not UTF-8" in problem
    action = classify(HTTPRequest(method="GET", scheme="https", host="h.example", port=443, path=path),
                      connection_type)
    assert not any("classifier failed" in e for e in action.errors), action.errors
