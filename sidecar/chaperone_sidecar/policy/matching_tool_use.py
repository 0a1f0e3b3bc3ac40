"""``match.anthropic.toolUses`` / ``toolInputRegex``: rules that act on the model's *response*.

Every other rule judges the request the agent sends. A rule with either of these two fields is a
**tool-use rule** (a response rule): it is evaluated on each ``tool_use`` block of the answer of
an ``anthropic`` connection, after masking and before the agent's SDK sees it
(``addons/tool_use.py``). The rest of its ``match`` (connections, subjects, ``anthropic.models``
and ``tools``, hosts, paths ...) selects the LLM *requests* whose answers it judges, with the
usual semantics. Semantics of the two fields:

* ``toolUses``: globs over the block's ``name`` (case-sensitive, as SDKs dispatch tools; the
  tool-name alphabet of :mod:`.vocabulary` is enforced, so ``Bash(rm:*)`` is refused).
* ``toolInputRegex``: a Python regular expression *searched* in the block's input as the agent
  receives it (masked): in every string value at any depth (so ``^`` and ``$`` anchor a value,
  and a newline in a shell script is a real newline), in every number/boolean as its JSON text,
  and in the input's compact JSON text (``{"command":"rm -rf /"}``, for patterns spanning keys).
  JSON escapes are decoded first, so ``"rm -rf \\u002f"`` is ``rm -rf /``. **Fail closed**: an
  input that is not a JSON object the SDK could parse (truncated by the end of the stream, or
  invalid) matches every ``toolInputRegex``.
* Both given: both must hold for the same block. A tool-use rule matches when any block
  matches; the blocks are judged one by one (one blocked, another allowed).

**Decision (only ``block``)**: a response cannot wait for a human (the model's stream would time
out) and there is no default to override, so ``allow``, ``requireApproval``, ``mask`` and
``rateLimit`` are refused on tool-use rules with the field path; require approval on the action
the agent takes next instead. The compiled rule gets rank 0, so the request evaluator
(:mod:`.evaluator`) never takes it for a decision about the request itself.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from .globs import GlobSet, glob_error
from .globs import quote as _q

__all__ = ["ToolUse", "ToolUseMatch", "is_tool_use_rule", "tool_use_errors", "tool_use_match",
           "input_texts"]

FIELDS = ("toolUses", "toolInputRegex")
_TOOL_PATTERN = re.compile(r"^[A-Za-z0-9_.*?-]+$")
_EFFECTS = ("allow", "block", "requireApproval", "mask", "rateLimit")
MAX_TEXTS = 4096  # string leaves searched per input (a pathological input is searched as JSON)


@dataclass(frozen=True)
class ToolUse:
    """One ``tool_use`` block of a model's answer, as the agent receives it (masked)."""

    id: str
    name: str
    input: Any = None  # the parsed input; None when ``parsed`` is False
    raw: str = ""  # the input as JSON text (the concatenated ``partial_json``, or canonical)
    parsed: bool = True  # the input is a JSON value the SDK parses
    index: Any = None  # the content block index
    complete: bool = True  # False: the stream ended before its content_block_stop

    @property
    def texts(self) -> tuple[str, ...]:
        return input_texts(self.input, self.raw, self.parsed)


def input_texts(value: Any, raw: str = "", parsed: bool = True) -> tuple[str, ...]:
    """What ``toolInputRegex`` is searched in: string leaves, scalars as JSON, compact JSON."""
    if not parsed:
        return (raw,)
    out: list[str] = []
    stack = [value]
    while stack and len(out) < MAX_TEXTS:
        item = stack.pop()
        if isinstance(item, str):
            out.append(item)
        elif isinstance(item, dict):
            stack.extend(reversed(list(item.values())))
        elif isinstance(item, list):
            stack.extend(reversed(item))
        elif item is not None:
            out.append(json.dumps(item))
    out.append(json.dumps(value, ensure_ascii=False, separators=(",", ":"), default=str))
    return tuple(out)


@dataclass(frozen=True)
class ToolUseMatch:
    """The compiled tool-use part of a rule."""

    names: GlobSet | None
    regex: re.Pattern[str] | None

    def why(self, tool_use: ToolUse) -> str | None:
        """Why ``tool_use`` matches (for the refusal text and the recording), or None."""
        reasons = []
        if self.names is not None:
            if not self.names.match(tool_use.name):
                return None
            reasons.append(f"tool {_q(tool_use.name)} matches {_q(list(self.names.patterns))}")
        if self.regex is not None:
            if not tool_use.parsed:
                reasons.append("its input is not complete JSON (judged as matching: fail closed)")
            else:
                hit = next((m for t in tool_use.texts if (m := self.regex.search(t))), None)
                if hit is None:
                    return None
                reasons.append(f"input matches {_q(self.regex.pattern)} at {_q(hit.group(0)[:80])}")
        return "; ".join(reasons)


def is_tool_use_rule(match: dict | None) -> bool:
    claude = (match or {}).get("anthropic") or {}
    return isinstance(claude, dict) and any(claude.get(k) for k in FIELDS)


def tool_use_match(anthropic: dict) -> ToolUseMatch | None:
    """The compiled condition of a validated ``match.anthropic``, None for request rules."""
    if not is_tool_use_rule({"anthropic": anthropic}):
        return None
    names = anthropic.get("toolUses")
    regex = anthropic.get("toolInputRegex")
    return ToolUseMatch(GlobSet(names) if names else None, re.compile(regex) if regex else None)


def tool_use_errors(rule: dict, path: str) -> Iterator[tuple[str, str]]:
    """(field path, reason) for the tool-use fields of one (schema-checked) rule at ``path``."""
    match: dict = rule["match"] if isinstance(rule.get("match"), dict) else {}
    claude: dict = match["anthropic"] if isinstance(match.get("anthropic"), dict) else {}
    where = f"{path}.match.anthropic"
    for i, name in enumerate(claude.get("toolUses") or ()):
        if not isinstance(name, str):
            continue
        if why := glob_error(name, "name"):
            yield f"{where}.toolUses[{i}]", why
        elif not _TOOL_PATTERN.match(name):
            hint = ""
            if "(" in name:
                hint = (f" (Claude Code permission syntax is not a tool name: match the tool, "
                        f"{_q(name.split('(', 1)[0])}, and its input with toolInputRegex)")
            yield (f"{where}.toolUses[{i}]", f"{_q(name)} can never match a tool name: tool names "
                   f"use only letters, digits, \"_\", \"-\" and \".\"{hint}")
    regex = claude.get("toolInputRegex")
    if isinstance(regex, str):
        try:
            re.compile(regex)
        except re.error as exc:
            yield f"{where}.toolInputRegex", f"invalid regular expression: {exc}"
    if not is_tool_use_rule(match):
        return
    for effect in _EFFECTS:
        if effect in rule and effect != "block":
            yield (f"{path}.{effect}", "a rule with match.anthropic.toolUses or toolInputRegex "
                   "judges the tool_use blocks of the model's response and can only block "
                   "(a response cannot wait for an approval); require approval on the action "
                   "the agent takes next instead")
