"""``sessions replay``'s "the model asked -> the agent did" table (``tool_use_links``)."""

from __future__ import annotations

from chaperone_sidecar.recording.sessions_cli import _print_tool_use_links, tool_use_links


def events() -> list[dict]:
    return [
        {"seq": 1, "type": "request", "flow": "llm", "data": {"method": "POST", "url": "https://api/v1/messages"}},
        {"seq": 2, "type": "tool-use", "flow": "llm", "data": {
            "id": "toolu_a", "name": "bash", "llmFlow": "llm", "replaced": False,
            "input": {"text": '{"command":"aws s3 rb s3://logs"}', "size": 33}}},
        {"seq": 3, "type": "tool-use", "flow": "llm", "data": {
            "id": "toolu_b", "name": "bash", "replaced": True, "input": {"text": "{}", "size": 2},
            "blocked": {"rule": {"policy": "ns/p", "name": "no-rm"}, "message": "no", "reason": "x"}}},
        {"seq": 4, "type": "request", "flow": "f2", "data": {
            "method": "DELETE", "url": "https://logs.s3.amazonaws.com/", "action": {"summary": "s3:DeleteBucket logs"},
            "decision": {"effect": "block"},
            "causedBy": {"toolUseId": "toolu_a", "name": "bash", "score": 0.9, "reason": "AWS CLI s3 rb"}}},
        {"seq": 5, "type": "request", "flow": "f3", "data": {
            "method": "GET", "url": "https://x/", "causedBy": {"toolUseId": "toolu_gone", "name": "bash",
                                                             "score": 0.4, "reason": "host x"}}},
    ]


def test_links_pair_each_tool_use_with_the_actions_naming_it(capsys):
    links = tool_use_links(events())
    by_id = {link["toolUseId"]: link for link in links}
    assert [a["seq"] for a in by_id["toolu_a"]["actions"]] == [4]
    assert by_id["toolu_a"]["actions"][0]["decision"] == "block" and by_id["toolu_a"]["actions"][0]["score"] == 0.9
    assert by_id["toolu_b"]["blocked"] == "ns/p#no-rm" and by_id["toolu_b"]["actions"] == []
    assert by_id["toolu_gone"]["seq"] is None  # its tool-use event is in an earlier session
    assert [link["toolUseId"] for link in links] == ["toolu_a", "toolu_b", "toolu_gone"]
    _print_tool_use_links(links)
    out = capsys.readouterr().out
    assert "#2     tool_use toolu_a bash: {\"command\":\"aws s3 rb s3://logs\"}" in out
    assert "-> #4 s3:DeleteBucket logs DELETE https://logs.s3.amazonaws.com/ [block]  (score 0.9: AWS CLI s3 rb)" in out
    assert "BLOCKED by ns/p#no-rm" in out and "(not in this session)" in out
