"""The shipper's own S3 client (recording/s3http.py: http11 + SigV4, no boto3) against a real
moto server with IAM authentication on, so every request's signature is verified by the
server (moto recomputes it with botocore's signer and refuses a mismatch).

Covered: the signer against botocore's ``S3SigV4Auth`` over the same requests; a whole
session shipped and verified (chain, digests, signed manifest) with Object Lock on and off;
a wrong secret refused; path-style and virtual-hosted addressing; an 8 MiB chunk; S3 down
mid-session and back (the shipper's retries); the sidecar Secret's keys rotated under a
running recorder (the old key deleted from IAM: only the new one can work); web identity
(AssumeRoleWithWebIdentity at moto's STS, temporary credentials with a session token); and
that shipping this way never imports boto3.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import socket
import subprocess
import sys
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path

import boto3
import pytest
from botocore.auth import S3SigV4Auth
from botocore.awsrequest import AWSRequest
from botocore.credentials import Credentials

from chaperone_sidecar.credentials.credential_sources import AWSCredentials, StaticAWSSource
from chaperone_sidecar.recording import Recorder
from chaperone_sidecar.recording.manifest import key_from_bytes
from chaperone_sidecar.recording.reader import SessionRef, load_session, verify_session
from chaperone_sidecar.recording.s3http import AioS3Store, S3Error, credential_chain, sign_v4
from chaperone_sidecar.recording.shipper import S3Store, ShipperConfig
from chaperone_sidecar.recording.spool import SpoolConfig
from chaperone_testbed.services import S3Server

REPO = Path(__file__).resolve().parents[3]
KEY = key_from_bytes(b"recording-test-hmac-secret-0123456789")
FAST = ShipperConfig(backoff_base=0.05, backoff_max=0.3, poll_interval=0.05)
ALLOW_S3 = json.dumps({"Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": "s3:*",
                                                               "Resource": "*"}]})


# ============================================================================ signer

@pytest.mark.parametrize("token", [None, "FQoGZXIvYXdzE//session+token=="])
@pytest.mark.parametrize("method,path,query,headers", [
    ("PUT", "/rec-bucket/env/prod/sessions/ns/pod/s1/chunk-00000000.jsonl", [],
     {"content-type": "application/x-ndjson", "content-md5": "1B2M2Y8AsgTpgAmY7PhCfg==",
      "x-amz-checksum-sha256": "47DEQpj8HBSa+/TImW+5JCeuQeRkm5NMpJWZG3hSuFU=",
      "x-amz-meta-sha256": "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855",
      "x-amz-object-lock-mode": "COMPLIANCE",
      "x-amz-object-lock-retain-until-date": "2030-01-02T03:04:05Z"}),
    ("HEAD", "/b/a key with spaces/ünïcode+plus=eq", [], {"x-amz-checksum-mode": "ENABLED"}),
    ("GET", "/b/", [("object-lock", "")], {}),
    ("GET", "/", [("list-type", "2"), ("prefix", "a/b c"), ("max-keys", "10")], {"x-amz-foo": " a  b "}),
])
def test_signature_is_botocores(method, path, query, headers, token):
    """Same credentials, time and request: the same Authorization as botocore's S3 signer."""
    now = datetime(2026, 12, 4, 18, 30, 5, tzinfo=UTC)
    creds = AWSCredentials("AKIDEXAMPLE", "wJalrXUtnFEMI/K7MDENG+bPxRfiCYEXAMPLEKEY", token)
    payload = hashlib.sha256(b"body" if method == "PUT" else b"").hexdigest()
    ours = sign_v4(method, "s3.eu-west-1.amazonaws.com", path, query, headers, payload, creds,
                   "eu-west-1", now)

    from urllib.parse import quote
    url = "https://s3.eu-west-1.amazonaws.com" + quote(path, safe="/-_.~")
    if query:
        url += "?" + "&".join(quote(k, safe="-_.~") + ("=" + quote(v, safe="-_.~") if v else "")
                              for k, v in query)
    stamp = now.strftime("%Y%m%dT%H%M%SZ")
    sent = {**headers, "x-amz-content-sha256": payload, "X-Amz-Date": stamp}
    if token:
        sent["X-Amz-Security-Token"] = token
    request = AWSRequest(method=method, url=url, data=b"body" if method == "PUT" else b"", headers=sent)
    request.context["timestamp"] = stamp  # what add_auth sets from the clock; moto does the same
    auth = S3SigV4Auth(Credentials(creds.access_key, creds.secret_key, token), "s3", "eu-west-1")
    signature = auth.signature(auth.string_to_sign(request, auth.canonical_request(request)), request)
    signed = auth.signed_headers(auth.headers_to_sign(request))
    assert ours["authorization"].endswith(f"SignedHeaders={signed}, Signature={signature}")
    assert ours.get("x-amz-security-token") == (token or None)


# ============================================================================ moto with IAM auth

class MotoReader(S3Store):
    """The ``sessions`` CLI's reader, listing without a ``Prefix`` parameter: moto's signature
    check mis-handles a query value with an encoded ``/`` (boto3's own ListObjectsV2 is
    refused), so the listing is filtered here instead."""

    def list(self, prefix: str = ""):
        for page in self.client.get_paginator("list_objects_v2").paginate(Bucket=self.bucket):
            for item in page.get("Contents", []):
                key = item["Key"]
                if key.startswith(self.prefix + prefix):
                    yield key[len(self.prefix):]


class AuthS3:
    """The sidecar tests' moto server with signature checking on (``moto_auth``,
    tests/sidecar/conftest.py), from the recorder's side."""

    def __init__(self, moto_auth) -> None:
        self.moto = moto_auth
        self.url = moto_auth.endpoint_url
        self.keys = (moto_auth.access_key, moto_auth.secret_key)
        self.role_arn = moto_auth.role_arn
        self.iam = moto_auth.client("iam")

    def admin_client(self, service: str):
        return self.moto.client(service)

    def bucket(self, **kwargs) -> str:
        name = f"rec-{uuid.uuid4().hex[:12]}"
        self.admin_client("s3").create_bucket(Bucket=name, **kwargs)
        return name

    def reader(self, bucket: str, prefix: str = "") -> S3Store:
        return MotoReader(bucket, prefix=prefix, endpoint_url=self.url, region_name="us-east-1",
                          aws_access_key_id=self.keys[0], aws_secret_access_key=self.keys[1])

    def store(self, bucket: str, **kwargs) -> AioS3Store:
        kwargs.setdefault("aws_access_key_id", self.keys[0])
        kwargs.setdefault("aws_secret_access_key", self.keys[1])
        return AioS3Store(bucket, endpoint_url=self.url, region_name="us-east-1", **kwargs)


@pytest.fixture
def auth_s3(moto_auth):
    return AuthS3(moto_auth)


def make_recorder(tmp_path: Path, store, session: str = "s1", **spool) -> Recorder:
    spool.setdefault("segment_bytes", 4000)
    spool.setdefault("segment_max_age", 0.2)
    return Recorder(SpoolConfig(tmp_path / "spool", **spool), namespace="ns", pod="pod-1",
                    identity={"namespace": "ns", "pod": "pod-1"}, session=session, store=store,
                    shipping=FAST, key=KEY)


async def record(rec: Recorder, n: int, pad: int = 60, start: int = 0) -> None:
    for i in range(start, start + n):
        await rec.record("request", flow=f"f{i}", data={"i": i, "pad": "x" * pad})


def shipped_requests(store, session: str = "s1") -> list[int]:
    ref = SessionRef("ns", "pod-1", session)
    report = verify_session(store, ref, KEY)
    assert report.ok, report.problems
    assert report.signature == "valid"
    return [e["data"]["i"] for e in load_session(store, ref).events if e["type"] == "request"]


@pytest.mark.parametrize("lock", [False, True])
def test_ships_a_session_signed_and_verified_by_the_server(tmp_path, auth_s3, lock):
    bucket = auth_s3.bucket(**({"ObjectLockEnabledForBucket": True} if lock else {}))
    store = auth_s3.store(bucket, prefix="/env/prod/")

    async def main():
        rec = make_recorder(tmp_path, store)
        await rec.start()
        await record(rec, 120)
        return rec, await rec.close()

    rec, shipped = asyncio.run(main())
    assert shipped and rec.metrics.upload_failures == 0 and rec.metrics.manifests == 1
    reader = auth_s3.reader(bucket, "env/prod")
    assert shipped_requests(reader) == list(range(120))
    client = auth_s3.admin_client("s3")
    head = client.head_object(Bucket=bucket, Key="env/prod/sessions/ns/pod-1/s1/manifest.json")
    assert head["Metadata"]["sha256"] and (head.get("ObjectLockMode") == "COMPLIANCE") == lock


async def put_one(store: AioS3Store, data: bytes = b"x\n") -> str:
    """One small PUT, then the store's connections closed (the server's refusal is raised)."""
    try:
        return await store.put("k", data, sha256=hashlib.sha256(data).hexdigest(), content_type="text/plain")
    finally:
        await store.aclose()


class HeaderSpy:
    """The PUT headers an AioS3Store sends (its own ``_request``, wrapped; the server still
    answers every request)."""

    def __init__(self, store: AioS3Store) -> None:
        self.puts: list[dict[str, str]] = []
        inner = store._request

        async def request(method, key, query, headers, *args, **kwargs):
            if method == "PUT":
                self.puts.append(dict(headers))
            return await inner(method, key, query, headers, *args, **kwargs)

        store._request = request  # type: ignore[method-assign]


def test_content_md5_only_where_object_lock_may_need_it(tmp_path, auth_s3):
    """MD5 of every shipped byte only where Object Lock may ask for it: a bucket without
    Object Lock gets none (the signed payload hash and x-amz-checksum-sha256 bind the body),
    an Object Lock bucket gets it with the retention headers."""
    plain, locked = auth_s3.bucket(), auth_s3.bucket(ObjectLockEnabledForBucket=True)
    seen = {}
    for bucket in (plain, locked):
        store = auth_s3.store(bucket)
        spy = HeaderSpy(store)

        async def main(store=store, bucket=bucket):
            rec = make_recorder(tmp_path / bucket, store)
            await rec.start()
            await record(rec, 40)
            return await rec.close()

        assert asyncio.run(main())
        assert shipped_requests(auth_s3.reader(bucket)) == list(range(40))
        seen[bucket] = spy.puts
    assert seen[plain] and not any("content-md5" in h for h in seen[plain])
    assert all(h["x-amz-checksum-sha256"] for h in seen[plain])
    assert seen[locked] and all(
        h["content-md5"] and h["x-amz-object-lock-mode"] == "COMPLIANCE" for h in seen[locked])


def test_a_bucket_whose_object_lock_cannot_be_read_still_gets_content_md5(tmp_path, auth_s3):
    """Not allowed to read the Object Lock configuration (the shipper writes without explicit
    retention): the bucket's default retention still needs Content-MD5 on every PUT, so it
    is sent - the server refuses the upload without it."""
    bucket = auth_s3.bucket(ObjectLockEnabledForBucket=True)
    auth_s3.admin_client("s3").put_object_lock_configuration(Bucket=bucket, ObjectLockConfiguration={
        "ObjectLockEnabled": "Enabled", "Rule": {"DefaultRetention": {"Mode": "GOVERNANCE", "Days": 1}}})
    user = f"no-lock-read-{uuid.uuid4().hex[:8]}"
    auth_s3.iam.create_user(UserName=user)
    auth_s3.iam.put_user_policy(UserName=user, PolicyName="s3", PolicyDocument=ALLOW_S3)
    # moto authorises GET ?object-lock as s3:ListBucket; AWS as GetBucketObjectLockConfiguration
    auth_s3.iam.put_user_policy(UserName=user, PolicyName="no-lock-read", PolicyDocument=json.dumps({
        "Version": "2012-10-17", "Statement": [{"Effect": "Deny", "Resource": "*", "Action": [
            "s3:GetBucketObjectLockConfiguration", "s3:ListBucket"]}]}))
    key = auth_s3.iam.create_access_key(UserName=user)["AccessKey"]
    store = auth_s3.store(bucket, aws_access_key_id=key["AccessKeyId"],
                          aws_secret_access_key=key["SecretAccessKey"])
    spy = HeaderSpy(store)

    async def main():
        enabled = await store.object_lock_enabled()
        rec = make_recorder(tmp_path, store)
        await rec.start()
        await record(rec, 40)
        return enabled, await rec.close()

    enabled, shipped = asyncio.run(main())
    assert enabled is False and store.object_lock is None  # refused: not known to be off
    assert shipped and shipped_requests(auth_s3.reader(bucket)) == list(range(40))
    assert spy.puts and all(h["content-md5"] and "x-amz-object-lock-mode" not in h for h in spy.puts)

    store.object_lock = False  # the control: this bucket does refuse a PUT without MD5
    with pytest.raises(S3Error) as err:
        asyncio.run(put_one(store))
    assert err.value.status == 400


def test_a_wrong_secret_is_refused_by_the_server(auth_s3):
    bucket = auth_s3.bucket()
    store = auth_s3.store(bucket, aws_secret_access_key="not-the-secret")
    with pytest.raises(S3Error) as err:
        asyncio.run(put_one(store))
    assert err.value.code == "SignatureDoesNotMatch" and err.value.status == 403


def test_virtual_hosted_addressing(auth_s3):
    """``bucket.endpoint/key``: the bucket travels in the Host header (signed)."""
    bucket = auth_s3.bucket()
    port = auth_s3.url.rsplit(":", 1)[1]
    store = AioS3Store(bucket, endpoint_url=f"http://localhost:{port}", region_name="us-east-1",
                       addressing_style="virtual", aws_access_key_id=auth_s3.keys[0],
                       aws_secret_access_key=auth_s3.keys[1],
                       connect_host=lambda host: "127.0.0.1")  # <bucket>.localhost, no DNS needed
    assert store.url("a/b").startswith(f"http://{bucket}.localhost:{port}/a/b")
    data = b"virtual\n"

    async def main():
        try:
            await store.put("a/b", data, sha256=hashlib.sha256(data).hexdigest(), content_type="text/plain")
            return await store.head("a/b")
        finally:
            await store.aclose()

    assert asyncio.run(main())["size"] == len(data)
    assert auth_s3.admin_client("s3").get_object(Bucket=bucket, Key="a/b")["Body"].read() == data
    # and the default for AWS itself: virtual-hosted when the name allows it
    assert AioS3Store("my-bucket", region_name="eu-west-1", aws_access_key_id="a",
                      aws_secret_access_key="b").url("k") == "https://my-bucket.s3.eu-west-1.amazonaws.com/k"
    assert AioS3Store("my.dotted.bucket", region_name="eu-west-1", aws_access_key_id="a",
                      aws_secret_access_key="b").url("k") == "https://s3.eu-west-1.amazonaws.com/my.dotted.bucket/k"


def test_a_large_chunk(tmp_path, auth_s3):
    """One 8 MiB segment (a large body recorded whole): one PUT, confirmed, verified."""
    bucket = auth_s3.bucket()
    store = auth_s3.store(bucket)

    async def main():
        rec = make_recorder(tmp_path, store, segment_bytes=16 << 20, segment_max_age=60)
        await rec.start()
        await record(rec, 8, pad=1 << 20)
        return rec, await rec.close()

    rec, shipped = asyncio.run(main())
    assert shipped
    keys = list(auth_s3.reader(bucket).list("sessions/"))
    assert len(keys) == 2  # one chunk, the manifest
    size = auth_s3.admin_client("s3").head_object(Bucket=bucket, Key=sorted(keys)[0])["ContentLength"]
    assert size > 8 << 20
    assert shipped_requests(auth_s3.reader(bucket)) == list(range(8))


def test_s3_down_mid_session_is_retried(tmp_path):
    """The server goes away with segments waiting, comes back (empty: moto keeps nothing), the
    bucket is made again: the shipper's backoff ships everything, nothing lost."""
    server = S3Server().start()
    try:
        kw = server.client_kwargs()
        boto3.client("s3", **kw).create_bucket(Bucket="rec")
        store = AioS3Store("rec", **kw)

        async def main():
            rec = make_recorder(tmp_path, store)
            await rec.start()
            await record(rec, 40)
            server.stop()
            await record(rec, 40, start=40)
            await asyncio.sleep(0.8)  # segments rotate and fail to ship
            failures = rec.metrics.upload_failures
            assert rec.metrics.backlog_segments > 0 and rec.upload_error
            await asyncio.to_thread(server.start)
            await asyncio.to_thread(lambda: boto3.client("s3", **kw).create_bucket(Bucket="rec"))
            return rec, failures, await rec.close()

        rec, failures, shipped = asyncio.run(main())
        assert failures >= 1 and shipped and rec.metrics.backlog_segments == 0
        reader = S3Store("rec", **kw)
        ids = shipped_requests(reader)
        assert sorted(ids) == list(range(80)) or set(range(40, 80)) <= set(ids)
    finally:
        server.close()


def test_rotated_secret_keys_are_used_without_a_restart(tmp_path, auth_s3):
    """The sidecar Secret's files change (kubelet's ..data swap) and the old key is deleted:
    the next uploads are signed with the new key."""
    bucket = auth_s3.bucket()
    secrets = tmp_path / "secret"

    def mount(generation: str, akid: str, secret: str) -> None:
        data = secrets / f"..{generation}"
        data.mkdir(parents=True)
        (data / "AWS_ACCESS_KEY_ID").write_text(akid + "\n")
        (data / "AWS_SECRET_ACCESS_KEY").write_text(secret + "\n")
        tmp = secrets / "..data_tmp"
        tmp.symlink_to(data.name)
        os.replace(tmp, secrets / "..data")
        for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
            if not (secrets / name).is_symlink():
                (secrets / name).symlink_to(f"..data/{name}")

    iam = auth_s3.iam
    user = f"rotating-{uuid.uuid4().hex[:8]}"
    iam.create_user(UserName=user)
    iam.put_user_policy(UserName=user, PolicyName="s3", PolicyDocument=ALLOW_S3)
    first = iam.create_access_key(UserName=user)["AccessKey"]
    mount("gen1", first["AccessKeyId"], first["SecretAccessKey"])
    source = credential_chain(secret_dir=secrets)
    assert isinstance(source, StaticAWSSource)
    store = auth_s3.store(bucket, credentials=source)

    async def main():
        rec = make_recorder(tmp_path, store)
        await rec.start()
        await record(rec, 40)
        for _ in range(200):  # the first chunks shipped with the first key
            if rec.metrics.uploads >= 2:
                break
            await asyncio.sleep(0.05)
        assert rec.metrics.uploads >= 2
        second = await asyncio.to_thread(iam.create_access_key, UserName=user)
        mount("gen2", second["AccessKey"]["AccessKeyId"], second["AccessKey"]["SecretAccessKey"])
        await asyncio.to_thread(iam.delete_access_key, UserName=user, AccessKeyId=first["AccessKeyId"])
        await record(rec, 40, start=40)
        return rec, await rec.close()

    rec, shipped = asyncio.run(main())
    assert shipped and rec.metrics.upload_failures == 0
    assert source.current().access_key != first["AccessKeyId"]
    assert shipped_requests(auth_s3.reader(bucket)) == list(range(80))


def test_web_identity_credentials(tmp_path, auth_s3):
    """IRSA: AWS_WEB_IDENTITY_TOKEN_FILE + AWS_ROLE_ARN -> AssumeRoleWithWebIdentity at STS
    (moto's) -> temporary credentials whose session token the server checks."""
    bucket = auth_s3.bucket()
    token = tmp_path / "token"
    token.write_text("eyJhbGciOiJSUzI1NiJ9.e30.c2ln")
    env = {"AWS_WEB_IDENTITY_TOKEN_FILE": str(token), "AWS_ROLE_ARN": auth_s3.role_arn,
           "AWS_ENDPOINT_URL_STS": auth_s3.url, "AWS_REGION": "us-east-1"}
    source = credential_chain(environ=env)
    store = AioS3Store(bucket, endpoint_url=auth_s3.url, region_name="us-east-1", credentials=source)

    async def main():
        # moto cannot serve the (legitimately unsigned) exchange while it checks signatures:
        # exactly this one request is let through; every S3 request after it is verified.
        auth_s3.moto.allow_unauthenticated(1)
        try:
            await store._creds()
        finally:
            auth_s3.moto.allow_unauthenticated(0)
        rec = make_recorder(tmp_path, store)
        await rec.start()
        await record(rec, 30)
        return rec, await rec.close()

    rec, shipped = asyncio.run(main())
    assert shipped and rec.metrics.upload_failures == 0
    creds = source.current()
    assert creds.token and creds.expiration > datetime.now(UTC) + timedelta(minutes=5)
    assert shipped_requests(auth_s3.reader(bucket)) == list(range(30))


def test_no_credentials_is_a_clear_error_not_a_crash():
    with pytest.raises(Exception, match="no credentials for the recording bucket"):
        credential_chain(environ={})


def test_the_sidecar_ships_without_importing_boto3(tmp_path, s3_server):
    """The store the sidecar builds (services._make_recorder) ships without boto3 or a
    botocore client in the process."""
    code = f"""
import asyncio, sys
from pathlib import Path
from chaperone_sidecar.recording import Recorder
from chaperone_sidecar.recording.s3http import AioS3Store
from chaperone_sidecar.recording.spool import SpoolConfig
kw = {s3_server.client_kwargs()!r}
async def main():
    rec = Recorder(SpoolConfig(Path({str(tmp_path / 'spool')!r}), segment_max_age=0.1), namespace="ns",
                   pod="p", session="s1", store=AioS3Store("nob3", **kw))
    await rec.start()
    await rec.record("request", data={{"i": 1}})
    assert await rec.close(timeout=20)
asyncio.run(main())
print(sorted(m for m in sys.modules
             if m.split(".")[0] in ("boto3", "s3transfer") or m in ("botocore.client", "botocore.session")))
"""
    boto3.client("s3", **s3_server.client_kwargs()).create_bucket(Bucket="nob3")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60,
                         env={**os.environ, "PYTHONPATH": str(REPO / "sidecar")})
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == "[]"


def test_the_injected_sidecar_recorder_ships_with_the_secret_keys(tmp_path, auth_s3):
    """``services._make_recorder`` as the injected sidecar runs it (bucket, endpoint, region,
    prefix from the environment; keys from the sidecar Secret's files): an AioS3Store whose
    uploads the server verifies."""
    from chaperone_sidecar.config import SidecarConfig
    from chaperone_sidecar.services import _make_recorder

    bucket = auth_s3.bucket()
    secret = tmp_path / "sidecar-secret"
    secret.mkdir()
    (secret / "AWS_ACCESS_KEY_ID").write_text(auth_s3.keys[0] + "\n")
    (secret / "AWS_SECRET_ACCESS_KEY").write_text(auth_s3.keys[1] + "\n")
    config = SidecarConfig(pod_name="pod-1", pod_namespace="ns", spool_dir=tmp_path / "spool",
                           sidecar_secret_dir=secret, s3_bucket=bucket, s3_endpoint=auth_s3.url,
                           s3_region="us-east-1", s3_prefix="team", api_server="https://127.0.0.1:6443")
    rec = _make_recorder(config)
    assert isinstance(rec._shipper.store, AioS3Store)
    assert isinstance(rec._shipper.store.credentials, StaticAWSSource)

    async def main():
        await rec.start()
        await record(rec, 5)
        return await rec.close()

    assert asyncio.run(main())
    keys = list(auth_s3.reader(bucket, "team").list("sessions/ns/pod-1/"))
    assert any(k.endswith("manifest.json") for k in keys) and len(keys) >= 2


def test_an_upload_the_server_stops_reading_times_out():
    """A server that accepts the connection and never reads: the PUT fails by its deadline
    (the shipper then backs off and retries) instead of hanging the shipper for good."""
    import time

    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(1)
    port = listener.getsockname()[1]
    store = AioS3Store("b", endpoint_url=f"http://127.0.0.1:{port}", region_name="us-east-1",
                       aws_access_key_id="a", aws_secret_access_key="s", request_timeout=1.0,
                       min_upload_rate=16 << 20)
    data = b"x" * (16 << 20)  # more than the socket buffers take

    async def main():
        started = time.monotonic()
        try:
            with pytest.raises(TimeoutError):
                # the outer bound only keeps a hanging store from hanging the test
                await asyncio.wait_for(store.put("k", data, sha256=hashlib.sha256(data).hexdigest(),
                                                 content_type="a/b"), 30)
        finally:
            await store.aclose()
        return time.monotonic() - started

    try:
        elapsed = asyncio.run(main())
    finally:
        listener.close()
    assert 1.5 < elapsed < 10  # its deadline: 1 s + 16 MiB at 16 MiB/s
