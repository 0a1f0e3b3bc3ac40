"""An agent that reaches Redis forges grants; the real sidecar forwards nothing it did not prove.

One injected pod (its sidecar run as a process with the real apiserver and the real
redis-server), an ``http`` connection to a local HTTPS API, and a policy under which every
DELETE needs alice's approval (defer mode). The agent's side is what an agent can do: HTTPS
through the proxy with Python ``requests`` and a plain ``redis`` client writing keys shaped
exactly like the real grant it finds there.
"""

from __future__ import annotations

import json
import time
import uuid

import pytest
import redis
import requests

from chaperone_operator.injection.settings import InjectionSettings

from .pod import HTTPSUpstream, InjectedPod, connection, free_port, policy, setup_namespace

HOST = "127.0.0.2"
TOKEN = "tickets-sidecar-token-f0r9"


@pytest.fixture
def pod(control_plane, crds_installed, redis_server, tmp_path):
    upstream = HTTPSUpstream(tmp_path / "upstream", host=HOST, names=("tickets.internal",), ips=(HOST,),
                             require_header=("Authorization", f"Bearer {TOKEN}"))
    ns = f"forge-{uuid.uuid4().hex[:8]}"
    conns = [connection("tickets", {
        "type": "http", "hosts": [HOST],
        "credentials": {"source": "secret", "secretRef": {"name": "tickets-token", "tokenKey": "token"}},
        "upstreamCA": {"kind": "ConfigMap", "name": "tickets-ca", "key": "ca.crt"}})]
    approver_rbac = [
        {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "Role", "metadata": {"name": "approver"},
         "rules": [{"apiGroups": ["chaperone.dev"], "resources": ["approvalrequests"],
                    "verbs": ["get", "list", "patch"]}]},
        {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "RoleBinding", "metadata": {"name": "approver"},
         "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": "approver"},
         "subjects": [{"kind": "User", "name": "alice", "apiGroup": "rbac.authorization.k8s.io"}]},
    ]
    policies = [policy("tickets", {"connections": ["tickets"], "rules": [
        {"name": "reads", "match": {"methods": ["GET"]}, "allow": {}},
        {"name": "deletes-need-alice", "match": {"methods": ["DELETE"]},
         "requireApproval": {"approvers": {"users": ["alice"]}, "mode": "defer",
                             "grant": {"scope": "exact", "ttlSeconds": 900}}}]})]
    setup_namespace(control_plane, ns, conns + policies + approver_rbac)
    settings = InjectionSettings(proxy_port=free_port(), health_port=free_port(),
                                 redis_url=redis_server.url)
    sidecar = InjectedPod(control_plane, ns, tmp_path / "pod", connections=conns, settings=settings,
                          approval_mode="defer", user_info={"username": "dave", "groups": ["developers"]},
                          secrets={"tickets-token": {"token": TOKEN}},
                          configmaps={"tickets-ca": {"ca.crt": upstream.ca_file.read_bytes()}})
    sidecar.start()
    try:
        sidecar.wait_ready()
        yield sidecar, upstream
    finally:
        sidecar.stop()
        upstream.close()
        control_plane.kubectl("delete", "namespace", ns, "--wait=false", check=False)


def delete(sidecar, upstream, ticket: int) -> requests.Response:
    """The agent's call: DELETE through the proxy, trusting only the interception CA."""
    return requests.delete(f"https://{HOST}:{upstream.port}/tickets/{ticket}", json={"id": ticket},
                           proxies={"https": sidecar.proxy_url}, verify=str(sidecar.trust_file),
                           timeout=30)


def test_forged_grants_in_redis_forward_nothing(pod, control_plane, redis_server):
    sidecar, upstream = pod
    ns = sidecar.namespace
    agent_redis = redis.Redis.from_url(redis_server.url)  # the agent's own client

    # A real approval: pending, alice approves, the retry passes and leaves a grant in Redis.
    first = delete(sidecar, upstream, 1)
    assert first.status_code == 403 and first.json()["error"] == "chaperone_approval_pending", first.text
    approved = first.json()["approval_request"]["name"]
    control_plane.kubectl("patch", "ar", approved, "-n", ns, "--type=merge", "-p",
                          json.dumps({"spec": {"decision": "Approved", "decidedBy": "alice"}}),
                          user="approver")
    retry = delete(sidecar, upstream, 1)
    assert retry.status_code == 200, retry.text
    assert [s["path"] for s in upstream.requests("DELETE")] == ["/tickets/1"]
    # Redis is shared by every test of the session: this pod's grant is the one naming its request.
    keys = [k.decode() for k in agent_redis.keys("chaperone:grant:*")
            if json.loads(agent_redis.get(k) or b"{}").get("request") == approved]
    assert len(keys) == 1, keys
    real_key, real_value = keys[0], agent_redis.get(keys[0])
    scope, subject, digest = real_key.removeprefix("chaperone:grant:").split(":", 2)
    assert scope == "exact" and json.loads(real_value)["request"] == approved

    # Another ticket: pending. The agent copies the real grant to that request's key.
    second = delete(sidecar, upstream, 2)
    assert second.status_code == 403 and second.json()["error"] == "chaperone_approval_pending"
    pending = second.json()["approval_request"]["name"]
    other = json.loads(control_plane.kubectl("get", "ar", pending, "-n", ns, "-o", "json").stdout)
    other_digest = other["spec"]["requestDigest"]  # the agent can compute it; the test reads it
    forged_key = f"chaperone:grant:exact:{subject}:{other_digest}"
    agent_redis.set(forged_key, real_value, ex=900)
    replayed = delete(sidecar, upstream, 2)
    assert replayed.status_code == 403, replayed.text
    assert replayed.json()["error"] == "chaperone_approval_pending"
    assert replayed.json()["approval_request"]["name"] == pending

    # Expiry pushed and approvers rewritten, same key: still refused.
    doc = json.loads(real_value)
    doc.update(expires_at=time.time() + 86400, approvers=["alice", "bob"])
    agent_redis.set(forged_key, json.dumps(doc), ex=90000)
    assert delete(sidecar, upstream, 2).status_code == 403

    # Hand-made, naming a request that does not exist.
    agent_redis.set(forged_key, json.dumps({"scope": "exact", "request": "http-delete-ffffffffff-zzzzz",
                                            "approvers": ["alice"], "expires_at": time.time() + 900}), ex=900)
    made_up = delete(sidecar, upstream, 2)
    assert made_up.status_code == 403 and made_up.json()["error"] == "chaperone_approval_pending"

    # Nothing of ticket 2 reached the API; no new request paged approvers; each attempt is logged.
    assert [s["path"] for s in upstream.requests("DELETE")] == ["/tickets/1"]
    names = control_plane.kubectl("get", "ar", "-n", ns, "-o", "name").stdout.split()
    assert sorted(n.split("/", 1)[1] for n in names) == sorted([approved, pending])
    attempts = [r for r in sidecar.log_records() if "forged or invalid grant" in str(r.get("msg", ""))]
    assert len(attempts) == 3, sidecar.logs()
    joined = json.dumps(attempts)
    assert f"approved request {digest}, not {other_digest}" in joined
    assert "which does not exist" in joined
    assert all(r["level"] == "warning" and r["refused_grants"] for r in attempts)
    # The real grant still works for what was really approved.
    assert delete(sidecar, upstream, 1).status_code == 200

