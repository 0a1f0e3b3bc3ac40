"""Anthropic classifier: model, streaming, declared tools and tool use in the conversation."""

from __future__ import annotations

import dataclasses
import json

import pytest

from chaperone_sidecar.policy.classify import anthropic as anthropic_module
from chaperone_sidecar.policy.classify import classify
from chaperone_sidecar.policy.model import AnthropicAction, HTTPRequest


def api(path: str, body=None, method: str = "POST") -> HTTPRequest:
    raw = body if isinstance(body, bytes) else (json.dumps(body).encode() if body is not None else b"")
    return HTTPRequest(method, "https", "api.anthropic.com", 443, path, "",
                       (("content-type", "application/json"), ("anthropic-version", "2023-06-01")),
                       raw)


CONVERSATION = {
    "model": "claude-sonnet-4-5",
    "max_tokens": 1024,
    "stream": True,
    "tools": [
        {"name": "Bash", "description": "run", "input_schema": {"type": "object"}},
        {"name": "Edit", "input_schema": {"type": "object"}},
        {"type": "web_search_20250305", "name": "web_search"},
    ],
    "messages": [
        {"role": "user", "content": "list files"},
        {"role": "assistant", "content": [
            {"type": "text", "text": "ok"},
            {"type": "tool_use", "id": "t1", "name": "Bash", "input": {"command": "ls"}},
            {"type": "server_tool_use", "id": "s1", "name": "web_search", "input": {}},
        ]},
        {"role": "user", "content": [
            {"type": "tool_result", "tool_use_id": "t1", "content": "a\nb"},
        ]},
        {"role": "assistant", "content": [
            {"type": "tool_use", "id": "t2", "name": "Bash", "input": {"command": "rm a"}},
            {"type": "tool_use", "id": "t3", "name": "Edit", "input": {}},
        ]},
        {"role": "user", "content": [
            {"type": "tool_result", "tool_use_id": "t2", "content": ""},
            {"type": "tool_result", "tool_use_id": "t3", "content": "", "is_error": True},
        ]},
    ],
}

CASES = [
    ("messages", api("/v1/messages", CONVERSATION), "anthropic:messages",
     AnthropicAction("claude-sonnet-4-5", True, ("Bash", "Edit", "web_search"),
                     ("Bash", "web_search", "Edit"), 3)),
    ("plain-text", api("/v1/messages", {"model": "claude-haiku-4-5", "messages": [
        {"role": "user", "content": "hi"}]}), "anthropic:messages",
     AnthropicAction("claude-haiku-4-5")),
    ("stream-false", api("/v1/messages", {"model": "m", "stream": False, "messages": []}),
     "anthropic:messages", AnthropicAction("m")),
    ("count-tokens", api("/v1/messages/count_tokens", {"model": "m", "tools": [{"name": "t"}],
                                                     "messages": []}),
     "anthropic:messages.count_tokens", AnthropicAction("m", tools=("t",))),
    ("batch-create", api("/v1/messages/batches", {"requests": [
        {"custom_id": "a", "params": {"model": "m1", "tools": [{"name": "Bash"}], "messages": [
            {"role": "assistant", "content": [{"type": "tool_use", "name": "Bash", "id": "x", "input": {}}]}]}},
        {"custom_id": "c", "params": {"model": "m1", "stream": True, "messages": []}},
    ]}), "anthropic:messages.batches", AnthropicAction("m1", True, ("Bash",), ("Bash",), 0)),
    ("batch-get", api("/v1/messages/batches/msgbatch_01abc", method="GET"),
     "anthropic:messages.batches", AnthropicAction()),
    ("batch-cancel", api("/v1/messages/batches/msgbatch_01abc/cancel", method="POST"),
     "anthropic:messages.batches.cancel", AnthropicAction()),
    ("models", api("/v1/models", method="GET"), "anthropic:models", AnthropicAction()),
    ("model-by-id", api("/v1/models/claude-sonnet-4-5", method="GET"), "anthropic:models",
     AnthropicAction()),
]


@pytest.mark.parametrize("request_, name, expected", [pytest.param(r, n, e, id=i) for i, r, n, e in CASES])
def test_anthropic_requests(request_, name, expected):
    action = classify(request_, "anthropic")
    assert action.errors == ()
    assert action.name == name
    got = action.anthropic
    assert got.models == ((expected.model,) if expected.model else ())
    assert dataclasses.replace(got, models=()) == expected


def test_summary_lists_model_and_tools():
    action = classify(api("/v1/messages", CONVERSATION), "anthropic")
    assert action.summary == ("anthropic:messages model=claude-sonnet-4-5 stream "
                              "tools=Bash,Edit,web_search tool_uses=Bash,web_search,Edit tool_results=3")


@pytest.mark.parametrize("body, fragment", [
    (b"{not json", "not JSON"),
    (b"\xff\xfe\x00garbage", "not JSON"),
    (b"", "empty body"),
    (b"[1, 2]", "not a JSON object"),
    (b"[" * 100_000 + b"]" * 100_000, "not JSON"),
    (json.dumps({"model": "m", "tools": "Bash", "messages": {"a": 1}}).encode(), "is not a list"),
])
def test_bad_bodies_are_noted(body, fragment):
    action = classify(api("/v1/messages", body), "anthropic")
    assert action.name == "anthropic:messages"
    assert any(fragment in e for e in action.errors), action.errors


def test_batch_with_mixed_models_lists_every_model():
    body = {"requests": [{"custom_id": "a", "params": {"model": "claude-sonnet-4-5", "messages": []}},
                         {"custom_id": "b", "params": {"model": "claude-opus-4-1", "messages": []}}]}
    action = classify(api("/v1/messages/batches", body), "anthropic")
    assert action.anthropic.model == ""
    assert action.anthropic.models == ("claude-sonnet-4-5", "claude-opus-4-1")


def test_odd_shapes_keep_what_was_understood():
    body = {"model": 7, "stream": "yes", "tools": [None, {"name": 3}, {"name": "ok"}],
            "messages": [None, "x", {"content": [None, 1, {"type": "tool_use"}, {"type": "tool_result"}]}]}
    action = classify(api("/v1/messages", body), "anthropic")
    assert action.anthropic == AnthropicAction("", False, ("ok",), (), 1)
    assert action.errors == ()


def test_large_body_is_not_parsed(monkeypatch):
    monkeypatch.setattr(anthropic_module, "MAX_BODY", 1000)
    big = dict(CONVERSATION, padding="x" * 2000)
    action = classify(api("/v1/messages", big), "anthropic")
    assert action.anthropic == AnthropicAction()
    assert any("not parsed" in e for e in action.errors)
