"""InjectCredentials: real credentials replace the agent's; fail closed; AWS re-signed for moto.

The injectors come from the real ``InjectorRegistry`` built from a snapshot (connection spec +
the mounted Secret directory), as in the sidecar. The AWS tests use the moto server with
signature checking on (``moto_auth``, tests/sidecar/conftest.py): an agent's boto3 client with
*dummy* keys talks to the real AWS host names; a ``before-send`` hook turns each request into a
mitmproxy flow exactly as the proxy receives it, runs the addon's hooks, and sends the result
to moto - which accepts only a correct signature by the sidecar's key.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

import boto3
import botocore.config
import pytest
import urllib3
from botocore.awsrequest import AWSResponse
from mitmproxy import hooks, http
from mitmproxy.test import taddons, tflow, tutils

from chaperone_sidecar import flowctx
from chaperone_sidecar.addons.credentials import ChainedStream, InjectCredentials, order_problems
from chaperone_sidecar.config import ConnectionMount, SidecarConfig
from chaperone_sidecar.policy.model import Decision, RuleRef
from chaperone_sidecar.services import InjectorRegistry, SidecarServices
from chaperone_sidecar.sources import Sources

NS = "team-a"
REGION = "us-east-1"
AGENT_KEY_ID = "AKIAAGENTDUMMYKEY000"
AGENT_SECRET = "the-agent-holds-no-real-secret"
ALLOW = Decision("allow", rule=RuleRef("team-a/p", "all"))


def make_services(connections: list[dict], mounts: list[ConnectionMount]) -> SidecarServices:
    config = SidecarConfig(standalone=True, pod_namespace=NS, pod_name="agent-0")
    sources = Sources(NS)
    registry = InjectorRegistry(config)
    sources.subscribe(registry.update)
    sources.publish({"connection_objs": connections, "policy_objs": [], "mounts": mounts})
    return SidecarServices(config=config, sources=sources, injectors=registry)


def conn(name: str, spec: dict) -> dict:
    return {"metadata": {"name": name}, "spec": spec}


@pytest.fixture
def token_dir(tmp_path) -> Path:
    d = tmp_path / "github-token"
    d.mkdir()
    (d / "token").write_text("ghp_the-real-token\n")
    return d


@pytest.fixture
def http_services(token_dir, tmp_path) -> SidecarServices:
    return make_services(
        [conn("github", {"type": "http", "hosts": ["api.github.com"],
                         "credentials": {"source": "secret", "secretRef": {"name": "gh"},
                                         "prefix": "Bearer "}}),
         conn("claude", {"type": "anthropic",
                         "credentials": {"source": "secret", "secretRef": {"name": "c"}}}),
         conn("unmounted", {"type": "http", "hosts": ["unmounted.example.com"],
                            "credentials": {"source": "secret", "secretRef": {"name": "x"}}}),
         conn("missing-file", {"type": "http", "hosts": ["missing.example.com"],
                               "credentials": {"source": "secret", "secretRef": {"name": "y"}}})],
        [ConnectionMount("github", "http", credentials_dir=str(token_dir)),
         ConnectionMount("claude", "anthropic", credentials_dir=str(token_dir)),
         ConnectionMount("missing-file", "http", credentials_dir=str(tmp_path / "nothing-here"))])


def make_flow(host="api.github.com", connection="github", decision=ALLOW, headers=None,
              content=b"") -> http.HTTPFlow:
    hdrs = http.Headers(**{"host": host, **(headers or {"authorization": "Bearer agent-fake"})})
    f = tflow.tflow(req=tutils.treq(host=host, port=443, scheme=b"https", headers=hdrs,
                                    content=content))
    ctx = flowctx.ensure(f)
    ctx.connection, ctx.decision = connection, decision
    return f


def inject(addon: InjectCredentials, flow: http.HTTPFlow) -> http.HTTPFlow:
    """requestheaders, then request - as mitmproxy calls them."""
    with taddons.context(addon):
        addon.requestheaders(flow)
        if flow.response is None:
            addon.request(flow)
    return flow


def refusal(flow) -> dict:
    assert flow.response.headers["Content-Type"] == "application/json"
    body = json.loads(flow.response.content)
    assert body["error"] == "chaperone_" + flow.response.headers["X-Chaperone-Refused"]
    return body


# ---------------------------------------------------------------------------- header connections

def test_http_token_replaces_the_agents(http_services):
    f = inject(InjectCredentials(http_services), make_flow())
    assert f.response is None
    assert f.request.headers.get_all("authorization") == ["Bearer ghp_the-real-token"]


def test_anthropic_api_key(http_services):
    f = make_flow("api.anthropic.com", "claude",
                  headers={"x-api-key": "sk-ant-agent-placeholder", "authorization": "Bearer x"})
    inject(InjectCredentials(http_services), f)
    assert f.request.headers.get_all("x-api-key") == ["ghp_the-real-token"]
    assert "authorization" not in f.request.headers


def test_an_approved_require_approval_flow_is_injected(http_services):
    f = make_flow(decision=Decision("require_approval", rule=RuleRef("team-a/p", "ask")))
    flowctx.get(f).approved_by = ("alice",)
    assert inject(InjectCredentials(http_services), f).response is None
    assert f.request.headers["authorization"] == "Bearer ghp_the-real-token"


def test_refused_flows_are_left_alone(http_services):
    f = make_flow()
    f.response = tutils.tresp(status_code=403)
    inject(InjectCredentials(http_services), f)
    assert f.request.headers["authorization"] == "Bearer agent-fake"


# ---------------------------------------------------------------------------- fail closed

@pytest.mark.parametrize("host, connection, needle", [
    ("missing.example.com", "missing-file", "missing-file"),  # Secret file missing
    ("unmounted.example.com", "unmounted", "mount directory"),  # spec unusable: no mount
    ("api.example.com", "no-such-connection", "no credentials are set up"),
])
def test_unavailable_credentials_are_a_503_never_forwarded(http_services, host, connection, needle):
    f = inject(InjectCredentials(http_services), make_flow(host, connection))
    assert f.response.status_code == 503
    body = refusal(f)
    assert body["error"] == "chaperone_credentials_unavailable" and needle in body["message"]
    assert body["action"]["connection"] == connection


def test_no_injector_registry_is_a_503(http_services):
    http_services.injectors = None
    f = inject(InjectCredentials(http_services), make_flow())
    assert f.response.status_code == 503


def test_a_request_that_cannot_be_signed_is_a_400(tmp_path):
    svc = make_services([conn("aws", {"type": "aws", "hosts": ["example.com"],
                                      "credentials": {"source": "none"}})],
                        [ConnectionMount("aws", "aws")])
    f = inject(InjectCredentials(svc), make_flow("example.com", "aws", headers={}))
    assert f.response.status_code == 400
    assert "which AWS service" in refusal(f)["message"]


def test_no_connection_or_no_decision_is_refused(http_services):
    addon = InjectCredentials(http_services)
    unrouted = inject(addon, make_flow(connection=""))
    assert unrouted.response.status_code == 403 and refusal(unrouted)["error"] == "chaperone_no_connection"
    unjudged = inject(addon, make_flow(decision=None))
    assert unjudged.response.status_code == 403 and "no policy decision" in refusal(unjudged)["message"]
    blocked = inject(addon, make_flow(decision=Decision("block")))
    assert blocked.response.status_code == 403
    bare = tflow.tflow()
    bare.response = None
    assert inject(addon, bare).response.status_code == 403


def test_an_unexpected_failure_is_a_503(http_services):
    class Broken:
        def get(self, name):
            raise RuntimeError("boom")
    http_services.injectors = Broken()
    f = inject(InjectCredentials(http_services), make_flow())
    assert f.response.status_code == 503 and "RuntimeError" in refusal(f)["message"]


# ---------------------------------------------------------------------------- order

class Mutator:
    mutates_request = True

    def request(self, flow):
        flow.request.content = b"changed after signing"


def test_order_check_names_request_mutators_that_run_later(http_services, caplog):
    addon = InjectCredentials(http_services)
    later = Mutator()
    assert order_problems([Mutator(), addon], addon) == []
    assert order_problems([addon, later], addon) == [
        "Mutator mutates requests but runs after InjectCredentials: requests it changes would "
        "leave with a stale signature"]
    with caplog.at_level(logging.ERROR, logger="chaperone.credentials"):
        with taddons.context(addon, later) as tctx:
            tctx.master.addons.invoke_addon_sync(addon, hooks.RunningHook())
    assert "Mutator mutates requests" in caplog.text
    caplog.clear()
    # Inside the Pipeline (as the sidecar registers its addons) the check still sees the order.
    from chaperone_sidecar.addons.pipeline import Pipeline

    addon = InjectCredentials(http_services)
    with caplog.at_level(logging.ERROR, logger="chaperone.credentials"):
        with taddons.context(Pipeline([addon, Mutator()])) as tctx:
            tctx.master.addons.invoke_addon_sync(addon, hooks.RunningHook())
    assert "Mutator mutates requests" in caplog.text


# ---------------------------------------------------------------------------- streaming

def test_chained_stream_runs_the_decoder_then_the_installed_function():
    seen: list[bytes] = []

    def tee(data: bytes) -> list[bytes]:
        seen.append(data)
        return [data] if data else []

    def decoder(data: bytes) -> bytes:
        return data.replace(b"#", b"")  # stands in for removing aws-chunked framing

    chained = ChainedStream(decoder, tee)
    assert chained(b"ab#") == [b"ab"] and chained(b"###") == [] and chained(b"") == []
    assert seen == [b"ab", b""] and chained.called
    assert ChainedStream(decoder, True)(b"x#") == [b"x"]


def test_streamed_request_is_injected_in_requestheaders(http_services):
    f = make_flow()
    f.request.stream = True
    addon = InjectCredentials(http_services)
    with taddons.context(addon):
        addon.requestheaders(f)
        assert f.request.headers["authorization"] == "Bearer ghp_the-real-token"
        f.request.headers["authorization"] = "changed later"
        addon.request(f)  # fires after the streamed body was sent: nothing more to do
    assert f.request.headers["authorization"] == "changed later"


def test_a_body_of_unknown_length_is_injected_in_requestheaders(http_services):
    """mitmproxy may start streaming a chunked body before `request`: inject before that."""
    f = make_flow(headers={"authorization": "Bearer agent-fake", "transfer-encoding": "chunked"})
    addon = InjectCredentials(http_services)
    with taddons.context(addon):
        addon.requestheaders(f)
    assert f.request.headers["authorization"] == "Bearer ghp_the-real-token"


# ---------------------------------------------------------------------------- AWS against moto

def to_mitmproxy(method: str, url: str, headers, body) -> http.Request:
    """The request as mitmproxy hands it to an addon (Host present, body as on the wire)."""
    if hasattr(body, "read"):
        body = body.read()
    elif isinstance(body, str):
        body = body.encode()
    fields = [(k.encode(), (v if isinstance(v, str) else v.decode()).encode())
              for k, v in headers.items()]
    if not any(k.lower() == b"host" for k, _ in fields):
        fields.insert(0, (b"Host", urlsplit(url).netloc.encode()))
    req = http.Request.make(method, url)
    req.headers = http.Headers(fields)  # after make(), which would rewrite Content-Encoding
    req.raw_content = body or b""
    if req.raw_content or method not in ("GET", "HEAD", "DELETE"):
        req.headers["content-length"] = str(len(req.raw_content))
    return req


def send(request: http.Request) -> urllib3.BaseHTTPResponse:
    """Forward like mitmproxy: to request.host/port, headers and body unchanged."""
    headers = urllib3.HTTPHeaderDict()
    for k, v in request.headers.fields:
        headers.add(k.decode(), v.decode())
    pool = urllib3.HTTPConnectionPool(request.host, request.port, retries=False)
    return pool.urlopen(request.method, request.path, body=request.raw_content or None,
                        headers=headers, preload_content=False, assert_same_host=False,
                        redirect=False, decode_content=False)


@dataclass
class Proxy:
    """Plays mitmproxy for boto3: each prepared request becomes a flow through the addon."""

    addon: InjectCredentials | None
    flows: list[http.HTTPFlow] = field(default_factory=list)

    def agent(self, service: str):
        client = boto3.client(service, region_name=REGION, aws_access_key_id=AGENT_KEY_ID,
                              aws_secret_access_key=AGENT_SECRET,
                              config=botocore.config.Config(retries={"max_attempts": 1}))
        client.meta.events.register("before-send", self._forward)
        return client

    def _forward(self, request, **_kwargs):
        assert urlsplit(request.url).hostname.endswith(".amazonaws.com")  # the agent's view
        f = tflow.tflow(req=to_mitmproxy(request.method, request.url, request.headers, request.body))
        ctx = flowctx.ensure(f)
        ctx.connection, ctx.connection_type, ctx.decision = "aws-prod", "aws", ALLOW
        if self.addon is not None:
            inject(self.addon, f)
        self.flows.append(f)
        if f.response is not None:
            return AWSResponse(request.url, f.response.status_code, dict(f.response.headers),
                               _Raw(f.response.content))
        resp = send(f.request)
        return AWSResponse(request.url, resp.status, resp.headers, resp)


class _Raw:
    def __init__(self, data: bytes) -> None:
        self.data = data

    def stream(self, *_a, **_k):
        yield self.data


@pytest.fixture
def aws_services(moto_auth, tmp_path) -> SidecarServices:
    secret = tmp_path / "aws-secret"
    secret.mkdir()
    (secret / "AWS_ACCESS_KEY_ID").write_text(moto_auth.access_key + "\n")
    (secret / "AWS_SECRET_ACCESS_KEY").write_text(moto_auth.secret_key + "\n")
    return make_services(
        [conn("aws-prod", {"type": "aws",
                           "credentials": {"source": "secret", "secretRef": {"name": "aws"}},
                           "aws": {"region": REGION, "endpointURL": moto_auth.endpoint_url}})],
        [ConnectionMount("aws-prod", "aws", credentials_dir=str(secret))])


def test_agent_with_dummy_keys_is_refused_without_the_addon(moto_auth):
    """The control: moto checks signatures, so the agent's own request fails."""
    # pointed at moto by hand (the addon would do this), with the agent's dummy signature
    port = int(moto_auth.endpoint_url.rsplit(":", 1)[1])
    f = tflow.tflow(req=to_mitmproxy("POST", f"http://127.0.0.1:{port}/", {
        "Content-Type": "application/x-www-form-urlencoded",
        "Authorization": f"AWS4-HMAC-SHA256 Credential={AGENT_KEY_ID}/20250101/{REGION}/sts/"
                         f"aws4_request, SignedHeaders=host;x-amz-date, Signature={'a' * 64}",
        "X-Amz-Date": "20250101T000000Z"}, b"Action=GetCallerIdentity&Version=2011-06-15"))
    resp = send(f.request)
    assert resp.status == 403, resp.read()


def test_agent_signed_with_dummy_keys_succeeds_after_resigning(aws_services, moto_auth):
    proxy = Proxy(InjectCredentials(aws_services))
    ident = proxy.agent("sts").get_caller_identity()
    assert ident["Arn"].endswith(":user/chaperone-sidecar")  # the sidecar's identity, not the agent's
    s3 = proxy.agent("s3")
    s3.create_bucket(Bucket="chaperone-addon")
    s3.put_object(Bucket="chaperone-addon", Key="notes/a.txt", Body=b"hello from the agent")
    got = s3.get_object(Bucket="chaperone-addon", Key="notes/a.txt")["Body"].read()
    assert got == b"hello from the agent"
    # (Prefix without "/": moto's signature check mis-canonicalises an encoded "/" in a query,
    # even for boto3 talking to it directly)
    listed = s3.list_objects_v2(Bucket="chaperone-addon", Prefix="notes")
    assert [o["Key"] for o in listed["Contents"]] == ["notes/a.txt"]
    for f in proxy.flows:
        assert f.response is None
        assert AGENT_KEY_ID not in f.request.headers.get("authorization", "")
        assert moto_auth.access_key in f.request.headers["authorization"]
        port = int(moto_auth.endpoint_url.rsplit(":", 1)[1])
        assert (f.request.host, f.request.port) == ("127.0.0.1", port)
    # virtual-hosted S3 became path-style on the custom endpoint
    assert any(f.request.path.startswith("/chaperone-addon/notes/a.txt") for f in proxy.flows)


def test_unavailable_aws_credentials_fail_closed(aws_services, moto_auth, tmp_path):
    secret = Path(aws_services.snapshot().connection("aws-prod").credentials_dir)
    (secret / "AWS_SECRET_ACCESS_KEY").unlink()
    proxy = Proxy(InjectCredentials(aws_services))
    with pytest.raises(Exception) as err:
        proxy.agent("sts").get_caller_identity()
    assert "chaperone_credentials_unavailable" in str(err.value)  # boto3 shows the JSON body
    f = proxy.flows[-1]
    assert f.response.status_code == 503
    assert refusal(f)["error"] == "chaperone_credentials_unavailable"
    assert AGENT_KEY_ID in f.request.headers["authorization"]  # untouched, and never sent


def _aws_chunked(payload: bytes, chunk: int) -> bytes:
    out = b""
    ext = b";chunk-signature=" + b"0" * 64
    for i in range(0, len(payload), chunk):
        part = payload[i:i + chunk]
        out += b"%x%s\r\n%s\r\n" % (len(part), ext, part)
    return out + b"0%s\r\n\r\n" % ext


def test_streamed_aws_chunked_upload_is_decoded_and_resigned(aws_services, moto_auth):
    moto_auth.client("s3").create_bucket(Bucket="chaperone-addon-stream")
    payload = bytes(range(256)) * 40
    wire = _aws_chunked(payload, 1000)
    host = f"chaperone-addon-stream.s3.{REGION}.amazonaws.com"
    req = to_mitmproxy("PUT", f"https://{host}/big.bin", {
        "Host": host,
        "Authorization": f"AWS4-HMAC-SHA256 Credential={AGENT_KEY_ID}/20250101/{REGION}/s3/"
                         "aws4_request, SignedHeaders=content-encoding;host;x-amz-content-sha256;"
                         "x-amz-date;x-amz-decoded-content-length, Signature=" + "a" * 64,
        "X-Amz-Date": "20250101T000000Z",
        "X-Amz-Content-SHA256": "STREAMING-AWS4-HMAC-SHA256-PAYLOAD",
        "Content-Encoding": "aws-chunked", "X-Amz-Decoded-Content-Length": str(len(payload)),
        "Content-Length": str(len(wire))}, wire)
    f = tflow.tflow(req=req)
    ctx = flowctx.ensure(f)
    ctx.connection, ctx.decision = "aws-prod", ALLOW
    seen = []
    f.request.raw_content = None  # streaming: mitmproxy has not read the body
    f.request.stream = lambda data: seen.append(data) or [data]  # an earlier addon's tee
    addon = InjectCredentials(aws_services)
    with taddons.context(addon):
        addon.requestheaders(f)
        assert isinstance(f.request.stream, ChainedStream)
        assert f.request.headers["x-amz-content-sha256"] == "UNSIGNED-PAYLOAD"
        # what mitmproxy does with the stream function, in odd-sized pieces, then b"" at the end
        out = b"".join(b"".join(f.request.stream(wire[i:i + 777])) for i in range(0, len(wire), 777))
        out += b"".join(f.request.stream(b""))
        addon.request(f)
    assert b"".join(seen) == payload == out
    f.request.raw_content = out
    resp = send(f.request)
    assert resp.status == 200, resp.read()
    got = moto_auth.client("s3").get_object(Bucket="chaperone-addon-stream", Key="big.bin")
    assert hashlib.sha256(got["Body"].read()).hexdigest() == hashlib.sha256(payload).hexdigest()


def test_a_replaced_decoder_is_reported(aws_services, moto_auth, caplog):
    host = f"b.s3.{REGION}.amazonaws.com"
    req = to_mitmproxy("PUT", f"https://{host}/k", {
        "Host": host, "X-Amz-Content-SHA256": "STREAMING-UNSIGNED-PAYLOAD-TRAILER",
        "Content-Encoding": "aws-chunked", "X-Amz-Decoded-Content-Length": "3"}, b"")
    f = tflow.tflow(req=req)
    ctx = flowctx.ensure(f)
    ctx.connection, ctx.decision = "aws-prod", ALLOW
    f.request.raw_content, f.request.stream = None, True
    addon = InjectCredentials(aws_services)
    with caplog.at_level(logging.ERROR, logger="chaperone.credentials"), taddons.context(addon):
        addon.requestheaders(f)
        f.request.stream = lambda data: data  # a later addon replacing it
        addon.request(f)
    assert "decoder was replaced" in caplog.text


def test_streamed_aws_chunked_upload_survives_mask_in_pipeline_order(aws_services, moto_auth,
                                                                     caplog):
    """The whole request side of the pipeline that touches the stream, in ADDON_ORDER: Mask
    (after InjectCredentials) captures the upload for the recording by wrapping the decoder,
    so the upload still leaves decoded and moto accepts the re-signed PUT."""
    from chaperone_sidecar.addons import ADDON_ORDER
    from chaperone_sidecar.addons.mask import Mask

    moto_auth.client("s3").create_bucket(Bucket="chaperone-addon-masked")
    payload = b"line of text\n" * 800
    wire = _aws_chunked(payload, 1000)
    host = f"chaperone-addon-masked.s3.{REGION}.amazonaws.com"
    req = to_mitmproxy("PUT", f"https://{host}/notes.txt", {
        "Host": host, "Content-Type": "text/plain",
        "Authorization": f"AWS4-HMAC-SHA256 Credential={AGENT_KEY_ID}/20250101/{REGION}/s3/"
                         "aws4_request, SignedHeaders=content-encoding;host;x-amz-content-sha256;"
                         "x-amz-date;x-amz-decoded-content-length, Signature=" + "a" * 64,
        "X-Amz-Date": "20250101T000000Z",
        "X-Amz-Content-SHA256": "STREAMING-AWS4-HMAC-SHA256-PAYLOAD",
        "Content-Encoding": "aws-chunked", "X-Amz-Decoded-Content-Length": str(len(payload)),
        "Content-Length": str(len(wire))}, wire)
    f = tflow.tflow(req=req)
    ctx = flowctx.ensure(f)
    ctx.connection, ctx.connection_type, ctx.decision = "aws-prod", "aws", ALLOW
    f.request.raw_content, f.request.stream = None, True  # mitmproxy: above stream_large_bodies
    built = {"InjectCredentials": InjectCredentials(aws_services), "Mask": Mask(aws_services)}
    chain = [built[cls.__name__] for cls in ADDON_ORDER if cls.__name__ in built]
    assert [type(a).__name__ for a in chain] == ["InjectCredentials", "Mask"]
    with caplog.at_level(logging.ERROR, logger="chaperone.credentials"), taddons.context(*chain):
        for addon in chain:
            addon.requestheaders(f)
        out = b"".join(c for i in range(0, len(wire), 777) for c in f.request.stream(wire[i:i + 777]))
        out += b"".join(f.request.stream(b""))
        for addon in chain:
            addon.request(f)
    assert "decoder was replaced" not in caplog.text
    assert out == payload  # decoded, not chunk-framed
    capture = flowctx.get(f).bodies.get("request")
    assert capture.complete and capture.size == len(payload)
    assert bytes(capture.data) == payload[:len(capture.data)] and capture.data
    f.request.raw_content = out
    resp = send(f.request)
    assert resp.status == 200, resp.read()
