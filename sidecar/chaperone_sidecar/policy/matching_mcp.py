"""``match.mcp`` conditions: JSON-RPC methods, tool names, resource URIs and tool arguments.

Built by :func:`mcp_condition` for :mod:`.matching` as **one** test over the calls of
``Action.mcp`` (:mod:`.classify.mcp`), because the fields of a rule describe *one call*: a block
rule ``tools: [delete_file]`` + ``arguments: [{path: $.path, values: ["/etc/*"]}]`` must not
match a batch of ``delete_file /tmp/x`` and ``read_file /etc/passwd`` (each field holds, for
different calls). Semantics:

* A call matches when every given field holds for it. A restricting rule (block,
  requireApproval, mask, rateLimit) matches when ANY call of the body matches, an ``allow``
  rule only when EVERY call does - so a batch mixing a harmless and a forbidden call is judged
  by its strictest element, and allowing ``read_*`` never lets a batched ``delete_file``
  through. A body without calls (the ``GET`` stream, ``DELETE``) never matches ``match.mcp``:
  match it with ``methods: [GET]`` outside ``mcp``.
* ``methods``: globs over the JSON-RPC method (``tools/call``, ``resources/*``,
  ``notifications/*``). A client's *response* to a server request (sampling, elicitation) has
  no method and never matches ``methods``.
* ``tools``: globs over the ``tools/call`` tool name (as the server will look it up: JSON
  escapes decoded, nothing else normalised); a call that is not ``tools/call`` never matches.
* ``resources``: globs over the URI of ``resources/read``/``subscribe``; matched as sent and
  normalised (dot segments resolved, percent-escapes decoded), see ``forms``.
* ``arguments``: each entry is ``path`` (the JSONPath subset of masking field rules, relative
  to ``params.arguments``: ``$.path``, ``$.files[*]``, ``$..token``) plus ``values`` (globs)
  and/or ``regex`` (searched). It holds when a value at the path matches; a list at the path is
  also tested element by element; numbers, booleans and null are tested as their JSON text and
  objects as canonical JSON. A string that looks like a file path or URI is also tested in its
  normalised form (``/tmp/../etc/passwd`` is ``/etc/passwd``): a restricting rule matches when
  any form matches, an allow rule needs every form to. Entries are ANDed. A missing path never
  holds.
* The tools/list **probe** (``MCPCall.probe``, addons/mcp_tools.py) asks "is this tool
  blocked whatever its arguments?": argument conditions hold for allow rules and never for
  others, so only an unconditional block hides a tool.
"""

from __future__ import annotations

import difflib
import json
import posixpath
import re
from collections.abc import Callable
from functools import lru_cache
from typing import Any
from urllib.parse import unquote

from .globs import GlobSet
from .globs import quote as _q
from .masking.fields import CompiledPath, compile_path
from .model import MCPCall

__all__ = ["MCP_FIELDS", "MCP_METHODS", "mcp_condition", "mcp_errors", "select", "forms"]

MCP_FIELDS = ("methods", "tools", "resources", "arguments")

CallTest = Callable[[MCPCall], bool]

# The methods of the MCP specification (2025-06-18, 2025-11-25, 2026-07-28); a literal method
# close to one of these but not one of them is a typo that would never match.
MCP_METHODS = frozenset({
    "initialize", "ping", "tools/list", "tools/call", "resources/list", "resources/read",
    "resources/templates/list", "resources/subscribe", "resources/unsubscribe", "prompts/list",
    "prompts/get", "completion/complete", "logging/setLevel", "roots/list",
    "sampling/createMessage", "elicitation/create", "tasks/get", "tasks/result", "tasks/list",
    "tasks/cancel", "server/discover", "notifications/initialized", "notifications/cancelled",
    "notifications/progress", "notifications/message", "notifications/roots/list_changed",
    "notifications/tools/list_changed", "notifications/resources/list_changed",
    "notifications/resources/updated", "notifications/prompts/list_changed",
    "notifications/elicitation/complete", "notifications/tasks/status",
})
_TOOL_PATTERN = re.compile(r"^[A-Za-z0-9_.*?/-]+$")


def mcp_errors(section: dict, path: str) -> list[tuple[str, str]]:
    """(field path, reason) for what in a ``match.mcp`` can never match or cannot compile."""
    errors: list[tuple[str, str]] = []
    for i, method in enumerate(section.get("methods") or ()):
        if isinstance(method, str) and "*" not in method and "?" not in method \
                and method not in MCP_METHODS:
            near = difflib.get_close_matches(method, sorted(MCP_METHODS), n=1, cutoff=0.8)
            if near:
                errors.append((f"{path}.methods[{i}]",
                               f"unknown MCP method {_q(method)}; did you mean {near[0]}?"))
    for i, tool in enumerate(section.get("tools") or ()):
        if isinstance(tool, str) and tool and not _TOOL_PATTERN.match(tool):
            errors.append((f"{path}.tools[{i}]", f"{_q(tool)} can never match an MCP tool name: tool "
                           "names use only letters, digits, \"_\", \"-\", \".\" and \"/\" "
                           "(match its arguments with arguments)"))
    for i, entry in enumerate(section.get("arguments") or ()):
        if not isinstance(entry, dict):
            continue
        at = f"{path}.arguments[{i}]"
        if isinstance(entry.get("path"), str):
            try:
                compile_path(entry["path"])
            except ValueError as exc:
                errors.append((f"{at}.path", str(exc)))
        if not entry.get("values") and not entry.get("regex"):
            errors.append((at, "needs values (globs) or regex: a path alone says nothing to match"))
        for j, value in enumerate(entry.get("values") or ()):
            if isinstance(value, str) and "***" in value:
                errors.append((f"{at}.values[{j}]", f"invalid glob {_q(value)}: use \"*\", not three "
                               "or more in a row"))
        if isinstance(entry.get("regex"), str):
            try:
                re.compile(entry["regex"])
            except re.error as exc:
                errors.append((f"{at}.regex", f"invalid regular expression: {exc}"))
    return errors


def forms(value: str) -> tuple[str, ...]:
    """The value, and its normalised form when it looks like a path or a URI."""
    out = [value]
    if "://" in value:
        scheme, _, rest = value.partition("://")
        authority, slash, path = rest.partition("/")
        if slash:
            decoded = unquote(path)
            norm = posixpath.normpath("/" + decoded).lstrip("/") if decoded else ""
            out.append(f"{scheme}://{authority}/{norm}")
    elif "/" in value or "\\" in value:
        decoded = unquote(value).replace("\\", "/")
        norm = posixpath.normpath(decoded)
        out.append("/" + norm.lstrip("/") if norm.startswith("//") else norm)
    return tuple(dict.fromkeys(out))


_CACHED_ARGUMENTS = 64 * 1024  # larger arguments are parsed per test, never kept


@lru_cache(maxsize=256)
def _parsed_small(arguments: str) -> Any:
    return json.loads(arguments)


def _parsed(arguments: str) -> Any:
    """The arguments as JSON; small ones cached (several rules test one call), large ones not:
    an agent choosing a 4 MiB argument per call must not fill the sidecar's memory."""
    if not arguments:
        return None
    return _parsed_small(arguments) if len(arguments) <= _CACHED_ARGUMENTS else json.loads(arguments)


def _text(value: Any) -> str:
    if isinstance(value, str):
        return value
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def select(document: Any, path: CompiledPath) -> list[Any]:
    """The values at ``path`` in ``document`` (the masking JSONPath subset)."""
    current = [document]
    for seg in path.segments:
        nxt: list[Any] = []
        for value in current:
            if seg.kind == "member":
                if isinstance(value, dict) and seg.name in value:
                    nxt.append(value[seg.name])
            elif seg.kind == "index":
                if isinstance(value, list) and -len(value) <= seg.index < len(value):
                    nxt.append(value[seg.index])
            elif seg.kind == "wildcard":
                nxt.extend(value.values() if isinstance(value, dict) else
                           value if isinstance(value, list) else ())
            else:  # descendant: iterative, no recursion limit
                stack = [value]
                while stack:
                    node = stack.pop()
                    if isinstance(node, dict):
                        if seg.name in node:
                            nxt.append(node[seg.name])
                        stack.extend(v for v in node.values() if isinstance(v, (dict, list)))
                    elif isinstance(node, list):
                        stack.extend(v for v in node if isinstance(v, (dict, list)))
        current = nxt
    return current


def _candidates(values: list[Any]) -> list[tuple[str, ...]]:
    """One tuple of forms per tested value (lists also element by element)."""
    out = []
    for value in values:
        out.append(forms(_text(value)))
        if isinstance(value, list):
            out.extend(forms(_text(v)) for v in value if not isinstance(v, (dict, list)))
    return out


def _argument_test(entry: dict, allow: bool) -> CallTest:
    path = compile_path(entry["path"])
    globs = GlobSet(entry["values"]) if entry.get("values") else None
    search = re.compile(entry["regex"]).search if entry.get("regex") else None

    def one(text: str) -> bool:
        return (globs is None or globs.match(text)) and (search is None or search(text) is not None)

    def test(call: MCPCall) -> bool:
        if call.probe:
            return allow
        if not call.arguments:
            return False
        candidates = _candidates(select(_parsed(call.arguments), path))
        if allow:  # every form of some value
            return any(all(map(one, fs)) for fs in candidates)
        return any(one(f) for fs in candidates for f in fs)
    return test


def _call_tests(section: dict, allow: bool) -> list[CallTest]:
    tests: list[CallTest] = []
    if section.get("methods"):
        methods = GlobSet(section["methods"])
        tests.append(lambda c: bool(c.method) and methods.match(c.method))
    if section.get("tools"):
        tools = GlobSet(section["tools"])
        tests.append(lambda c: c.method == "tools/call" and tools.match(c.tool))
    if section.get("resources"):
        resources = GlobSet(section["resources"])
        if allow:
            tests.append(lambda c: bool(c.uri) and all(map(resources.match, forms(c.uri))))
        else:
            tests.append(lambda c: bool(c.uri) and any(map(resources.match, forms(c.uri))))
    for entry in section.get("arguments") or ():
        tests.append(_argument_test(entry, allow))
    return tests


def mcp_condition(section: dict, effect: str) -> tuple[tuple[str, ...], Callable[[Any], bool],
                                                          Callable[[Any], object]]:
    """(patterns as written, test on a MatchContext, value for explanations)."""
    allow = effect == "allow"
    tests = _call_tests(section, allow)

    def call_matches(call: MCPCall) -> bool:
        return all(t(call) for t in tests)

    def test(ctx: Any) -> bool:
        mcp = ctx.action.mcp
        if mcp is None or not mcp.calls:
            return False
        return all(map(call_matches, mcp.calls)) if allow else any(map(call_matches, mcp.calls))

    def value(ctx: Any) -> object:
        mcp = ctx.action.mcp
        return ctx.action.summary if mcp is not None else None

    patterns: list[str] = []
    for key in ("methods", "tools", "resources"):
        patterns += [f"{key}={p}" for p in section.get(key) or ()]
    for entry in section.get("arguments") or ():
        patterns.append(f"arguments {entry['path']} " + " ".join(
            [*(entry.get("values") or ()), *([f"~/{entry['regex']}/"] if entry.get("regex") else [])]))
    return tuple(patterns), test, value
