"""Verify on-behalf-of tokens: the optional per-request OIDC ID token of the human an agent acts for.

An agent (or the harness running it) may send ``X-Chaperone-On-Behalf-Of: <JWT>`` (a
``Bearer `` prefix is accepted). The sidecar verifies it against the configured issuer and uses
the token's user and groups in policy subjects and recordings; the header itself never reaches
the target (Identify strips every ``X-Chaperone-*`` header).

Verification, all of it required:

* The signature, with a key from the issuer's JWKS: ``<issuer>/.well-known/openid-configuration``
  names ``jwks_uri``; both are fetched with the sidecar's :mod:`.http11` client (never blocking
  the event loop; at most 1 MiB each, up to 3 redirects, https never downgraded), the discovery
  document's ``issuer`` must equal the configured one, and the keys are cached for
  ``jwks_ttl_seconds``. A token whose ``kid`` is not in the cache triggers one refresh (keys
  rotate), rate-limited so random ``kid`` values cannot make the sidecar hammer the issuer.
* Algorithms RS256 and ES256 only (``none`` and HMAC are refused: a JWKS holds public keys), and
  the key's ``kty``/``crv``/``alg``/``use`` must fit the algorithm. A header with ``crit`` is
  refused: no JWS extension is supported.
* Claims: ``iss`` equals the issuer, ``aud`` (string or list) contains the audience, ``exp`` is
  required and in the future, ``nbf`` and ``iat`` (if present) are not in the future - each
  with ``leeway_seconds`` of clock skew.
* The username claim (default ``sub``) must be a non-empty string; the groups claim (default
  ``groups``) may be absent, a string or a list of strings.

Issuer URLs must be ``https``; plain ``http`` is accepted only for a loopback issuer (tests,
a local IdP in standalone mode).

The JOSE work (JWK import, JWS parsing and signature verification, the registered claims) is
joserfc's, not ours: it is maintained (by the Authlib authors), typed, built on
``cryptography`` (already a dependency) and strict where it matters here - an algorithm is
used only with a key of its own type (an RSA key can never verify an ``HS256`` MAC), each
verification is given an explicit allowlist of one algorithm, ``crit`` is checked, and its
claims registry takes an injectable clock (``clock`` below) and a leeway. PyJWT would do as
well; joserfc won because it is already in the dependency tree (moto's server) and takes the
clock. This module keeps what is ours: the async discovery/JWKS fetch with its cache and
rate-limited refresh, which keys of a JWKS are usable, and the refusals in words an agent can
act on.

joserfc is imported when the first :class:`OIDCVerifier` is made (an issuer is configured),
not with this module: the Identify addon imports :class:`TokenInvalid` from here in every
sidecar, and joserfc costs ~0.7 MB of idle RSS in one that verifies no tokens (issue 16).
"""

from __future__ import annotations

import asyncio
import ipaddress
import json
import ssl
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

from .config import OIDCConfig
from .http11 import Client

if TYPE_CHECKING:
    from joserfc import jws
    from joserfc.jwk import ECKey, RSAKey

    PublicKey = RSAKey | ECKey

__all__ = ["OIDCVerifier", "TokenInvalid", "VerifiedToken", "MAX_TOKEN_BYTES"]

MAX_TOKEN_BYTES = 16 * 1024
ALGORITHMS = ("RS256", "ES256")
_REFRESH_MIN_INTERVAL = 10.0  # seconds between unknown-kid refreshes
_FETCH_TIMEOUT = 10.0
_MAX_DOCUMENT = 1 << 20  # a discovery document or JWKS: a hostile issuer cannot fill memory


class TokenInvalid(Exception):
    """The token was not accepted; ``str()`` says why in words an agent can act on."""


@dataclass(frozen=True)
class VerifiedToken:
    username: str
    groups: tuple[str, ...]
    claims: Mapping[str, Any]


def _registry(alg: str) -> jws.JWSRegistry:
    """joserfc's JWS registry allowing exactly ``alg``. Its default size limits (8000-byte
    payload, 512-byte header) are lifted to the token limit checked before: an ID token with
    many groups is legitimate. Header parameters outside the registered ones are allowed, as
    before (IdPs add their own); ``crit`` naming one is still refused (by us and by joserfc)."""
    from joserfc import jws  # only with an issuer configured (module doc)

    registry = jws.JWSRegistry(algorithms=[alg], strict_check_header=False)
    registry.max_header_length = MAX_TOKEN_BYTES
    registry.max_payload_length = MAX_TOKEN_BYTES
    return registry


def _public_key(jwk: Mapping[str, Any]) -> tuple[str, PublicKey] | None:
    """(algorithm, key) for a usable JWK, or None for keys we cannot or must not use."""
    from joserfc import errors as jose_errors
    from joserfc.jwk import ECKey, RSAKey, import_key
    if jwk.get("use") not in (None, "sig"):
        return None
    kty, alg = jwk.get("kty"), jwk.get("alg")
    if kty == "RSA" and alg in (None, "RS256"):
        usable = "RS256"
    elif kty == "EC" and jwk.get("crv") == "P-256" and alg in (None, "ES256"):
        usable = "ES256"
    else:
        return None  # oct (a shared secret has no place in a JWKS), OKP, other curves/algs
    try:
        key = import_key(dict(jwk))
    except (jose_errors.JoseError, ValueError, TypeError, KeyError):
        return None
    if not isinstance(key, (RSAKey, ECKey)):
        return None
    return usable, key


def _loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


class OIDCVerifier:
    """Verifies on-behalf-of tokens for one issuer. Create in the event loop; ``aclose()`` at exit."""

    def __init__(self, config: OIDCConfig, *, clock: Callable[[], float] = time.time,
                 ssl_context: ssl.SSLContext | None = None):
        parts = urlsplit(config.issuer)
        if parts.scheme != "https" and not (parts.scheme == "http" and _loopback(parts.hostname or "")):
            raise ValueError(f"OIDC issuer {config.issuer!r} must be an https URL")
        self.config = config
        self.clock = clock
        self._ssl = ssl_context
        self._keys: dict[str, tuple[str, PublicKey]] = {}  # kid -> (alg, key); "#i" for keys without kid
        self._fetched_at = 0.0
        self._last_refresh = 0.0
        self._lock = asyncio.Lock()
        self._registries = {alg: _registry(alg) for alg in ALGORITHMS}  # imports joserfc
        self._client: Client | None = None

    # ------------------------------------------------------------------ public
    async def verify(self, token: str) -> VerifiedToken:
        """Verify ``token`` (compact JWS); raises :class:`TokenInvalid` with the reason."""
        token = token.strip()
        if token.lower().startswith("bearer "):
            token = token[7:].strip()
        if not token:
            raise TokenInvalid("empty token")
        if len(token) > MAX_TOKEN_BYTES:
            raise TokenInvalid(f"token longer than {MAX_TOKEN_BYTES} bytes")
        if token.count(".") != 2:
            raise TokenInvalid("malformed token: expected a signed JWT (three dot-separated parts)")
        header = self._header(token)
        # The header is judged before any key is looked up: a token we would refuse anyway
        # (alg none, HMAC, extensions) never makes the sidecar contact the issuer.
        alg, kid = header.get("alg"), header.get("kid")
        if alg not in ALGORITHMS:
            raise TokenInvalid(f"token algorithm {alg!r} is not accepted (use {' or '.join(ALGORITHMS)})")
        if kid is not None and not isinstance(kid, str):
            raise TokenInvalid("token header kid must be a string")
        if "crit" in header:
            raise TokenInvalid("token has critical header extensions, which are not supported")
        key = await self._key(kid or "", alg)
        from joserfc import errors as jose_errors
        from joserfc import jwt

        try:
            decoded = jwt.decode(token, key, algorithms=[alg], registry=self._registries[alg])
        except jose_errors.BadSignatureError:
            raise TokenInvalid("token signature does not verify") from None
        except jose_errors.JoseError as exc:
            raise TokenInvalid(f"malformed token: {exc}") from None
        if not isinstance(decoded.claims, dict):
            raise TokenInvalid("malformed token: the payload is not a JSON object")
        return self._check_claims(decoded.claims)

    async def aclose(self) -> None:
        if self._client is not None:
            client, self._client = self._client, None
            await client.aclose()

    # ------------------------------------------------------------------ keys
    async def _key(self, kid: str, alg: str) -> PublicKey:
        now = time.monotonic()
        fresh = self._keys and now - self._fetched_at < self.config.jwks_ttl_seconds
        if not fresh:
            await self._refresh()
        found = self._find(kid, alg)
        if found is None:
            await self._refresh()  # keys may have rotated (rate-limited)
            found = self._find(kid, alg)
        if found is None:
            raise TokenInvalid(f"no key {kid!r} for {alg} in the issuer's JWKS" if kid
                               else f"no single {alg} key in the issuer's JWKS and the token names no kid")
        return found

    def _find(self, kid: str, alg: str) -> PublicKey | None:
        if kid:
            entry = self._keys.get(kid)
            return entry[1] if entry and entry[0] == alg else None
        matching = [k for a, k in self._keys.values() if a == alg]
        return matching[0] if len(matching) == 1 else None

    async def _refresh(self) -> None:
        started = time.monotonic()
        async with self._lock:
            # Someone else refreshed while we waited for the lock: use their result. With keys
            # in hand, refresh at most every _REFRESH_MIN_INTERVAL (unknown kids, dead issuer).
            if self._last_refresh >= started:
                return
            if self._keys and started - self._last_refresh < _REFRESH_MIN_INTERVAL:
                return
            self._last_refresh = time.monotonic()
            try:
                keys = await self._fetch_keys()
            except TokenInvalid:
                raise
            except Exception as exc:  # network, JSON, TLS: the token cannot be verified now
                if self._keys:
                    return  # keep serving the cached keys until the issuer is reachable again
                raise TokenInvalid(f"cannot fetch the issuer's keys: {type(exc).__name__}: {exc}") from None
            self._keys = keys
            self._fetched_at = time.monotonic()

    async def _fetch_keys(self) -> dict[str, tuple[str, PublicKey]]:
        discovery_url = self.config.issuer.rstrip("/") + "/.well-known/openid-configuration"
        discovery = await self._get_json(discovery_url)
        if discovery.get("issuer") != self.config.issuer:
            raise TokenInvalid(f"the discovery document names issuer {discovery.get('issuer')!r}, "
                               f"not {self.config.issuer!r}")
        jwks_uri = discovery.get("jwks_uri")
        if not isinstance(jwks_uri, str) or not jwks_uri:
            raise TokenInvalid("the issuer's discovery document has no jwks_uri")
        jwks = await self._get_json(jwks_uri)
        keys: dict[str, tuple[str, PublicKey]] = {}
        for i, jwk in enumerate(jwks.get("keys") or []):
            if not isinstance(jwk, dict):
                continue
            usable = _public_key(jwk)
            if usable is not None:
                keys[str(jwk.get("kid") or f"#{i}")] = usable
        return keys

    async def _get_json(self, url: str) -> dict[str, Any]:
        if self._client is None:
            if self._ssl is None:
                self._ssl = ssl.create_default_context(cafile=None)
                if self.config.ca_file:
                    self._ssl.load_verify_locations(cafile=self.config.ca_file)
            self._client = Client(ssl_context=self._ssl, connect_timeout=_FETCH_TIMEOUT,
                                  read_timeout=_FETCH_TIMEOUT, max_idle=1)
        # An HTTPError (no answer) is not TokenInvalid: _refresh keeps serving cached keys.
        resp = await self._client.request("GET", url, headers={"Accept": "application/json"},
                                          timeout=_FETCH_TIMEOUT, max_body=_MAX_DOCUMENT, max_redirects=3)
        if resp.status != 200:
            raise TokenInvalid(f"cannot fetch {url}: HTTP {resp.status}")
        data = json.loads(resp.body)
        if not isinstance(data, dict):
            raise TokenInvalid(f"{url} did not return a JSON object")
        return data

    # ------------------------------------------------------------------ checks
    def _header(self, token: str) -> dict[str, Any]:
        """The protected header, parsed by joserfc (unverified: only to pick the key)."""
        from joserfc import errors as jose_errors
        from joserfc import jws

        try:
            header = jws.extract_compact(token.encode("ascii"), registry=self._registries[ALGORITHMS[0]]).headers()
        except jose_errors.MissingAlgorithmError:
            return {}  # refused with the algorithm's message
        except (jose_errors.JoseError, ValueError, TypeError, UnicodeError) as exc:
            raise TokenInvalid(f"malformed token: {exc or type(exc).__name__}") from None
        if not isinstance(header, dict):
            raise TokenInvalid("malformed token: the header is not a JSON object")
        return header

    def _check_claims(self, claims: Mapping[str, Any]) -> VerifiedToken:
        """joserfc's claims registry judges iss/aud/exp/nbf/iat; the messages are ours."""
        from joserfc import errors as jose_errors
        from joserfc import jwt

        cfg, leeway = self.config, int(self.config.leeway_seconds)
        # RFC 7519: iss is one StringOrURI. joserfc would accept a list containing the issuer.
        if not isinstance(claims.get("iss"), str):
            raise TokenInvalid(f"token issuer {claims.get('iss')!r} is not {cfg.issuer!r}")
        for name in ("exp", "nbf", "iat"):  # joserfc takes a JSON true for 1
            if isinstance(claims.get(name), bool):
                raise TokenInvalid(self._claim_reason(name, claims))
        registry = jwt.JWTClaimsRegistry(
            now=lambda: int(self.clock()), leeway=leeway,
            iss={"essential": True, "value": cfg.issuer},
            aud={"essential": True, "value": cfg.audience},
            exp={"essential": True})
        try:
            registry.validate(dict(claims))
        except jose_errors.ExpiredTokenError:
            raise TokenInvalid(f"token expired {int(self.clock() - claims['exp'])} seconds ago") from None
        except jose_errors.InvalidTokenError:  # nbf or iat ahead of now + leeway
            name = next((n for n in ("nbf", "iat") if _number(claims.get(n))
                         and claims[n] > int(self.clock()) + leeway), "nbf")
            ahead = int(claims.get(name, 0) - self.clock()) if _number(claims.get(name)) else 0
            raise TokenInvalid(f"token is not valid yet ({name} is {ahead} seconds ahead)") from None
        except jose_errors.ClaimError as exc:
            raise TokenInvalid(self._claim_reason(exc.claim, claims)) from None
        username = claims.get(cfg.username_claim)
        if not isinstance(username, str) or not username:
            raise TokenInvalid(f"token has no {cfg.username_claim!r} claim naming the user")
        raw_groups = claims.get(cfg.groups_claim)
        if raw_groups is None:
            groups: tuple[str, ...] = ()
        elif isinstance(raw_groups, str):
            groups = (raw_groups,)
        elif isinstance(raw_groups, list) and all(isinstance(g, str) for g in raw_groups):
            groups = tuple(raw_groups)
        else:
            raise TokenInvalid(f"token claim {cfg.groups_claim!r} must be a string or a list of strings")
        return VerifiedToken(username=username, groups=groups, claims=dict(claims))

    def _claim_reason(self, claim: str, claims: Mapping[str, Any]) -> str:
        cfg = self.config
        names = set(claim.split(","))  # MissingClaimError lists every missing one
        if "iss" in names:
            return f"token issuer {claims.get('iss')!r} is not {cfg.issuer!r}"
        if "aud" in names:
            return f"token audience {claims.get('aud')!r} does not include {cfg.audience!r}"
        if "exp" in names:
            return "token has no numeric exp (expiry) claim"
        if names & {"nbf", "iat"}:
            return f"token claim {claim} is not a number"
        return f"token claim {claim} is not valid"
