"""``chaperone policy test`` with SQL: a suite case (or ``--sql``) on a postgres connection is
judged by the sidecar's SQL classifier and evaluator, unit by unit as the postgres listener
judges it (cross-checked against ``postgres/decide.py`` itself)."""

from __future__ import annotations

import argparse
import asyncio
import io
import json
from types import SimpleNamespace

import pytest
import yaml

from chaperone_sidecar.approvals.ratelimit import MemoryRateLimiter
from chaperone_sidecar.approvals.service import Outcome
from chaperone_sidecar.policy import cli
from chaperone_sidecar.policy.cases import Case, judge_sql, load_policies, make_identity, sql_request
from chaperone_sidecar.policy.classify.postgres import SQLParseError, parse_statements
from chaperone_sidecar.postgres.decide import decide
from chaperone_sidecar.routing import Connection

POLICY = {"apiVersion": "chaperone.dev/v1alpha1", "kind": "AccessPolicy", "metadata": {"name": "shop-db"},
          "spec": {"defaultEffect": "block", "approvers": {"users": ["alice"]}, "rules": [
              {"name": "reads", "match": {"postgres": {"kinds": ["read"]}}, "allow": {}},
              {"name": "writes", "match": {"postgres": {"kinds": ["write"], "tables": ["orders", "users"]}},
               "allow": {}},
              {"name": "no-mass-writes", "match": {"postgres": {"statements": ["DELETE", "UPDATE"],
                                                                "whereMissing": True}},
               "block": {"message": "DELETE/UPDATE without WHERE touches every row"}},
              {"name": "drops", "match": {"postgres": {"statements": ["DROP"]}},
               "requireApproval": {"mode": "defer"}},
              {"name": "truncates", "match": {"postgres": {"statements": ["TRUNCATE"]}},
               "requireApproval": {"mode": "defer"}},
              {"name": "only-prod-db", "match": {"paths": ["/prod"], "postgres": {"kinds": ["read"]}},
               "block": {}},
              {"name": "pw", "match": {"postgres": {}}, "mask": {"fields": ["$.password"]}}]}}

CASES = [
    {"name": "select", "sql": "SELECT id, password FROM users WHERE id = 1",
     "expect": {"decision": "allow", "rule": "reads", "action": "postgres:SELECT", "masks": ["pw"]}},
    {"name": "delete without where", "sql": "DELETE FROM users",
     "expect": {"decision": "block", "rule": "no-mass-writes", "action": "postgres:DELETE"}},
    {"name": "delete one", "sql": "DELETE FROM users WHERE id = 1", "expect": {"decision": "allow", "rule": "writes"}},
    {"name": "cte delete under a select", "sql": "WITH d AS (DELETE FROM users RETURNING *) SELECT * FROM d",
     "expect": {"decision": "block", "rule": "no-mass-writes"}},
    {"name": "strictest of a multi-statement query", "sql": "SELECT 1; DROP TABLE scratch; DELETE FROM orders",
     "expect": {"decision": "block", "rule": "no-mass-writes", "action": "postgres:DELETE"}},
    {"name": "drop", "sql": "DROP TABLE scratch", "expect": {"decision": "requireApproval", "rule": "drops"}},
    {"name": "two approval rules in one query", "sql": "DROP TABLE a; TRUNCATE b", "expect": {"decision": "block"}},
    {"name": "unparseable", "sql": "SELEC 1", "expect": {"decision": "block", "action": "postgres:unparseable"}},
    {"name": "opaque DO", "sql": "DO $$ BEGIN DELETE FROM users; END $$", "expect": {"decision": "block"}},
    {"name": "database from the case", "sql": "SELECT 1", "database": "prod",
     "expect": {"decision": "block", "rule": "only-prod-db"}},
]


def run(argv: list[str]) -> tuple[int, str, str]:
    parser = argparse.ArgumentParser()
    cli.add_commands(parser)
    out, err = io.StringIO(), io.StringIO()
    code = cli.run_test(parser.parse_args(argv), out=out, err=err)
    return code, out.getvalue(), err.getvalue()


def suite(tmp_path, cases, **top) -> str:
    (tmp_path / "policy.yaml").write_text(yaml.safe_dump(POLICY))
    path = tmp_path / "suite.yaml"
    path.write_text(yaml.safe_dump({"policies": ["policy.yaml"], "defaults": {"connection": "shop-db"},
                                    "cases": cases, **top}))
    return str(path)


def test_a_suite_states_sql_cases(tmp_path):
    code, out, err = run(["test", "--suite", suite(tmp_path, CASES), "--json"])
    data = json.loads(out)
    failed = {c["name"]: c["mismatches"] for c in data["cases"] if not c["passed"]}
    assert code == 0 and not failed, (failed, err)
    assert data["passed"] == len(CASES)
    by_name = {c["name"]: c for c in data["cases"]}
    assert by_name["select"]["action"]["path"] == "/postgres" and by_name["select"]["action"]["method"] == "SQL"
    assert "different rules" in by_name["two approval rules in one query"]["decision"]["message"]


def test_a_wrong_expectation_fails_and_explains_each_statement(tmp_path):
    cases = [{"name": "mass delete", "sql": "SELECT 1; DELETE FROM users", "expect": {"decision": "allow"}}]
    code, out, _ = run(["test", "--suite", suite(tmp_path, cases)])
    assert code == 1
    assert "FAIL  mass delete" in out and "decision: expected allow, got block" in out
    assert "statement 1 postgres:SELECT: allow" in out and "statement 2 postgres:DELETE: block" in out


@pytest.mark.parametrize(("case", "problem"), [
    ({"sql": "SELECT 1", "request": {"url": "https://x/"}}, "sql and request cannot be combined"),
    ({"sql": "SELECT 1", "type": "aws"}, "a sql case runs on a postgres connection"),
    ({"sql": ""}, "sql: must be a non-empty string"),
    ({"sql": "SELECT 1", "server": "db:notaport"}, "invalid server"),
    ({"sql": "SELECT 1", "expect": {"decision": "maybe"}}, "expect.decision"),
])
def test_invalid_sql_cases_are_reported(tmp_path, case, problem):
    code, _, err = run(["test", "--suite", suite(tmp_path, [{"name": "x", **case}])])
    assert code == 2 and problem in err, err


def test_single_sql_on_the_command_line(tmp_path):
    (tmp_path / "policy.yaml").write_text(yaml.safe_dump(POLICY))
    code, out, _ = run(["test", "-f", str(tmp_path / "policy.yaml"), "--connection", "shop-db",
                        "--sql", "DELETE FROM users", "--expect", "block", "--json"])
    assert code == 0 and json.loads(out)["decision"]["rule"] == "default/shop-db#no-mass-writes"
    code, _, err = run(["test", "-f", str(tmp_path / "policy.yaml"), "--connection", "shop-db", "--type", "aws",
                        "--sql", "SELECT 1"])
    assert code == 2 and "--sql runs on a postgres connection" in err


class PendingApprovals:
    async def request(self, **kwargs):
        return Outcome("pending", "ar-1", (), "", "2026-01-01T00:00:00Z")


@pytest.mark.parametrize("sql", [c["sql"] for c in CASES if "database" not in c])
def test_the_case_decides_as_the_sidecar_does(sql, tmp_path):
    """The same unit through postgres/decide.py (the listener's judge) and a suite case."""
    (tmp_path / "p.yaml").write_text(yaml.safe_dump(POLICY))
    policies = load_policies([tmp_path / "p.yaml"])
    snap = SimpleNamespace(policies=policies, connection={"shop-db": Connection("shop-db", "postgres")}.get)
    services = SimpleNamespace(snapshot=lambda: snap, approvals=PendingApprovals(), recorder=None,
                               config=SimpleNamespace(approval_timeout_seconds=30, standalone=False,
                                                      pod_namespace="default"),
                               approval_backend=SimpleNamespace(namespace="default"),
                               rate_limiter=MemoryRateLimiter())
    identity = make_identity("default/claude")
    try:
        statements, error = parse_statements(sql, "postgres"), None
    except SQLParseError as exc:
        statements, error = None, str(exc)
    verdict = asyncio.run(decide(services, connection="shop-db", identity=identity, host="localhost", port=5432,
                                 database="postgres", sql=sql, statements=statements, params=[],
                                 parse_error=error))
    action, decision = judge_sql(Case("x", sql_request(), identity, "shop-db", "postgres", sql=sql), policies)
    sidecar = "block" if verdict.effect == "unparseable" or (
        verdict.effect == "require_approval" and "different rules" in (verdict.refusal or {}).get("M", "")) \
        else verdict.effect
    assert decision.effect == sidecar
    deciding = verdict.deciding
    if deciding is not None and (deciding.effect == sidecar):  # the same rule decided
        assert decision.rule == deciding.rule
