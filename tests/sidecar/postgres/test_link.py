"""A postgres unit's ``causedBy``: the tool_use whose input names its statement, tables and
commands (tool_use_ledger.action_terms for postgres, postgres/record.link_statements)."""

from __future__ import annotations

from chaperone_sidecar.flowctx import RecordingSettings
from chaperone_sidecar.policy.classify.postgres import classify_sql
from chaperone_sidecar.policy.matching_tool_use import ToolUse
from chaperone_sidecar.policy.model import Decision, Identity
from chaperone_sidecar.postgres.decide import Verdict
from chaperone_sidecar.postgres.record import link_statements, request_events
from chaperone_sidecar.tool_use_ledger import Candidate, ToolUseLedger, candidate_text

POD = Identity(pod_namespace="team-a", pod_name="agent-0", pod_uid="u-1")
OTHER_POD = Identity(pod_namespace="team-a", pod_name="agent-1", pod_uid="u-2")


def ledger(*inputs: tuple[str, str]) -> ToolUseLedger:
    book = ToolUseLedger()
    for tid, command in inputs:
        book.add(POD, Candidate(id=tid, name="bash", text=candidate_text(ToolUse(tid, "bash", {"command": command})),
                                at=__import__("time").monotonic(), flow="f-llm"))
    return book


def actions(sql: str):
    return classify_sql(sql, host="db.internal", port=5432, database="shop")


def test_psql_command_links_the_statement_it_runs():
    book = ledger(("toolu_ls", "ls -la"), ("toolu_drop", 'psql -h db.internal -d shop -c "DROP TABLE users"'))
    link = link_statements(book, POD, actions("DROP TABLE users"))
    assert link is not None and link["toolUseId"] == "toolu_drop" and link["score"] == 1.0
    assert "statement text" in link["reason"] and "table users" in link["reason"]
    assert "statement DROP" in link["reason"]
    # the same table and command written differently (schema, case, spacing) still link
    link = link_statements(book, POD, actions("drop   table public.users"))
    assert link is not None and link["toolUseId"] == "toolu_drop"


def test_psycopg_code_and_nested_commands_link():
    code = 'cur.execute("WITH gone AS (DELETE FROM orders WHERE id = %s RETURNING *) SELECT count(*) FROM gone")'
    book = ledger(("toolu_py", code))
    link = link_statements(book, POD, actions("WITH gone AS (DELETE FROM orders WHERE id = $1 RETURNING *) "
                                              "SELECT count(*) FROM gone"))
    assert link is not None and "table orders" in link["reason"] and "statement DELETE" in link["reason"]


def test_weak_or_foreign_matches_do_not_link():
    book = ledger(("toolu_other", 'psql -h db.internal -d shop -c "DELETE FROM sessions WHERE id = 1"'))
    # same server, database and command, another table: context only, below the threshold
    assert link_statements(book, POD, actions("DELETE FROM users WHERE id = 1")) is None
    # "SQL" and the database are no evidence on their own (every psql command names them)
    assert link_statements(book, POD, actions("SELECT 1")) is None
    # another pod's candidates are never linked
    assert link_statements(book, OTHER_POD, actions("DELETE FROM sessions WHERE id = 1")) is None
    assert link_statements(ToolUseLedger(), POD, actions("DROP TABLE users")) is None


def test_the_request_event_carries_the_link_but_not_the_statement_text_in_its_reason():
    book = ledger(("toolu_drop", "psql -c \"DELETE FROM users WHERE note = 'hunter2-secret'\""))
    acts = actions("DELETE FROM users WHERE note = 'hunter2-secret'")
    cause = link_statements(book, POD, acts)
    events = request_events("pg-1-1", identity=POD, connection="shop", url="postgres://db.internal:5432/shop",
                            sql="DELETE FROM users WHERE note = 'hunter2-secret'", params=[],
                            verdict=Verdict(True, acts, [Decision("allow")]), settings=RecordingSettings(),
                            extended=False, caused_by=cause)
    assert events[0]["data"]["causedBy"]["toolUseId"] == "toolu_drop"
    assert "hunter2" not in events[0]["data"]["causedBy"]["reason"]
