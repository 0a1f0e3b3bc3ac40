"""The verdict of one unit: strictest statement wins, approvals, and the refusal texts."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace

from chaperone_sidecar.approvals.ratelimit import MemoryRateLimiter
from chaperone_sidecar.approvals.service import Outcome
from chaperone_sidecar.policy.classify.postgres import parse_statements
from chaperone_sidecar.policy.compiler import compile_policies
from chaperone_sidecar.policy.model import Identity
from chaperone_sidecar.postgres.decide import decide, unit_digest
from chaperone_sidecar.routing import Connection

POLICY = {"apiVersion": "chaperone.dev/v1alpha1", "kind": "AccessPolicy",
          "metadata": {"name": "db", "namespace": "agents"},
          "spec": {"defaultEffect": "block", "approvers": {"users": ["alice"], "groups": ["dba"]},
                   "rules": [
                       {"name": "reads", "match": {"postgres": {"kinds": ["read"]}}, "allow": {}},
                       {"name": "drop", "match": {"postgres": {"statements": ["DROP"]}},
                        "requireApproval": {"mode": "defer"}},
                       {"name": "truncate", "match": {"postgres": {"statements": ["TRUNCATE"]}},
                        "requireApproval": {"mode": "defer"}},
                       {"name": "pw", "match": {"postgres": {}}, "mask": {"fields": ["$.password"]}},
                       {"name": "slow", "match": {"postgres": {"tables": ["counters"]}},
                        "rateLimit": {"requests": 2, "periodSeconds": 60}}]}}


class FakeApprovals:
    def __init__(self, state: str):
        self.state, self.calls = state, []

    async def request(self, **kwargs):
        self.calls.append(kwargs)
        return Outcome(self.state, "postgres-drop-abc-x1", ("alice",) if self.state != "pending" else (),
                       "denied: not today" if self.state == "denied" else "", "2026-01-01T00:00:00Z")


def services(approvals=None, connection="shop", limiter=None):
    policies = compile_policies([POLICY]).policies
    conns = {connection: Connection(connection, "postgres")}
    snap = SimpleNamespace(policies=policies, connection=conns.get)
    config = SimpleNamespace(approval_timeout_seconds=30, standalone=False, pod_namespace="agents")
    return SimpleNamespace(snapshot=lambda: snap, approvals=approvals, config=config,
                           approval_backend=SimpleNamespace(namespace="agents"), recorder=None,
                           rate_limiter=limiter or MemoryRateLimiter())


def verdict(sql, svc, connection="shop"):
    return asyncio.run(decide(svc, connection=connection, identity=Identity(service_account="agents/claude"),
                              host="db", port=5432, database="shop", sql=sql,
                              statements=parse_statements(sql, "shop"), params=[]))


def test_allowed_reads_carry_their_masks():
    v = verdict("SELECT * FROM users", services())
    assert v.allowed and v.effect == "allow" and [m.fields for m in v.masks] == [("$.password",)]


def test_one_blocked_statement_refuses_the_whole_query():
    v = verdict("SELECT 1; DELETE FROM users", services())
    assert not v.allowed and v.effect == "block"
    assert v.refusal["C"] == "42501" and v.refusal["M"].startswith("chaperone refused DELETE")
    assert "nothing of this query was run" in v.refusal["H"]


def test_pending_approval_names_the_request_who_approves_and_the_command():
    approvals = FakeApprovals("pending")
    v = verdict("DROP TABLE orders", services(approvals))
    assert not v.allowed and v.effect == "require_approval"
    assert "ApprovalRequest postgres-drop-abc-x1 in namespace agents is waiting for 1 approval from " \
           "user alice or members of group dba" in v.refusal["M"]
    assert "kubectl patch ar postgres-drop-abc-x1 -n agents" in v.refusal["H"]
    call = approvals.calls[0]
    assert call["action"].name == "postgres:DROP" and call["rule"].rule == "drop"
    assert call["digest"] == unit_digest("db", 5432, "shop", "DROP TABLE orders", [])
    assert "DROP TABLE orders" in call["body_preview"]
    assert v.approval["state"] == "pending"


def test_approved_runs_denied_is_refused_naming_who():
    assert verdict("DROP TABLE orders", services(FakeApprovals("approved"))).allowed
    v = verdict("DROP TABLE orders", services(FakeApprovals("denied")))
    assert not v.allowed and "was denied by alice" in v.refusal["M"]


def test_no_approvals_backend_fails_closed():
    v = verdict("DROP TABLE orders", services(None))
    assert not v.allowed and "cannot open ApprovalRequests" in v.refusal["M"]


def test_statements_needing_different_approvals_are_sent_one_at_a_time():
    approvals = FakeApprovals("approved")
    v = verdict("DROP TABLE a; TRUNCATE b", services(approvals))
    assert not v.allowed and "different rules" in v.refusal["M"] and not approvals.calls


def test_a_deleted_connection_refuses_and_unparseable_sql_is_42601():
    assert "no longer exists" in verdict("SELECT 1", services(connection="other"), connection="shop").refusal["M"]
    v = asyncio.run(decide(services(), connection="shop", identity=Identity(), host="db", port=5432,
                           database="shop", sql="selec", statements=None, params=[],
                           parse_error="syntax error"))
    assert v.refusal["C"] == "42601" and v.effect == "unparseable"


def test_the_digest_binds_text_and_parameters():
    a = unit_digest("db", 5432, "shop", "DELETE FROM t WHERE id = $1", ["1"])
    assert a != unit_digest("db", 5432, "shop", "DELETE FROM t WHERE id = $1", ["2"])
    assert a != unit_digest("db", 5432, "shop", "DELETE FROM t WHERE id = $1", [None])
    assert a != unit_digest("db", 5432, "other", "DELETE FROM t WHERE id = $1", ["1"])


def test_rate_limit_rules_count_units_and_refuse_past_the_limit():
    svc = services()
    assert verdict("SELECT * FROM counters", svc).allowed
    assert verdict("SELECT * FROM counters; SELECT 1 FROM counters", svc).allowed  # one unit, one hit
    v = verdict("SELECT * FROM counters", svc)
    assert not v.allowed and v.effect == "rate_limited" and v.refusal["C"] == "53400"
    assert "at most 2 statements per 60s per identity (rule agents/db#slow)" in v.refusal["M"]
    assert verdict("SELECT * FROM users", svc).allowed  # other tables are not limited


def test_a_limiter_that_cannot_count_refuses():
    class Down:
        async def hit(self, *args):
            raise ConnectionError("redis down")
    v = verdict("SELECT * FROM counters", services(limiter=Down()))
    assert not v.allowed and "cannot count" in v.refusal["M"]
