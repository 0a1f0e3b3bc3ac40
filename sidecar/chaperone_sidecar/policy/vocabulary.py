"""Names a rule can only match if they exist: AWS actions, HTTP methods, Anthropic tool names.

Why a check beyond the schema: a misspelled name in a *block* rule (``s3:DeleteBuckett``,
``methods: [DELET]``) is well-formed, compiles, and matches nothing, so the rule fails open
without a word. :func:`unknown_names` reports each such value with its field path and, where one
is close, the nearest valid name; the compiler adds them to the policy's errors, so the
operator's admission webhook and ``chaperone policy test`` refuse the same policy with the same
words.

What is known, and from where:

* AWS actions: botocore's service models, in the names the classifier produces
  (:mod:`.aws_catalog`).
* HTTP methods: the IANA HTTP Method Registry's methods in common use - RFC 9110's (Python's
  ``http.HTTPMethod``), PATCH (RFC 5789) and the WebDAV family (RFC 4918, 3253, 5323) that git
  and CalDAV/CardDAV clients send - plus QUERY. ``match.methods`` allows no wildcards.
* Anthropic tool names are chosen by the agent (``tools[].name``), so no list of them exists;
  what is known is their alphabet: the Messages API accepts ``[A-Za-z0-9_-]`` and MCP tool names
  add ``.``. A pattern with any other character (``Bash(git push:*)``, Claude Code's permission
  syntax, or a space) can never match and is refused.
"""

from __future__ import annotations

import difflib
import http
import re
from collections.abc import Iterator

from .aws_catalog import action_error
from .globs import quote as _q

__all__ = ["HTTP_METHODS", "unknown_names"]

HTTP_METHODS: frozenset[str] = frozenset({m.value for m in http.HTTPMethod} | {
    "PATCH", "QUERY",
    # WebDAV and its extensions (git over HTTP, CalDAV/CardDAV clients).
    "PROPFIND", "PROPPATCH", "MKCOL", "COPY", "MOVE", "LOCK", "UNLOCK", "REPORT", "SEARCH",
    "MKCALENDAR", "MKACTIVITY", "CHECKOUT", "CHECKIN", "UNCHECKOUT", "MERGE", "VERSION-CONTROL",
    "LABEL", "UPDATE", "MKWORKSPACE", "BASELINE-CONTROL", "ORDERPATCH", "ACL", "BIND", "UNBIND",
    "REBIND",
})
# Tool-name characters plus the glob wildcards.
_TOOL_PATTERN = re.compile(r"^[A-Za-z0-9_.*?-]+$")


def unknown_names(match: dict, path: str) -> Iterator[tuple[str, str]]:
    """(field path, reason) for every name in a rule's ``match`` that can never match."""
    aws = match.get("aws") or {}
    for i, pattern in enumerate(aws.get("actions") or ()):
        if isinstance(pattern, str) and (why := action_error(pattern)):
            yield f"{path}.aws.actions[{i}]", why
    for i, method in enumerate(match.get("methods") or ()):
        if isinstance(method, str) and method not in HTTP_METHODS:
            near = difflib.get_close_matches(method, sorted(HTTP_METHODS), n=1, cutoff=0.6)
            hint = f"; did you mean {near[0]}?" if near else ""
            yield f"{path}.methods[{i}]", f"unknown HTTP method {_q(method)}{hint}"
    anthropic = match.get("anthropic") or {}
    for i, tool in enumerate(anthropic.get("tools") or ()):
        if isinstance(tool, str) and tool and not _TOOL_PATTERN.match(tool):
            hint = ""
            if "(" in tool:
                hint = (f" (Claude Code permission syntax such as {_q(tool)} is not a tool "
                        f"name; match the tool, e.g. {_q(tool.split('(', 1)[0])}, and its input "
                        "with bodyRegex)")
            yield (f"{path}.anthropic.tools[{i}]", f"{_q(tool)} can never match a tool name: tool "
                   f"names use only letters, digits, \"_\", \"-\" and \".\"{hint}")
