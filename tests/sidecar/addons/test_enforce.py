"""Enforce: policy decisions on hand-made FlowContexts; 403 for blocks, 429 for rate limits."""

from __future__ import annotations

import asyncio
import dataclasses
import json

import pytest
import redis.asyncio as aioredis
from mitmproxy import http
from mitmproxy.test import taddons, tflow, tutils

from chaperone_sidecar import flowctx
from chaperone_sidecar.addons.enforce import Enforce
from chaperone_sidecar.addons.streaming import body_leaves_early
from chaperone_sidecar.approvals.ratelimit import MemoryRateLimiter, RedisRateLimiter
from chaperone_sidecar.config import SidecarConfig
from chaperone_sidecar.policy.model import Action, AWSAction, Identity, RuleRef
from chaperone_sidecar.services import SidecarServices
from chaperone_sidecar.sources import Sources

NS = "team-a"
AGENT = Identity(service_account=f"{NS}/claude", pod_namespace=NS, pod_name="agent-0",
                 creator="alice")
CONNECTIONS = [{"metadata": {"name": "aws-prod"}, "spec": {"type": "aws"}},
               {"metadata": {"name": "github"}, "spec": {"type": "http", "hosts": ["api.github.com"]}}]
AWS_POLICY = {
    "metadata": {"name": "aws-guardrails", "namespace": NS},
    "spec": {"connections": ["aws-prod"], "defaultEffect": "allow",
             "approvers": {"users": ["carol"], "groups": ["platform-approvers"]},
             "rules": [{"name": "no-bucket-deletion",
                        "match": {"aws": {"actions": ["s3:DeleteBucket"]}},
                        "block": {"message": "Bucket deletion is not allowed for agents"}},
                       {"name": "roles-need-approval",
                        "match": {"aws": {"actions": ["iam:CreateRole"]}},
                        "requireApproval": {}},
                       {"name": "two-puts-a-minute", "match": {"methods": ["PUT"]},
                        "rateLimit": {"requests": 2, "periodSeconds": 60}}]},
}
GITHUB_POLICY = {
    "metadata": {"name": "github", "namespace": NS},
    "spec": {"connections": ["github"],
             "rules": [{"name": "reads", "match": {"methods": ["GET"]}, "allow": {}},
                       {"name": "no-force-push",
                        "match": {"methods": ["POST"], "bodyRegex": "\"force\":\\s*true"},
                        "block": {}},
                       {"name": "posts", "match": {"methods": ["POST"]}, "allow": {}}]},
}


def services(policies=(AWS_POLICY, GITHUB_POLICY), limiter=None) -> SidecarServices:
    sources = Sources(NS)
    sources.publish({"connection_objs": CONNECTIONS,
                     "policy_objs": [{"apiVersion": "chaperone.dev/v1alpha1", "kind": "AccessPolicy", **p}
                                     for p in policies]})
    return SidecarServices(config=SidecarConfig(standalone=True), sources=sources,
                           rate_limiter=limiter if limiter is not None else MemoryRateLimiter())


def aws_flow(operation="DeleteBucket", method="DELETE", service="s3", host="logs.s3.amazonaws.com"):
    f = tflow.tflow(req=tutils.treq(host=host, port=443, scheme=b"https", method=method.encode(),
                                    path=b"/", headers=http.Headers(host=host)))
    info = AWSAction(service, "us-east-1", operation, resources=("logs",))
    ctx = flowctx.ensure(f)
    ctx.identity, ctx.connection, ctx.connection_type = AGENT, "aws-prod", "aws"
    ctx.action = Action("aws", method, "https", host, 443, "/", name=info.action,
                        summary=f"{info.action} logs (us-east-1)", aws=info)
    return f


def github_flow(method="GET", content=b"", headers=None):
    hdrs = http.Headers(host="api.github.com", **(headers or {}))
    f = tflow.tflow(req=tutils.treq(host="api.github.com", port=443, scheme=b"https",
                                    method=method.encode(), path=b"/repos/o/r/git/refs",
                                    headers=hdrs, content=content))
    ctx = flowctx.ensure(f)
    ctx.identity, ctx.connection, ctx.connection_type = AGENT, "github", "http"
    ctx.action = Action("http", method, "https", "api.github.com", 443, "/repos/o/r/git/refs",
                        name=f"http:{method}", summary=f"{method} api.github.com/repos/o/r/git/refs")
    return f


def enforce(flow, svc=None, *, streamed=False):
    """Run Enforce's hooks the way mitmproxy does (requestheaders, then request)."""
    addon = Enforce(svc or services())

    async def run():
        with taddons.context(addon):
            if streamed:
                flow.request.stream = True
            await addon.requestheaders(flow)
            if flow.response is None:
                await addon.request(flow)
    asyncio.run(run())
    return flowctx.get(flow)


def body_of(flow) -> dict:
    assert flow.response.headers["Content-Type"] == "application/json"
    return json.loads(flow.response.content)


# ---------------------------------------------------------------------------- decisions

def test_allow_stores_the_decision_and_forwards():
    f = aws_flow("GetObject", "GET")
    ctx = enforce(f)
    assert ctx.decision.effect == "allow" and f.response is None and ctx.refused is None


def test_block_is_a_403_an_agent_can_act_on_and_never_forwarded():
    f = aws_flow()
    ctx = enforce(f)
    assert f.response.status_code == 403  # set in the request hook: mitmproxy never connects
    assert f.response.headers["X-Chaperone-Refused"] == "blocked"
    body = body_of(f)
    assert body == {
        "error": "chaperone_blocked",
        "message": "Bucket deletion is not allowed for agents",
        "rule": {"policy": "team-a/aws-guardrails", "name": "no-bucket-deletion"},
        "action": {"name": "s3:DeleteBucket", "summary": "s3:DeleteBucket logs (us-east-1)",
                   "connection": "aws-prod"},
        "how_to_get_access": body["how_to_get_access"],
    }
    how = body["how_to_get_access"]
    assert "AccessPolicy aws-guardrails in namespace team-a" in how
    assert "users carol or members of groups platform-approvers" in how
    assert "requireApproval" in how and "kubectl get accesspolicy aws-guardrails -n team-a" in how
    assert ctx.decision.effect == "block" and ctx.refused == body


def test_require_approval_passes_to_approve():
    f = aws_flow("CreateRole", "POST", service="iam", host="iam.amazonaws.com")
    ctx = enforce(f)
    assert ctx.decision.effect == "require_approval" and f.response is None
    assert ctx.decision.approval.approvers.groups == ("platform-approvers",)


def test_default_block_names_the_governing_policies():
    f = github_flow("DELETE")
    ctx = enforce(f)
    body = body_of(f)
    assert f.response.status_code == 403 and body["rule"] is None and ctx.decision.rule is None
    assert "denied by default (team-a/github)" in body["message"]
    assert "governing connection 'github' (team-a/github)" in body["how_to_get_access"]


def test_no_policy_at_all_blocks_fail_closed():
    f = github_flow()
    enforce(f, services(policies=()))
    body = body_of(f)
    assert "no AccessPolicy governs connection" in body["message"]
    assert "Ask the team that owns namespace team-a to create an AccessPolicy" in body["how_to_get_access"]


def test_unclassified_request_is_blocked():
    f = github_flow()
    flowctx.get(f).action = None
    enforce(f)
    assert body_of(f)["error"] == "chaperone_blocked" and "could not be classified" in body_of(f)["message"]


def test_refused_flows_are_left_alone():
    f = aws_flow()
    f.response = tutils.tresp(status_code=401)
    ctx = enforce(f)
    assert ctx.decision is None and f.response.status_code == 401


def test_uses_the_snapshot_the_flow_was_routed_with():
    f = aws_flow()
    flowctx.ensure(f).snapshot = services(policies=()).snapshot()  # routed before policies loaded
    enforce(f)
    assert "no AccessPolicy governs" in body_of(f)["message"]


# ---------------------------------------------------------------------------- bodies

def test_body_regex_sees_the_request_body():
    push = github_flow("POST", b'{"sha": "abc", "force": true}', {"content-type": "application/json"})
    ctx = enforce(push)
    assert push.response.status_code == 403 and ctx.decision.rule == RuleRef("team-a/github", "no-force-push")
    ok = github_flow("POST", b'{"sha": "abc"}')
    assert enforce(ok).decision.effect == "allow" and ok.response is None


def test_body_regex_sees_a_compressed_body_decoded():
    push = github_flow("POST", b"", {"content-encoding": "gzip"})
    push.request.content = b'{"force": true}'  # encoded with gzip on the wire
    assert push.request.raw_content != b'{"force": true}'
    enforce(push)
    assert push.response.status_code == 403


def test_streamed_request_is_judged_on_headers_in_requestheaders():
    f = aws_flow()
    f.request.stream = True
    addon = Enforce(services())

    async def run():
        with taddons.context(addon):
            await addon.requestheaders(f)
    asyncio.run(run())
    assert f.response.status_code == 403  # before any body byte went upstream


def test_streamed_request_a_body_rule_could_match_is_buffered_when_small():
    f = github_flow("POST", b'{"force": true}', {"content-length": "15"})
    f.request.stream = True
    addon = Enforce(services())

    async def run():
        with taddons.context(addon):
            await addon.requestheaders(f)
            assert f.request.stream is False and flowctx.get(f).decision is None
            await addon.request(f)
    asyncio.run(run())
    assert f.response.status_code == 403 and flowctx.get(f).decision.rule.rule == "no-force-push"


def test_a_body_rule_refuses_a_chunked_body_it_cannot_read_first():
    f = github_flow("POST", b"", {"transfer-encoding": "chunked"})
    enforce(f)  # not streamed yet - but mitmproxy would stream it once it grows past the limit
    assert f.response.status_code == 411
    body = body_of(f)
    assert body["rule"] == {"policy": "team-a/github", "name": "no-force-push"}
    assert "bodyRegex" in body["message"] and "no Content-Length" in body["message"]
    assert "Content-Length header of at most 67108864 bytes" in body["how_to_get_access"]


def test_a_body_rule_refuses_a_body_over_the_streaming_size():
    """Past stream_large_bodies mitmproxy streams a body it was told to buffer again, before the
    request hook (it sent a 2 MiB body matching a bodyRegex block rule upstream): refused."""
    f = github_flow("POST", b"", {"content-length": str(2 * 1024 * 1024)})
    f.request.stream = True
    addon = Enforce(services())

    async def run():
        from mitmproxy.addons.proxyserver import Proxyserver  # declares stream_large_bodies

        with taddons.context(addon, Proxyserver()) as tctx:
            tctx.options.stream_large_bodies = "1m"
            await addon.requestheaders(f)
    asyncio.run(run())
    assert f.response.status_code == 413 and "larger than 1048576 bytes" in body_of(f)["message"]
    assert f.request.stream is False  # mitmproxy cannot answer while streaming


def test_a_body_rule_refuses_a_streamed_body_above_its_limit():
    f = github_flow("POST", b"", {"content-length": str(100 * 1024 * 1024)})
    enforce(f, streamed=True)
    assert f.response.status_code == 413 and "larger than 67108864 bytes" in body_of(f)["message"]
    assert f.request.stream is False  # mitmproxy cannot answer while streaming


def test_chunked_body_is_judged_before_it_can_leave():
    """mitmproxy starts streaming a chunked body once it is large, before the request hook:
    such a request is judged in requestheaders (a blocked DELETE never slips through)."""
    f = aws_flow()
    f.request.headers["transfer-encoding"] = "chunked"
    addon = Enforce(services())

    async def run():
        with taddons.context(addon):
            await addon.requestheaders(f)
    asyncio.run(run())
    assert f.response.status_code == 403 and flowctx.get(f).decision.rule.rule == "no-bucket-deletion"


def test_http2_without_length_is_judged_early_and_again_with_a_buffered_body():
    f = github_flow("POST", b"")
    f.request.http_version = "HTTP/2.0"
    f.request.method = "GET"  # an HTTP/2 GET without Content-Length: normally no body
    ctx = flowctx.get(f)
    ctx.action = dataclasses.replace(ctx.action, method="GET", name="http:GET")
    addon = Enforce(services(policies=[{**GITHUB_POLICY, "spec": {**GITHUB_POLICY["spec"], "rules": [
        {"name": "no-secrets", "match": {"bodyRegex": "secret"}, "block": {}},
        {"name": "reads", "match": {"methods": ["GET"]}, "allow": {}}]}}]))

    async def run():
        with taddons.context(addon):
            await addon.requestheaders(f)
            assert ctx.decision.effect == "allow" and f.response is None
            f.request.content = b"a secret"  # a body came after all, and was buffered
            await addon.request(f)
    asyncio.run(run())
    assert f.response.status_code == 403 and ctx.decision.rule.rule == "no-secrets"


@pytest.mark.parametrize("version, headers, early", [
    ("HTTP/1.1", {"content-length": "5"}, False),
    ("HTTP/1.1", {}, False),
    ("HTTP/1.1", {"transfer-encoding": "gzip, chunked"}, True),
    ("HTTP/2.0", {}, True),
    ("HTTP/2.0", {"content-length": "0"}, False),
    ("HTTP/3", {}, True),
])
def test_body_leaves_early(version, headers, early):
    f = tflow.tflow(req=tutils.treq(headers=http.Headers(host="h", **headers), content=b""))
    f.request.http_version = version
    assert body_leaves_early(f) is early
    f.request.stream = True
    assert body_leaves_early(f) is True


def test_streamed_request_without_body_rules_is_judged_at_once():
    f = aws_flow("PutObject", "PUT")
    ctx = enforce(f, streamed=True)
    assert ctx.decision.effect == "allow" and f.request.stream is True and f.response is None


# ---------------------------------------------------------------------------- rate limits

def test_rate_limit_429_with_retry_after():
    svc = services()
    flows = [aws_flow("PutObject", "PUT") for _ in range(3)]
    for f in flows:
        enforce(f, svc)
    assert [f.response for f in flows[:2]] == [None, None]
    third = flows[2]
    assert third.response.status_code == 429
    assert third.response.headers["X-Chaperone-Refused"] == "rate_limited"
    retry = int(third.response.headers["Retry-After"])
    assert 1 <= retry <= 60
    body = body_of(third)
    assert body["error"] == "chaperone_rate_limited" and body["retry_after_seconds"] == retry
    assert body["rule"] == {"policy": "team-a/aws-guardrails", "name": "two-puts-a-minute"}
    assert body["limit"] == {"requests": 2, "period_seconds": 60, "per": "identity"}
    ctx = flowctx.get(third)
    assert ctx.decision.effect == "rate_limited" and ctx.decision.rule.rule == "two-puts-a-minute"


def test_blocked_requests_do_not_count_against_limits():
    svc = services(policies=[{**GITHUB_POLICY, "spec": {
        **GITHUB_POLICY["spec"], "rules": [*GITHUB_POLICY["spec"]["rules"],
                                           {"name": "one-post", "match": {"methods": ["POST"]},
                                            "rateLimit": {"requests": 1, "periodSeconds": 60}}]}}])
    blocked = github_flow("POST", b'{"force": true}')
    enforce(blocked, svc)
    assert blocked.response.status_code == 403
    ok = github_flow("POST", b"{}")
    assert enforce(ok, svc).decision.effect == "allow"
    again = github_flow("POST", b"{}")
    enforce(again, svc)
    assert again.response.status_code == 429


def test_rate_limits_are_shared_through_redis(redis_server):
    """Two sidecars (two Enforce instances) share the counter in Redis."""
    async def run():
        client = aioredis.from_url(redis_server.url)
        try:
            prefix = f"chaperone:test-enforce:{id(client)}:"
            results = []
            for i in range(3):
                addon = Enforce(services(limiter=RedisRateLimiter(client, prefix=prefix)))
                f = aws_flow("PutObject", "PUT")
                with taddons.context(addon):
                    await addon.request(f)
                results.append(f.response.status_code if f.response else None)
            return results
        finally:
            await client.aclose()
    assert asyncio.run(run()) == [None, None, 429]


class BrokenLimiter:
    async def hit(self, key, limit, period):
        raise ConnectionError("redis is down")


def test_rate_limiter_unavailable_fails_closed():
    f = aws_flow("PutObject", "PUT")
    ctx = enforce(f, services(limiter=BrokenLimiter()))
    assert f.response.status_code == 503 and f.response.headers["Retry-After"] == "5"
    assert "cannot be counted" in body_of(f)["message"] and ctx.decision.effect == "rate_limited"


def test_without_a_limiter_in_services_memory_is_used():
    svc = services()
    svc.rate_limiter = None
    addon = Enforce(svc)
    flows = [aws_flow("PutObject", "PUT") for _ in range(3)]

    async def run():
        with taddons.context(addon):
            for f in flows:
                await addon.request(f)
    asyncio.run(run())
    assert [f.response.status_code if f.response else None for f in flows] == [None, None, 429]


def test_block_through_the_mitmproxy_event_sequence():
    """All of the flow's events through taddons' cycle: the block is the answer, no upstream."""
    f = aws_flow()
    f.response = None
    addon = Enforce(services())

    async def run():
        with taddons.context(addon) as tctx:
            await tctx.cycle(addon, f)
    asyncio.run(run())
    assert f.response.status_code == 403 and body_of(f)["rule"]["name"] == "no-bucket-deletion"
