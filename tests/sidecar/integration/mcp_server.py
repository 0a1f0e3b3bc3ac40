"""A real MCP server for the tests: FastMCP (the ``mcp`` SDK) over streamable HTTP, on uvicorn.

``python mcp_server.py PORT MODE`` with MODE ``sse`` (POST answered as text/event-stream, the
SDK's default), ``json`` (application/json) or ``stateless`` (SSE, no Mcp-Session-Id: every POST
stands alone, as on the 2026-07-28 transport). Tools: ``read_file``, ``delete_file``,
``get_secret`` (returns an AWS access key id, for masking) and ``deploy`` (for approval).
Every call is appended to ``$MCP_CALLS`` (one JSON line) so tests see what reached the server.
"""

from __future__ import annotations

import json
import os
import sys

import uvicorn
from mcp.server.fastmcp import FastMCP

SECRET = "AKIAIOSFODNN7EXAMPLE"


def build(json_response: bool, stateless: bool) -> FastMCP:
    server = FastMCP("files", json_response=json_response, stateless_http=stateless)

    def log(tool: str, **args: str) -> None:
        with open(os.environ["MCP_CALLS"], "a") as out:
            out.write(json.dumps({"tool": tool, **args}) + "\n")

    @server.tool()
    def read_file(path: str) -> str:
        """Read a file."""
        log("read_file", path=path)
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

    return server


if __name__ == "__main__":
    port, mode = int(sys.argv[1]), sys.argv[2]
    app = build(mode == "json", mode == "stateless").streamable_http_app()
    uvicorn.run(app, host="127.0.0.1", port=port, log_level="warning")
