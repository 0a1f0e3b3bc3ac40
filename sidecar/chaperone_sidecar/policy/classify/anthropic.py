"""Classify an Anthropic API request: endpoint, model, streaming and tool use.

Policies about agents talking to Claude care about *which model* and *which tools*: the tools
the agent declares (``tools[].name``), the tools it has already been running (``tool_use``
blocks in the conversation it sends back, including server and MCP tool uses) and how many
tool results it is returning. All of it is in the JSON body of ``POST /v1/messages``,
``/v1/messages/count_tokens`` and, one level down per request, ``/v1/messages/batches``.

Conversation bodies grow to megabytes; they are parsed up to ``MAX_BODY`` bytes. A body that
is too large, not JSON or oddly shaped is noted in errors and the action keeps whatever was
understood: the classifier never raises.
"""

from __future__ import annotations

import json

from ..model import AnthropicAction, HTTPRequest

MAX_BODY = 32 * 1024 * 1024
# Path words that name an endpoint; other segments (ids like msgbatch_01..., model names) are
# skipped so every request to one endpoint shares one action name.
_ENDPOINT_WORDS = frozenset(
    {"messages", "count_tokens", "batches", "results", "cancel", "models", "files", "complete",
     "content", "skills", "versions"}
)
_TOOL_USE_TYPES = frozenset({"tool_use", "server_tool_use", "mcp_tool_use"})
_BODY_ENDPOINTS = frozenset({"messages", "messages.count_tokens", "messages.batches"})


def endpoint(path: str) -> str:
    """``messages``, ``messages.count_tokens``, ``messages.batches.cancel``, ``models``..."""
    segments = [s for s in path.split("?", 1)[0].split("/") if s]
    if segments and segments[0] in ("v1", "v1beta"):
        segments = segments[1:]
    if not segments:
        return "root"
    words = [segments[0]] + [s for s in segments[1:] if s in _ENDPOINT_WORDS]
    return ".".join(words)


class _Collector:
    def __init__(self):
        self.models: list[str] = []
        self.stream = False
        self.tools: list[str] = []
        self.tool_uses: list[str] = []
        self.tool_results = 0

    def params(self, body: dict, errors: list[str]) -> None:
        model = body.get("model")
        if isinstance(model, str) and model and model not in self.models:
            self.models.append(model)
        self.stream = self.stream or body.get("stream") is True
        tools = body.get("tools")
        if isinstance(tools, list):
            for tool in tools:
                name = tool.get("name") if isinstance(tool, dict) else None
                if isinstance(name, str) and name not in self.tools:
                    self.tools.append(name)
        elif tools is not None:
            errors.append("tools is not a list")
        messages = body.get("messages")
        if isinstance(messages, list):
            for message in messages:
                self._message(message)
        elif messages is not None:
            errors.append("messages is not a list")

    def _message(self, message) -> None:
        content = message.get("content") if isinstance(message, dict) else None
        if not isinstance(content, list):  # a plain string has no tool blocks
            return
        for block in content:
            if not isinstance(block, dict):
                continue
            kind = block.get("type")
            if kind in _TOOL_USE_TYPES:
                name = block.get("name")
                if isinstance(name, str) and name not in self.tool_uses:
                    self.tool_uses.append(name)
            elif kind == "tool_result":
                self.tool_results += 1

    def action(self, errors: list[str]) -> AnthropicAction:
        # A batch can mix models: `model` is set only when there is exactly one, and policies
        # match on `models` (an allow needs every model to match, a block any one).
        model = self.models[0] if len(self.models) == 1 else ""
        return AnthropicAction(
            model=model,
            models=tuple(self.models),
            stream=self.stream,
            tools=tuple(self.tools),
            tool_uses=tuple(self.tool_uses),
            tool_results=self.tool_results,
        )


def classify_anthropic(request: HTTPRequest, errors: list[str]) -> tuple[AnthropicAction, str]:
    """The typed part and the endpoint name (``messages``...)."""
    name = endpoint(request.path)
    collector = _Collector()
    if request.method.upper() == "POST" and name in _BODY_ENDPOINTS:
        body = _load(request.body, errors)
        if isinstance(body, dict):
            if name == "messages.batches":
                requests = body.get("requests")
                for item in requests if isinstance(requests, list) else ():
                    params = item.get("params") if isinstance(item, dict) else None
                    if isinstance(params, dict):
                        collector.params(params, errors)
            else:
                collector.params(body, errors)
        elif body is not None:
            errors.append("body is not a JSON object")
    return collector.action(errors), name


def _load(body: bytes, errors: list[str]):
    if not body:
        errors.append("empty body")
        return None
    if len(body) > MAX_BODY:
        errors.append(f"body of {len(body)} bytes not parsed (limit {MAX_BODY})")
        return None
    try:
        return json.loads(body)
    except (ValueError, RecursionError) as exc:
        errors.append(f"body is not JSON: {type(exc).__name__}")
        return None


def anthropic_summary(action: AnthropicAction, name: str) -> str:
    """``anthropic:messages model=claude-x stream tools=Bash,Edit tool_uses=Bash tool_results=1``"""
    parts = [name]
    if action.model:
        parts.append(f"model={action.model}")
    if action.stream:
        parts.append("stream")
    if action.tools:
        parts.append(f"tools={','.join(action.tools)}")
    if action.tool_uses:
        parts.append(f"tool_uses={','.join(action.tool_uses)}")
    if action.tool_results:
        parts.append(f"tool_results={action.tool_results}")
    return " ".join(parts)
