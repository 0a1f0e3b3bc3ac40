"""``sessions replay`` pairs a postgres unit with the tool_use it carries out: the unit's
request event has ``causedBy``, its decision is an event of its own (postgres/record.py)."""

from __future__ import annotations

from chaperone_sidecar.recording.sessions_cli import _print_tool_use_links, tool_use_links


def test_a_postgres_unit_is_shown_under_the_tool_use_with_its_own_decision_event(capsys):
    events = [
        {"seq": 2, "type": "tool-use", "flow": "llm", "data": {
            "id": "toolu_drop", "name": "bash", "input": {"text": '{"command":"psql -c \\"DELETE FROM users\\""}'}}},
        {"seq": 5, "type": "request", "flow": "pg-ab-1", "data": {
            "method": "SQL", "url": "postgres://db:5432/shop", "protocol": "postgres",
            "action": {"name": "postgres:DELETE", "summary": "DELETE users (every row: no WHERE) on shop@db:5432"},
            "causedBy": {"toolUseId": "toolu_drop", "name": "bash", "score": 1.0,
                         "reason": "statement text, table users, statement DELETE"}}},
        {"seq": 6, "type": "decision", "flow": "pg-ab-1", "data": {"effect": "block", "refused": "42501"}},
    ]
    links = tool_use_links(events)
    assert links[0]["actions"][0]["decision"] == "block"
    _print_tool_use_links(links)
    out = capsys.readouterr().out
    assert "tool_use toolu_drop bash" in out
    assert ("-> #5 DELETE users (every row: no WHERE) on shop@db:5432 SQL postgres://db:5432/shop [block]"
            "  (score 1.0: statement text, table users, statement DELETE)") in out
