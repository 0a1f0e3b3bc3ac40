"""Classify a Model Context Protocol request (streamable HTTP): every JSON-RPC message it carries.

MCP over HTTP is JSON-RPC 2.0 in ``POST`` bodies to one endpoint (``/mcp``); the path says
nothing, the body says everything. Two wire revisions are understood:

* **2025-06-18 streamable HTTP** (the ``mcp`` 1.x SDK): an ``initialize`` handshake, a session
  named by the ``Mcp-Session-Id`` header, ``POST`` answered with ``application/json`` or a
  ``text/event-stream`` of JSON-RPC messages, ``GET`` opening the server->client SSE stream
  (server requests such as ``sampling/createMessage`` travel there), ``DELETE`` ending the
  session. JSON-RPC batches (arrays, allowed by 2025-03-26) are still accepted by servers.
* **2026-07-28 stateless HTTP** (the ``mcp`` 2.x SDK): no handshake and no session; each
  ``POST`` is self-contained, with the protocol version and client capabilities in
  ``params._meta`` and mirrored in headers: ``MCP-Protocol-Version``, ``Mcp-Method`` (the
  JSON-RPC method) and ``Mcp-Name`` (the tool or prompt name, the resource URI; a non-ASCII
  value is sent as ``=?base64?...?=``). Servers reject a header that disagrees with the body.

Each message of the body becomes one :class:`~..model.MCPCall` (method, id, tool, prompt,
resource URI, canonical arguments); a batch becomes several, and the policy judges every one
(``policy/matching.py``: a block or requireApproval rule matches when any call matches it, an
allow rule only when every call does). The action is named ``mcp:<method>`` (``mcp:tools/call``;
``mcp:batch`` when a batch mixes methods, ``mcp:stream`` for the ``GET`` stream,
``mcp:session/delete``) and summarised as ``mcp tools/call delete_file {"path": "/etc"}``.

**Fail closed** (``MCPAction.invalid``; the sidecar refuses such a request before any policy,
``addons/enforce.py``), because whatever Chaperone cannot read unambiguously the server might
read differently:

* not JSON, not UTF-8, ``NaN``/``Infinity``, too deep, larger than ``MAX_BODY``, empty;
* a **duplicate key** anywhere (``{"name": "read", "name": "delete"}``: Python and pydantic keep
  the last, other parsers the first);
* not a JSON-RPC 2.0 message (``jsonrpc`` other than ``"2.0"``, a method that is not a string,
  an id that is not a string or integer, ``params`` that is not an object, a ``tools/call``
  without a string ``name``, ``arguments`` that is not an object), an empty batch;
* ``Mcp-Method`` / ``Mcp-Name`` headers that disagree with the body (a gateway routing on
  headers would see another call than the server runs);
* a ``POST`` whose body streamed before it could be read (judged on headers only).

Unicode escapes are decoded by the JSON parser, so ``"delete\\u005ffile"`` *is*
``delete_file``; names are not otherwise normalised - the server looks tools up by exact name,
so a look-alike name is a different (unknown) tool to it as well.
"""

from __future__ import annotations

import base64
import binascii
import json
from typing import Any

from ..model import HTTPRequest, MCPAction, MCPCall

__all__ = ["MAX_BODY", "classify_mcp", "mcp_name", "mcp_summary", "parse_messages",
           "canonical_arguments", "decode_header_value"]

MAX_BODY = 4 * 1024 * 1024  # a JSON-RPC request, not an upload: larger is refused
_MAX_ARGS_SUMMARY = 200
PROTOCOL_VERSION_META_KEY = "io.modelcontextprotocol/protocolVersion"  # 2026-07-28 _meta
# Method -> the params key the 2026-07-28 transport mirrors into Mcp-Name.
NAME_BEARING = {"tools/call": "name", "prompts/get": "name", "resources/read": "uri"}
_URI_METHODS = frozenset({"resources/read", "resources/subscribe", "resources/unsubscribe"})


class _Duplicate(ValueError):
    pass


def _pairs(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise _Duplicate(f"duplicate key {key!r} in a JSON object")
        out[key] = value
    return out


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def parse_messages(body: bytes) -> tuple[list[Any], bool]:
    """The JSON-RPC messages of a body and whether it was a batch; raises ``ValueError`` saying
    why the body is not unambiguous JSON (duplicate keys, NaN, bad UTF-8, too deep...)."""
    if len(body) > MAX_BODY:
        raise ValueError(f"body of {len(body)} bytes is larger than {MAX_BODY}")
    try:
        text = body.decode("utf-8")
        doc = json.loads(text, object_pairs_hook=_pairs, parse_constant=_no_constant)
    except _Duplicate:
        raise
    except UnicodeDecodeError as exc:
        raise ValueError("body is not UTF-8") from exc
    except RecursionError as exc:
        raise ValueError("body nests too deep") from exc
    except ValueError as exc:
        raise ValueError(f"body is not JSON: {exc}") from exc
    if isinstance(doc, list):
        return doc, True
    return [doc], False


def canonical_arguments(arguments: Any) -> str:
    """Arguments as canonical JSON: key order and spacing do not change it."""
    if arguments is None:
        return ""
    return json.dumps(arguments, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def decode_header_value(value: str | None) -> str | None:
    """An ``Mcp-Name`` value: verbatim, or the UTF-8 of a canonical ``=?base64?...?=``; None
    when the sentinel is malformed (never equal to a body value)."""
    if value is None or not (value.startswith("=?base64?") and value.endswith("?=")):
        return value
    payload = value[len("=?base64?"):-2]
    try:
        decoded = base64.b64decode(payload, validate=True)
        if base64.b64encode(decoded).decode("ascii") != payload:
            return None
        return decoded.decode("utf-8")
    except (binascii.Error, UnicodeDecodeError):
        return None


def _id_text(message: dict) -> str | None:
    """The id as JSON text; "" when absent (a notification); None when not a valid id."""
    if "id" not in message:
        return ""
    value = message["id"]
    if isinstance(value, bool) or not isinstance(value, (str, int)):
        return None
    return json.dumps(value, ensure_ascii=False)


def _call(message: Any, where: str) -> tuple[MCPCall | None, str]:
    """One message -> (call, problem)."""
    if not isinstance(message, dict):
        return None, f"{where} is not a JSON object"
    if message.get("jsonrpc") != "2.0":
        return None, f'{where} is not JSON-RPC 2.0 (jsonrpc must be "2.0")'
    ident = _id_text(message)
    if ident is None:
        return None, f"{where}: id must be a string or an integer"
    if "method" not in message:  # a response to a server request (sampling, elicitation...)
        if not ident or ("result" in message) == ("error" in message):
            return None, f"{where} is neither a request, a notification nor a response"
        return MCPCall(method="", id=ident), ""
    method = message["method"]
    if not isinstance(method, str) or not method:
        return None, f"{where}: method must be a non-empty string"
    params = message.get("params", {})
    if params is None:
        params = {}
    if not isinstance(params, dict):
        return None, f"{where}: params must be an object"
    tool = prompt = uri = arguments = ""
    name, target = params.get("name"), params.get("uri")
    if method == "tools/call":
        if not isinstance(name, str) or not name:
            return None, f"{where}: tools/call needs a string params.name"
        tool = name
        args = params.get("arguments")
        if args is not None and not isinstance(args, dict):
            return None, f"{where}: tools/call params.arguments must be an object"
        arguments = canonical_arguments(args)
    elif method == "prompts/get":
        if not isinstance(name, str):
            return None, f"{where}: prompts/get needs a string params.name"
        prompt = name
        args = params.get("arguments")
        if args is not None and not isinstance(args, dict):
            return None, f"{where}: prompts/get params.arguments must be an object"
        arguments = canonical_arguments(args)
    elif method in _URI_METHODS:
        if not isinstance(target, str):
            return None, f"{where}: {method} needs a string params.uri"
        uri = target
    return MCPCall(method=method, id=ident, tool=tool, prompt=prompt, uri=uri,
                   arguments=arguments), ""


def _protocol_version(request: HTTPRequest, messages: list[Any]) -> str:
    header = request.header("mcp-protocol-version")
    if header:
        return header[:64]
    for message in messages:
        params = message.get("params") if isinstance(message, dict) else None
        meta = params.get("_meta") if isinstance(params, dict) else None
        version = meta.get(PROTOCOL_VERSION_META_KEY) if isinstance(meta, dict) else None
        if isinstance(version, str):
            return version[:64]
    return ""


def _header_mismatch(request: HTTPRequest, messages: list[Any], calls: list[MCPCall]) -> str:
    """The 2026-07-28 routing headers must say what the body says (servers check the same)."""
    method_header = request.header("mcp-method")
    name_header = request.header("mcp-name")
    if method_header is None and name_header is None:
        return ""
    if len(calls) != 1 or not calls[0].method:
        return "Mcp-Method/Mcp-Name headers on a body that is not exactly one request"
    call, message = calls[0], messages[0]
    if method_header is not None and method_header != call.method:
        return f"the Mcp-Method header {method_header[:80]!r} does not match the body's method {call.method!r}"
    key = NAME_BEARING.get(call.method)
    if name_header is not None and key is not None:
        value = message["params"].get(key)
        if decode_header_value(name_header) != value:
            return f"the Mcp-Name header does not match the body's params.{key}"
    return ""


def classify_mcp(request: HTTPRequest, errors: list[str]) -> MCPAction:
    """The typed part of an MCP request; problems that make it unjudgeable go to ``invalid``."""
    session = (request.header("mcp-session-id") or "")[:256]
    method = request.method.upper()
    if method == "GET":
        return MCPAction(stream=True, session_id=session,
                         protocol_version=(request.header("mcp-protocol-version") or "")[:64])
    if method in ("DELETE", "OPTIONS", "HEAD"):
        return MCPAction(session_id=session)
    if method != "POST":
        return MCPAction(session_id=session, invalid=f"{method} is not an MCP request method")
    if not request.body:
        invalid = "the body is empty (or streamed before it could be read); an MCP request " \
                  "is judged on its JSON-RPC body"
        errors.append(invalid)
        return MCPAction(session_id=session, invalid=invalid)
    try:
        messages, batch = parse_messages(request.body)
    except ValueError as exc:
        errors.append(str(exc))
        return MCPAction(session_id=session, invalid=str(exc))
    if batch and not messages:
        errors.append("empty JSON-RPC batch")
        return MCPAction(session_id=session, batch=True, invalid="empty JSON-RPC batch")
    calls: list[MCPCall] = []
    for i, message in enumerate(messages):
        call, problem = _call(message, f"batch[{i}]" if batch else "the message")
        if call is None:
            errors.append(problem)
            return MCPAction(session_id=session, batch=batch, invalid=problem)
        calls.append(call)
    ids = [c.id for c in calls if c.id and c.method]
    if len(set(ids)) != len(ids):
        problem = "two requests of the batch share an id (their answers could be swapped)"
        errors.append(problem)
        return MCPAction(session_id=session, batch=batch, invalid=problem)
    problem = _header_mismatch(request, messages, calls)
    if problem:
        errors.append(problem)
    return MCPAction(calls=tuple(calls), batch=batch, session_id=session,
                     protocol_version=_protocol_version(request, messages), invalid=problem)


def mcp_name(action: MCPAction, http_method: str) -> str:
    """``mcp:tools/call``, ``mcp:batch`` (mixed methods), ``mcp:stream``, ``mcp:response``..."""
    if action.stream:
        return "mcp:stream"
    if http_method.upper() == "DELETE":
        return "mcp:session/delete"
    methods = action.methods
    if len(methods) == 1:
        return f"mcp:{methods[0]}"
    if len(methods) > 1:
        return "mcp:batch"
    if action.calls:
        return "mcp:response"
    return "mcp:invalid" if action.invalid else f"mcp:{http_method.lower()}"


def _call_summary(call: MCPCall) -> str:
    if not call.method:
        return f"response id={call.id}"
    parts = [call.method]
    if call.tool or call.prompt:
        parts.append(call.tool or call.prompt)
    if call.uri:
        parts.append(call.uri[:200])
    if call.arguments:
        pretty = json.dumps(json.loads(call.arguments), ensure_ascii=False)
        if len(pretty) > _MAX_ARGS_SUMMARY:
            pretty = pretty[:_MAX_ARGS_SUMMARY - 3] + "..."
        parts.append(pretty)
    return " ".join(parts)


def mcp_summary(action: MCPAction, name: str) -> str:
    """``mcp tools/call delete_file {"path": "/etc"}``; batch calls joined by ``; ``."""
    if action.invalid:
        return f"mcp (unreadable: {action.invalid[:200]})"
    if not action.calls:
        return f"mcp {name.removeprefix('mcp:')}"
    text = "; ".join(_call_summary(c) for c in action.calls[:8])
    if len(action.calls) > 8:
        text += f"; ... {len(action.calls) - 8} more"
    return f"mcp {'batch ' if action.batch else ''}{text}"
