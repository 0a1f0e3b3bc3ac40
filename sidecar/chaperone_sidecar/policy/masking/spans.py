"""Scanning and replacement shared by the whole-body and the streaming masker.

A ``Rule`` (the built-in ones are in ``detectors.py``) proposes ``Candidate`` matches;
validated ones carry a ``Finding`` (a byte span and the kind). Overlapping findings are
merged (their union is masked, so no part of either secret survives) and replaced by a mask
token that names the kind, optionally with a keyed hash so equal secrets stay correlatable in
recordings: ``[MASKED:jwt]`` / ``[MASKED:jwt:1a2b3c4d5e6f]`` (HMAC-SHA256, first 48 bits).

Idempotence: a finding that lies wholly inside an existing mask token is dropped, no detector
matches a mask token, and ``mask_text`` rescans while a replacement created a new token
boundary, so its output is a fixed point: masking masked text changes nothing.
"""

from __future__ import annotations

import bisect
import hashlib
import hmac
import re
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import NamedTuple, TypeAlias

from .prefilter import MASKED, SHARED_TRIGGERS, Hits, Prefilter, Trigger

# Trailing "*" and an empty or cut kind: the length-preserving tokens of binary bodies
# (``decoded.mask_binary``) are tokens too, so masking them again changes nothing.
MASK_TOKEN_RE = re.compile(rb"\[MASKED:[a-z-]{0,32}(?::[0-9a-f]{12})?\]\**")

# A match: re's, or a SpanMatch built by a custom finder (the same methods, duck-typed).
MatchLike: TypeAlias = "re.Match[bytes] | SpanMatch"
Validator = Callable[[bytes, MatchLike], bool]
# (text, pos, positions): matches starting at or after pos, given the sorted positions of the
# rule's triggers in text (see prefilter.py); each finder says why that finds every match.
Finder = Callable[[bytes, int, list[int]], "Iterator[MatchLike]"]


@dataclass(frozen=True, slots=True)
class Rule:
    """One regex of a detector. ``max_len`` bounds a match; ``lookahead``/``lookbehind`` say
    how many bytes around a match the validator reads (the stream masker holds that much)."""

    name: str
    pattern: re.Pattern[bytes]
    max_len: int
    # Every match contains one of these (prefilter.py); the finder runs only where they occur.
    triggers: tuple[Trigger, ...]
    find: Finder
    validate: Validator | None = None
    lookahead: int = 0
    lookbehind: int = 0
    # Open-ended tail (unterminated PEM only): used when the match's "body" group is absent.
    continuation: re.Pattern[bytes] | None = None
    # Where a match that may still become a finding can start, for the stream masker's hold
    # (stream._open_start): ``open_from(text, i)`` for each trigger occurrence ``i`` (the
    # starts the finder tries for it), or within ``open_tail`` bytes of the end (its trigger
    # has not fully arrived yet). None: the pattern itself is searched from every position.
    open_from: Callable[[bytes, int], Iterable[int]] | None = None
    open_tail: int = 0
    # The finder splits runs of ``pattern`` into candidates (credit-card digit groups): what it
    # finds depends on a run's neighbourhood, so a stream never cuts a run carelessly.
    runs: bool = False


# Findings and candidates are NamedTuples, not frozen dataclasses: a flood of trigger hits
# builds one of each per hit, and a frozen dataclass's __init__ (object.__setattr__ per field)
# was ~15% of the time of a 1 MiB "AKIA" flood (issue 16, session 5).
class Finding(NamedTuple):
    start: int
    end: int
    kind: str


class Candidate(NamedTuple):
    """A regex hit before/after validation; the stream masker also needs the rejected ones."""

    finding: Finding | None  # None when the validator rejected it
    match_start: int
    match_end: int
    rule: Rule
    open: bool = False  # an open-ended match (PEM BEGIN without END): rule.continuation applies


class SpanMatch:
    """A match built by a custom finder: the whole match and the ``s`` span, with the part
    of the ``re.Match`` interface that validators and ``scan`` use."""

    __slots__ = ("_text", "_whole", "_s")

    def __init__(self, text: bytes, start: int, end: int, s: tuple[int, int]) -> None:
        self._text, self._whole, self._s = text, (start, end), s

    def span(self, group: int | str = 0) -> tuple[int, int]:
        return self._whole if group == 0 else self._s

    def start(self, group: int | str = 0) -> int:
        return self.span(group)[0]

    def end(self, group: int | str = 0) -> int:
        return self.span(group)[1]

    def group(self, group: int | str = 0) -> bytes:
        a, b = self.span(group)
        return self._text[a:b]


# --- finders ------------------------------------------------------------------------------
# One Hyperscan pass (prefilter.py) finds where each rule's triggers occur; a finder runs the
# rule's exact pattern only there. The finders of the built-in rules are in detectors.py;
# ``anchored`` and ``at_offset`` are shared.


def anchored(pattern: re.Pattern[bytes], starts: Callable[[bytes, int], Iterable[int]]) -> Finder:
    """Matches of ``pattern`` at the starts ``starts(text, anchor_pos)`` proposes for each
    trigger occurrence at or after ``pos`` (first start that matches wins; matches of
    different anchors may overlap). Exactly the matches the same search over every
    occurrence found by ``bytes.find`` gives: the occurrences are the same positions."""

    offset = getattr(starts, "offset", None)
    if offset is not None:
        return _at_anchor(pattern, offset)

    def find(text: bytes, pos: int, anchors: list[int]) -> Iterator[re.Match[bytes]]:
        # Matches may overlap (an address glued to the end of another one): the findings are
        # merged later, so overlapping secrets are masked as one.
        tried: set[int] = set()
        for i in anchors[bisect.bisect_left(anchors, pos):]:
            for start in starts(text, i):
                if start < pos or start in tried:
                    continue
                tried.add(start)
                m = pattern.match(text, start)
                if m is not None:
                    yield m
                    break

    return find


def at_offset(offset: int) -> Callable[[bytes, int], Iterable[int]]:
    """The starts of an ``anchored`` rule whose match starts ``offset`` bytes before its
    trigger (``open_from`` of such rules too)."""
    def starts(text: bytes, i: int) -> tuple[int]:
        return (i - offset,)
    starts.offset = offset  # type: ignore[attr-defined]  # read by anchored: its fast path
    return starts


def _at_anchor(pattern: re.Pattern[bytes], offset: int) -> Finder:
    """``anchored(pattern, at_offset(offset))`` without its per-trigger Python work: one start per
    trigger occurrence, so distinct occurrences are distinct starts (the ``tried`` set of the
    general finder never skips one) and ``start < pos`` is ``i < pos + offset``. Measured:
    a 1 MiB "AKIA" flood (262 144 occurrences) ~25% faster (docs/benchmarks.md, session 5)."""
    match = pattern.match

    def find(text: bytes, pos: int, anchors: list[int]) -> Iterator[re.Match[bytes]]:
        for i in anchors[bisect.bisect_left(anchors, pos + offset):]:
            m = match(text, i - offset)
            if m is not None:
                yield m

    return find


# --- scanning and replacement ---------------------------------------------------------------

# Compiled trigger databases by rule set (keyed by the rules' identities; the entry keeps the
# rules, so an identity is never reused while its entry lives). A rule set whose triggers are
# all in an existing database reuses it (the built-in rules share the one of "all",
# compiled when detectors.py is imported): extra triggers only cost a little scan time.
_PREFILTERS: dict[tuple[int, ...], tuple[tuple[Rule, ...], Prefilter]] = {}
# By the identity of the rules tuple itself (kept in the entry, so never reused while it lives):
# a body is scanned 2-4 times through the same tuple, and building the key above and checking
# it rule by rule was ~5 µs a time - a quarter of masking a clean 1 KiB body (session 6).
_LAST_PREFILTER: dict[int, tuple[tuple[Rule, ...], Prefilter]] = {}


def prefilter_for(rules: tuple[Rule, ...]) -> Prefilter:
    """The compiled trigger database for a rule set (with ``prefilter.SHARED_TRIGGERS``): an
    existing one that has every trigger, or a new one."""
    last = _LAST_PREFILTER.get(id(rules))
    if last is not None and last[0] is rules:  # the same tuple object (one Masker's rules)
        return last[1]
    key = tuple(map(id, rules))
    entry = _PREFILTERS.get(key)
    if entry is not None and all(a is b for a, b in zip(entry[0], rules, strict=True)):
        if len(_LAST_PREFILTER) >= 256:
            _LAST_PREFILTER.clear()
        _LAST_PREFILTER[id(rules)] = (rules, entry[1])
        return entry[1]
    needed = {t for r in rules for t in r.triggers} | set(SHARED_TRIGGERS)
    pre = next((p for _, p in _PREFILTERS.values() if needed <= p.trigger_set), None)
    if pre is None:
        pre = Prefilter(sorted(needed, key=lambda t: (t.pattern, t.caseless)))
    if len(_PREFILTERS) >= 256:
        _PREFILTERS.clear()
        _LAST_PREFILTER.clear()
    _PREFILTERS[key] = (rules, pre)
    _LAST_PREFILTER[id(rules)] = (rules, pre)
    return pre


def scan(text: bytes, rules: tuple[Rule, ...], pos: int = 0, hits: Hits | None = None) -> list[Candidate]:
    """Every candidate of every rule in ``text[pos:]`` (lookbehinds still see before ``pos``).

    Findings are the validated candidates with the span of group ``s`` (whole match when the
    rule has none). A finding lying wholly inside an existing ``[MASKED:...]`` token is
    dropped: that is what makes masking idempotent. A rule runs only where its triggers
    occur (one Hyperscan pass over ``text`` for all rules, ``prefilter.py``); rejected
    candidates are only reported where a valid one could be (near a trigger).
    """
    if not rules or not text:
        return []
    if hits is None:
        hits = prefilter_for(rules).hits(text)
    tokens = [m.span() for m in MASK_TOKEN_RE.finditer(text, pos)] if hits.positions((MASKED,)) else []
    token_starts = [a for a, _ in tokens]
    out: list[Candidate] = []
    for rule in rules:
        anchors = hits.positions(rule.triggers)
        if not anchors:
            continue
        has_s = "s" in rule.pattern.groupindex
        validate, name, may_open = rule.validate, rule.name, rule.continuation is not None
        for m in rule.find(text, pos, anchors):
            ok = validate is None or validate(text, m)
            start, end = m.span("s") if has_s else m.span()
            if ok and tokens:
                k = bisect.bisect_right(token_starts, start) - 1  # the token starting at/before
                ok = k < 0 or end > tokens[k][1]
            a, b = m.span()
            out.append(Candidate(Finding(start, end, name) if ok else None, a, b, rule,
                                 may_open and m.group("body") is None))
    return out


def merge(findings: Iterable[Finding]) -> list[Finding]:
    """Sort and merge overlapping findings (the union is masked; the first one names it).

    A group of overlapping findings becomes one Finding when it ends (not one per member: a
    flood of overlapping secrets is one group of ~50 000 per MiB)."""
    merged: list[Finding] = []
    start = end = -1
    kind = ""
    for f in sorted(findings, key=lambda f: (f.start, -f.end)):
        if f.start < end:
            if f.end > end:
                end = f.end
            continue
        if end >= 0:
            merged.append(Finding(start, end, kind))
        start, end, kind = f
    if end >= 0:
        merged.append(Finding(start, end, kind))
    return merged


def mask_token(kind: str, secret: bytes, hash_key: bytes | None) -> bytes:
    """``[MASKED:kind]`` or, keyed, ``[MASKED:kind:<12 hex of HMAC-SHA256(key, secret)>]``."""
    if hash_key is None:
        return b"[MASKED:" + kind.encode() + b"]"
    digest = hmac.new(hash_key, secret, hashlib.sha256).hexdigest()[:12]
    return b"[MASKED:" + kind.encode() + b":" + digest.encode() + b"]"


def apply(text: bytes, findings: list[Finding], hash_key: bytes | None,
          counts: dict[str, int] | None = None, start: int = 0, end: int | None = None,
          strings: list[tuple[int, int]] | None = None) -> bytes:
    """``text[start:end]`` with the (merged, sorted) findings inside it replaced.

    With ``strings`` (JSON string spans, see ``string_spans``) a bare number outside any
    string (``{"pan": 4111111111111111}``) is replaced by a *quoted* token, so the document
    stays valid JSON. Other hits outside strings mean the text is not JSON: left unquoted.
    """
    end = len(text) if end is None else end
    starts = [a for a, _ in strings] if strings is not None else []
    parts: list[bytes] = []
    at = start
    for f in findings:
        parts.append(text[at : f.start])
        token = mask_token(f.kind, text[f.start : f.end], hash_key)
        if strings is not None and text[f.start : f.end].isdigit():
            k = bisect.bisect_right(starts, f.start) - 1
            if k < 0 or not strings[k][0] < f.start < strings[k][1]:
                token = b'"' + token + b'"'
        parts.append(token)
        if counts is not None:
            counts[f.kind] = counts.get(f.kind, 0) + 1
        at = f.end
    parts.append(text[at:end])
    return b"".join(parts)


# JSON strings never contain a raw line feed, so string state is per line: exact for JSON,
# NDJSON and SSE "data:" lines, and a stream can carry it across chunks as one flag.
_JSON_STRING_RE = re.compile(rb'"[^"\\\n]*(?:\\.[^"\\\n]*)*"')
_STRING_REST_RE = re.compile(rb'[^"\\\n]*(?:\\.[^"\\\n]*)*"')


def string_spans(text: bytes, in_string: bool = False) -> list[tuple[int, int]]:
    """Spans of the JSON strings in ``text`` (quotes included). ``in_string``: ``text`` starts
    inside a string, whose rest becomes a span starting at -1 (and running past the end if it
    does not close here)."""
    return _strings(text, in_string)[0]


# A line's text as far as it is closed strings and other bytes; stops at a quote that does not
# close on the line (possessive: linear, one C-level match instead of a Python loop per string).
_CLOSED_LINE_RE = re.compile(rb'(?:[^"\n]++|"[^"\\\n]*+(?:\\.[^"\\\n]*+)*+")*+')


def ends_in_string(text: bytes, in_string: bool = False) -> bool:
    """Whether the end of ``text`` is inside a JSON string (for a stream's next chunk).

    The same answer as ``string_spans``' scan: a string never spans a line feed, so only the
    text after the last one counts; there the end is inside a string when some quote does
    not close before it (after such a quote no later one closes either: its escapes pair up
    the same way).

    Without ``\\"`` or ``\\\\`` there, no escape decides a quote (inside a string a backslash
    escapes a letter, outside one it is a byte like any other): the end is inside a string when
    an odd number of quotes follow ``start`` - counted in C, where the regex ran at ~150 MB/s
    (a 64 KiB chunk of one-line JSON cost ~0.4 ms, half of streaming it; session 11)."""
    nl = text.rfind(b"\n")
    simple = text.find(b'\\"', nl + 1) < 0 and text.find(b"\\\\", nl + 1) < 0
    if nl >= 0:
        start = nl + 1
    elif in_string:  # the string open at the start closes at its first unescaped quote
        if simple:
            start = text.find(b'"') + 1
            if start == 0:
                return True
        else:
            rest = _STRING_REST_RE.match(text)
            if rest is None:
                return True
            start = rest.end()
    else:
        start = 0
    if simple:
        return text.count(b'"', start) % 2 == 1
    return _CLOSED_LINE_RE.match(text, start).end() < len(text)  # type: ignore[union-attr]  # matches empty


def _strings(text: bytes, in_string: bool) -> tuple[list[tuple[int, int]], bool]:
    spans: list[tuple[int, int]] = []
    pos = 0
    if in_string:
        m = _STRING_REST_RE.match(text)
        if m:
            spans.append((-1, m.end()))
            pos = m.end()
        elif (nl := text.find(b"\n")) < 0:
            return [(-1, len(text) + 1)], True
        else:
            pos = nl + 1  # never closed on its line: not a string after all (as a whole-body scan)
    spans.extend(m.span() for m in _JSON_STRING_RE.finditer(text, pos))
    # A quote after the last string that found no closing quote: open if no line feed follows.
    quote = text.rfind(b'"', spans[-1][1] if spans else pos)
    return spans, quote >= 0 and text.find(b"\n", quote) < 0


MAX_ROUNDS = 4
_TOKEN_BYTES = frozenset(b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789._%+-/=~@")


def adjacent(text: bytes, findings: Iterable[Finding], before: bytes = b"") -> bool:
    """True when a finding touches a token byte on either side.

    Replacing such a finding creates a new boundary (``]`` or ``[``) that can complete a
    match the original text did not have (an address glued to the end of a JWT), so one
    more scan is needed; otherwise one scan is final.
    """
    for f in findings:
        prev = text[f.start - 1] if f.start > 0 else (before[-1] if before else None)
        nxt = text[f.end] if f.end < len(text) else None
        if prev in _TOKEN_BYTES or nxt in _TOKEN_BYTES:
            return True
    return False


def mask_text(text: bytes, rules: tuple[Rule, ...], hash_key: bytes | None = None,
              counts: dict[str, int] | None = None, json_strings: bool = False) -> bytes:
    """Mask every finding of ``rules`` in ``text``; ``counts`` (kind -> n) is updated.

    Repeats (at most MAX_ROUNDS scans) while a replacement created a new token boundary, so
    the result is a fixed point: masking it again changes nothing. ``json_strings`` quotes
    tokens that replace bare JSON values (see ``apply``).
    """
    if not rules or not text:
        return text
    for _ in range(MAX_ROUNDS):
        findings = merge(c.finding for c in scan(text, rules) if c.finding is not None)
        if not findings:
            break
        again = adjacent(text, findings)
        # The string spans only matter for a finding of bare digits (``apply``): computing them
        # is a Python step per JSON string (~50 000 per MiB of API JSON), so only then.
        digits = json_strings and any(text[f.start : f.end].isdigit() for f in findings)
        text = apply(text, findings, hash_key, counts, strings=string_spans(text) if digits else None)
        if not again:
            break
    return text
