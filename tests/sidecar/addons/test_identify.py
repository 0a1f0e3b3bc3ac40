"""Identify: identity from the config, verified on-behalf-of tokens, no X-Chaperone-* spoofing."""

from __future__ import annotations

import asyncio
import json

from mitmproxy import http
from mitmproxy.test import taddons, tflow, tutils

from chaperone_sidecar import flowctx
from chaperone_sidecar.addons.identify import Identify, base_identity
from chaperone_sidecar.config import SidecarConfig
from chaperone_sidecar.oidc import TokenInvalid, VerifiedToken
from chaperone_sidecar.services import SidecarServices
from chaperone_sidecar.sources import Sources


class FakeVerifier:
    """Stands in for OIDCVerifier (verified for real in tests/sidecar/runtime/test_oidc.py)."""

    def __init__(self):
        self.seen = []

    async def verify(self, token):
        self.seen.append(token)
        if token.removeprefix("Bearer ") == "good":
            return VerifiedToken("alice@example.com", ("dev",), {"sub": "alice@example.com"})
        raise TokenInvalid("token expired 3 seconds ago")


def services(oidc=None, **config):
    base = dict(standalone=False, api_server="https://127.0.0.1:6443", pod_name="agent-1",
                pod_namespace="team-a", pod_uid="uid-1", service_account="claude",
                creator="bob", creator_groups=("admins",))
    base.update(config)
    return SidecarServices(config=SidecarConfig(**base), sources=Sources("team-a"), oidc=oidc)


def flow_with(*headers):
    fields = [(b"host", b"api.example.com"), *((k.encode(), v.encode()) for k, v in headers)]
    return tflow.tflow(req=tutils.treq(host="api.example.com", port=443, scheme=b"https",
                                       headers=http.Headers(fields), content=b""))


def run(addon, flow):
    with taddons.context(addon):
        asyncio.run(addon.requestheaders(flow))
        addon.request(flow)


def test_identity_comes_from_the_config():
    addon = Identify(services())
    f = flow_with()
    run(addon, f)
    ident = flowctx.get(f).identity
    assert ident.service_account == "team-a/claude"
    assert (ident.pod_namespace, ident.pod_name, ident.pod_uid) == ("team-a", "agent-1", "uid-1")
    assert (ident.creator, ident.creator_groups) == ("bob", ("admins",))
    assert ident.on_behalf_of == "" and f.response is None


def test_every_chaperone_header_is_stripped():
    f = flow_with(("X-Chaperone-Approved-By", "alice"), ("x-chaperone-grant", "exact"),
                  ("X-CHAPERONE-Identity", '{"user":"root"}'), ("X-Other", "kept"),
                  ("x-chaperone-grant", "twice"))
    run(Identify(services()), f)
    assert [k for k in f.request.headers if k.lower().startswith("x-chaperone")] == []
    assert f.request.headers["X-Other"] == "kept" and f.response is None


def test_trailers_are_stripped_too():
    f = flow_with()
    f.request.trailers = http.Headers([(b"x-chaperone-decision", b"allow"), (b"x-ok", b"1")])
    run(Identify(services()), f)
    assert list(f.request.trailers.keys()) == ["x-ok"]


def test_a_valid_on_behalf_of_token_sets_the_user_and_is_not_forwarded():
    verifier = FakeVerifier()
    f = flow_with(("X-Chaperone-On-Behalf-Of", "Bearer good"))
    run(Identify(services(oidc=verifier)), f)
    ident = flowctx.get(f).identity
    assert (ident.on_behalf_of, ident.on_behalf_of_groups) == ("alice@example.com", ("dev",))
    assert ident.creator == "bob"  # the pod's creator stays
    assert verifier.seen == ["Bearer good"] and "x-chaperone-on-behalf-of" not in f.request.headers
    assert f.response is None


def test_an_invalid_token_is_answered_401_and_never_forwarded():
    f = flow_with(("X-Chaperone-On-Behalf-Of", "forged"))
    run(Identify(services(oidc=FakeVerifier())), f)
    assert f.response.status_code == 401
    assert f.response.headers["X-Chaperone-Refused"] == "unauthenticated"
    body = json.loads(f.response.content)
    assert body["error"] == "chaperone_unauthenticated"
    assert "token expired" in body["message"] and body["how_to_get_access"]
    assert flowctx.get(f).refused == body and flowctx.get(f).identity.on_behalf_of == ""


def test_a_token_without_a_configured_issuer_is_refused():
    f = flow_with(("X-Chaperone-On-Behalf-Of", "good"))
    run(Identify(services()), f)
    assert f.response.status_code == 401
    assert "no OIDC issuer configured" in json.loads(f.response.content)["message"]


def test_two_tokens_are_refused():
    f = flow_with(("X-Chaperone-On-Behalf-Of", "good"), ("x-chaperone-on-behalf-of", "good"))
    run(Identify(services(oidc=FakeVerifier())), f)
    assert f.response.status_code == 401
    assert "at most one" in json.loads(f.response.content)["message"]


def test_creator_falls_back_to_the_podinfo_annotation(tmp_path):
    creator = json.dumps({"username": "carol", "groups": ["g1"]})
    (tmp_path / "annotations").write_text(
        f'chaperone.dev/creator={json.dumps(creator)}\nchaperone.dev/status="{{}}"\n')
    ident = base_identity(SidecarConfig(standalone=True, podinfo_dir=tmp_path))
    assert (ident.creator, ident.creator_groups) == ("carol", ("g1",))
    # The env value (immutable) wins over the (mutable) annotation.
    ident = base_identity(SidecarConfig(standalone=True, podinfo_dir=tmp_path, creator="dave"))
    assert ident.creator == "dave"



def test_strip_removes_what_the_decoded_names_say_and_nothing_else():
    """Issue 16: raw field names are checked first; the answer is the decoded names' answer,
    whatever the case or the non-ASCII bytes (str.lower() maps e.g. the Kelvin sign to "k")."""
    import itertools

    from chaperone_sidecar.addons.identify import strip_chaperone_headers

    names = [b"X-Chaperone-On-Behalf-Of", b"x-chaperone-anything", b"X-CHAPERONE-", b"X-Chaperone",
             b"x-chaperonex", "X-Chaperone-\u212aey".encode(), "\u0130-chaperone-x".encode(), b"\xff-x",
             b"Host", b"x-chaperone\xff-", b"X-Chaperone-\xff"]
    for pair in itertools.permutations(names, 2):
        fields = [(n, b"v%d" % i) for i, n in enumerate(pair)]
        headers = http.Headers(fields)
        expected = [(k, v) for k, v in http.Headers(fields).items(multi=True)
                    if k.lower().startswith("x-chaperone-")]
        assert strip_chaperone_headers(headers) == expected
        assert not any(k.lower().startswith("x-chaperone-") for k in headers.keys())
        assert len(headers.fields) == len(fields) - len(expected)
