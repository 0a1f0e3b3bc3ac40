"""The opt-in content attributes of a GenAI span: an Anthropic Messages request and answer as
OpenTelemetry's ``gen_ai.system_instructions``, ``gen_ai.input.messages`` and
``gen_ai.output.messages`` (semconv v1.41.0: JSON strings of ``{role, parts: [...]}``).

Why a module of its own: pure functions of two masked bodies, no addon state; the Telemetry
addon calls them only when content capture is switched on
(``OTEL_INSTRUMENTATION_GENAI_CAPTURE_MESSAGE_CONTENT=true``, the variable OpenTelemetry's GenAI
instrumentations use), and only with what the recording would store: Mask's masked captures
(``FlowContext.bodies``), never the wire bytes - so a span never holds more than the recording,
and a body the recording leaves out (``recording.bodies: none``, unmaskable) is left out here too.

Parts: text -> ``{"type": "text", "content"}``; ``thinking`` -> ``{"type": "reasoning",
"content"}``; ``tool_use`` -> ``{"type": "tool_call", "id", "name", "arguments"}``;
``tool_result`` -> ``{"type": "tool_call_response", "id", "response"}``; anything else (images,
documents) -> ``{"type": <its type>}`` without its data. A streamed answer is assembled from its
SSE events (text and thinking deltas, ``input_json_delta`` pieces). Each attribute is cut at
:data:`MAX_CHARS` (a truncated JSON string is marked by ending in ``...[truncated]``).
"""

from __future__ import annotations

import json
from typing import Any

from .policy.masking.sse import SSEParser

__all__ = ["MAX_CHARS", "request_content", "response_content"]

MAX_CHARS = 64 * 1024


def _dump(value: Any) -> str:
    text = json.dumps(value, ensure_ascii=False, separators=(",", ":"))
    return text if len(text) <= MAX_CHARS else text[:MAX_CHARS] + "...[truncated]"


def _parts(content: Any) -> list[dict[str, Any]]:
    if isinstance(content, str):
        return [{"type": "text", "content": content}]
    parts: list[dict[str, Any]] = []
    for block in content if isinstance(content, list) else ():
        if not isinstance(block, dict):
            continue
        kind = block.get("type")
        if kind == "text":
            parts.append({"type": "text", "content": block.get("text", "")})
        elif kind == "thinking":
            parts.append({"type": "reasoning", "content": block.get("thinking", "")})
        elif kind == "tool_use":
            parts.append({"type": "tool_call", "id": block.get("id"), "name": block.get("name"),
                          "arguments": block.get("input")})
        elif kind == "tool_result":
            parts.append({"type": "tool_call_response", "id": block.get("tool_use_id"),
                          "response": block.get("content")})
        elif isinstance(kind, str):
            parts.append({"type": kind})  # image, document ...: not their data
    return parts


def request_content(body: bytes) -> dict[str, str]:
    """``gen_ai.system_instructions`` and ``gen_ai.input.messages`` of a Messages request."""
    try:
        obj = json.loads(body)
    except ValueError:
        return {}
    if not isinstance(obj, dict):
        return {}
    out: dict[str, str] = {}
    system = obj.get("system")
    if system:
        out["gen_ai.system_instructions"] = _dump(_parts(system))
    messages = obj.get("messages")
    if isinstance(messages, list):
        out["gen_ai.input.messages"] = _dump([
            {"role": m.get("role"), "parts": _parts(m.get("content"))}
            for m in messages if isinstance(m, dict)])
    return out


def _assemble(body: bytes) -> dict[str, Any] | None:
    """A Messages answer from its SSE events (as the SDKs assemble it)."""
    message: dict[str, Any] | None = None
    blocks: dict[int, dict[str, Any]] = {}
    partial: dict[int, str] = {}
    for fields in SSEParser().feed(body, final=True):
        payload = b"\n".join(v for k, v in fields if k == b"data")
        try:
            event = json.loads(payload)
        except ValueError:
            continue
        if not isinstance(event, dict):
            continue
        kind, index = event.get("type"), event.get("index")
        if kind == "message_start" and isinstance(event.get("message"), dict):
            message = dict(event["message"])
        elif kind == "content_block_start" and isinstance(index, int):
            blocks[index] = dict(event.get("content_block") or {})
        elif kind == "content_block_delta" and index in blocks:
            delta = event.get("delta") or {}
            block = blocks[index]
            if delta.get("type") == "text_delta":
                block["text"] = block.get("text", "") + str(delta.get("text", ""))
            elif delta.get("type") == "thinking_delta":
                block["thinking"] = block.get("thinking", "") + str(delta.get("thinking", ""))
            elif delta.get("type") == "input_json_delta":
                partial[index] = partial.get(index, "") + str(delta.get("partial_json", ""))
        elif kind == "message_delta" and message is not None:
            message.update({k: v for k, v in (event.get("delta") or {}).items() if v is not None})
    if message is None:
        return None
    for index, text in partial.items():
        try:
            blocks[index]["input"] = json.loads(text)
        except ValueError:
            blocks[index]["input"] = text  # cut short (bounded capture): as far as it went
    message["content"] = [blocks[i] for i in sorted(blocks)]
    return message


def response_content(body: bytes, *, sse: bool) -> dict[str, str]:
    """``gen_ai.output.messages`` of a Messages answer (JSON, or SSE assembled)."""
    if sse:
        message = _assemble(body)
    else:
        try:
            message = json.loads(body)
        except ValueError:
            return {}
    if not isinstance(message, dict) or message.get("type") == "error":
        return {}
    out = {"role": message.get("role") or "assistant", "parts": _parts(message.get("content"))}
    if message.get("stop_reason"):
        out["finish_reason"] = message["stop_reason"]
    return {"gen_ai.output.messages": _dump([out])}
