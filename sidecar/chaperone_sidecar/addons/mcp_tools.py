"""McpTools: the model never sees an MCP tool the policy would block for this identity.

An MCP client (Claude Code, the ``mcp`` SDK) asks the server ``tools/list`` and hands the model
every tool it gets back. For a ``tools/list`` request on an ``mcp`` connection, this addon
removes from the result each tool whose call the policy blocks *whatever its arguments*, for the
flow's identity and connection and with the flow's snapshot: a probe ``tools/call <name>`` is
evaluated (:class:`~chaperone_sidecar.policy.model.MCPCall` ``probe``: argument conditions hold
for allow rules and never for block rules, ``policy/matching_mcp.py``). So an unconditional
``block`` (or ``defaultEffect: block`` without an allow rule for the tool) hides it; a block on
some arguments only, and requireApproval, leave it listed. Calling a hidden tool anyway is
refused by Enforce (the same policy, judged on the real call), as a JSON-RPC error.

Where. The result arrives as ``application/json`` (filtered in ``response``; a batch response
too) or as an SSE event of a ``text/event-stream`` response (filtered as the stream passes,
:class:`~chaperone_sidecar.mcpwire.SSEToolsFilter`). This addon runs **after Mask**: Mask sets
``flow.response.stream`` for every SSE response (its masker, or a pass-through that captures
the body for the recording) and this addon **wraps** that callable - it filters what Mask
releases - never replaces it. A JSON list that streams (no ``Content-Length``) is collected
up to ``MAX_EVENT_BYTES`` and filtered whole at its end. **Decision**: the recording keeps the
list as the server sent it (masked) - what the server offered; the names hidden are logged.

The ``GET`` stream is filtered too, for *any* response carrying ``result.tools``: a client
that resumes a broken ``POST`` stream (``Last-Event-ID``) gets its replay there, and so does
the legacy HTTP+SSE transport - an agent must not read the list around the filter.

Fail closed: a compressed SSE ``tools/list`` stream (``Content-Encoding``) cannot be rewritten
as it passes and is cut (the client sees a broken stream, never the unfiltered list); a
compressed JSON body is decoded by mitmproxy and re-encoded.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import replace
from typing import Any

from mitmproxy import http

from .. import flowctx
from ..log_setup import flow_fields
from ..mcpwire import MAX_EVENT_BYTES, Ids, SSEToolsFilter, filter_tools_json
from ..policy.evaluator import evaluate
from ..policy.model import MCPAction, MCPCall
from ..services import SidecarServices

__all__ = ["McpTools"]

log = logging.getLogger("chaperone.mcp")


class _Wrapped:
    """Runs the stream callable found first (Mask's), then the filter on what it released."""

    def __init__(self, inner: Any, tools: Callable[[bytes], list[bytes]]) -> None:
        self.inner = inner
        self.tools = tools

    def __call__(self, data: bytes) -> list[bytes]:
        if callable(self.inner):
            out: Any = self.inner(data)
            chunks = [out] if isinstance(out, bytes) else list(out or ())
        else:
            chunks = [data]
        released: list[bytes] = []
        for chunk in chunks:
            if chunk:
                released += self.tools(chunk)
        if not data:
            released += self.tools(b"")
        return [c for c in released if c]  # b"" would end an HTTP/1 chunked body


class _JSONCollector:
    """A streamed JSON body collected (bounded) and filtered whole at its end."""

    def __init__(self, ids: Ids, hidden: Any) -> None:
        self.ids, self.hidden = ids, hidden
        self.body = bytearray()  # appended in place: O(n) for a large list
        self.failed = False

    def __call__(self, data: bytes) -> list[bytes]:
        if self.failed:
            return []
        self.body += data
        if len(self.body) > MAX_EVENT_BYTES:  # fail closed: never the unfiltered list
            self.failed = True
            self.body.clear()
            return []
        if data:
            return []
        content, _ = filter_tools_json(bytes(self.body), self.ids, self.hidden)
        self.body.clear()
        return [content]


class McpTools:
    """Removes the tools the policy blocks from ``tools/list`` results (JSON and SSE)."""

    def __init__(self, services: SidecarServices) -> None:
        self.services = services

    @staticmethod
    def _list_ids(flow: http.HTTPFlow) -> tuple[flowctx.FlowContext, Ids] | None:
        ctx = flowctx.get(flow)
        if ctx is None or ctx.refused is not None or flow.response is None:
            return None
        action = ctx.action
        if ctx.connection_type != "mcp" or action is None or action.mcp is None:
            return None
        if action.mcp.stream:  # GET: a resumed POST stream (Last-Event-ID) or the legacy transport
            return ctx, None  # may replay a tools/list result: any response with result.tools
        ids = frozenset(c.id for c in action.mcp.calls if c.method == "tools/list" and c.id)
        return (ctx, ids) if ids else None

    def _hidden(self, ctx: flowctx.FlowContext) -> Callable[[str], bool]:
        snapshot = ctx.snapshot if ctx.snapshot is not None else self.services.snapshot()
        action = ctx.action
        assert action is not None and action.mcp is not None
        session = action.mcp.session_id
        cache: dict[str, bool] = {}

        def hidden(name: str) -> bool:
            if name not in cache:
                probe = replace(action, method="POST", name="mcp:tools/call", summary=f"mcp tools/call {name}",
                                mcp=MCPAction(calls=(MCPCall("tools/call", tool=name, probe=True),),
                                              session_id=session))
                decision = evaluate(snapshot.policies, probe, ctx.identity, ctx.connection)
                cache[name] = decision.effect == "block"
            return cache[name]
        return hidden

    # ------------------------------------------------------------------ hooks
    def responseheaders(self, flow: http.HTTPFlow) -> None:
        found = self._list_ids(flow)
        if found is None:
            return
        resp = flow.response
        assert resp is not None
        ctx, ids = found
        if "text/event-stream" not in resp.headers.get("content-type", "").lower():
            if resp.stream:  # a JSON list that streams through Mask: collected, filtered whole
                resp.stream = _Wrapped(resp.stream, _JSONCollector(ids, self._hidden(ctx)))
            return
        if resp.headers.get("content-encoding", "identity").strip().lower() not in ("", "identity"):
            log.warning("compressed SSE tools/list response cut (cannot be filtered as it passes)",
                        extra=flow_fields(flow))
            flow.kill()
            return
        resp.stream = _Wrapped(resp.stream, SSEToolsFilter(ids, self._hidden(ctx)))

    def response(self, flow: http.HTTPFlow) -> None:
        found = self._list_ids(flow)
        resp = flow.response
        if found is None or resp is None or resp.stream:
            return  # streams were filtered chunk by chunk
        if "json" not in resp.headers.get("content-type", "").lower():
            return
        ctx, ids = found
        content, removed = filter_tools_json(resp.get_content(strict=False) or b"", ids, self._hidden(ctx))
        if removed:
            resp.set_content(content)
            log.info("tools/list: hid %s", ", ".join(removed), extra=flow_fields(flow))
