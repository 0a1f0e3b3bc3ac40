"""ApprovalService end to end: real apiserver (service-account identity), real redis-server.

Decisions are made the way a human makes them (kubectl patch as alice/bob) while the service
holds a flow; outcomes are asserted, not timings.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
import uuid

import pytest
import redis.asyncio as aioredis

from chaperone_sidecar.approvals import ApprovalUnavailable
from chaperone_sidecar.approvals.digest import request_digest
from chaperone_sidecar.approvals.grants import Grant, MemoryGrants, RedisGrants, grant_key
from chaperone_sidecar.approvals.local import LocalApprovalStore
from chaperone_sidecar.approvals.objects import approve_command, approvers_text, subject_key
from chaperone_sidecar.approvals.service import ApprovalService, Outcome
from chaperone_sidecar.policy.model import ApprovalRequirement, Approvers

from .conftest import RULE, Ticker, http_action, http_request, identity, requirement


class DeafBackend:
    """A real backend whose watch never reports a change (a sidecar with a broken watch)."""

    def __init__(self, inner) -> None:
        self.inner = inner

    async def create(self, obj):
        return await self.inner.create(obj)

    async def get(self, name):
        return await self.inner.get(name)

    async def find(self, labels):
        return await self.inner.find(labels)

    async def wait(self, name, timeout, done):
        obj = await self.inner.get(name)
        await asyncio.sleep(timeout)
        return obj  # what it saw at the start: still pending

    async def close(self):
        await self.inner.close()


@contextlib.asynccontextmanager
async def service(env, redis_url: str = "", *, prefix: str = "", backend=None):
    client = aioredis.Redis.from_url(redis_url) if redis_url else None
    grants = RedisGrants(client, prefix=prefix or f"svc-{uuid.uuid4().hex[:8]}:",
                         reconnect_delay=0.05) if client else MemoryGrants()
    svc = ApprovalService(backend or env.backend(), grants)
    try:
        yield svc
    finally:
        await svc.close()
        if client is not None:
            await client.aclose()


def ask(svc, who, req=None, *, body=b'{"force":true}', path="/v1/things/42", **requirement_kw):
    return svc.request(identity=who, connection="example-api", action=http_action(path),
                       digest=request_digest(http_request(body, path)), rule=RULE,
                       requirement=req or requirement(**requirement_kw),
                       session_id="session-1", body_preview=body.decode())


# ---------------------------------------------------------------------------- hold mode

def test_held_flow_is_released_on_approval_with_the_approver(kube_env, redis_server):
    who = identity(kube_env.ns)

    async def scenario():
        async with service(kube_env, redis_server.url) as svc:
            with Ticker() as ticker:
                decider = asyncio.create_task(kube_env.decide_later("Approved", delay=1.0))
                outcome = await ask(svc, who, hold_seconds=60)
                name = await decider
            assert svc.held == 0
            return outcome, name, ticker.ticks

    outcome, name, ticks = asyncio.run(scenario())
    assert outcome.state == "approved" and outcome.name == name
    assert outcome.approvers == ("alice",)
    assert outcome.grant == "" and outcome.expires_at  # released by the decision, grant cached
    assert ticks >= 5  # the loop kept running during the ~1 s hold
    assert kube_env.names() == [name]
    spec = kube_env.get(name)["spec"]
    assert spec["requester"]["serviceAccount"] == f"system:serviceaccount:{kube_env.ns}:agent"
    assert spec["rule"] == {"policy": RULE.policy, "name": RULE.rule}
    assert spec["approvers"] == {"users": ["alice"], "groups": ["platform-approvers"]}
    assert spec["sessionID"] == "session-1" and spec["action"]["bodyPreview"] == '{"force":true}'


def test_denied_flow_is_refused_with_the_reason(kube_env, redis_server):
    who = identity(kube_env.ns)

    async def scenario():
        async with service(kube_env, redis_server.url) as svc:
            decider = asyncio.create_task(
                kube_env.decide_later("Denied", user="bob", reason="not during the freeze"))
            outcome = await ask(svc, who, hold_seconds=60)
            await decider
            retry = await ask(svc, who, mode="defer")  # a denial leaves no grant behind
            # ... and a retry is answered with the denial, not a new request paging approvers
            # again - even by a fresh sidecar whose grant cache was wiped (a restart, or an
            # agent that flushed Redis): the memory is the ApprovalRequest itself.
            async with service(kube_env, redis_server.url) as fresh:
                again = await ask(fresh, who, hold_seconds=60)
            # remembering is the policy's choice: with 0 a retry asks again at once
            anew = await ask(svc, who, mode="defer", remember_outcome_seconds=0)
            return outcome, retry, again, anew

    outcome, retry, again, anew = asyncio.run(scenario())
    assert outcome.state == "denied" and outcome.approvers == ("bob",)
    assert outcome.reason == "denied by bob: not during the freeze"
    for answer in (retry, again):
        assert answer.state == "denied" and answer.name == outcome.name, answer
        assert answer.approvers == ("bob",) and answer.reason == outcome.reason
        assert answer.remembered_until  # until when retries get this answer
    assert anew.state == "pending" and anew.name != outcome.name
    assert len(kube_env.names()) == 2  # the remembered retries opened nothing


def test_expired_outcome_is_remembered_for_retries(kube_env, redis_server):
    who = identity(kube_env.ns)

    async def scenario():
        async with service(kube_env, redis_server.url) as svc:
            first = await ask(svc, who, hold_seconds=60, timeout_seconds=1)
            retry = await ask(svc, who, hold_seconds=60, timeout_seconds=1)
            return first, retry

    first, retry = asyncio.run(scenario())
    expires = kube_env.get(first.name)["spec"]["expiresAt"]
    assert first.state == "expired" and f"expired undecided at {expires}" in first.reason
    assert retry.state == "expired" and retry.name == first.name, retry
    assert f"expired undecided at {expires}" in retry.reason and retry.remembered_until
    assert kube_env.names() == [first.name]


def test_hold_timeout_returns_pending_with_the_name(kube_env, redis_server):
    who = identity(kube_env.ns)

    async def scenario():
        async with service(kube_env, redis_server.url) as svc:
            return await ask(svc, who, hold_seconds=1, timeout_seconds=300)

    outcome = asyncio.run(scenario())
    assert outcome.state == "pending" and kube_env.names() == [outcome.name]
    assert outcome.expires_at == kube_env.get(outcome.name)["spec"]["expiresAt"]
    assert "1 approval from user alice or members of group platform-approvers" in outcome.reason


def test_request_expiry_during_the_hold(kube_env, redis_server):
    who = identity(kube_env.ns)

    async def scenario():
        async with service(kube_env, redis_server.url) as svc:
            return await ask(svc, who, hold_seconds=60, timeout_seconds=2)

    outcome = asyncio.run(scenario())
    assert outcome.state == "expired" and outcome.name in kube_env.names()
    assert "ask again" in outcome.reason


def test_operator_status_phase_is_honoured(kube_env, redis_server):
    who = identity(kube_env.ns)

    async def scenario():
        async with service(kube_env, redis_server.url) as svc:
            results = []
            for phase, path in (("Expired", "/a"), ("Denied", "/b")):
                async def operator_writes(phase=phase, count=len(results) + 1):
                    names = await kube_env.wait_for_request(count)
                    done = {r.name for r in results}
                    name = next(n for n in names if n not in done)
                    await asyncio.sleep(0.3)
                    await asyncio.to_thread(kube_env.set_phase, name, phase)

                task = asyncio.create_task(operator_writes())
                results.append(await ask(svc, who, path=path, hold_seconds=60))
                await task
            return results

    expired, denied = asyncio.run(scenario())
    assert expired.state == "expired" and denied.state == "denied"


def test_deleted_request_releases_the_hold_as_expired(kube_env, redis_server):
    who = identity(kube_env.ns)

    async def scenario():
        async with service(kube_env, redis_server.url) as svc:
            async def admin_deletes():
                name = (await kube_env.wait_for_request())[0]
                await asyncio.sleep(0.3)
                await asyncio.to_thread(kube_env.cp.kubectl, "delete", "ar", name, "-n", kube_env.ns)

            task = asyncio.create_task(admin_deletes())
            outcome = await ask(svc, who, hold_seconds=60)
            await task
            # The deletion erased nothing the agent could use: a retry opens a new request
            # (approvers see it again), and a grant naming the deleted request proves nothing.
            retry = await ask(svc, who, mode="defer")
            await svc.grants.put(grant_key("exact", subject_key(who, "example-api"),
                                           request_digest(http_request())),
                                 Grant("exact", outcome.name, ("alice",), time.time() + 900))
            forged = await ask(svc, who, mode="defer")
            return outcome, retry, forged

    outcome, retry, forged = asyncio.run(scenario())
    assert outcome.state == "expired" and outcome.reason.startswith("request deleted: ")
    assert retry.state == "pending" and retry.name != outcome.name
    assert kube_env.names() == [retry.name]
    assert forged.state == "pending" and forged.name == retry.name
    assert f"names ApprovalRequest '{outcome.name}', which does not exist" in forged.refused_grants[0]


# ---------------------------------------------------------------------------- reuse and grants

def test_retries_reuse_the_pending_request(kube_env, redis_server):
    who = identity(kube_env.ns)

    async def scenario():
        async with service(kube_env, redis_server.url) as svc:
            first = await ask(svc, who, hold_seconds=1)
            again = await ask(svc, who, mode="defer")
            burst = await asyncio.gather(*(ask(svc, who, mode="defer") for _ in range(5)))
            return first, again, burst

    first, again, burst = asyncio.run(scenario())
    assert first.state == again.state == "pending"
    assert {o.name for o in burst} == {first.name} == {again.name}
    assert kube_env.names() == [first.name]  # exactly one object in `kubectl get ar`


def test_concurrent_first_requests_open_one_request(kube_env, redis_server):
    who = identity(kube_env.ns)

    async def scenario():
        async with service(kube_env, redis_server.url) as svc:
            return await asyncio.gather(*(ask(svc, who, mode="defer") for _ in range(5)))

    outcomes = asyncio.run(scenario())
    assert len({o.name for o in outcomes}) == 1 and len(kube_env.names()) == 1


def test_exact_grant_passes_the_same_request_only(kube_env, redis_server):
    who = identity(kube_env.ns)

    async def scenario():
        async with service(kube_env, redis_server.url) as svc:
            decider = asyncio.create_task(kube_env.decide_later("Approved"))
            approved = await ask(svc, who, hold_seconds=60)
            await decider
            retry = await ask(svc, who, hold_seconds=60)
            changed = await ask(svc, who, body=b'{"force":false}', mode="defer")
            return approved, retry, changed

    approved, retry, changed = asyncio.run(scenario())
    assert approved.state == "approved"
    assert retry.state == "approved" and retry.grant == "exact"
    assert retry.name == approved.name and retry.approvers == ("alice",)
    assert changed.state == "pending" and changed.name != approved.name  # a new approval
    assert sorted(kube_env.names()) == sorted([approved.name, changed.name])


def test_action_grant_passes_the_same_action_with_another_body(kube_env, redis_server):
    who = identity(kube_env.ns)

    async def scenario():
        async with service(kube_env, redis_server.url) as svc:
            decider = asyncio.create_task(kube_env.decide_later("Approved"))
            approved = await ask(svc, who, hold_seconds=60, grant_scope="action")
            await decider
            other_body = await ask(svc, who, body=b'{"force":false}', mode="defer",
                                   grant_scope="action")
            other_path = await ask(svc, who, path="/v1/things/43", mode="defer",
                                   grant_scope="action")
            return approved, other_body, other_path

    approved, other_body, other_path = asyncio.run(scenario())
    assert approved.state == "approved"
    assert other_body.state == "approved" and other_body.grant == "action"
    assert other_path.state == "pending"  # another resource is another action
    assert len(kube_env.names()) == 2


def test_grant_ttl_expiry_needs_a_new_approval(kube_env, redis_server):
    who = identity(kube_env.ns)

    async def scenario():
        async with service(kube_env, redis_server.url) as svc:
            decider = asyncio.create_task(kube_env.decide_later("Approved"))
            approved = await ask(svc, who, hold_seconds=60, grant_ttl_seconds=1)
            await decider
            within = await ask(svc, who, mode="defer", grant_ttl_seconds=1)
            await asyncio.sleep(1.3)
            after = await ask(svc, who, mode="defer", grant_ttl_seconds=1)
            return approved, within, after

    approved, within, after = asyncio.run(scenario())
    assert approved.state == "approved"
    assert within.state == "approved" and within.grant == "exact"
    assert after.state == "pending" and after.name != approved.name
    assert len(kube_env.names()) == 2


def test_approval_given_while_nobody_held_passes_the_retry(kube_env, redis_server):
    """Defer mode: the agent got 403 + name; the human approves later; the retry passes."""
    who = identity(kube_env.ns)

    async def scenario():
        async with service(kube_env, redis_server.url) as svc:
            deferred = await ask(svc, who, mode="defer")
            await asyncio.to_thread(kube_env.decide, deferred.name, "Approved", "bob")
            retry = await ask(svc, who, mode="defer")
            cached = await ask(svc, who, mode="defer")
            return deferred, retry, cached

    deferred, retry, cached = asyncio.run(scenario())
    assert deferred.state == "pending"
    assert retry.state == "approved" and retry.name == deferred.name and retry.approvers == ("bob",)
    assert cached.grant == "exact"
    assert kube_env.names() == [deferred.name]


# ---------------------------------------------------------------------------- fan-out

def test_decision_is_fanned_out_to_a_sidecar_whose_watch_is_deaf(kube_env, redis_server):
    """Two services share Redis. A's watch never reports; B (holding the same request) sees the
    decision and publishes it; A is released by the fan-out — its own wait would have returned
    'pending' only at the end of its 60 s hold. A third service then passes from the shared
    grant without a new ApprovalRequest."""
    who = identity(kube_env.ns)
    prefix = f"fan-{uuid.uuid4().hex[:8]}:"

    async def scenario():
        async with service(kube_env, redis_server.url, prefix=prefix,
                           backend=DeafBackend(kube_env.backend())) as a, \
                service(kube_env, redis_server.url, prefix=prefix) as b, \
                service(kube_env, redis_server.url, prefix=prefix) as c:
            held_a = asyncio.create_task(ask(a, who, hold_seconds=60))
            await kube_env.wait_for_request()
            held_b = asyncio.create_task(ask(b, who, hold_seconds=60))  # reuses A's request
            await asyncio.sleep(0.5)
            assert not held_a.done() and not held_b.done()
            name = await kube_env.decide_later("Approved", delay=0)
            out_a, out_b = await asyncio.wait_for(asyncio.gather(held_a, held_b), 30)
            other_sidecar = await ask(c, who, mode="defer")
            return name, out_a, out_b, other_sidecar

    name, out_a, out_b, other = asyncio.run(scenario())
    assert out_b.state == "approved" and out_b.name == name
    assert out_a.state == "approved" and out_a.name == name and out_a.approvers == ("alice",)
    assert other.state == "approved" and other.grant == "exact"
    assert kube_env.names() == [name]


def test_forged_fanout_cannot_release_a_flow(kube_env, redis_server):
    who = identity(kube_env.ns)
    prefix = f"forge-{uuid.uuid4().hex[:8]}:"

    async def scenario():
        async with service(kube_env, redis_server.url, prefix=prefix) as svc:
            async def forge():
                name = (await kube_env.wait_for_request())[0]
                client = aioredis.Redis.from_url(redis_server.url)
                try:
                    doc = json.dumps({"name": name, "state": "approved", "approvers": ["mallory"]})
                    await client.set(f"{prefix}decision:{name}", doc)
                    await client.publish(f"{prefix}decided:{name}", doc)
                finally:
                    await client.aclose()

            task = asyncio.create_task(forge())
            outcome = await ask(svc, who, hold_seconds=2)
            await task
            return outcome

    outcome = asyncio.run(scenario())
    assert outcome.state == "pending"  # re-read from the apiserver: nobody decided


# ---------------------------------------------------------------------------- failures

def test_no_request_can_be_opened_fails_closed(kube_env, control_plane, redis_server):
    who = identity(kube_env.ns)
    control_plane.create_namespace("appr-forbidden")

    async def scenario():
        backend = kube_env.backend()
        backend.namespace = "appr-forbidden"  # no RBAC there
        async with service(kube_env, redis_server.url, backend=backend) as svc:
            with pytest.raises(ApprovalUnavailable, match="403"):
                await ask(svc, who, mode="defer")
            with pytest.raises(ApprovalUnavailable, match="names no approvers"):
                await ask(svc, who, ApprovalRequirement(Approvers()))

    asyncio.run(scenario())


# ---------------------------------------------------------------------------- standalone

def test_standalone_local_store_with_memory_grants(tmp_path):
    store = LocalApprovalStore(tmp_path / "approvals", poll_interval=0.05)
    svc = ApprovalService(store, MemoryGrants())
    who = identity("local")

    async def scenario():
        async def two_approvers():
            while not store.list():
                await asyncio.sleep(0.05)
            name = store.list()[0]["metadata"]["name"]
            await asyncio.sleep(0.5)
            await asyncio.to_thread(store.decide, name, "Approved", "alice")
            await asyncio.sleep(0.3)
            await asyncio.to_thread(store.decide, name, "Approved", "bob", "ok")

        with Ticker() as ticker:
            task = asyncio.create_task(two_approvers())
            held = await ask(svc, who, hold_seconds=30, min_approvals=2)
            await task
        retry = await ask(svc, who, hold_seconds=30, min_approvals=2)
        other = await ask(svc, who, path="/v1/other", mode="defer")
        store.decide(other.name, "Denied", "alice", "no")
        refused = await ask(svc, who, path="/v1/other", hold_seconds=1, mode="hold")
        return held, retry, other, refused, ticker.ticks

    held, retry, other, refused, ticks = asyncio.run(scenario())
    assert held.state == "approved" and held.approvers == ("alice", "bob")
    assert ticks >= 5
    assert retry.grant == "exact" and retry.name == held.name
    assert other.state == "pending"
    # a denied request answers the retry (remembered), it does not open another one
    assert refused.state == "denied" and refused.name == other.name
    assert refused.reason == "denied by alice: no" and refused.approvers == ("alice",)


def test_two_services_in_one_process_share_memory_fanout(tmp_path):
    """MemoryGrants fans out in-process: the deaf holder is woken by the one that sees."""
    grants = MemoryGrants()
    store = LocalApprovalStore(tmp_path, poll_interval=0.05)
    deaf = ApprovalService(DeafBackend(LocalApprovalStore(tmp_path)), grants)
    seeing = ApprovalService(store, grants)
    who = identity("local")

    async def scenario():
        held_deaf = asyncio.create_task(ask(deaf, who, hold_seconds=30))
        while not store.list():
            await asyncio.sleep(0.02)
        held_seeing = asyncio.create_task(ask(seeing, who, hold_seconds=30))  # reuses it
        await asyncio.sleep(0.3)
        name = store.list()[0]["metadata"]["name"]
        await asyncio.to_thread(store.decide, name, "Approved", "alice")
        return await asyncio.wait_for(asyncio.gather(held_deaf, held_seeing), 10)

    out_deaf, out_seeing = asyncio.run(scenario())
    assert out_deaf.state == out_seeing.state == "approved"
    assert out_deaf.name == out_seeing.name and out_deaf.approvers == ("alice",)
    assert len(store.list()) == 1


# ---------------------------------------------------------------------------- texts

def test_who_may_approve_text_and_command():
    req = ApprovalRequirement(Approvers(("alice", "bob"), ("sre",)), min_approvals=2)
    assert approvers_text(req) == "2 approvals from users alice, bob or members of group sre"
    assert approvers_text(ApprovalRequirement(Approvers(groups=("a", "b")))) == \
        "1 approval from members of groups a, b"
    cmd = approve_command("iam-createrole-0123456789-abcde", "team")
    assert cmd == ("kubectl -n team patch approvalrequest iam-createrole-0123456789-abcde "
                   "--type=merge -p '{\"spec\":{\"decision\":\"Approved\"}}'")
    out = Outcome("pending", "n", (), "waiting", "2030-01-01T00:00:00Z")
    assert out.to_dict() == {"state": "pending", "name": "n", "reason": "waiting",
                             "expires_at": "2030-01-01T00:00:00Z"}
