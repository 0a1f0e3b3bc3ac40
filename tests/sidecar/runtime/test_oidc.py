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


# ---------------------------------------------------------------- adversarial tokens
def _forge(header: dict, claims_: dict, signature: bytes = b"") -> str:
    return f"{b64(json.dumps(header).encode())}.{b64(json.dumps(claims_).encode())}.{b64(signature)}"


def test_alg_none_is_refused_before_any_key_fetch(idp):
    """An unsigned token (alg none, any case, with or without a signature part) never verifies
    and never makes the sidecar contact the issuer."""
    for alg in ("none", "None", "NONE", ""):
        with pytest.raises(TokenInvalid, match="is not accepted"):
            verify(idp, _forge({"alg": alg, "kid": "rsa-1"}, claims(idp)))
    with pytest.raises(TokenInvalid, match="algorithm None is not accepted"):
        verify(idp, _forge({"kid": "rsa-1"}, claims(idp), b"x"))  # no alg at all
    assert idp.fetches == {"discovery": 0, "jwks": 0}


def test_hs256_signed_with_the_rsa_public_key_is_refused(idp):
    """Algorithm confusion: the attacker MACs the token with the issuer's public key (which
    anyone can fetch from the JWKS) and names the RSA key's kid. A verifier that feeds the key
    material to HMAC would accept it."""
    import hashlib
    import hmac

    from cryptography.hazmat.primitives import serialization

    rsa_key = idp.keys[0]
    pem = rsa_key.private.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    for alg, digest in (("HS256", hashlib.sha256), ("HS384", hashlib.sha384), ("HS512", hashlib.sha512)):
        head = b64(json.dumps({"alg": alg, "kid": "rsa-1", "typ": "JWT"}).encode())
        body = b64(json.dumps(claims(idp, sub="mallory")).encode())
        for secret in (pem, json.dumps(rsa_key.jwk()).encode(), rsa_key.jwk()["n"].encode()):
            mac = hmac.new(secret, f"{head}.{body}".encode(), digest).digest()
            with pytest.raises(TokenInvalid, match=f"{alg}' is not accepted"):
                verify(idp, f"{head}.{body}.{b64(mac)}")


def test_the_jwks_oct_key_is_never_used(idp):
    """The JWKS the IdP serves also holds an oct (shared secret) key without kid; a token MAC'd
    with it must not verify whatever the header says."""
    import hashlib
    import hmac

    head = b64(json.dumps({"alg": "HS256", "typ": "JWT"}).encode())
    body = b64(json.dumps(claims(idp, sub="mallory")).encode())
    mac = hmac.new(b"secret", f"{head}.{body}".encode(), hashlib.sha256).digest()
    with pytest.raises(TokenInvalid, match="not accepted"):
        verify(idp, f"{head}.{body}.{b64(mac)}")


def test_unknown_kid_refetches_once_then_is_rate_limited(idp):
    """A kid not in the cache: exactly one refetch (the issuer may have rotated); a key that
    appears after that refetch is picked up only once the rate limit allows another one."""
    late = Key("rsa-late", "RS256")

    async def go():
        verifier = OIDCVerifier(OIDCConfig(issuer=idp.issuer, audience="chaperone"))
        try:
            assert idp.fetches["jwks"] == 0
            with pytest.raises(TokenInvalid, match="no key 'rsa-late' for RS256"):
                await verifier.verify(late.sign(claims(idp)))
            assert idp.fetches["jwks"] == 1  # first fetch; the unknown kid's refresh is held back
            idp.keys.append(late)
            for _ in range(5):
                with pytest.raises(TokenInvalid, match="no key 'rsa-late'"):
                    await verifier.verify(late.sign(claims(idp)))
            assert idp.fetches["jwks"] == 1
        finally:
            await verifier.aclose()
    asyncio.run(go())


def test_unknown_kid_refetch_picks_up_a_rotated_key(idp, monkeypatch):
    monkeypatch.setattr("chaperone_sidecar.oidc._REFRESH_MIN_INTERVAL", 0.05)
    late = Key("rsa-late", "RS256")

    async def go():
        verifier = OIDCVerifier(OIDCConfig(issuer=idp.issuer, audience="chaperone"))
        try:
            await verifier.verify(idp.keys[0].sign(claims(idp)))
            idp.keys.append(late)
            await asyncio.sleep(0.1)
            assert (await verifier.verify(late.sign(claims(idp, sub="carol")))).username == "carol"
            assert idp.fetches["jwks"] == 2  # exactly one refetch for the unknown kid
            await verifier.verify(late.sign(claims(idp)))
            assert idp.fetches["jwks"] == 2  # now cached
        finally:
            await verifier.aclose()
    asyncio.run(go())


def test_expired_and_future_tokens_with_an_injected_clock(idp):
    """exp/nbf/iat are judged against the verifier's clock, with the leeway on each side."""
    token = idp.keys[0].sign(claims(idp, exp=1_000_000, iat=999_000, nbf=999_000))

    async def at(now, leeway=60):
        verifier = OIDCVerifier(OIDCConfig(issuer=idp.issuer, audience="chaperone", leeway_seconds=leeway),
                                clock=lambda: now)
        try:
            return await verifier.verify(token)
        finally:
            await verifier.aclose()

    assert asyncio.run(at(999_500)).username
    assert asyncio.run(at(1_000_059)).username  # within the leeway after exp
    with pytest.raises(TokenInvalid, match="token expired 61 seconds ago"):
        asyncio.run(at(1_000_061, leeway=0))
    with pytest.raises(TokenInvalid, match="expired"):
        asyncio.run(at(1_000_100))
    with pytest.raises(TokenInvalid, match=r"not valid yet \(nbf is 100 seconds ahead\)"):
        asyncio.run(at(998_900, leeway=0))
    assert asyncio.run(at(998_950)).username  # nbf 50 s ahead, leeway 60
    only_iat = idp.keys[0].sign({k: v for k, v in claims(idp, exp=1_000_000, iat=999_000).items() if k != "nbf"})

    async def iat_at(now):
        verifier = OIDCVerifier(OIDCConfig(issuer=idp.issuer, audience="chaperone", leeway_seconds=0),
                                clock=lambda: now)
        try:
            return await verifier.verify(only_iat)
        finally:
            await verifier.aclose()
    with pytest.raises(TokenInvalid, match=r"not valid yet \(iat is"):
        asyncio.run(iat_at(998_000))


@pytest.mark.parametrize("over, reason", [
    ({"aud": ["someone-else", "chaperone-x"]}, "audience"),
    ({"aud": "Chaperone"}, "audience"),
    ({"aud": None}, "audience"),
    ({"aud": {"chaperone": True}}, "audience"),
    ({"iss": None}, "issuer"),
    ({"iss": "http://127.0.0.1"}, "issuer"),
    ({"exp": "9999999999"}, "no numeric exp"),
    ({"exp": True}, "no numeric exp"),
    ({"iat": True}, "iat is not a number"),
    ({"nbf": "0"}, "nbf is not a number"),
])
def test_wrong_audience_issuer_and_claim_types(idp, over, reason):
    with pytest.raises(TokenInvalid, match=reason):
        verify(idp, idp.keys[0].sign(claims(idp, **over)))


def test_issuer_as_a_list_is_refused(idp):
    """RFC 7519 iss is one string; a list that contains the issuer is not the issuer."""
    with pytest.raises(TokenInvalid, match="issuer"):
        verify(idp, idp.keys[0].sign(claims(idp, iss=[idp.issuer])))


def test_token_with_crit_header_is_refused(idp):
    """crit names extensions the verifier must understand; none is supported, so any crit -
    even one naming a registered parameter, or RFC 7797's unencoded payload - is refused,
    with a valid signature and before any key fetch."""
    # An empty crit list is invalid JWS (RFC 7515 4.1.11); it used to pass as "no crit".
    for extra in ({"crit": ["exp"], "exp": 1}, {"crit": ["b64"], "b64": False}, {"crit": []},
                  {"crit": ["kid"]}, {"crit": "b64"}):
        with pytest.raises(TokenInvalid, match="critical header"):
            verify(idp, idp.keys[0].sign(claims(idp), header=extra))
    assert idp.fetches["jwks"] == 0


def test_key_use_and_alg_of_the_jwk_are_honoured(idp):
    """A JWK marked for encryption, or for another algorithm, never verifies a signature."""
    enc, other = Key("rsa-enc", "RS256"), Key("rsa-384", "RS256")
    base_jwk = Key.jwk
    idp.keys = [enc, other]
    Key.jwk = lambda self: {**base_jwk(self), **({"use": "enc"} if self is enc else {"alg": "RS384"})}
    try:
        for key in (enc, other):
            with pytest.raises(TokenInvalid, match=f"no key '{key.kid}' for RS256"):
                verify(idp, key.sign(claims(idp)))
    finally:
        Key.jwk = base_jwk


def test_large_token_within_the_limit_verifies(idp):
    """An ID token with many groups (payload above joserfc's default 8000-byte limit, under
    the sidecar's 16 KiB) is legitimate."""
    groups = [f"team-{i:04d}-with-a-long-name" for i in range(300)]
    token = idp.keys[1].sign(claims(idp, groups=groups))
    assert 8000 < len(token) < 16 * 1024
    assert verify(idp, token).groups == tuple(groups)


def test_signature_of_another_key_or_truncated_is_refused(idp):
    rsa_key, ec_key = idp.keys
    impostor = Key("ec-1", "ES256")  # same kid, different key
    with pytest.raises(TokenInvalid, match="signature does not verify"):
        verify(idp, impostor.sign(claims(idp)))
    head, body, sig = ec_key.sign(claims(idp)).split(".")
    for bad in (sig[:-4], sig + "AAAA", ""):
        with pytest.raises(TokenInvalid, match="signature does not verify|malformed"):
            verify(idp, f"{head}.{body}.{bad}")


def test_joserfc_loads_only_with_an_issuer():
    """Identify imports this module in every sidecar; joserfc (~0.7 MB of idle RSS) comes with
    the first verifier, i.e. only when an issuer is configured."""
    import subprocess
    import sys

    code = ("import sys\n"
            "import chaperone_sidecar.addons.identify, chaperone_sidecar.services\n"
            "before = 'joserfc' in sys.modules\n"
            "from chaperone_sidecar.config import OIDCConfig\n"
            "from chaperone_sidecar.oidc import OIDCVerifier\n"
            "OIDCVerifier(OIDCConfig(issuer='https://idp.example.com', audience='a'))\n"
            "print(before, 'joserfc' in sys.modules)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["False", "True"]
