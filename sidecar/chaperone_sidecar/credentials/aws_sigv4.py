"""Strip the agent's SigV4 signature and re-sign the request with the sidecar's credentials.

Why: the agent runs with dummy AWS credentials (its SDK insists on signing something), so every
request arrives signed with a key AWS has never seen. The sidecar removes everything the
agent's signature put on the request and signs again with **botocore's own** ``SigV4Auth`` /
``S3SigV4Auth`` over exactly the request that goes upstream, so a bug in a home-grown signer
can never be the weak point.

What is kept from the agent's signature, and why:

* **Service and region** from its credential scope (``Credential=AKID/date/REGION/SERVICE/
  aws4_request``), because that is what the agent's SDK resolved for the operation. Unsigned
  requests fall back to the host name, then to the connection's ``aws.region``.
* **Which headers were signed**, so the new signature covers the same headers (plus ``host``,
  every ``x-amz-*`` header and ``content-md5``, which AWS requires). Headers the agent did not
  sign stay unsigned: a proxy or client may legitimately add them.
* **Whether the payload was signed**: ``UNSIGNED-PAYLOAD`` (and the unsigned streaming trailer
  variant) stays unsigned, a signed payload is re-hashed (the body may have been masked on the
  way). S3 bodies above ``hash_limit`` are sent as ``UNSIGNED-PAYLOAD`` instead of being
  hashed on the event loop; over TLS with S3's checksums that is what the SDKs do themselves.

**Decision (presigned URLs)**: a presigned URL the agent made with its dummy key is converted to
header signing: its ``X-Amz-*`` query parameters are removed and the request gets an
``Authorization`` header. Re-presigning would have to guess an expiry and would put a valid
signature into a URL that is logged and recorded; header signing puts it nowhere the agent or
the recording sees. The agent's own ``X-Amz-Expires`` is still honoured: an expired URL is
refused as AWS would refuse it.

**Decision (endpointURL)**: when the connection sets ``aws.endpointURL`` the request is pointed
there first (scheme, host, port, path prefix) and then signed. Virtual-hosted S3 requests
(``bucket.s3.region.amazonaws.com``) become path-style (``/bucket/key``) because a custom
endpoint cannot be assumed to serve bucket sub-domains.

The query string is re-encoded to SigV4's canonical form (decode, then percent-encode all but
``A-Za-z0-9-_.~``) and sent that way, so what is signed and what is sent agree byte for byte.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable
from datetime import UTC, datetime, timedelta
from hashlib import sha256
from urllib.parse import quote, unquote, urlsplit

from botocore.auth import EMPTY_SHA256_HASH, SIGNED_HEADERS_BLACKLIST, S3SigV4Auth, SigV4Auth
from botocore.awsrequest import AWSRequest
from botocore.credentials import ReadOnlyCredentials

from . import aws_chunked
from .credential_sources import AWSCredentialSource, InjectionError, utcnow
from .request import HTTPLike

UNSIGNED_PAYLOAD = "UNSIGNED-PAYLOAD"
_UNSIGNED_AGENT_PAYLOADS = frozenset({UNSIGNED_PAYLOAD, "STREAMING-UNSIGNED-PAYLOAD-TRAILER"})
# Everything an agent's SigV4 (or SigV2) signature puts on a request.
_AUTH_HEADERS = ("authorization", "x-amz-security-token", "x-amz-date", "x-amz-content-sha256")
_AUTH_QUERY = frozenset({"x-amz-algorithm", "x-amz-credential", "x-amz-date", "x-amz-expires",
                         "x-amz-signedheaders", "x-amz-signature", "x-amz-security-token"})
_SIGV2_QUERY = frozenset({"awsaccesskeyid", "signature", "expires"})
_NEVER_SIGN = frozenset(SIGNED_HEADERS_BLACKLIST) | {"authorization", "date"} | set(_AUTH_HEADERS)
_S3_VHOST = re.compile(
    r"^(?P<bucket>.+)\.s3(?!-accesspoint|-object-lambda|-control)(?:[.-][a-z0-9-]+)*"
    r"\.amazonaws\.com(?:\.cn)?$")
_REGION = re.compile(r"^[a-z]{2}(?:-gov|-iso[a-z]*)?-[a-z]+-\d+$")
_SAFE = "-_.~"
DEFAULT_HASH_LIMIT = 8 * 1024 * 1024


class _PayloadFromContext:
    # botocore hashes the body itself; the payload hash here is decided by the rules above
    # (kept unsigned, streamed, too large to hash on the loop), so it comes from the context.
    def payload(self, request: AWSRequest) -> str:
        return request.context["chaperone_payload_hash"]


class _SigV4(_PayloadFromContext, SigV4Auth):
    pass


class _S3SigV4(_PayloadFromContext, S3SigV4Auth):
    pass


class AgentSignature:
    """What the agent's (dummy) signature says: scope, signed headers, presign expiry."""

    __slots__ = ("service", "region", "signed_headers", "presigned", "expires_at")

    def __init__(self) -> None:
        self.service = ""
        self.region = ""
        self.signed_headers: tuple[str, ...] | None = None
        self.presigned = False
        self.expires_at: datetime | None = None


def _parse_credential(agent: AgentSignature, credential: str) -> None:
    parts = unquote(credential).strip().split("/")
    if len(parts) >= 5 and parts[-1] == "aws4_request":
        agent.region, agent.service = parts[-3], parts[-2]
    elif len(parts) == 4 and parts[-1] == "aws4_request":  # SigV4a: no region in the scope
        agent.service = parts[-2]


def parse_agent_signature(authorization: str, query: list[tuple[str, str]]) -> AgentSignature:
    """Read the agent's Authorization header or presigned query (decoded ``(key, value)``)."""
    agent = AgentSignature()
    if authorization.startswith("AWS4-"):
        for item in authorization.split(" ", 1)[-1].split(","):
            key, _, value = item.strip().partition("=")
            if key == "Credential":
                _parse_credential(agent, value)
            elif key == "SignedHeaders":
                agent.signed_headers = tuple(h.strip().lower() for h in value.split(";") if h)
        return agent
    params = {k.lower(): v for k, v in query}
    if "x-amz-credential" in params:
        agent.presigned = True
        _parse_credential(agent, params["x-amz-credential"])
        signed = params.get("x-amz-signedheaders")
        if signed:
            agent.signed_headers = tuple(h.strip().lower() for h in signed.split(";") if h)
        try:
            start = datetime.strptime(params["x-amz-date"], "%Y%m%dT%H%M%SZ")
            agent.expires_at = (start.replace(tzinfo=UTC)
                                + timedelta(seconds=int(params["x-amz-expires"])))
        except (KeyError, ValueError):
            pass  # no usable expiry: nothing to honour
    elif "awsaccesskeyid" in params and "signature" in params:
        # SigV2 presigned URL (botocore's default for S3 in some regions): no scope, the host
        # decides the service; Expires is an absolute epoch second.
        agent.presigned = True
        try:
            agent.expires_at = datetime.fromtimestamp(int(params["expires"]), UTC)
        except (KeyError, ValueError, OverflowError):
            pass
    return agent


def split_query(raw: str) -> list[tuple[str, str]]:
    pairs = []
    for item in raw.split("&"):
        if item:
            key, _, value = item.partition("=")
            pairs.append((unquote(key), unquote(value)))
    return pairs


def encode_query(pairs: list[tuple[str, str]]) -> str:
    return "&".join(f"{quote(k, safe=_SAFE)}={quote(v, safe=_SAFE)}" for k, v in pairs)


def _host_hints(host: str) -> tuple[str, str]:
    """(service, region) guessed from an AWS host name, for requests the agent did not sign."""
    host = host.rsplit(":", 1)[0].lower() if not host.endswith("]") else host.lower()
    if _S3_VHOST.match(host):
        labels = host.split(".")
        return "s3", next((label for label in labels if _REGION.match(label)), "")
    for suffix in (".amazonaws.com.cn", ".amazonaws.com"):
        if host.endswith(suffix):
            labels = host[: -len(suffix)].split(".")
            region = next((label for label in labels[1:] if _REGION.match(label)), "")
            return labels[0], region
    return "", ""


class AWSResigner:
    """Re-signs AWS requests in place with the credentials of one connection.

    ``credentials=None`` (source ``none``) strips the agent's signature and sends the request
    anonymously (public buckets and the like).
    """

    def __init__(self, credentials: AWSCredentialSource | None, *, region: str | None = None,
                 endpoint_url: str | None = None, hash_limit: int = DEFAULT_HASH_LIMIT,
                 clock: Callable[[], datetime] = utcnow) -> None:
        self.credentials = credentials
        self.region = region
        self.hash_limit = hash_limit
        self._clock = clock
        self._endpoint: tuple[str, str, int, str] | None = None
        if endpoint_url:
            parts = urlsplit(endpoint_url)
            if parts.scheme not in ("http", "https") or not parts.hostname:
                raise ValueError(f"aws.endpointURL must be an http(s) URL: {endpoint_url!r}")
            port = parts.port or (443 if parts.scheme == "https" else 80)
            self._endpoint = (parts.scheme, parts.hostname, port, parts.path.rstrip("/"))

    def __repr__(self) -> str:
        return f"AWSResigner(credentials={self.credentials!r}, region={self.region!r})"

    def apply(self, request: HTTPLike) -> aws_chunked.AwsChunkedDecoder | None:
        """Strip, rewrite, re-sign. Returns a body decoder only for streamed aws-chunked uploads."""
        # Before touching the request: without credentials the proxy refuses it unchanged.
        creds = self.credentials.current() if self.credentials is not None else None
        headers = request.headers
        snap = _snapshot(headers)
        path, _, raw_query = request.path.partition("?")
        query = split_query(raw_query)
        agent = parse_agent_signature(_first(snap, "authorization"), query)
        agent_payload = _first(snap, "x-amz-content-sha256").strip().upper()
        if agent.expires_at is not None and self._clock() >= agent.expires_at:
            raise InjectionError("the presigned URL has expired (X-Amz-Date + X-Amz-Expires)")
        host_service, host_region = _host_hints(request.host_header or request.host)
        service = agent.service or host_service
        region = agent.region or host_region or self.region or "us-east-1"
        if not service:
            raise InjectionError(
                "cannot tell which AWS service this request is for (no SigV4 scope, "
                "not an AWS host name)")
        is_s3 = service in ("s3", "s3express", "s3-object-lambda")

        for name in _AUTH_HEADERS:
            if snap.pop(name, None) is not None:
                headers.pop(name, None)
        if agent.presigned:
            auth_params = _AUTH_QUERY if "x-amz-credential" in {k.lower() for k, _ in query} \
                else _SIGV2_QUERY
            query = [(k, v) for k, v in query if k.lower() not in auth_params]
        if self._endpoint is not None:
            path = self._retarget(request, path, is_s3)
        query_string = encode_query(query)
        request.path = f"{path}?{query_string}" if query_string else path

        decoder = None
        if ("content-encoding" in snap or agent_payload.startswith("STREAMING-")) \
                and aws_chunked.is_aws_chunked(request, agent_payload):
            decoder = aws_chunked.unwrap_request(request)
            snap = _snapshot(headers)
        if creds is None:
            return decoder
        payload_hash = self._payload_hash(request, agent_payload, is_s3)

        host = request.host_header
        if not host:  # HTTP/1.1 without Host: send the one we sign
            host = _hostport(request.scheme, request.host, request.port)
            request.host_header = host
        aws_request = AWSRequest(method=request.method, url=f"{request.scheme}://{host}"
                                 f"{request.path}", data=b"")
        aws_request.headers["host"] = host
        for name in self._headers_to_sign(snap.keys(), agent):
            for value in snap[name]:
                aws_request.headers[name] = value
        if not is_s3 and agent_payload:
            aws_request.headers["X-Amz-Content-SHA256"] = payload_hash
        aws_request.context["chaperone_payload_hash"] = payload_hash

        frozen = ReadOnlyCredentials(creds.access_key, creds.secret_key, creds.token)
        signer = (_S3SigV4 if is_s3 else _SigV4)(frozen, service, region)
        signer.add_auth(aws_request)

        for name in ("Authorization", "X-Amz-Date", "X-Amz-Security-Token",
                     "X-Amz-Content-SHA256"):
            signed = aws_request.headers.get(name)
            if signed is not None:
                headers[name] = signed
        return decoder

    def _retarget(self, request: HTTPLike, path: str, is_s3: bool) -> str:
        assert self._endpoint is not None
        scheme, host, port, prefix = self._endpoint
        if is_s3:
            match = _S3_VHOST.match((request.host_header or request.host).split(":")[0].lower())
            if match:
                bucket = quote(match.group("bucket"), safe="")
                path = f"/{bucket}" if path in ("", "/") else f"/{bucket}{path}"
        request.scheme = scheme
        request.host = host
        request.port = port
        request.host_header = _hostport(scheme, host, port)
        return prefix + path

    def _payload_hash(self, request: HTTPLike, agent_payload: str, is_s3: bool) -> str:
        if agent_payload in _UNSIGNED_AGENT_PAYLOADS:
            return UNSIGNED_PAYLOAD
        body = request.raw_content
        if body is None or (is_s3 and len(body) > self.hash_limit):
            if is_s3:
                return UNSIGNED_PAYLOAD
            raise InjectionError("this AWS service needs a signed payload; the body must be "
                                 "buffered, not streamed")
        return sha256(body).hexdigest() if body else EMPTY_SHA256_HASH

    @staticmethod
    def _headers_to_sign(present: Iterable[str], agent: AgentSignature) -> set[str]:
        present = set(present)
        wanted = {n for n in present if n.startswith("x-amz-")} | {"content-md5"}
        if agent.signed_headers is not None:
            wanted.update(agent.signed_headers)
        else:
            wanted.add("content-type")
        return (wanted & present) - _NEVER_SIGN - {"host"}


def _snapshot(headers) -> dict[str, list[str]]:
    """All header values by lower-cased name, read in one pass (each mitmproxy lookup scans
    every field, and a request is looked at a dozen times)."""
    snap: dict[str, list[str]] = {}
    fields = getattr(headers, "fields", None)
    if fields is not None:  # mitmproxy: raw (bytes, bytes) pairs, decoded as it decodes them
        for key, value in fields:
            snap.setdefault(key.decode("utf-8", "surrogateescape").lower(), []).append(
                value.decode("utf-8", "surrogateescape"))
    else:
        for key in headers.keys():
            snap[key.lower()] = list(headers.get_all(key))
    return snap


def _first(snap: dict[str, list[str]], name: str) -> str:
    values = snap.get(name)
    return values[0] if values else ""


def _hostport(scheme: str, host: str, port: int) -> str:
    default = {"http": 80, "https": 443}.get(scheme)
    host = f"[{host}]" if ":" in host else host  # IPv6 literal
    return host if port == default else f"{host}:{port}"
