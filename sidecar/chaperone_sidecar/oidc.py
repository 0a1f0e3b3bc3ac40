"""Verify on-behalf-of tokens: the optional per-request OIDC ID token of the human an agent acts for.

An agent (or the harness running it) may send ``X-Chaperone-On-Behalf-Of: <JWT>`` (a
``Bearer `` prefix is accepted). The sidecar verifies it against the configured issuer and uses
the token's user and groups in policy subjects and recordings; the header itself never reaches
the target (Identify strips every ``X-Chaperone-*`` header).

Verification, all of it required:

* The signature, with a key from the issuer's JWKS: ``<issuer>/.well-known/openid-configuration``
  names ``jwks_uri``; both are fetched with aiohttp (never blocking the event loop), the discovery
  document's ``issuer`` must equal the configured one, and the keys are cached for
  ``jwks_ttl_seconds``. A token whose ``kid`` is not in the cache triggers one refresh (keys
  rotate), rate-limited so random ``kid`` values cannot make the sidecar hammer the issuer.
* Algorithms RS256 and ES256 only (``none`` and HMAC are refused: a JWKS holds public keys), and
  the key's ``kty``/``crv``/``alg``/``use`` must fit the algorithm.
* Claims: ``iss`` equals the issuer, ``aud`` (string or list) contains the audience, ``exp`` is
  required and in the future, ``nbf`` and ``iat`` (if present) are not in the future - each
  with ``leeway_seconds`` of clock skew.
* The username claim (default ``sub``) must be a non-empty string; the groups claim (default
  ``groups``) may be absent, a string or a list of strings.

Issuer URLs must be ``https``; plain ``http`` is accepted only for a loopback issuer (tests,
a local IdP in standalone mode).
"""

from __future__ import annotations

import asyncio
import base64
import ipaddress
import json
import ssl
import time
from dataclasses import dataclass
from typing import Any, Callable, Mapping
from urllib.parse import urlsplit

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature

from .config import OIDCConfig

__all__ = ["OIDCVerifier", "TokenInvalid", "VerifiedToken", "MAX_TOKEN_BYTES"]

MAX_TOKEN_BYTES = 16 * 1024
ALGORITHMS = ("RS256", "ES256")
_REFRESH_MIN_INTERVAL = 10.0  # seconds between unknown-kid refreshes
_FETCH_TIMEOUT = 10.0


class TokenInvalid(Exception):
    """The token was not accepted; ``str()`` says why in words an agent can act on."""


@dataclass(frozen=True)
class VerifiedToken:
    username: str
    groups: tuple[str, ...]
    claims: Mapping[str, Any]


def _b64decode(part: str) -> bytes:
    try:
        return base64.urlsafe_b64decode(part + "=" * (-len(part) % 4))
    except (ValueError, TypeError) as exc:
        raise TokenInvalid(f"malformed token: bad base64url ({exc})") from None


def _b64int(value: Any) -> int:
    if not isinstance(value, str):
        raise ValueError("key parameter is not a string")
    return int.from_bytes(_b64decode(value), "big")


def _public_key(jwk: Mapping[str, Any]) -> tuple[str, Any] | None:
    """(algorithm, key) for a usable JWK, or None for keys we cannot or must not use."""
    if jwk.get("use") not in (None, "sig"):
        return None
    kty, alg = jwk.get("kty"), jwk.get("alg")
    try:
        if kty == "RSA" and alg in (None, "RS256"):
            return "RS256", rsa.RSAPublicNumbers(_b64int(jwk["e"]), _b64int(jwk["n"])).public_key()
        if kty == "EC" and jwk.get("crv") == "P-256" and alg in (None, "ES256"):
            x, y = _b64int(jwk["x"]), _b64int(jwk["y"])
            return "ES256", ec.EllipticCurvePublicNumbers(x, y, ec.SECP256R1()).public_key()
    except (KeyError, ValueError, TokenInvalid):
        return None
    return None


def _loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


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
        self._keys: dict[str, tuple[str, Any]] = {}  # kid -> (alg, key); "" for keys without kid
        self._fetched_at = 0.0
        self._last_refresh = 0.0
        self._lock = asyncio.Lock()
        self._session: Any = None

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
        parts = token.split(".")
        if len(parts) != 3:
            raise TokenInvalid("malformed token: expected a signed JWT (three dot-separated parts)")
        header = self._json(parts[0], "header")
        claims = self._json(parts[1], "payload")
        alg, kid = header.get("alg"), header.get("kid")
        if alg not in ALGORITHMS:
            raise TokenInvalid(f"token algorithm {alg!r} is not accepted (use {' or '.join(ALGORITHMS)})")
        if kid is not None and not isinstance(kid, str):
            raise TokenInvalid("token header kid must be a string")
        if header.get("crit"):
            raise TokenInvalid("token has critical header extensions, which are not supported")
        key = await self._key(kid or "", alg)
        self._check_signature(alg, key, f"{parts[0]}.{parts[1]}".encode("ascii"), _b64decode(parts[2]))
        return self._check_claims(claims)

    async def aclose(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    # ------------------------------------------------------------------ keys
    async def _key(self, kid: str, alg: str) -> Any:
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

    def _find(self, kid: str, alg: str) -> Any:
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

    async def _fetch_keys(self) -> dict[str, tuple[str, Any]]:
        discovery_url = self.config.issuer.rstrip("/") + "/.well-known/openid-configuration"
        discovery = await self._get_json(discovery_url)
        if discovery.get("issuer") != self.config.issuer:
            raise TokenInvalid(f"the discovery document names issuer {discovery.get('issuer')!r}, "
                               f"not {self.config.issuer!r}")
        jwks_uri = discovery.get("jwks_uri")
        if not isinstance(jwks_uri, str) or not jwks_uri:
            raise TokenInvalid("the issuer's discovery document has no jwks_uri")
        jwks = await self._get_json(jwks_uri)
        keys: dict[str, tuple[str, Any]] = {}
        for i, jwk in enumerate(jwks.get("keys") or []):
            if not isinstance(jwk, dict):
                continue
            usable = _public_key(jwk)
            if usable is not None:
                keys[str(jwk.get("kid") or f"#{i}")] = usable
        return keys

    async def _get_json(self, url: str) -> dict[str, Any]:
        import aiohttp

        if self._session is None:
            if self._ssl is None:
                self._ssl = ssl.create_default_context(cafile=None)
                if self.config.ca_file:
                    self._ssl.load_verify_locations(cafile=self.config.ca_file)
            self._session = aiohttp.ClientSession(
                timeout=aiohttp.ClientTimeout(total=_FETCH_TIMEOUT),
                connector=aiohttp.TCPConnector(ssl=self._ssl))
        async with self._session.get(url, headers={"Accept": "application/json"}) as resp:
            if resp.status != 200:
                raise TokenInvalid(f"cannot fetch {url}: HTTP {resp.status}")
            body = await resp.read()
        data = json.loads(body)
        if not isinstance(data, dict):
            raise TokenInvalid(f"{url} did not return a JSON object")
        return data

    # ------------------------------------------------------------------ checks
    @staticmethod
    def _json(part: str, what: str) -> dict[str, Any]:
        try:
            value = json.loads(_b64decode(part))
        except ValueError:
            raise TokenInvalid(f"malformed token: the {what} is not JSON") from None
        if not isinstance(value, dict):
            raise TokenInvalid(f"malformed token: the {what} is not a JSON object")
        return value

    @staticmethod
    def _check_signature(alg: str, key: Any, signed: bytes, signature: bytes) -> None:
        try:
            if alg == "RS256":
                key.verify(signature, signed, padding.PKCS1v15(), hashes.SHA256())
            else:  # ES256: JWS carries r || s, 32 bytes each
                if len(signature) != 64:
                    raise InvalidSignature()
                der = encode_dss_signature(int.from_bytes(signature[:32], "big"),
                                           int.from_bytes(signature[32:], "big"))
                key.verify(der, signed, ec.ECDSA(hashes.SHA256()))
        except InvalidSignature:
            raise TokenInvalid("token signature does not verify") from None

    def _check_claims(self, claims: Mapping[str, Any]) -> VerifiedToken:
        cfg, now, leeway = self.config, self.clock(), self.config.leeway_seconds
        if claims.get("iss") != cfg.issuer:
            raise TokenInvalid(f"token issuer {claims.get('iss')!r} is not {cfg.issuer!r}")
        aud = claims.get("aud")
        audiences = [aud] if isinstance(aud, str) else aud if isinstance(aud, list) else []
        if cfg.audience not in audiences:
            raise TokenInvalid(f"token audience {aud!r} does not include {cfg.audience!r}")
        exp = claims.get("exp")
        if not isinstance(exp, (int, float)) or isinstance(exp, bool):
            raise TokenInvalid("token has no numeric exp (expiry) claim")
        if now > exp + leeway:
            raise TokenInvalid(f"token expired {int(now - exp)} seconds ago")
        for name in ("nbf", "iat"):
            value = claims.get(name)
            if value is None:
                continue
            if not isinstance(value, (int, float)) or isinstance(value, bool):
                raise TokenInvalid(f"token claim {name} is not a number")
            if value > now + leeway:
                raise TokenInvalid(f"token is not valid yet ({name} is {int(value - now)} seconds ahead)")
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
