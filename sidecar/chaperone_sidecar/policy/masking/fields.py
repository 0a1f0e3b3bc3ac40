"""JSON-path field rules: values at matching paths are replaced whole by ``[MASKED:field]``.

A deliberately small JSONPath subset, parsed here rather than by a library so that the
accepted language is exactly what is documented and admission errors are precise:

    $                 the root            .name / ['name'] / ["name"]   a member
    [N]               an array element (negative counts from the end)
    [*] / .*          every child (array elements or object members)
    ..name / ..['n']  the member ``name`` of the current value and of every descendant

Examples: ``$.SecretString``, ``$.items[*].data.*``, ``$..password``, ``$.data['tls.key']``.
A matched object or array is replaced whole (its structure would leak key names and sizes
otherwise). Already-masked values (a ``[MASKED:...]`` string) are left as they are, which keeps
masking idempotent.
"""

from __future__ import annotations

import hashlib
import hmac
import json
from dataclasses import dataclass
from typing import Any

from .spans import MASK_TOKEN_RE

MAX_PATH_LENGTH = 512  # the CRD's maxLength
MAX_SEGMENTS = 64
FIELD_KIND = "field"


@dataclass(frozen=True, slots=True)
class Segment:
    """One step: ``kind`` is "member", "index", "wildcard" or "descendant" (member at any depth)."""

    kind: str
    name: str = ""
    index: int = 0

    def __str__(self) -> str:
        if self.kind == "member":
            return f"[{json.dumps(self.name)}]"
        if self.kind == "descendant":
            return f"..[{json.dumps(self.name)}]"
        return f"[{self.index}]" if self.kind == "index" else "[*]"


@dataclass(frozen=True, slots=True)
class CompiledPath:
    source: str
    segments: tuple[Segment, ...]

    def __str__(self) -> str:
        return "$" + "".join(str(s) for s in self.segments)


_NAME_STOP = set(".[]'\"* \t\r\n")


def compile_path(path: str) -> CompiledPath:
    """Parse a path; raises ``ValueError`` with the reason and position on bad syntax."""
    if not isinstance(path, str) or not path:
        raise ValueError("empty JSON path")
    if len(path) > MAX_PATH_LENGTH:
        raise ValueError(f"JSON path longer than {MAX_PATH_LENGTH} characters")
    if path[0] != "$":
        raise ValueError(f"JSON path {path!r} must start with '$'")
    segments: list[Segment] = []
    i, n = 1, len(path)

    def fail(reason: str, at: int) -> ValueError:
        return ValueError(f"JSON path {path!r}: {reason} at position {at}")

    def name_at(j: int) -> tuple[str, int]:
        k = j
        while k < n and path[k] not in _NAME_STOP:
            k += 1
        if k == j:
            raise fail("expected a member name", j)
        return path[j:k], k

    def bracket_at(j: int) -> tuple[Segment, int]:
        # path[j] == "["
        k = j + 1
        if k < n and path[k] in "'\"":
            quote, k, chars = path[k], k + 1, []
            while True:
                if k >= n:
                    raise fail("unterminated quoted name", j)
                c = path[k]
                if c == "\\" and k + 1 < n:
                    chars.append(path[k + 1])
                    k += 2
                    continue
                if c == quote:
                    break
                chars.append(c)
                k += 1
            k += 1
            if k >= n or path[k] != "]":
                raise fail("expected ']' after quoted name", k)
            return Segment("member", "".join(chars)), k + 1
        close = path.find("]", k)
        if close < 0:
            raise fail("unclosed '['", j)
        inner = path[k:close].strip()
        if inner == "*":
            return Segment("wildcard"), close + 1
        try:
            index = int(inner, 10)
        except ValueError:
            raise fail(f"expected an index, '*' or a quoted name inside [], got {inner!r}", j) from None
        return Segment("index", index=index), close + 1

    while i < n:
        c = path[i]
        if c == "." and path.startswith("..", i):
            j = i + 2
            if j < n and path[j] == "[":
                seg, i = bracket_at(j)
                if seg.kind != "member":
                    raise fail("'..' must be followed by a member name ('..*' would mask everything)", i)
                segments.append(Segment("descendant", seg.name))
            elif j < n and path[j] in ".*":
                raise fail("'..' must be followed by a member name ('..*' would mask everything)", j)
            else:
                name, i = name_at(j)
                segments.append(Segment("descendant", name))
        elif c == ".":
            if i + 1 < n and path[i + 1] == "*":
                segments.append(Segment("wildcard"))
                i += 2
            else:
                name, i = name_at(i + 1)
                segments.append(Segment("member", name))
        elif c == "[":
            seg, i = bracket_at(i)
            segments.append(seg)
        else:
            raise fail(f"unexpected {c!r}", i)
        if len(segments) > MAX_SEGMENTS:
            raise fail(f"more than {MAX_SEGMENTS} segments", i)
    return CompiledPath(path, tuple(segments))


def path_errors(paths: list[str] | tuple[str, ...]) -> list[str]:
    """One message per path that does not compile (for admission)."""
    errors = []
    for p in paths:
        try:
            compile_path(p)
        except ValueError as exc:
            errors.append(str(exc))
    return errors


def _children(value: Any) -> list[tuple[Any, Any]]:
    if isinstance(value, dict):
        return [(value, k) for k in value]
    if isinstance(value, list):
        return [(value, i) for i in range(len(value))]
    return []


def _step(locations: list[tuple[Any, Any]], seg: Segment) -> list[tuple[Any, Any]]:
    """Advance a set of (container, key) locations by one segment."""
    out: list[tuple[Any, Any]] = []
    for container, key in locations:
        value = container[key]
        if seg.kind == "member":
            if isinstance(value, dict) and seg.name in value:
                out.append((value, seg.name))
        elif seg.kind == "index":
            if isinstance(value, list) and -len(value) <= seg.index < len(value):
                out.append((value, seg.index % len(value)))
        elif seg.kind == "wildcard":
            out.extend(_children(value))
        else:  # descendant: iterative walk (no recursion limit on deep documents)
            stack = [value]
            while stack:
                node = stack.pop()
                if isinstance(node, dict):
                    if seg.name in node:
                        out.append((node, seg.name))
                    stack.extend(v for v in node.values() if isinstance(v, (dict, list)))
                elif isinstance(node, list):
                    stack.extend(v for v in node if isinstance(v, (dict, list)))
    return out


def _containers_within(value: Any) -> set[int]:
    """ids of ``value`` and of every dict/list nested in it."""
    ids: set[int] = set()
    stack = [value]
    while stack:
        node = stack.pop()
        if isinstance(node, (dict, list)) and id(node) not in ids:
            ids.add(id(node))
            stack.extend(node.values() if isinstance(node, dict) else node)
    return ids


def _is_masked(value: Any) -> bool:
    return isinstance(value, str) and MASK_TOKEN_RE.fullmatch(value.encode("utf-8", "replace")) is not None


def field_token(value: Any, hash_key: bytes | None) -> str:
    """``[MASKED:field]``, or keyed with an HMAC of the value's canonical JSON."""
    if hash_key is None:
        return f"[MASKED:{FIELD_KIND}]"
    canonical = json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    digest = hmac.new(hash_key, canonical.encode("utf-8", "surrogatepass"), hashlib.sha256)
    return f"[MASKED:{FIELD_KIND}:{digest.hexdigest()[:12]}]"


def apply_paths(document: Any, paths: tuple[CompiledPath, ...],
                hash_key: bytes | None = None) -> tuple[Any, int]:
    """Mask every value matched by ``paths`` in a parsed JSON document (mutated in place).

    Returns the (possibly new, when ``$`` itself matched) document and the number of values
    replaced. Values inside a replaced value are not counted twice.
    """
    holder = [document]
    count = 0
    for path in paths:
        locations: list[tuple[Any, Any]] = [(holder, 0)]
        for seg in path.segments:
            locations = _step(locations, seg)
            if not locations:
                break
        # A match nested inside another match of the same path (``$..password`` on
        # {"password": {"password": ...}}) disappears with the outer value: skip it.
        covered: set[int] = set()
        for container, key in locations:
            covered |= _containers_within(container[key])
        seen: set[tuple[int, Any]] = set()
        for container, key in locations:
            if (id(container), key) in seen or id(container) in covered:
                continue
            seen.add((id(container), key))
            value = container[key]
            if _is_masked(value):
                continue
            container[key] = field_token(value, hash_key)
            count += 1
    return holder[0], count
