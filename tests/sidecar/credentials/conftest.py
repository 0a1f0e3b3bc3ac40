"""Fixtures for the credential tests: an "agent" talking to the moto server that *checks
signatures* (``moto_auth``, shared by the sidecar tests in ``tests/sidecar/conftest.py``).

``AgentHarness`` plays the agent: real boto3 clients with *dummy* credentials talking to the
real AWS host names over https. A ``before-send`` hook takes each request botocore prepared,
turns it into a mitmproxy ``http.Request`` exactly as the proxy would receive it, runs the
injector, and sends the result to moto; boto3 then parses moto's real answer. Nothing reaches
AWS.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

import boto3
import botocore.config
import pytest
import urllib3
from botocore.awsrequest import AWSResponse
from mitmproxy import http

AGENT_KEY_ID = "AKIAAGENTDUMMYKEY000"
AGENT_SECRET = "the-agent-holds-no-real-secret"
REGION = "us-east-1"


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

