"""Helpers for the classifier tests: real AWS requests, signed by botocore, never sent.

The ``aws_request`` fixture, ``aws_request(service, method, **params)``, builds a boto3 client with dummy credentials, lets
botocore serialize and SigV4-sign the call exactly as it would for AWS, captures the
``AWSPreparedRequest`` in a ``before-send`` handler and stops the call there by raising, so
nothing goes over the network. The prepared request becomes the ``HTTPRequest`` the proxy
would have handed the classifier. ``aws_client`` and ``url_request`` are the two halves, for
presigned URLs. (Fixtures rather than imports: every test directory has a ``conftest``.)
"""

from __future__ import annotations

from urllib.parse import urlsplit

import boto3
import pytest
from botocore.config import Config

from chaperone_sidecar.policy.model import HTTPRequest


class _Captured(Exception):
    def __init__(self, request):
        super().__init__("captured")
        self.request = request


def _capture(request, **_):
    raise _Captured(request)


def _session() -> boto3.session.Session:
    return boto3.session.Session(
        aws_access_key_id="AKIDEXAMPLE",
        aws_secret_access_key="wJalrXUtnFEMI/K7MDENG+bPxRfiCYEXAMPLEKEY",
        region_name="us-east-1",
    )


def make_client(service: str, region: str = "us-east-1", endpoint_url: str | None = None,
                config: Config | None = None):
    config = (config or Config()).merge(Config(retries={"max_attempts": 1, "mode": "standard"}))
    return _session().client(service, region_name=region, endpoint_url=endpoint_url,
                             config=config)


def from_url(method: str, url: str, headers=(), body: bytes = b"") -> HTTPRequest:
    parts = urlsplit(url)
    default = 443 if parts.scheme == "https" else 80
    return HTTPRequest(
        method=method,
        scheme=parts.scheme,
        host=parts.hostname or "",
        port=parts.port or default,
        path=parts.path or "/",
        query=parts.query,
        headers=tuple(headers),
        body=body,
    )


def to_http_request(prepared) -> HTTPRequest:
    """An AWSPreparedRequest as the proxy would see it."""
    body = prepared.body
    if body is None:
        body = b""
    elif isinstance(body, str):
        body = body.encode("utf-8")
    elif not isinstance(body, (bytes, bytearray)):
        body = body.read()
    headers = [
        (k, v.decode("utf-8") if isinstance(v, bytes) else v) for k, v in prepared.headers.items()
    ]
    return from_url(prepared.method, prepared.url, headers, bytes(body))


def aws_request(service: str, operation: str, region: str = "us-east-1",
                endpoint_url: str | None = None, config: Config | None = None,
                **params) -> HTTPRequest:
    """Call ``client.<operation>(**params)`` and return the signed request it would send."""
    client = make_client(service, region, endpoint_url, config)
    client.meta.events.register("before-send", _capture)
    try:
        getattr(client, operation)(**params)
    except _Captured as captured:
        return to_http_request(captured.request)
    raise AssertionError("before-send handler did not run")


@pytest.fixture(name="aws_request")
def _aws_request_fixture():
    return aws_request


@pytest.fixture(name="aws_client")
def _aws_client_fixture():
    return make_client


@pytest.fixture(name="url_request")
def _url_request_fixture():
    return from_url
