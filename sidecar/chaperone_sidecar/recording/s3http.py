"""The shipper's S3 client: PutObject, HeadObject and GetObjectLockConfiguration over the
sidecar's own HTTP/1.1 client (:mod:`chaperone_sidecar.http11`), signed with SigV4 here - no
boto3 (and no aiohttp) in the sidecar process.

Why not boto3 (what the shipper used until issue 16): a boto3 S3 client costs ~20 MB of
resident memory (the session, the S3 service model, endpoint rules) and ~15 ms of CPU per
1 MiB chunk, and its blocking calls need a thread each. The shipper makes three kinds of
request, all on the event loop with the sidecar's own HTTP client (one kept-alive connection,
re-used from upload to upload): a chunk or manifest
``PUT`` (with ``x-amz-checksum-sha256`` and ``x-amz-meta-sha256``, plus the Object Lock
headers and ``Content-MD5`` when the bucket has Object Lock or could not be asked), a ``HEAD``
to confirm it, and one ``GET ?object-lock`` per process.

**Signing** (:func:`sign_v4`): AWS Signature Version 4 in its S3 form - the path URI-encoded
once, the payload's SHA-256 in ``x-amz-content-sha256``, ``x-amz-security-token`` for
temporary credentials. It is ~40 lines of ``hmac``; botocore's ``S3SigV4Auth`` is the
reference it is tested against (tests/sidecar/recording/test_s3http.py computes both over
the same requests), and the moto server the tests ship to verifies every signature (IAM
authentication on). The agent's AWS requests are still re-signed with botocore itself
(``credentials/aws_sigv4.py``): that path signs whatever an SDK sent, this one signs four
request shapes the sidecar builds.

**Addressing**: ``path`` (``https://endpoint/bucket/key``), ``virtual``
(``https://bucket.endpoint/key``) or ``auto`` (the default: virtual-hosted on AWS's own
endpoint when the bucket name is DNS-compatible, path-style with a custom ``endpoint_url`` -
MinIO, Ceph and moto are reached by address, not by bucket sub-domain).

**Credentials** (:func:`credential_chain`), in this order - the order boto3's default chain
has for the sources a sidecar can be given: explicit keys (the sidecar Secret's
``AWS_ACCESS_KEY_ID``/``AWS_SECRET_ACCESS_KEY``[/``AWS_SESSION_TOKEN``] files, re-read when
the kubelet rotates the Secret), the ``AWS_ACCESS_KEY_ID``/``AWS_SECRET_ACCESS_KEY``/
``AWS_SESSION_TOKEN`` environment, then web identity (IRSA: ``AWS_WEB_IDENTITY_TOKEN_FILE`` +
``AWS_ROLE_ARN``; :class:`~chaperone_sidecar.credentials.credential_sources.WebIdentitySource`
with an STS client of a dozen lines below, refreshed before expiry). **Not supported** (boto3
had them): shared config/credentials files, ECS container credentials and the EC2 instance
metadata service - none of them is what the operator injects into a sidecar.

**TLS**: the system trust store, or ``AWS_CA_BUNDLE`` when set (as boto3 honoured it), or the
``ca_bundle`` argument.

**Timeouts**: ``connect_timeout`` (TCP + TLS), ``read_timeout`` (a silent server, or one that
stops reading an upload) and a deadline per request of ``request_timeout`` plus the body at
``min_upload_rate``.

Errors: a non-2xx answer raises :class:`S3Error` with the code from S3's XML body; no answer
raises :class:`~chaperone_sidecar.http11.HTTPError`; the shipper's backoff retries either. A
``HEAD`` 404 is "not there" (None).
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import os
import re
import ssl
import urllib.parse
import urllib.request
import xml.etree.ElementTree as ET
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from ..credentials.credential_sources import (
    AWSCredentials,
    AWSCredentialSource,
    CredentialsUnavailable,
    StaticAWSSource,
    TokenSource,
    WebIdentitySource,
)
from ..http11 import Client, Headers

__all__ = ["AioS3Store", "S3Error", "sign_v4", "credential_chain", "EnvAWSSource", "StsClient"]

_DNS_BUCKET = re.compile(r"^[a-z0-9][a-z0-9-]{1,61}[a-z0-9]$")
# Every character but A-Z a-z 0-9 - _ . ~ is percent-encoded (SigV4's URI encoding).
_SAFE = "-_.~"


class S3Error(RuntimeError):
    """S3 (or the S3-compatible server) refused a request."""

    def __init__(self, status: int, code: str, message: str, what: str) -> None:
        super().__init__(f"{what}: HTTP {status} {code}: {message}".rstrip(": "))
        self.status, self.code = status, code


def _uri(value: str, safe: str = "") -> str:
    return urllib.parse.quote(value, safe=safe + _SAFE)


def _hmac(key: bytes, text: str) -> bytes:
    return hmac.new(key, text.encode("utf-8"), hashlib.sha256).digest()


def sign_v4(method: str, host: str, path: str, query: list[tuple[str, str]],
            headers: dict[str, str], payload_sha256: str, creds: AWSCredentials, region: str,
            now: datetime, service: str = "s3") -> dict[str, str]:
    """The request's headers with ``Authorization`` (S3's SigV4: path encoded once).

    ``path`` is the raw (unencoded) object path, ``query`` the raw parameters; every header
    given is signed, plus ``host``, ``x-amz-date``, ``x-amz-content-sha256`` and, for
    temporary credentials, ``x-amz-security-token``.
    """
    amz_date = now.astimezone(UTC).strftime("%Y%m%dT%H%M%SZ")
    out = {k.lower(): v for k, v in headers.items()}
    out.update({"host": host, "x-amz-date": amz_date, "x-amz-content-sha256": payload_sha256})
    if creds.token:
        out["x-amz-security-token"] = creds.token
    names = sorted(out)
    canonical = "\n".join([
        method, _uri(path, "/"),
        "&".join(f"{_uri(k)}={_uri(v)}" for k, v in sorted(query)),
        "".join(f"{k}:{' '.join(out[k].split())}\n" for k in names),
        ";".join(names), payload_sha256])
    scope = f"{amz_date[:8]}/{region}/{service}/aws4_request"
    to_sign = "\n".join(["AWS4-HMAC-SHA256", amz_date, scope,
                         hashlib.sha256(canonical.encode("utf-8")).hexdigest()])
    key = _hmac(("AWS4" + creds.secret_key).encode("utf-8"), amz_date[:8])
    for part in (region, service, "aws4_request"):
        key = _hmac(key, part)
    signature = hmac.new(key, to_sign.encode("utf-8"), hashlib.sha256).hexdigest()
    out["authorization"] = (f"AWS4-HMAC-SHA256 Credential={creds.access_key}/{scope}, "
                            f"SignedHeaders={';'.join(names)}, Signature={signature}")
    return out


# ============================================================================ credentials

class FixedAWSSource:
    """Keys given as values (the bench, tests)."""

    def __init__(self, access_key: str, secret_key: str, token: str | None = None) -> None:
        self._creds = AWSCredentials(access_key, secret_key, token or None)

    def current(self) -> AWSCredentials:
        return self._creds


class EnvAWSSource:
    """``AWS_ACCESS_KEY_ID``/``AWS_SECRET_ACCESS_KEY``/``AWS_SESSION_TOKEN``, read per request
    (a process's environment does not change under it, but tests set it)."""

    def __init__(self, environ: Any = None) -> None:
        self._env = os.environ if environ is None else environ

    def current(self) -> AWSCredentials:
        akid, secret = self._env.get("AWS_ACCESS_KEY_ID"), self._env.get("AWS_SECRET_ACCESS_KEY")
        if not akid or not secret:
            raise CredentialsUnavailable("AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY are not set")
        return AWSCredentials(akid, secret, self._env.get("AWS_SESSION_TOKEN") or None)


class StsClient:
    """AssumeRoleWithWebIdentity over HTTPS, the one STS call web identity needs: unsigned
    (the token is the proof), blocking - :class:`WebIdentitySource` runs it in a thread.
    Quacks like the botocore client it replaces (``assume_role_with_web_identity``)."""

    _NS = "{https://sts.amazonaws.com/doc/2011-06-15/}"

    def __init__(self, region: str, endpoint_url: str | None = None, ca_bundle: str | None = None,
                 timeout: float = 10.0) -> None:
        self.url = endpoint_url or (f"https://sts.{region}.amazonaws.com/" if region else
                                    "https://sts.amazonaws.com/")
        self.context = ssl.create_default_context(cafile=ca_bundle or None)
        self.timeout = timeout

    def assume_role_with_web_identity(self, *, RoleArn: str, RoleSessionName: str,  # noqa: N803
                                      WebIdentityToken: str, DurationSeconds: int) -> dict[str, Any]:
        form = urllib.parse.urlencode({
            "Action": "AssumeRoleWithWebIdentity", "Version": "2011-06-15", "RoleArn": RoleArn,
            "RoleSessionName": RoleSessionName, "WebIdentityToken": WebIdentityToken,
            "DurationSeconds": str(DurationSeconds)}).encode()
        request = urllib.request.Request(self.url, data=form, method="POST", headers={
            "Content-Type": "application/x-www-form-urlencoded; charset=utf-8"})
        try:
            with urllib.request.urlopen(request, timeout=self.timeout, context=self.context) as resp:
                body = resp.read()
        except urllib.error.HTTPError as exc:
            code = _xml_code(exc.read())
            raise CredentialsUnavailable(f"STS answered HTTP {exc.code} {code}".rstrip()) from None
        creds = ET.fromstring(body).find(f".//{self._NS}Credentials")
        if creds is None:
            raise CredentialsUnavailable("STS answer holds no Credentials")

        def text(name: str) -> str:
            node = creds.find(self._NS + name)
            return (node.text or "") if node is not None else ""

        expiration = datetime.fromisoformat(text("Expiration").replace("Z", "+00:00"))
        return {"Credentials": {"AccessKeyId": text("AccessKeyId"), "SecretAccessKey": text("SecretAccessKey"),
                                "SessionToken": text("SessionToken"), "Expiration": expiration}}


def credential_chain(*, secret_dir: str | Path | None = None, environ: Any = None,
                     region: str = "", ca_bundle: str | None = None,
                     session_name: str = "chaperone-recorder") -> AWSCredentialSource:
    """The first source that is configured (see the module docstring); raises
    CredentialsUnavailable when none is."""
    env = os.environ if environ is None else environ
    if secret_dir is not None and all(os.path.isfile(os.path.join(secret_dir, k))
                                      for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")):
        return StaticAWSSource(secret_dir)
    if env.get("AWS_ACCESS_KEY_ID") and env.get("AWS_SECRET_ACCESS_KEY"):
        return EnvAWSSource(env)
    token_file, role = env.get("AWS_WEB_IDENTITY_TOKEN_FILE"), env.get("AWS_ROLE_ARN")
    if token_file and role:
        sts_region = region or env.get("AWS_REGION") or env.get("AWS_DEFAULT_REGION") or ""
        endpoint = env.get("AWS_ENDPOINT_URL_STS") or env.get("AWS_ENDPOINT_URL") or None
        return WebIdentitySource(
            role_arn=role, token=TokenSource.from_file(token_file),
            session_name=env.get("AWS_ROLE_SESSION_NAME") or session_name, region=sts_region or "us-east-1",
            client_factory=lambda: StsClient(sts_region, endpoint, ca_bundle))
    raise CredentialsUnavailable(
        "no credentials for the recording bucket: give the sidecar Secret AWS_ACCESS_KEY_ID and "
        "AWS_SECRET_ACCESS_KEY, set them in the environment, or use web identity "
        "(AWS_WEB_IDENTITY_TOKEN_FILE + AWS_ROLE_ARN)")


def _xml_code(body: bytes) -> str:
    try:
        root = ET.fromstring(body)
    except ET.ParseError:
        return ""
    for node in root.iter():
        if node.tag.rsplit("}", 1)[-1] == "Code":
            return node.text or ""
    return ""


def _xml_message(body: bytes) -> str:
    try:
        root = ET.fromstring(body)
    except ET.ParseError:
        return body[:200].decode("utf-8", "replace")
    for node in root.iter():
        if node.tag.rsplit("}", 1)[-1] == "Message":
            return node.text or ""
    return ""


# ============================================================================ the store

class AioS3Store:
    """An S3 bucket over :class:`~chaperone_sidecar.http11.Client` (the shipper's
    :class:`~.shipper.ObjectStore`, async).

    ``put``/``head``/``object_lock_enabled`` are coroutines; keys are store-relative (the
    ``prefix`` goes in front). Connections are opened on first use, inside the loop, and
    closed by :meth:`aclose`. ``connect_host`` maps a host name to the address to connect to
    (tests: ``bucket.localhost`` -> 127.0.0.1); TLS still checks the URL's name.
    """

    is_async = True

    def __init__(self, bucket: str, *, prefix: str = "", endpoint_url: str | None = None,
                 region_name: str | None = None, credentials: AWSCredentialSource | None = None,
                 aws_access_key_id: str | None = None, aws_secret_access_key: str | None = None,
                 aws_session_token: str | None = None, addressing_style: str = "auto",
                 ca_bundle: str | None = None, connect_timeout: float = 3.0,
                 read_timeout: float = 20.0, request_timeout: float = 60.0,
                 min_upload_rate: float = 65536.0, connect_host: Callable[[str], str] | None = None,
                 clock: Callable[[], datetime] | None = None) -> None:
        if addressing_style not in ("auto", "path", "virtual"):
            raise ValueError(f"addressing_style must be auto, path or virtual, not {addressing_style!r}")
        self.bucket = bucket
        self.prefix = prefix.strip("/") + "/" if prefix.strip("/") else ""
        self.description = f"s3://{bucket}/{self.prefix}"
        self.region = region_name or os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION") \
            or "us-east-1"
        if credentials is None and aws_access_key_id and aws_secret_access_key:
            credentials = FixedAWSSource(aws_access_key_id, aws_secret_access_key, aws_session_token)
        self.ca_bundle = ca_bundle or os.environ.get("AWS_CA_BUNDLE") or None
        # None: the default chain, resolved at the first request - a sidecar without
        # credentials still starts; the shipper logs why uploads fail and retries.
        self.credentials: AWSCredentialSource | None = credentials
        endpoint = (endpoint_url or f"https://s3.{self.region}.amazonaws.com").rstrip("/")
        split = urllib.parse.urlsplit(endpoint)
        if split.scheme not in ("http", "https") or not split.netloc:
            raise ValueError(f"S3 endpoint must be an http(s) URL, not {endpoint_url!r}")
        virtual = addressing_style == "virtual" or (
            addressing_style == "auto" and endpoint_url is None and _DNS_BUCKET.match(bucket) is not None)
        base_path = split.path.rstrip("/")
        if virtual:
            self._origin, self._host = f"{split.scheme}://{bucket}.{split.netloc}", f"{bucket}.{split.netloc}"
            self._base = base_path + "/"
        else:
            self._origin, self._host = f"{split.scheme}://{split.netloc}", split.netloc
            self._base = f"{base_path}/{bucket}/"
        self._timeout = (connect_timeout, read_timeout)
        self._request_timeout, self._min_rate = request_timeout, min_upload_rate
        self._connect_host = connect_host
        self._clock = clock or (lambda: datetime.now(UTC))
        self._client: Client | None = None
        # Whether the bucket has Object Lock, as GetObjectLockConfiguration answered (None:
        # not asked yet, or refused): ``put`` sends Content-MD5 unless this is False.
        self.object_lock: bool | None = None

    def __repr__(self) -> str:
        return f"AioS3Store({self.description!r}, {self._origin}{self._base})"

    def url(self, key: str) -> str:
        """The object's URL (as sent: the path percent-encoded like the signature has it)."""
        return self._origin + _uri(self._base + self.prefix + key, "/")

    def _http(self) -> Client:
        if self._client is None:
            context = ssl.create_default_context(cafile=self.ca_bundle) if self.ca_bundle else None
            connect, read = self._timeout
            self._client = Client(ssl_context=context, connect_timeout=connect, read_timeout=read,
                                  max_idle=2, connect_host=self._connect_host)
        return self._client

    async def aclose(self) -> None:
        if self._client is not None:
            client, self._client = self._client, None
            await client.aclose()

    async def _request(self, method: str, key: str | None, query: list[tuple[str, str]],
                       headers: dict[str, str], body: bytes = b"",
                       payload_sha256: str | None = None) -> tuple[int, Headers, bytes]:
        path = self._base + (self.prefix + key if key is not None else "")
        creds = await self._creds()
        # The Host header sent is the one signed (with the port when the endpoint names one).
        signed = sign_v4(method, self._host, path, query, headers,
                         payload_sha256 or hashlib.sha256(body).hexdigest(), creds, self.region,
                         self._clock())
        url = self._origin + _uri(path, "/")
        if query:
            url += "?" + "&".join(f"{_uri(k)}={_uri(v)}" if v else _uri(k) for k, v in query)
        # read_timeout bounds a silent server, not an upload it stops reading: the whole request
        # gets a deadline too: request_timeout plus the body at min_upload_rate (64 KiB/s: 16 s
        # per MiB).
        resp = await self._http().request(method, url, headers=signed, body=body or None,
                                          timeout=self._request_timeout + len(body) / self._min_rate,
                                          max_body=4 << 20)
        return resp.status, resp.headers, resp.body

    async def _creds(self) -> AWSCredentials:
        if self.credentials is None:
            self.credentials = credential_chain(region=self.region, ca_bundle=self.ca_bundle)
        source = self.credentials
        refresh = getattr(source, "refresh", None)
        if refresh is not None and getattr(source, "refresh_due", lambda: False)():
            try:
                return await refresh()  # first use, or expiry near: exchange now (off the loop)
            except CredentialsUnavailable:
                pass  # current() says whether what is cached is still valid
        return source.current()

    @staticmethod
    def _raise(status: int, body: bytes, what: str) -> None:
        raise S3Error(status, _xml_code(body), _xml_message(body), what)

    async def put(self, key: str, data: bytes, *, sha256: str, content_type: str,
                  lock_mode: str | None = None, retain_until: datetime | None = None) -> str:
        headers = {"content-type": content_type,
                   "x-amz-checksum-sha256": base64.b64encode(bytes.fromhex(sha256)).decode(),
                   "x-amz-meta-sha256": sha256}
        if lock_mode or self.object_lock is not False:
            # Object Lock (explicit retention, or a bucket default we may not have been allowed
            # to read) wants Content-MD5 - AWS also takes an SDK checksum algorithm, other
            # S3 servers (Ceph) only MD5. Elsewhere it would be a third digest of every
            # recorded byte: the signed payload hash and x-amz-checksum-sha256 already make
            # the server refuse a body that is not the one we hashed.
            md5 = hashlib.md5(data) if len(data) < 65536 else await asyncio.to_thread(hashlib.md5, data)
            headers["content-md5"] = base64.b64encode(md5.digest()).decode()
        if lock_mode and retain_until:
            headers["x-amz-object-lock-mode"] = lock_mode
            headers["x-amz-object-lock-retain-until-date"] = retain_until.astimezone(UTC).strftime(
                "%Y-%m-%dT%H:%M:%SZ")
        # sha256 is the body's digest (the shipper computed it): the signed payload hash
        status, resp_headers, body = await self._request("PUT", key, [], headers, data, sha256)
        if status != 200:
            self._raise(status, body, f"PUT {self.description}{key}")
        return str(resp_headers.get("ETag", "")).strip('"')

    async def head(self, key: str) -> dict[str, Any] | None:
        status, h, body = await self._request("HEAD", key, [], {"x-amz-checksum-mode": "ENABLED"})
        if status == 404:
            return None
        if status != 200:
            self._raise(status, body, f"HEAD {self.description}{key}")
        checksum = h.get("x-amz-checksum-sha256")
        until = h.get("x-amz-object-lock-retain-until-date")
        return {"size": int(h.get("Content-Length") or 0), "etag": str(h.get("ETag", "")).strip('"'),
                "sha256": h.get("x-amz-meta-sha256"),
                "checksum": base64.b64decode(checksum).hex() if checksum else None,
                "lockMode": h.get("x-amz-object-lock-mode"),
                "retainUntil": datetime.fromisoformat(until.replace("Z", "+00:00")) if until else None}

    async def object_lock_enabled(self) -> bool:
        status, _, body = await self._request("GET", None, [("object-lock", "")], {})
        if status == 200:
            self.object_lock = any(node.tag.rsplit("}", 1)[-1] == "ObjectLockEnabled" and node.text == "Enabled"
                                   for node in ET.fromstring(body).iter())
            return self.object_lock
        code = _xml_code(body)
        if code == "ObjectLockConfigurationNotFoundError":
            self.object_lock = False
            return False
        if code in ("AccessDenied", "AccessDeniedException"):
            import logging

            # Without s3:GetBucketObjectLockConfiguration we cannot know; the bucket's default
            # retention (if any) still applies. Said once (the shipper caches the answer).
            logging.getLogger("chaperone.recording").warning(
                "recording: cannot read Object Lock configuration of %s (%s); objects are written "
                "without explicit retention", self.bucket, code)
            return False
        self._raise(status, body, f"GET {self.description}?object-lock")
        return False

    # The reader's half of the store protocol is not needed in the sidecar (``chaperone
    # sessions`` reads with S3Store); a clear error rather than an AttributeError.
    def get(self, key: str) -> bytes:
        raise NotImplementedError("AioS3Store only ships; read recordings with S3Store")

    def list(self, prefix: str = "") -> Iterator[str]:
        raise NotImplementedError("AioS3Store only ships; read recordings with S3Store")
