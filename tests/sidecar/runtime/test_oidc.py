"""On-behalf-of token verification against a real (local) OIDC discovery + JWKS server."""

from __future__ import annotations

import asyncio
import base64
import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature

from chaperone_sidecar.config import OIDCConfig
from chaperone_sidecar.oidc import OIDCVerifier, TokenInvalid


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def uint(n: int, size: int | None = None) -> str:
    size = size or (n.bit_length() + 7) // 8
    return b64(n.to_bytes(size, "big"))


class Key:
    def __init__(self, kid: str, alg: str):
        self.kid, self.alg = kid, alg
        self.private = (rsa.generate_private_key(public_exponent=65537, key_size=2048)
                        if alg == "RS256" else ec.generate_private_key(ec.SECP256R1()))

    def jwk(self) -> dict:
        pub = self.private.public_key().public_numbers()
        if self.alg == "RS256":
            return {"kty": "RSA", "kid": self.kid, "use": "sig", "alg": "RS256", "n": uint(pub.n), "e": uint(pub.e)}
        return {"kty": "EC", "kid": self.kid, "crv": "P-256", "x": uint(pub.x, 32), "y": uint(pub.y, 32)}

    def sign(self, claims: dict, header: dict | None = None) -> str:
        head = {"alg": self.alg, "kid": self.kid, "typ": "JWT", **(header or {})}
        signing_input = f"{b64(json.dumps(head).encode())}.{b64(json.dumps(claims).encode())}".encode()
        if self.alg == "RS256":
            sig = self.private.sign(signing_input, padding.PKCS1v15(), hashes.SHA256())
        else:
            r, s = decode_dss_signature(self.private.sign(signing_input, ec.ECDSA(hashes.SHA256())))
            sig = r.to_bytes(32, "big") + s.to_bytes(32, "big")
        return f"{signing_input.decode()}.{b64(sig)}"


class IdP:
    """Discovery document + JWKS over HTTP on loopback; counts fetches."""

    def __init__(self):
        self.keys: list[Key] = []
        self.fetches = {"discovery": 0, "jwks": 0}
        self.issuer_override: str | None = None
        idp = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self):
                if self.path == "/.well-known/openid-configuration":
                    idp.fetches["discovery"] += 1
                    body = {"issuer": idp.issuer_override or idp.issuer, "jwks_uri": idp.issuer + "/keys"}
                elif self.path == "/keys":
                    idp.fetches["jwks"] += 1
                    body = {"keys": [k.jwk() for k in idp.keys] + [{"kty": "oct", "k": "c2VjcmV0"}]}
                else:
                    self.send_response(404)
                    self.end_headers()
                    return
                data = json.dumps(body).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.issuer = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True).start()

    def close(self):
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def idp():
    server = IdP()
    server.keys = [Key("rsa-1", "RS256"), Key("ec-1", "ES256")]
    yield server
    server.close()


def claims(idp, **over):
    now = int(time.time())
    base = {"iss": idp.issuer, "aud": "chaperone", "sub": "alice@example.com", "groups": ["dev", "ops"],
            "exp": now + 300, "iat": now, "nbf": now}
    base.update(over)
    return {k: v for k, v in base.items() if v is not None}


def verify(idp, token, **cfg):
    async def go():
        verifier = OIDCVerifier(OIDCConfig(issuer=idp.issuer, audience="chaperone", **cfg))
        try:
            return await verifier.verify(token)
        finally:
            await verifier.aclose()
    return asyncio.run(go())


def test_rs256_and_es256_tokens_verify(idp):
    rsa_key, ec_key = idp.keys
    got = verify(idp, rsa_key.sign(claims(idp)))
    assert got.username == "alice@example.com" and got.groups == ("dev", "ops")
    got = verify(idp, "Bearer " + ec_key.sign(claims(idp, groups="solo")))
    assert got.groups == ("solo",)
    got = verify(idp, rsa_key.sign(claims(idp, email="a@x", aud=["other", "chaperone"])),
                 username_claim="email")
    assert got.username == "a@x"


@pytest.mark.parametrize("over, reason", [
    ({"aud": "someone-else"}, "audience"),
    ({"iss": "https://evil.example.com"}, "issuer"),
    ({"exp": int(time.time()) - 3600}, "expired"),
    ({"exp": None}, "no numeric exp"),
    ({"nbf": int(time.time()) + 3600}, "not valid yet"),
    ({"sub": None}, "no 'sub' claim"),
    ({"groups": [1, 2]}, "must be a string or a list of strings"),
])
def test_claims_are_checked(idp, over, reason):
    with pytest.raises(TokenInvalid, match=reason):
        verify(idp, idp.keys[0].sign(claims(idp, **over)))


def test_clock_skew_leeway(idp):
    now = int(time.time())
    token = idp.keys[0].sign(claims(idp, exp=now - 30, nbf=now + 30))
    assert verify(idp, token).username  # within the default 60 s
    with pytest.raises(TokenInvalid, match="expired"):
        verify(idp, token, leeway_seconds=5)


def test_signature_and_algorithm_are_enforced(idp):
    token = idp.keys[0].sign(claims(idp))
    head, payload, sig = token.split(".")
    forged = b64(json.dumps(claims(idp, sub="mallory")).encode())
    with pytest.raises(TokenInvalid, match="signature does not verify"):
        verify(idp, f"{head}.{forged}.{sig}")
    none_head = b64(json.dumps({"alg": "none", "kid": "rsa-1"}).encode())
    with pytest.raises(TokenInvalid, match="algorithm 'none' is not accepted"):
        verify(idp, f"{none_head}.{payload}.")
    hs_head = b64(json.dumps({"alg": "HS256", "kid": "rsa-1"}).encode())
    with pytest.raises(TokenInvalid, match="HS256"):
        verify(idp, f"{hs_head}.{payload}.{sig}")
    # An RSA kid with an ES256 header: the key does not fit the algorithm.
    es_head = b64(json.dumps({"alg": "ES256", "kid": "rsa-1"}).encode())
    with pytest.raises(TokenInvalid, match="no key 'rsa-1' for ES256"):
        verify(idp, f"{es_head}.{payload}.{sig}")
    for junk in ("", "a.b", "x" * 20000, "!!!.???.***"):
        with pytest.raises(TokenInvalid):
            verify(idp, junk)


def test_keys_are_cached_and_refreshed_for_an_unknown_kid(idp, monkeypatch):
    monkeypatch.setattr("chaperone_sidecar.oidc._REFRESH_MIN_INTERVAL", 0.0)
    old, new = idp.keys[0], Key("rsa-2", "RS256")

    async def go():
        verifier = OIDCVerifier(OIDCConfig(issuer=idp.issuer, audience="chaperone"))
        try:
            for _ in range(3):
                await verifier.verify(old.sign(claims(idp)))
            assert idp.fetches == {"discovery": 1, "jwks": 1}
            idp.keys.append(new)  # the issuer rotates keys
            await asyncio.sleep(0.01)
            assert (await verifier.verify(new.sign(claims(idp, sub="bob")))).username == "bob"
            assert idp.fetches["jwks"] == 2
            with pytest.raises(TokenInvalid, match="no key 'ghost'"):
                await verifier.verify(Key("ghost", "RS256").sign(claims(idp)))
        finally:
            await verifier.aclose()
    asyncio.run(go())


def test_unknown_kid_refreshes_are_rate_limited(idp):
    async def go():
        verifier = OIDCVerifier(OIDCConfig(issuer=idp.issuer, audience="chaperone"))
        try:
            await verifier.verify(idp.keys[0].sign(claims(idp)))
            for i in range(5):
                with pytest.raises(TokenInvalid):
                    await verifier.verify(Key(f"random-{i}", "ES256").sign(claims(idp)))
            assert idp.fetches["jwks"] == 1  # random kids do not hammer the issuer
        finally:
            await verifier.aclose()
    asyncio.run(go())


def test_discovery_must_name_the_same_issuer(idp):
    idp.issuer_override = "https://someone-else.example.com"
    with pytest.raises(TokenInvalid, match="discovery document names issuer"):
        verify(idp, idp.keys[0].sign(claims(idp)))


def test_unreachable_issuer_and_plain_http_issuers():
    async def go():
        verifier = OIDCVerifier(OIDCConfig(issuer="http://127.0.0.1:9", audience="a"))
        try:
            with pytest.raises(TokenInvalid, match="cannot fetch the issuer's keys"):
                await verifier.verify(Key("k", "ES256").sign({"iss": "x"}))
        finally:
            await verifier.aclose()
    asyncio.run(go())
    with pytest.raises(ValueError, match="must be an https URL"):
        OIDCVerifier(OIDCConfig(issuer="http://idp.example.com", audience="a"))
