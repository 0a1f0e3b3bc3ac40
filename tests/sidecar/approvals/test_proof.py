"""Grants are claims the ApprovalRequest must prove: forgeries written straight into the real
redis-server, the way an agent that reaches Redis would, are refused and reported.

Every forgery is written with a plain synchronous ``redis`` client (what an agent would run),
shaped exactly like a real grant: the real one is copied and one thing changed (the key's digest
or subject, its scope, its expiry), or hand-made naming a request that does not exist or was
denied. The ApprovalRequests live on the real apiserver.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import time
import uuid

import redis

from chaperone_sidecar.approvals.digest import action_key, request_digest
from chaperone_sidecar.approvals.objects import subject_key

from .conftest import http_action, http_request, identity
from .test_service import ask, service

CONNECTION = "example-api"


def approved_grant(kube_env, redis_server, prefix: str, who) -> tuple[str, bytes, str]:
    """Approve one request through the service (held, approved by alice): (key, value, name)."""
    async def scenario():
        async with service(kube_env, redis_server.url, prefix=prefix) as svc:
            decider = asyncio.create_task(kube_env.decide_later("Approved", delay=0.3))
            outcome = await ask(svc, who, hold_seconds=30)
            await decider
            return outcome

    outcome = asyncio.run(scenario())
    assert outcome.state == "approved"
    agent = redis.Redis.from_url(redis_server.url)
    keys = agent.keys(f"{prefix}grant:*")
    assert len(keys) == 1, keys
    return keys[0].decode(), agent.get(keys[0]), outcome.name


def ask_once(kube_env, redis_server, prefix: str, who, **kw):
    async def scenario():
        async with service(kube_env, redis_server.url, prefix=prefix) as svc:
            outcome = await ask(svc, who, mode="defer", **kw)
            return outcome, svc.refused_grants
    return asyncio.run(scenario())


def digest_of(body: bytes = b'{"force":true}', path: str = "/v1/things/42") -> str:
    return request_digest(http_request(body, path))


def test_real_grant_passes_and_forged_copies_are_refused(kube_env, redis_server):
    who = identity(kube_env.ns)
    prefix = f"proof-{uuid.uuid4().hex[:8]}:"
    key, value, name = approved_grant(kube_env, redis_server, prefix, who)
    agent = redis.Redis.from_url(redis_server.url)
    subject = subject_key(who, CONNECTION)
    assert key == f"{prefix}grant:exact:{subject}:{digest_of()}"

    # The real grant passes the same request (proven by the ApprovalRequest it names).
    outcome, refused = ask_once(kube_env, redis_server, prefix, who)
    assert outcome.state == "approved" and outcome.grant == "exact" and outcome.name == name
    assert outcome.approvers == ("alice",) and refused == 0

    # 1. Replayed to another digest (another body): refused, the request goes to approvers.
    other = digest_of(b'{"force":true,"cascade":true}')
    agent.set(f"{prefix}grant:exact:{subject}:{other}", value, ex=600)
    outcome, refused = ask_once(kube_env, redis_server, prefix, who, body=b'{"force":true,"cascade":true}')
    assert outcome.state == "pending" and outcome.name != name, outcome
    assert refused == 1 and f"approved request {digest_of()}, not {other}" in outcome.refused_grants[0]
    assert agent.get(f"{prefix}grant:exact:{subject}:{other}") is None  # dropped after refusal

    # 2. Replayed to another subject (a sibling pod created by someone else).
    mallory = identity(kube_env.ns, pod="agent-pod-2")
    mallory = dataclasses.replace(mallory, creator="mallory")
    theirs = subject_key(mallory, CONNECTION)
    agent.set(f"{prefix}grant:exact:{theirs}:{digest_of()}", value, ex=600)
    outcome, refused = ask_once(kube_env, redis_server, prefix, mallory)
    assert outcome.state == "pending" and refused == 1, outcome
    assert "was asked by someone else: spec.requester.creator is 'dave'" in outcome.refused_grants[0]

    # 3. Scope widened: the exact grant copied to the action key, claiming "action".
    widened = json.loads(value)
    widened["scope"] = "action"
    akey = action_key(CONNECTION, http_action())
    agent.set(f"{prefix}grant:action:{subject}:{akey}", json.dumps(widened), ex=600)
    body = b'{"force":false}'  # same action (same path and method), another request
    outcome, refused = ask_once(kube_env, redis_server, prefix, who, body=body)
    assert outcome.state == "pending" and refused == 1, outcome
    assert f"ApprovalRequest {name} granted scope 'exact', the grant claims 'action'" in \
        outcome.refused_grants[0]

    # 4. Expiry pushed: the real key, its end a day later. The flow still passes - on the real
    # approval, re-read from the ApprovalRequest - but the altered grant is reported.
    pushed = json.loads(value)
    pushed["expires_at"] += 86400
    agent.set(key, json.dumps(pushed), ex=90000)
    outcome, refused = ask_once(kube_env, redis_server, prefix, who)
    assert refused == 1 and "claims to last until" in outcome.refused_grants[0]
    assert outcome.state == "approved" and outcome.name == name and outcome.grant == ""
    stored = json.loads(agent.get(key))  # the cache was refilled from the request's own window
    assert stored["expires_at"] <= json.loads(value)["expires_at"] + 1


def test_hand_made_grants_are_refused(kube_env, redis_server):
    who = identity(kube_env.ns)
    prefix = f"proof-{uuid.uuid4().hex[:8]}:"
    agent = redis.Redis.from_url(redis_server.url)
    subject = subject_key(who, CONNECTION)
    key = f"{prefix}grant:exact:{subject}:{digest_of()}"

    def forge(doc) -> None:
        agent.set(key, doc if isinstance(doc, str) else json.dumps(doc), ex=600)

    # A request that does not exist.
    forge({"scope": "exact", "request": "http-delete-0123456789-abcde", "approvers": ["alice"],
           "expires_at": time.time() + 900})
    outcome, refused = ask_once(kube_env, redis_server, prefix, who)
    assert outcome.state == "pending" and refused == 1
    assert "names ApprovalRequest 'http-delete-0123456789-abcde', which does not exist" in \
        outcome.refused_grants[0]
    pending = outcome.name

    # The agent's own pending request (exists, right subject and digest - but not approved).
    forge({"scope": "exact", "request": pending, "approvers": ["alice"], "expires_at": time.time() + 900})
    outcome, refused = ask_once(kube_env, redis_server, prefix, who)
    assert outcome.state == "pending" and outcome.name == pending and refused == 1
    assert f"ApprovalRequest {pending} is pending, not approved" in outcome.refused_grants[0]

    # A path instead of a name: never requested from the API.
    forge({"scope": "exact", "request": "../../../api/v1/namespaces", "approvers": [],
           "expires_at": time.time() + 900})
    outcome, refused = ask_once(kube_env, redis_server, prefix, who)
    assert outcome.state == "pending" and "which does not exist" in outcome.refused_grants[0]

    # Not even a grant.
    forge("yes")
    outcome, refused = ask_once(kube_env, redis_server, prefix, who)
    assert outcome.state == "pending" and "unreadable grant" in outcome.refused_grants[0]

    # After a denial: a grant naming the denied request.
    kube_env.decide(pending, "Denied", "alice", "no")
    forge({"scope": "exact", "request": pending, "approvers": ["alice"], "expires_at": time.time() + 900})
    outcome, refused = ask_once(kube_env, redis_server, prefix, who)
    assert f"ApprovalRequest {pending} is denied, not approved" in outcome.refused_grants[0]
    assert outcome.state == "denied" and outcome.name == pending  # the remembered denial answers
    assert len(kube_env.names()) == 1  # nothing of this opened a second request
