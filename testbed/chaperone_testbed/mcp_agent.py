"""An MCP agent for the e2e story: the ``mcp`` SDK's client, proxied only by its environment.

``python -m chaperone_testbed.mcp_agent URL OPS`` where OPS is a JSON list of ``["list"]`` and
``["call", NAME, {ARGS}]``; prints one JSON list with a result per op: the tool names, the text
of a tool result, or ``{"error": {"code", "message", "data"}}`` for a JSON-RPC error (McpError).
The HTTP client trusts the environment (HTTP_PROXY, SSL_CERT_FILE...), like an agent container.
"""

from __future__ import annotations

import asyncio
import json
import sys

import httpx
from mcp import ClientSession
from mcp.client.streamable_http import streamable_http_client
from mcp.shared.exceptions import McpError
from mcp.types import TextContent


async def main(url: str, ops: list) -> list:
    out: list = []
    async with httpx.AsyncClient(trust_env=True, timeout=httpx.Timeout(30, read=300)) as http, \
            streamable_http_client(url, http_client=http) as (read, write, _), \
            ClientSession(read, write) as session:
        await session.initialize()
        for op in ops:
            try:
                if op[0] == "list":
                    out.append([t.name for t in (await session.list_tools()).tools])
                else:
                    result = await session.call_tool(op[1], op[2])
                    text = [c.text for c in result.content if isinstance(c, TextContent)]
                    out.append({"text": "".join(text), "isError": result.isError})
            except McpError as exc:
                out.append({"error": {"code": exc.error.code, "message": exc.error.message,
                                      "data": exc.error.data}})
    return out


if __name__ == "__main__":
    print(json.dumps(asyncio.run(main(sys.argv[1], json.loads(sys.argv[2])))))
