"""A real MCP server for the tests: FastMCP (the ``mcp`` SDK) over streamable HTTP, on uvicorn.

``python -m chaperone_testbed.mcp_server PORT MODE [HOST]`` with MODE ``sse`` (POST answered as text/event-stream, the
SDK's default), ``json`` (application/json) or ``stateless`` (SSE, no Mcp-Session-Id: every POST
stands alone, as on the 2026-07-28 transport). Tools: ``read_file``, ``delete_file``,
``get_secret`` (returns an AWS access key id, for masking), ``deploy`` (for approval) and
``ask_model`` (asks the client's model through a ``sampling/createMessage`` server request).
Every call is appended to ``$MCP_CALLS`` (one JSON line) so tests see what reached the server.
"""

from __future__ import annotations

import json
import os
import sys

import uvicorn
from mcp.server.fastmcp import Context, FastMCP
from mcp.server.transport_security import TransportSecuritySettings
from mcp.types import SamplingMessage, TextContent

SECRET = "AKIAIOSFODNN7EXAMPLE"


def build(json_response: bool, stateless: bool) -> FastMCP:
    server = FastMCP("files", json_response=json_response, stateless_http=stateless)

    def log(tool: str, **args: str) -> None:
        with open(os.environ["MCP_CALLS"], "a") as out:
            out.write(json.dumps({"tool": tool, **args}) + "\n")

    @server.tool()
    def read_file(path: str, ctx: Context) -> str:
        """Read a file."""
        request = ctx.request_context.request  # the HTTP request (streamable HTTP): who called
        auth = request.headers.get("authorization", "") if request is not None else ""
        log("read_file", path=path, **({"auth": auth} if auth else {}))
        return f"contents of {path}"

    @server.tool()
    def delete_file(path: str) -> str:
        """Delete a file."""
        log("delete_file", path=path)
        return f"deleted {path}"

    @server.tool()
    def get_secret(name: str) -> str:
        """A credential."""
        log("get_secret", name=name)
        return f"the key of {name} is {SECRET}"

    @server.tool()
    def deploy(env: str) -> str:
        """Deploy."""
        log("deploy", env=env)
        return f"deployed to {env}"

    @server.tool()
    async def ask_model(question: str, ctx: Context) -> str:
        """Ask the client's model (sampling)."""
        log("ask_model", question=question)
        answer = await ctx.session.create_message(
            [SamplingMessage(role="user", content=TextContent(type="text", text=question))], max_tokens=50)
        return f"the model said: {answer.content.text if isinstance(answer.content, TextContent) else '?'}"

    return server


if __name__ == "__main__":
    port, mode = int(sys.argv[1]), sys.argv[2]
    host = sys.argv[3] if len(sys.argv) > 3 else "127.0.0.1"
    server = build(mode == "json", mode == "stateless")
    # FastMCP's DNS-rebinding protection admits localhost names only; the tests reach it by IP.
    server.settings.transport_security = TransportSecuritySettings(
        enable_dns_rebinding_protection=True, allowed_hosts=[f"{host}:{port}"],
        allowed_origins=[f"http://{host}:{port}"])
    uvicorn.run(server.streamable_http_app(), host=host, port=port, log_level="warning")
