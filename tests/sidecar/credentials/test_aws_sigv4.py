"""AWS re-signing, proven against a moto server that validates SigV4 signatures.

Every round trip below starts as a request botocore signed with a dummy key that moto does not
know; it only succeeds if the injector's signature is right. The controls (wrong secret, the
agent's request sent as is) show that moto would refuse anything else.
"""

from __future__ import annotations

import hashlib
import json
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest
from botocore.exceptions import ClientError
from mitmproxy import http

from chaperone_sidecar.credentials import CredentialInjector
from chaperone_sidecar.credentials.aws_sigv4 import AWSResigner, parse_agent_signature, split_query
from chaperone_sidecar.credentials.credential_sources import AWSCredentials, InjectionError, StaticAWSSource

from .conftest import AGENT_KEY_ID, REGION, AgentHarness, aws_spec, send, to_mitmproxy


class Fixed:
    """An AWSCredentialSource holding one set of credentials."""

    def __init__(self, creds: AWSCredentials) -> None:
        self.creds = creds

    def current(self) -> AWSCredentials:
        return self.creds


@pytest.fixture
def agent(moto_auth, aws_secret_dir) -> AgentHarness:
    injector = CredentialInjector.for_connection(aws_spec(moto_auth.endpoint_url), aws_secret_dir)
    return AgentHarness(injector)


def _no_agent_credentials(request: http.Request) -> None:
    for name, value in request.headers.items(multi=True):
        assert AGENT_KEY_ID not in value, name
    assert AGENT_KEY_ID not in request.path


# -- controls ---------------------------------------------------------------------------------

def test_wrong_secret_is_refused(moto_auth):
    injector = AWSResigner(Fixed(AWSCredentials(moto_auth.access_key, "wrong-secret")),
                           endpoint_url=moto_auth.endpoint_url)
    s3 = AgentHarness(injector).client("s3")
    with pytest.raises(ClientError, match="SignatureDoesNotMatch"):
        s3.list_buckets()
    sts = AgentHarness(injector).client("sts")
    with pytest.raises(ClientError, match="SignatureDoesNotMatch"):
        sts.get_caller_identity()


def test_agent_request_without_injector_is_refused(moto_auth):
    class Retarget:  # point at moto, change nothing else
        def apply(self, request):
            request.scheme, request.host, request.port = "http", "127.0.0.1", int(
                moto_auth.endpoint_url.rsplit(":", 1)[1])

    with pytest.raises(ClientError, match="InvalidClientTokenId"):
        AgentHarness(Retarget()).client("sts").get_caller_identity()


# -- round trips --------------------------------------------------------------------------------

def test_sts_get_caller_identity_is_the_sidecar(agent, moto_auth):
    ident = agent.client("sts").get_caller_identity()
    assert ident["Arn"].endswith(":user/chaperone-sidecar")
    _no_agent_credentials(agent.seen[-1])


def test_s3_bucket_object_round_trip(agent):
    s3 = agent.client("s3")
    s3.create_bucket(Bucket="chaperone-roundtrip")
    assert "chaperone-roundtrip" in [b["Name"] for b in s3.list_buckets()["Buckets"]]

    # botocore 1.43's default for PutObject over https: aws-chunked body with an unsigned
    # CRC32 trailer. Assert that is really what the agent sent, then that it arrived intact.
    body = b"hello from the agent\n" * 1000
    s3.put_object(Bucket="chaperone-roundtrip", Key="dir/greeting.txt", Body=body)
    assert agent.agent_payloads[-1] == "STREAMING-UNSIGNED-PAYLOAD-TRAILER"
    sent = agent.seen[-1]
    assert "aws-chunked" not in sent.headers.get("content-encoding", "")
    assert sent.headers["content-length"] == str(len(body))
    assert "x-amz-checksum-crc32" in sent.headers  # the trailer became a (signed) header
    assert "x-amz-checksum-crc32" in sent.headers["authorization"]
    _no_agent_credentials(sent)

    got = s3.get_object(Bucket="chaperone-roundtrip", Key="dir/greeting.txt")
    assert got["Body"].read() == body
    listed = s3.list_objects_v2(Bucket="chaperone-roundtrip", Prefix="dir", MaxKeys=10)
    assert [o["Key"] for o in listed["Contents"]] == ["dir/greeting.txt"]
    s3.delete_object(Bucket="chaperone-roundtrip", Key="dir/greeting.txt")


@pytest.mark.parametrize("config, agent_payload", [
    ({"request_checksum_calculation": "when_required"}, "sha256"),
    ({"s3": {"payload_signing_enabled": False},
      "request_checksum_calculation": "when_required"}, "UNSIGNED-PAYLOAD"),
])
def test_s3_put_object_payload_modes(agent, config, agent_payload):
    s3 = agent.client("s3", **config)
    s3.create_bucket(Bucket="chaperone-payloads")
    body = b"\x00binary\xff" * 300
    s3.put_object(Bucket="chaperone-payloads", Key="blob", Body=body)
    sent_as = agent.agent_payloads[-1]
    if agent_payload == "sha256":
        assert sent_as == hashlib.sha256(body).hexdigest()
        assert agent.seen[-1].headers["x-amz-content-sha256"] == sent_as
    else:
        assert sent_as == "UNSIGNED-PAYLOAD"
        assert agent.seen[-1].headers["x-amz-content-sha256"] == "UNSIGNED-PAYLOAD"
    assert s3.get_object(Bucket="chaperone-payloads", Key="blob")["Body"].read() == body


@pytest.mark.parametrize("signature_version", [None, "s3v4"])
def test_presigned_get_object(agent, moto_auth, signature_version):
    """botocore presigns S3 with SigV2 query auth by default here, SigV4 when configured."""
    moto_auth.client("s3").create_bucket(Bucket="chaperone-presign")
    # moto's own signature check mis-handles keys with spaces or "+" (even boto3's direct
    # requests fail), so the key stays plain.
    moto_auth.client("s3").put_object(Bucket="chaperone-presign", Key="dir/shared.txt",
                                      Body=b"shared")
    config = {"signature_version": signature_version} if signature_version else {}
    url = agent.client("s3", **config).generate_presigned_url(
        "get_object", Params={"Bucket": "chaperone-presign", "Key": "dir/shared.txt"},
        ExpiresIn=300)
    marker = "X-Amz-Signature=" if signature_version else "Signature="
    assert marker in url and AGENT_KEY_ID in url
    request = to_mitmproxy("GET", url, {}, b"")
    resp = agent.through(request)
    assert resp.status == 200, resp.read()
    assert resp.read() == b"shared"
    assert "?" not in request.path  # converted to header signing
    assert request.headers["authorization"].startswith("AWS4-HMAC-SHA256 ")
    _no_agent_credentials(request)


@pytest.mark.parametrize("signature_version", [None, "s3v4"])
def test_expired_presigned_url_is_refused(agent, signature_version):
    config = {"signature_version": signature_version} if signature_version else {}
    url = agent.client("s3", **config).generate_presigned_url(
        "get_object", Params={"Bucket": "b-expired", "Key": "k"}, ExpiresIn=1)
    later = AWSResigner(None, clock=lambda: datetime.now(timezone.utc) + timedelta(seconds=5))
    with pytest.raises(InjectionError, match="expired"):
        later.apply(to_mitmproxy("GET", url, {}, b""))
    AWSResigner(None).apply(to_mitmproxy("GET", url, {}, b""))  # still valid now


def test_iam_create_role_query_protocol(agent):
    iam = agent.client("iam")
    role = iam.create_role(RoleName="made-by-agent", AssumeRolePolicyDocument=json.dumps(
        {"Version": "2012-10-17", "Statement": []}), Description="héllo wörld & more")
    assert role["Role"]["RoleName"] == "made-by-agent"
    sent = agent.seen[-1]
    assert sent.headers["content-type"].startswith("application/x-www-form-urlencoded")
    assert b"Action=CreateRole" in sent.raw_content


def test_secretsmanager_json_protocol(agent):
    sm = agent.client("secretsmanager")
    sm.create_secret(Name="chaperone/demo", SecretString="s3cr3t-value")
    assert sm.get_secret_value(SecretId="chaperone/demo")["SecretString"] == "s3cr3t-value"
    assert agent.seen[-1].headers["x-amz-target"] == "secretsmanager.GetSecretValue"
    _no_agent_credentials(agent.seen[-1])


def test_session_token_credentials(moto_auth, tmp_path):
    """Temporary credentials (key + secret + token) from a Secret: the token is injected."""
    assumed = moto_auth.client("sts").assume_role(
        RoleArn=moto_auth.role_arn, RoleSessionName="from-secret")["Credentials"]
    d = tmp_path / "sec"
    d.mkdir()
    (d / "id").write_text(assumed["AccessKeyId"])
    (d / "key").write_text(assumed["SecretAccessKey"])
    (d / "tok").write_text(assumed["SessionToken"])
    spec = aws_spec(moto_auth.endpoint_url)
    spec["credentials"]["secretRef"].update(accessKeyIdKey="id", secretAccessKeyKey="key",
                                            sessionTokenKey="tok")
    agent = AgentHarness(CredentialInjector.for_connection(spec, d))
    ident = agent.client("sts").get_caller_identity()
    assert ":assumed-role/agent-role/from-secret" in ident["Arn"]
    assert agent.seen[-1].headers["x-amz-security-token"] == assumed["SessionToken"]


def _aws_chunked(payload: bytes, chunk: int, *, signed: bool, trailer: str | None) -> bytes:
    out = b""
    ext = b";chunk-signature=" + b"0" * 64 if signed else b""
    for i in range(0, len(payload), chunk):
        part = payload[i:i + chunk]
        out += b"%x%s\r\n%s\r\n" % (len(part), ext, part)
    out += b"0%s\r\n" % ext
    if trailer:
        out += trailer.encode() + b"\r\n"
        if signed:
            out += b"x-amz-trailer-signature:" + b"1" * 64 + b"\r\n"
    return out + b"\r\n"


def _streaming_put(moto_auth, bucket: str, payload: bytes, mode: str) -> http.Request:
    """A PutObject as the AWS CLI / SDKs with signed chunks send it (virtual-hosted)."""
    moto_auth.client("s3").create_bucket(Bucket=bucket)
    signed = mode.startswith("STREAMING-AWS4-HMAC-SHA256")
    trailer = "x-amz-checksum-sha256:" + __import__("base64").b64encode(
        hashlib.sha256(payload).digest()).decode() if mode.endswith("TRAILER") else None
    body = _aws_chunked(payload, 1000, signed=signed, trailer=trailer)
    headers = {
        "Host": f"{bucket}.s3.{REGION}.amazonaws.com",
        "Authorization": f"AWS4-HMAC-SHA256 Credential={AGENT_KEY_ID}/20250101/{REGION}/s3/"
                         "aws4_request, SignedHeaders=content-encoding;host;x-amz-content-sha256;"
                         "x-amz-date;x-amz-decoded-content-length, Signature=" + "a" * 64,
        "X-Amz-Date": "20250101T000000Z", "X-Amz-Content-SHA256": mode,
        "Content-Encoding": "aws-chunked", "X-Amz-Decoded-Content-Length": str(len(payload)),
        "Content-Length": str(len(body)),
    }
    if trailer:
        headers["X-Amz-Trailer"] = "x-amz-checksum-sha256"
    return to_mitmproxy("PUT", f"https://{bucket}.s3.{REGION}.amazonaws.com/obj", headers, body)


@pytest.mark.parametrize("mode", ["STREAMING-AWS4-HMAC-SHA256-PAYLOAD",
                                  "STREAMING-AWS4-HMAC-SHA256-PAYLOAD-TRAILER",
                                  "STREAMING-UNSIGNED-PAYLOAD-TRAILER"])
def test_streaming_uploads_with_chained_chunk_signatures(agent, moto_auth, mode):
    payload = bytes(range(256)) * 20
    request = _streaming_put(moto_auth, "chaperone-chunks", payload, mode)
    resp = agent.through(request)
    assert resp.status == 200, resp.read()
    expected = "UNSIGNED-PAYLOAD" if "UNSIGNED" in mode else hashlib.sha256(payload).hexdigest()
    assert request.headers["x-amz-content-sha256"] == expected
    assert "x-amz-trailer-signature" not in request.headers
    got = moto_auth.client("s3").get_object(Bucket="chaperone-chunks", Key="obj")["Body"].read()
    assert got == payload


def test_streamed_body_gets_a_decoder(agent, moto_auth):
    """Body not buffered (mitmproxy streaming): headers fixed up front, decoder returned."""
    payload = b"streamed!" * 500
    request = _streaming_put(moto_auth, "chaperone-streamed", payload,
                             "STREAMING-AWS4-HMAC-SHA256-PAYLOAD")
    wire, request.raw_content = request.raw_content, None
    decoder = agent.injector.apply(request)
    assert decoder is not None
    assert request.headers["content-length"] == str(len(payload))
    assert request.headers["x-amz-content-sha256"] == "UNSIGNED-PAYLOAD"
    # what mitmproxy would do with request.stream = decoder, in odd-sized pieces
    out = b"".join(decoder(wire[i:i + 777]) for i in range(0, len(wire), 777)) + decoder(b"")
    request.raw_content = out
    resp = send(request)
    assert resp.status == 200, resp.read()
    got = moto_auth.client("s3").get_object(Bucket="chaperone-streamed", Key="obj")["Body"]
    assert got.read() == payload


# -- request shaping (no server needed) ---------------------------------------------------------

def _signed(method="GET", url="https://iam.amazonaws.com/?Action=ListRoles&Version=2010-05-08",
            headers=None, body=b"", scope=f"{AGENT_KEY_ID}/20250101/us-east-1/iam/aws4_request"):
    h = {"Authorization": f"AWS4-HMAC-SHA256 Credential={scope}, SignedHeaders=host;x-amz-date, "
                          f"Signature={'f' * 64}",
         "X-Amz-Date": "20250101T000000Z", "X-Amz-Security-Token": "agent-token"}
    h.update(headers or {})
    return to_mitmproxy(method, url, h, body)


CREDS = Fixed(AWSCredentials("AKIASIDECAR000000000", "sidecar-secret", "sidecar-token"))


def test_scope_parsing():
    agent = parse_agent_signature(
        "AWS4-HMAC-SHA256 Credential=AK/20250101/eu-west-1/sqs/aws4_request, "
        "SignedHeaders=content-type;host;x-amz-date, Signature=abc", [])
    assert (agent.service, agent.region) == ("sqs", "eu-west-1")
    assert agent.signed_headers == ("content-type", "host", "x-amz-date")
    pre = parse_agent_signature("", split_query(
        "X-Amz-Credential=AK%2F20250101%2Fus-west-2%2Fs3%2Faws4_request&X-Amz-Date=20250101T000000Z"
        "&X-Amz-Expires=60&X-Amz-SignedHeaders=host"))
    assert (pre.service, pre.region, pre.presigned) == ("s3", "us-west-2", True)
    assert pre.expires_at == datetime(2025, 1, 1, 0, 1, tzinfo=timezone.utc)


def test_agent_auth_is_replaced_and_scope_kept():
    request = _signed()
    AWSResigner(CREDS).apply(request)
    auth = request.headers["authorization"]
    assert auth.startswith("AWS4-HMAC-SHA256 Credential=AKIASIDECAR000000000/")
    assert "/us-east-1/iam/aws4_request" in auth
    assert request.headers["x-amz-security-token"] == "sidecar-token"
    assert request.headers.get_all("authorization") == [auth]
    assert "SignedHeaders=host;x-amz-date;x-amz-security-token," in auth
    assert request.host == "iam.amazonaws.com"  # no endpointURL: destination unchanged


def test_region_falls_back_to_host_then_connection():
    unsigned = to_mitmproxy("GET", "https://sqs.eu-central-1.amazonaws.com/?Action=ListQueues",
                            {}, b"")
    AWSResigner(CREDS, region="ap-south-1").apply(unsigned)
    assert "/eu-central-1/sqs/aws4_request" in unsigned.headers["authorization"]
    sigv4a = _signed(scope=f"{AGENT_KEY_ID}/20250101/s3/aws4_request",
                     url="https://bucket.s3.amazonaws.com/key")
    AWSResigner(CREDS, region="ap-south-1").apply(sigv4a)
    assert "/ap-south-1/s3/aws4_request" in sigv4a.headers["authorization"]


def test_virtual_hosted_s3_becomes_path_style_at_endpoint():
    request = _signed(url="https://my.bucket.s3.eu-west-1.amazonaws.com/some/key?tagging",
                      scope=f"{AGENT_KEY_ID}/20250101/eu-west-1/s3/aws4_request")
    AWSResigner(CREDS, endpoint_url="http://minio.local:9000/base").apply(request)
    assert (request.scheme, request.host, request.port) == ("http", "minio.local", 9000)
    assert request.host_header == "minio.local:9000"
    assert request.path == "/base/my.bucket/some/key?tagging="


def test_query_is_sent_in_canonical_form():
    request = _signed(url="https://iam.amazonaws.com/?Action=ListRoles&PathPrefix=/a b/&x=%7e")
    AWSResigner(CREDS).apply(request)
    assert request.path == "/?Action=ListRoles&PathPrefix=%2Fa%20b%2F&x=~"


def test_source_none_strips_and_sends_anonymously():
    request = _signed()
    AWSResigner(None).apply(request)
    for name in ("authorization", "x-amz-security-token", "x-amz-date"):
        assert name not in request.headers


def test_non_s3_streamed_body_cannot_be_signed():
    request = _signed(method="POST", url="https://iam.amazonaws.com/", body=b"Action=ListRoles")
    request.raw_content = None
    with pytest.raises(InjectionError, match="buffered"):
        AWSResigner(CREDS).apply(request)


def test_large_s3_body_is_not_hashed_on_the_loop():
    scope = f"{AGENT_KEY_ID}/20250101/us-east-1/s3/aws4_request"
    request = _signed(method="PUT", url="https://b.s3.amazonaws.com/k", body=b"x" * 2048,
                      scope=scope, headers={"X-Amz-Content-SHA256": "f" * 64})
    AWSResigner(CREDS, hash_limit=1024).apply(request)
    assert request.headers["x-amz-content-sha256"] == "UNSIGNED-PAYLOAD"
    small = _signed(method="PUT", url="https://b.s3.amazonaws.com/k", body=b"x" * 10, scope=scope)
    AWSResigner(CREDS, hash_limit=1024).apply(small)
    assert small.headers["x-amz-content-sha256"] == hashlib.sha256(b"x" * 10).hexdigest()


def test_unknown_service_is_refused():
    request = to_mitmproxy("GET", "https://example.com/", {}, b"")
    with pytest.raises(InjectionError, match="which AWS service"):
        AWSResigner(CREDS).apply(request)


def test_credentials_from_secret_dir_rotate(moto_auth, aws_secret_dir: Path):
    """A rotated Secret is used on the next request (the old key is then refused)."""
    source = StaticAWSSource(aws_secret_dir)
    agent = AgentHarness(AWSResigner(source, endpoint_url=moto_auth.endpoint_url))
    sts = agent.client("sts")
    sts.get_caller_identity()
    (aws_secret_dir / "AWS_SECRET_ACCESS_KEY").write_text("rotated-to-something-wrong")
    with pytest.raises(ClientError, match="SignatureDoesNotMatch"):
        sts.get_caller_identity()
    (aws_secret_dir / "AWS_SECRET_ACCESS_KEY").write_text(moto_auth.secret_key)
    assert sts.get_caller_identity()["Arn"].endswith(":user/chaperone-sidecar")
