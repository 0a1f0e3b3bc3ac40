"""Enforce reads the bodies it judges by content (addons/enforce.py ``_body_needs``), and
Chaperone - not mitmproxy - streams large bodies (addons/streaming.py ``stream_large``).

The end-to-end behaviour (a real sidecar, a real upstream) is in
tests/sidecar/integration/test_large_bodies.py; these pin the decisions per reader.
"""

from __future__ import annotations

import asyncio
import gzip
import json

from mitmproxy import http
from mitmproxy.test import taddons, tflow, tutils

from chaperone_sidecar import flowctx
from chaperone_sidecar.addons.enforce import Enforce
from chaperone_sidecar.addons.streaming import READ_LIMIT, stream_large
from chaperone_sidecar.approvals.ratelimit import MemoryRateLimiter
from chaperone_sidecar.config import SidecarConfig
from chaperone_sidecar.policy.model import Action, AWSAction, Identity
from chaperone_sidecar.services import SidecarServices
from chaperone_sidecar.sources import Sources

MIB = 1024 * 1024
NS = "team-a"
AGENT = Identity(service_account=f"{NS}/claude", pod_namespace=NS, pod_name="agent-0", creator="alice")
CONNECTIONS = [{"metadata": {"name": "aws"}, "spec": {"type": "aws"}},
               {"metadata": {"name": "claude"}, "spec": {"type": "anthropic"}},
               {"metadata": {"name": "db"}, "spec": {"type": "http", "hosts": ["db.internal"]}}]
POLICIES = [
    {"metadata": {"name": "aws", "namespace": NS},
     "spec": {"connections": ["aws"], "defaultEffect": "allow", "rules": [
         {"name": "keep-queues", "match": {"aws": {"actions": ["sqs:DeleteQueue"]}}, "block": {}}]}},
    {"metadata": {"name": "claude", "namespace": NS},
     "spec": {"connections": ["claude"], "defaultEffect": "allow", "rules": [
         {"name": "no-bash", "match": {"anthropic": {"tools": ["bash"]}}, "block": {}}]}},
    {"metadata": {"name": "db", "namespace": NS},
     "spec": {"connections": ["db"], "defaultEffect": "allow", "masking": {"maxBodyBytes": 2 * MIB},
              "rules": [{"name": "no-drop", "match": {"bodyRegex": "DROP TABLE"}, "block": {}}]}},
]


def services() -> SidecarServices:
    sources = Sources(NS)
    sources.publish({"connection_objs": CONNECTIONS,
                     "policy_objs": [{"apiVersion": "chaperone.dev/v1alpha1", "kind": "AccessPolicy", **p}
                                     for p in POLICIES]})
    return SidecarServices(config=SidecarConfig(standalone=True), sources=sources,
                           rate_limiter=MemoryRateLimiter())


def flow(conn: str, ctype: str, headers: dict[str, str], content: bytes = b"", *, aws: AWSAction | None = None):
    host = {"aws": "sqs.us-east-1.amazonaws.com", "claude": "api.anthropic.com", "db": "db.internal"}[conn]
    f = tflow.tflow(req=tutils.treq(host=host, port=443, scheme=b"https", method=b"POST", path=b"/",
                                    headers=http.Headers(host=host, **headers), content=content))
    ctx = flowctx.ensure(f)
    ctx.identity, ctx.connection, ctx.connection_type = AGENT, conn, ctype
    ctx.action = Action(ctype, "POST", "https", host, 443, "/", name=aws.action if aws else f"{ctype}:POST",
                        summary="", aws=aws)
    return f


def requestheaders(f, stream_size: str = "1m") -> None:
    """Enforce's requestheaders with the body streaming (as Route leaves a large one)."""
    addon = Enforce(services())

    async def run():
        with taddons.context(addon):
            stream_large(f, 1 * MIB)
            await addon.requestheaders(f)
    asyncio.run(run())


def request(f) -> None:
    addon = Enforce(services())

    async def run():
        with taddons.context(addon):
            await addon.request(f)
    asyncio.run(run())


def test_stream_large_streams_only_a_length_above_the_size():
    big = tflow.tflow(req=tutils.treq(headers=http.Headers(host="x", content_length=str(MIB + 1))))
    small = tflow.tflow(req=tutils.treq(headers=http.Headers(host="x", content_length=str(MIB))))
    chunked = tflow.tflow(req=tutils.treq(headers=http.Headers(host="x", transfer_encoding="chunked")))
    for f in (big, small, chunked):
        f.request.stream = False
        stream_large(f, MIB)
    assert (big.request.stream, small.request.stream, chunked.request.stream) == (True, False, False)
    assert READ_LIMIT == 64 * MIB


def test_an_aws_query_call_over_the_streaming_size_is_read_first():
    sqs = AWSAction("sqs", "us-east-1", "", protocol="query")
    form = {"content_type": "application/x-www-form-urlencoded"}
    read = flow("aws", "aws", {**form, "content_length": str(2 * MIB)}, aws=sqs)
    requestheaders(read)
    assert read.response is None and read.request.stream is False  # buffered, judged in `request`
    huge = flow("aws", "aws", {**form, "content_length": str(9 * MIB)}, aws=sqs)
    requestheaders(huge)
    assert huge.response.status_code == 413 and f"larger than {8 * MIB} bytes" in huge.response.text
    chunked = flow("aws", "aws", {**form, "transfer_encoding": "chunked"}, aws=sqs)
    requestheaders(chunked)
    assert chunked.response.status_code == 411


def test_a_json_protocol_call_named_by_its_header_still_streams():
    """X-Amz-Target names the operation: nothing in the body changes it, so it is not held."""
    ddb = AWSAction("dynamodb", "us-east-1", "BatchWriteItem", protocol="json")
    f = flow("aws", "aws", {"content_type": "application/x-amz-json-1.0", "content_length": str(20 * MIB)},
             aws=ddb)
    requestheaders(f)
    assert f.response is None and f.request.stream is True


def test_an_anthropic_request_is_read_up_to_the_apis_limit():
    ok = flow("claude", "anthropic", {"content_length": str(20 * MIB)})
    requestheaders(ok)
    assert ok.response is None and ok.request.stream is False
    huge = flow("claude", "anthropic", {"content_length": str(33 * MIB)})
    requestheaders(huge)
    assert huge.response.status_code == 413
    assert json.loads(huge.response.text)["error"] == "chaperone_invalid_request"


def test_a_gzip_body_is_judged_on_what_it_decodes_to():
    past = gzip.compress(b" " * (2 * MIB) + b"DROP TABLE t;")
    f = flow("db", "http", {"content_encoding": "gzip", "content_length": str(len(past))}, past)
    request(f)
    assert f.response.status_code == 413 and f"larger than {2 * MIB} bytes" in f.response.text
    garbage = gzip.compress(b"DROP TABLE t;") + b"trailing"
    g = flow("db", "http", {"content_encoding": "gzip", "content_length": str(len(garbage))}, garbage)
    request(g)
    assert g.response.status_code == 403 and json.loads(g.response.text)["rule"]["name"] == "no-drop"
    corrupt = b"\x1f\x8b\x08\x00garbage"
    c = flow("db", "http", {"content_encoding": "gzip", "content_length": str(len(corrupt))}, corrupt)
    request(c)
    assert c.response.status_code == 415
