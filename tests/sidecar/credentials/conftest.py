"""Fixtures for the credential tests: a moto server that *checks signatures*, and an "agent".

moto only validates SigV4 once ``INITIAL_NO_AUTH_ACTION_COUNT`` actions have been served; from
then on every request must be signed by an access key that exists in moto's IAM (or by
credentials moto's STS handed out) and the signature must match, else 403. So the server is
started with the count set to exactly the number of bootstrap calls (create a user with an
allow-all policy and an access key; a role with an allow-all policy for the web-identity
tests); ``moto_auth`` then proves that a wrong secret is refused before any test relies on it.

``AgentHarness`` plays the agent: real boto3 clients with *dummy* credentials talking to the
real AWS host names over https. A ``before-send`` hook takes each request botocore prepared,
turns it into a mitmproxy ``http.Request`` exactly as the proxy would receive it, runs the
injector, and sends the result to moto; boto3 then parses moto's real answer. Nothing reaches
AWS.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

import boto3
import botocore.config
import pytest
import urllib3
from botocore.awsrequest import AWSResponse
from mitmproxy import http

from chaperone_testbed.services import ManagedProcess, free_port

ALLOW_ALL = json.dumps({"Version": "2012-10-17",
                        "Statement": [{"Effect": "Allow", "Action": "*", "Resource": "*"}]})
TRUST_ANY = json.dumps({"Version": "2012-10-17", "Statement": [
    {"Effect": "Allow", "Principal": {"Federated": "*"},
     "Action": "sts:AssumeRoleWithWebIdentity"},
    {"Effect": "Allow", "Principal": {"AWS": "*"}, "Action": "sts:AssumeRole"}]})
BOOTSTRAP_ACTIONS = 5  # CreateUser, PutUserPolicy, CreateAccessKey, CreateRole, PutRolePolicy
AGENT_KEY_ID = "AKIAAGENTDUMMYKEY000"
AGENT_SECRET = "the-agent-holds-no-real-secret"
REGION = "us-east-1"


@dataclass
class MotoAuthServer:
    endpoint_url: str
    access_key: str
    secret_key: str
    role_arn: str
    process: ManagedProcess

    def allow_unauthenticated(self, actions: int) -> None:
        """Let the next `actions` calls through unsigned (moto's /moto-api/reset-auth)."""
        req = urllib.request.Request(self.endpoint_url + "/moto-api/reset-auth",
                                     data=str(actions).encode(), method="POST",
                                     # not form-encoded, or Flask consumes the body as a form
                                     headers={"Content-Type": "text/plain"})
        urllib.request.urlopen(req, timeout=10).read()

    def client(self, service: str, *, secret: str | None = None):
        return boto3.client(service, endpoint_url=self.endpoint_url, region_name=REGION,
                            aws_access_key_id=self.access_key,
                            aws_secret_access_key=secret or self.secret_key)


@pytest.fixture(scope="session")
def moto_auth():
    workdir = Path(tempfile.mkdtemp(prefix="chaperone-moto-auth-"))
    port = free_port()
    endpoint = f"http://127.0.0.1:{port}"
    env = dict(os.environ, INITIAL_NO_AUTH_ACTION_COUNT=str(BOOTSTRAP_ACTIONS))
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN"):
        env.pop(name, None)
    proc = ManagedProcess("moto-auth", [sys.executable, "-m", "moto.server", "-H", "127.0.0.1",
                                        "-p", str(port)], workdir / "moto.log", env=env)
    proc.start()

    def probe() -> bool:
        with urllib.request.urlopen(endpoint + "/moto-api/", timeout=2) as resp:
            return resp.status == 200

    try:
        proc.wait_ready(probe, 60, "serving")
    except Exception as exc:  # the test bed rule: a missing server fails, never skips
        pytest.fail(f"moto server with IAM auth did not start: {exc}", pytrace=False)
    boot = dict(endpoint_url=endpoint, region_name=REGION, aws_access_key_id="bootstrap",
                aws_secret_access_key="bootstrap")
    iam = boto3.client("iam", **boot)
    iam.create_user(UserName="chaperone-sidecar")
    iam.put_user_policy(UserName="chaperone-sidecar", PolicyName="all", PolicyDocument=ALLOW_ALL)
    key = iam.create_access_key(UserName="chaperone-sidecar")["AccessKey"]
    role = iam.create_role(RoleName="agent-role", AssumeRolePolicyDocument=TRUST_ANY)["Role"]
    iam.put_role_policy(RoleName="agent-role", PolicyName="all", PolicyDocument=ALLOW_ALL)
    server = MotoAuthServer(endpoint, key["AccessKeyId"], key["SecretAccessKey"], role["Arn"],
                            proc)
    # The control that makes every other test meaningful: signature checking is on.
    sts_ok = server.client("sts").get_caller_identity()
    assert sts_ok["Arn"].endswith(":user/chaperone-sidecar")
    with pytest.raises(Exception, match="SignatureDoesNotMatch"):
        server.client("sts", secret="wrong-secret").get_caller_identity()
    yield server
    proc.stop()


def to_mitmproxy(method: str, url: str, headers, body) -> http.Request:
    """The request as mitmproxy hands it to an addon: Host header present, HTTP chunking (if
    any) already removed from ``raw_content``, any Content-Encoding left as sent."""
    if hasattr(body, "read"):
        body = body.read()
    elif isinstance(body, str):
        body = body.encode()
    fields = [(k.encode(), (v if isinstance(v, str) else v.decode()).encode())
              for k, v in headers.items()]
    if not any(k.lower() == b"host" for k, _ in fields):
        fields.insert(0, (b"Host", urlsplit(url).netloc.encode()))
    req = http.Request.make(method, url)
    # Headers after make(): its content setter drops a Content-Encoding it cannot encode
    # (aws-chunked) and writes "content-length: 0"; the proxy sees what the client sent.
    req.headers = http.Headers(fields)
    req.raw_content = body or b""
    if "transfer-encoding" in req.headers:
        req.headers.pop("content-length", None)
    elif req.raw_content or method not in ("GET", "HEAD", "DELETE"):
        req.headers["content-length"] = str(len(req.raw_content))
    else:
        req.headers.pop("content-length", None)
    return req


def send(request: http.Request) -> urllib3.BaseHTTPResponse:
    """Forward like mitmproxy does: the headers and body of ``request``, unchanged."""
    headers = urllib3.HTTPHeaderDict()
    for k, v in request.headers.fields:
        headers.add(k.decode(), v.decode())
    pool = urllib3.HTTPConnectionPool(request.host, request.port, retries=False)
    return pool.urlopen(request.method, request.path, body=request.raw_content or None,
                        headers=headers, preload_content=False, assert_same_host=False,
                        redirect=False, decode_content=False)


@dataclass
class AgentHarness:
    """boto3 "agent" clients whose requests go through ``injector`` to the moto server."""

    injector: object
    seen: list[http.Request] = field(default_factory=list)
    agent_payloads: list[str | None] = field(default_factory=list)  # x-amz-content-sha256 as sent

    def client(self, service: str, **config):
        client = boto3.client(
            service, region_name=REGION, aws_access_key_id=AGENT_KEY_ID,
            aws_secret_access_key=AGENT_SECRET,
            config=botocore.config.Config(retries={"max_attempts": 1}, **config))
        client.meta.events.register("before-send", self._forward)
        return client

    def through(self, request: http.Request) -> urllib3.BaseHTTPResponse:
        self.injector.apply(request)
        self.seen.append(request)
        return send(request)

    def _forward(self, request, **_kwargs):
        assert urlsplit(request.url).hostname.endswith(".amazonaws.com")  # the agent's view
        mreq = to_mitmproxy(request.method, request.url, request.headers, request.body)
        self.agent_payloads.append(mreq.headers.get("x-amz-content-sha256"))
        resp = self.through(mreq)
        return AWSResponse(request.url, resp.status, resp.headers, resp)


@pytest.fixture
def aws_secret_dir(tmp_path, moto_auth) -> Path:
    d = tmp_path / "aws-secret"
    d.mkdir()
    (d / "AWS_ACCESS_KEY_ID").write_text(moto_auth.access_key + "\n")
    (d / "AWS_SECRET_ACCESS_KEY").write_text(moto_auth.secret_key + "\n")
    return d


def aws_spec(endpoint_url: str, **aws) -> dict:
    return {"type": "aws",
            "credentials": {"source": "secret", "secretRef": {"name": "aws-creds"}},
            "aws": {"region": REGION, "endpointURL": endpoint_url, **aws}}

