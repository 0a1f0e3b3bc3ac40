"""Glob patterns of AccessPolicies, compiled once to regular expressions.

Two dialects, because the CRD uses globs for two kinds of values:

* ``path`` (``match.paths``): ``*`` and ``?`` stay inside one ``/``-separated segment, ``**``
  crosses ``/``; ``/**/`` also matches a single ``/`` so ``/a/**/b`` matches ``/a/b``, and a
  final ``/**`` also matches its root, so ``/admin/**`` matches ``/admin``.
* ``name`` (hosts, connection names, service accounts, users, AWS actions and resources,
  Kubernetes names, models, tools): ``*`` matches any run of characters (``/`` included, since
  e.g. an S3 resource ``bucket/key`` has no segments a policy author thinks about) and ``?``
  exactly one character.

Every other character is literal (no ``[...]`` classes, no escapes): policy authors write host
names and paths, not shell patterns, and a character class would be a second syntax to learn.
Matching is always whole-value (anchored).

Compilation is cached (``functools.lru_cache``): the same pattern appears in many rules and in
many policies, and the operator recompiles policies on every update. A :class:`GlobSet` matches a
value against several patterns at once: literal patterns go into a ``frozenset`` (the common case
- ``s3:DeleteBucket``, ``GET``, ``api.github.com`` - costs one hash lookup) and the rest are
joined into one alternation regex, so the evaluator never loops over patterns.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable
from functools import lru_cache
from typing import Literal

GlobKind = Literal["name", "path", "host"]

_WILDCARDS = frozenset("*?")


def quote(value: object) -> str:
    """Quote a value in messages as Kubernetes does: JSON, so strings get double quotes."""
    return json.dumps(value, default=str)


def is_literal(pattern: str) -> bool:
    """True when the pattern has no wildcard, i.e. it matches exactly one value."""
    return not any(ch in _WILDCARDS for ch in pattern)


def glob_error(pattern: str, kind: GlobKind = "name", *, allow_empty: bool = False) -> str | None:
    """Why ``pattern`` is not a usable glob of this kind, or ``None`` when it is fine.

    The reasons are phrased to follow a field path, e.g. ``spec.rules[0].match.paths[1]: ...``.
    """
    if not isinstance(pattern, str):
        return "must be a string"
    if pattern == "":
        return None if allow_empty else "must not be empty"
    if pattern != pattern.strip() or any(ch.isspace() for ch in pattern):
        return f"invalid glob {quote(pattern)}: must not contain whitespace"
    if "***" in pattern:
        return f"invalid glob {quote(pattern)}: use \"*\" or \"**\", not three or more \"*\" in a row"
    if kind == "path" and not pattern.startswith("/"):
        return f"invalid path glob {quote(pattern)}: must start with \"/\""
    if kind == "host":
        if "://" in pattern:
            return f"invalid host glob {quote(pattern)}: give the host name only, without a scheme"
        if "/" in pattern:
            return f"invalid host glob {quote(pattern)}: give the host name only, without a path"
        if ":" in pattern:
            return f"invalid host glob {quote(pattern)}: give the host name only, without a port"
    return None


def translate(pattern: str, kind: GlobKind = "name") -> str:
    """The regular-expression source (not anchored) equivalent to ``pattern``."""
    out: list[str] = []
    i, n = 0, len(pattern)
    while i < n:
        ch = pattern[i]
        if ch == "*":
            if kind == "path" and pattern.startswith("**", i):
                # "/**/" may also stand for a single "/" (zero segments), as in gitignore.
                if out and out[-1] == "/" and pattern.startswith("**/", i):
                    out[-1] = "/(?:.*/)?"
                    i += 3
                    continue
                # A final "/**" also matches the directory itself: "/admin/**" covers "/admin"
                # (as in Ant/Spring patterns), so a block rule has no gap at its own root.
                if out and out[-1] == "/" and i + 2 == n:
                    out[-1] = "(?:/.*)?"
                    break
                out.append(".*")
                i += 2
                continue
            out.append("[^/]*" if kind == "path" else ".*")
            # "**" in a name glob means the same as "*"; skip the second star.
            while kind != "path" and i + 1 < n and pattern[i + 1] == "*":
                i += 1
        elif ch == "?":
            out.append("[^/]" if kind == "path" else ".")
        else:
            out.append(re.escape(ch))
        i += 1
    return "".join(out)


@lru_cache(maxsize=4096)
def compile_glob(pattern: str, kind: GlobKind = "name", ignore_case: bool = False) -> re.Pattern[str]:
    """One pattern as a compiled, anchored regex (cached)."""
    flags = re.IGNORECASE if ignore_case else 0
    return re.compile(r"(?s:" + translate(pattern, kind) + r")\Z", flags)


def match(pattern: str, value: str, kind: GlobKind = "name", ignore_case: bool = False) -> bool:
    """Whether ``value`` matches the single glob ``pattern``."""
    return compile_glob(pattern, kind, ignore_case).match(value) is not None


class GlobSet:
    """Several globs of one kind matched as one: ``match(value)`` is true when any pattern matches.

    Host globs are matched case-insensitively (DNS names are), as are globs built with
    ``ignore_case=True`` (AWS action names, which IAM treats case-insensitively).
    """

    __slots__ = ("patterns", "kind", "ignore_case", "_exact", "_regex")

    def __init__(self, patterns: Iterable[str], kind: GlobKind = "name", ignore_case: bool = False):
        self.patterns: tuple[str, ...] = tuple(patterns)
        self.kind = kind
        self.ignore_case = ignore_case or kind == "host"
        fold = str.lower if self.ignore_case else str
        self._exact = frozenset(fold(p) for p in self.patterns if is_literal(p))
        wild = [p for p in self.patterns if not is_literal(p)]
        self._regex = _alternation(tuple(fold(p) for p in wild), kind) if wild else None

    def match(self, value: str) -> bool:
        if self.ignore_case:
            value = value.lower()
        if value in self._exact:
            return True
        regex = self._regex
        return regex is not None and regex.match(value) is not None

    def first_match(self, value: str) -> str | None:
        """The first pattern (as written) that matches ``value``; for explanations, not speed."""
        for pattern in self.patterns:
            if match(pattern, value, self.kind, self.ignore_case):
                return pattern
        return None

    def __repr__(self) -> str:
        return f"GlobSet({list(self.patterns)!r}, kind={self.kind!r})"


@lru_cache(maxsize=1024)
def _alternation(patterns: tuple[str, ...], kind: GlobKind) -> re.Pattern[str]:
    # Case folding was done by the caller (values are lower-cased before matching), so the
    # regex itself is case-sensitive; that keeps the fast path free of re.IGNORECASE costs.
    body = "|".join("(?:" + translate(p, kind) + ")" for p in patterns)
    return re.compile(r"(?s:" + body + r")\Z")
