"""MCP's wire format for Chaperone's answers: JSON-RPC refusals and filtered ``tools/list`` results.

Shared by :mod:`.addons.refusal` (a refused MCP request is answered as JSON-RPC) and
:mod:`.addons.mcp_tools` (the tools the policy blocks are removed from ``tools/list``
results, JSON or SSE). Pure functions on bytes and dicts, no mitmproxy.

**Decision - how a refusal reaches an MCP client**: HTTP 200 with a JSON-RPC error response for
each request of the body (same ``id``), ``Content-Type: application/json``. The streamable
HTTP client of the ``mcp`` SDK calls ``raise_for_status()`` on a POST and only logs the error
in its writer task - the awaiting ``call_tool`` would hang until its timeout - while a JSON-RPC
error is delivered to the caller (``McpError`` in Python, the rejected promise in TypeScript,
"MCP error -32030: ..." shown to the model by Claude Code). A refusal is a protocol-level error,
not a tool result with ``isError``: that would read as the tool's own output. The code is
``-32030`` (in the JSON-RPC implementation-defined range; ``-32001`` is the SDKs' request
timeout, ``-32000`` connection closed, ``-32020..-32022`` and ``-32042`` are taken by the
2026-07-28 revision). ``message`` is one line naming the action, the rule and what to do;
``data`` is the whole Chaperone refusal body (addons/refusal.py). A batch gets an array with one
error per request (the whole batch is refused: the proxy cannot forward part of a body). A body
without a request id (notifications, responses, the GET stream, an unreadable body) keeps the
plain JSON refusal and its HTTP status.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Mapping
from typing import Any

__all__ = ["REFUSAL_CODE", "jsonrpc_refusal", "filter_tools_json", "filter_tools_message",
           "SSEToolsFilter", "MAX_EVENT_BYTES"]

REFUSAL_CODE = -32030
MAX_EVENT_BYTES = 8 * 1024 * 1024


def _one_line(body: Mapping[str, Any]) -> str:
    action = (body.get("action") or {}).get("summary") or "this request"
    rule = body.get("rule")
    where = f" (rule {rule['name']!r} of AccessPolicy {rule['policy']})" if rule else ""
    text = f"Chaperone refused {action}: {body.get('message', '')}{where}"
    request = body.get("approval_request")
    name = request.get("name") if isinstance(request, Mapping) else request
    if name:
        text += f" [ApprovalRequest {name}]"
    if body.get("how_to_get_access"):
        text += f" How to get access: {body['how_to_get_access']}"
    return " ".join(text.split())


def jsonrpc_refusal(ids: Iterable[str], batch: bool, body: Mapping[str, Any]) -> bytes | None:
    """The JSON-RPC error(s) answering the requests ``ids`` (JSON texts of their ids); None when
    there is no request to answer (the caller keeps the plain refusal)."""
    ids = [i for i in ids if i]
    if not ids:
        return None
    message = _one_line(body)
    errors = [{"jsonrpc": "2.0", "id": json.loads(i),
               "error": {"code": REFUSAL_CODE, "message": message, "data": dict(body)}} for i in ids]
    doc: Any = errors if batch else errors[0]
    # ASCII escapes: the agent chose these strings, a lone surrogate would not encode as UTF-8
    return json.dumps(doc).encode() + b"\n"


Hidden = Callable[[str], bool]


Ids = frozenset[str] | None  # JSON texts of the tools/list requests' ids; None: any response


def filter_tools_message(message: Any, ids: Ids, hidden: Hidden) -> list[str]:
    """Remove hidden tools from one JSON-RPC response to a ``tools/list`` request (``ids``: JSON
    texts of those requests' ids, None for any response carrying ``result.tools``), in place;
    returns the names removed."""
    if not isinstance(message, dict) or "method" in message or "id" not in message:
        return []
    if ids is not None and (isinstance(message["id"], bool)
                            or json.dumps(message["id"], ensure_ascii=False) not in ids):
        return []
    result = message.get("result")
    if not isinstance(result, dict) or not isinstance(result.get("tools"), list):
        return []
    tools = result["tools"]
    kept, removed = [], []
    for tool in tools:
        name = tool.get("name") if isinstance(tool, dict) else None
        # A tool without a usable name cannot be called by name either way; an odd entry is
        # dropped rather than shown unjudged.
        if not isinstance(name, str) or hidden(name):
            removed.append(name if isinstance(name, str) else "<unnamed>")
        else:
            kept.append(tool)
    if removed:
        result["tools"] = kept
    return removed


def filter_tools_json(content: bytes, ids: Ids, hidden: Hidden) -> tuple[bytes, list[str]]:
    """A JSON response body (one message or a batch) with hidden tools removed."""
    try:
        doc = json.loads(content)
    except (ValueError, RecursionError):
        return content, []
    removed: list[str] = []
    for message in doc if isinstance(doc, list) else [doc]:
        removed += filter_tools_message(message, ids, hidden)
    if not removed:
        return content, []
    return json.dumps(doc).encode(), removed  # ASCII escapes: any string the server sent encodes


_TERMINATORS = (b"\r\n\r\n", b"\n\n", b"\r\r")


class SSEToolsFilter:
    """Rewrites the SSE events of a response stream that carry a ``tools/list`` result.

    Events are held until their blank line; an event whose ``data`` is a JSON-RPC response to
    one of ``ids`` goes out with the hidden tools removed (one ``data`` line, its ``id:`` and
    ``event:`` lines kept, LF line ends), every other event byte for byte. An event larger than
    ``MAX_EVENT_BYTES`` ends the stream (fail closed: it could be the list).
    """

    def __init__(self, ids: Ids, hidden: Hidden) -> None:
        self.ids = ids
        self.hidden = hidden
        self.buffer = bytearray()  # appended in place: a large event costs O(n), not O(n^2)
        self.scanned = 0  # bytes of the buffer already searched for a blank line
        self.removed: list[str] = []
        self.failed = False

    def __call__(self, data: bytes) -> list[bytes]:
        if self.failed:
            return []
        self.buffer += data
        out: list[bytes] = []
        while True:
            start = max(0, self.scanned - 3)  # a terminator may straddle two chunks
            ends = [(i, t) for t in _TERMINATORS if (i := self.buffer.find(t, start)) >= 0]
            if not ends:
                self.scanned = len(self.buffer)
                break
            index, term = min(ends)
            event = bytes(self.buffer[:index + len(term)])
            del self.buffer[:index + len(term)]
            self.scanned = 0
            out.append(self._event(event))
        if len(self.buffer) > MAX_EVENT_BYTES:
            self.failed = True
            self.buffer.clear()
            return out
        if not data and self.buffer:  # end of stream: an unterminated event is dropped by clients
            out.append(bytes(self.buffer))
            self.buffer.clear()
        return out

    def _event(self, event: bytes) -> bytes:
        if b"data" not in event:
            return event
        lines = event.replace(b"\r\n", b"\n").replace(b"\r", b"\n").split(b"\n")
        data = [ln[5:].removeprefix(b" ") for ln in lines if ln.startswith(b"data:")]
        try:
            message = json.loads(b"\n".join(data))
        except (ValueError, RecursionError):
            return event
        removed = filter_tools_message(message, self.ids, self.hidden)
        if not removed:
            return event
        self.removed += removed
        kept = [ln for ln in lines if ln and not ln.startswith(b"data:")]
        payload = json.dumps(message).encode()
        return b"\n".join([*kept, b"data: " + payload]) + b"\n\n"
