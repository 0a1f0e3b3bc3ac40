"""Decoded views of a body: what the agent gets after one obvious decoding step.

The detectors match bytes as they are on the wire. An agent reads more than that: it parses
JSON (``"\\u0041KIA..."`` *is* ``"AKIA..."`` once parsed), it base64-decodes fields (a
Kubernetes Secret's ``data``, ``SecretBinary``, credential blobs of many APIs), and it can dig
the printable strings out of a binary body. Each function here builds one such view, runs the
detectors over it and masks the wire text where the view had a secret:

* :func:`canonical_json_strings` rewrites every JSON string literal that uses a ``\\uXXXX`` or
  ``\\/`` escape into its canonical form (``json.dumps``: the only escapes left are ``\\"``,
  ``\\\\`` and control characters), so the ordinary scan then sees ``AKIA...``,
  ``"pass\\u0077ord"`` as ``"password"``, a secret key whose ``/`` were escaped ... The result
  is still JSON with the same meaning. **Decision**: only strings with such escapes are
  rewritten, and the masker keeps the rewrite only when something was masked (otherwise the
  original bytes go out untouched).
* :func:`mask_base64` finds runs of the base64 alphabets (standard and URL-safe, with or
  without padding) of at least ``B64_MIN`` characters, decodes them, and scans the decoded
  bytes (JSON escapes canonicalised; base64 nested once more, e.g. a JSON credentials file
  inside a Secret). **Decision**: a secret in the decoded bytes masks the *whole encoded run*
  with the token of the first detector that fired (``[MASKED:aws-access-key-id]``): masking
  part of an encoding would leave the rest decodable. All runs of a body are decoded and
  scanned in one joined scan (a scan has a fixed cost per detector). Wrapped base64 (lines
  of a multiple of 4 characters joined by a raw or JSON-escaped line break: GitHub's contents
  API, MIME) is decoded as one run and masked whole.
* :func:`mask_binary` scans a binary body's printable ASCII runs (``RUN_MIN`` = 8 bytes or
  more: every detector needs more than that) and masks findings **in place, length
  preserving**: the token padded with ``*``, or with its kind cut short (``[MASKED:aws-acc]``);
  both still read as tokens (``spans.MASK_TOKEN_RE``), so masking is idempotent. **Decision**:
  length preserving, because length-prefixed binary formats (protobuf, as Kubernetes serves
  it; tar; zip directories) stay parseable, and a buffered body keeps its Content-Length.

Every function returns its input object unchanged when it masked nothing, and updates
``counts`` (kind -> replacements) like ``spans.mask_text``.
"""

from __future__ import annotations

import binascii
import bisect
import json
import re
from collections.abc import Callable, Iterable, Iterator
from typing import NamedTuple

from ._stretches import first_run_candidate, first_upper_run, printable_runs, printable_tail
from .detectors import SLACK
from .prefilter import JSON_ESCAPE, MASKED
from .spans import MASK_TOKEN_RE, Finding, Rule, mask_text, mask_token, merge, prefilter_for, scan, string_spans

B64_MIN = 16  # shortest base64 run decoded (12 bytes; an AWS key id alone encodes to 28)
RUN_MIN = 8  # shortest printable run of a binary body that is scanned
NESTING = 2  # base64 inside base64 is decoded this many levels deep

# --- JSON escapes ---------------------------------------------------------------------------

# Escapes that decode to printable ASCII (what every detector matches), and "\/". Others
# (\u00e9, \ud83d ...) decode to characters no detector looks for: left as they are, which
# keeps ensure_ascii JSON (Python's default) off this path.
_NONCANONICAL_ESCAPE = re.compile(rb"\\(?:u00[2-7][0-9A-Fa-f]|/)")


def canonical_json_strings(text: bytes) -> bytes:
    """``text`` with each JSON string literal that escapes printable ASCII (``\\u0041``) or
    uses ``\\/`` rewritten in its canonical form (decoded, then re-encoded by ``json.dumps``).
    Strings that do not parse as JSON strings are left alone. Returns ``text`` itself when
    nothing changed."""
    if _NONCANONICAL_ESCAPE.search(text) is None:
        return text
    parts: list[bytes] = []
    at = 0
    for a, b in string_spans(text):
        literal = text[a:b]
        if _NONCANONICAL_ESCAPE.search(literal) is None:
            continue
        try:
            value = json.loads(literal)
        except ValueError:
            continue
        try:
            canonical = json.dumps(value, ensure_ascii=False).encode("utf-8")
        except UnicodeEncodeError:  # a lone surrogate (\ud800): keep non-ASCII escaped
            canonical = json.dumps(value).encode("ascii")
        if canonical == literal:
            continue
        parts.append(text[at:a])
        parts.append(canonical)
        at = b
    if not parts:
        return text
    parts.append(text[at:])
    return b"".join(parts)


# --- base64 ---------------------------------------------------------------------------------

# A run of either alphabet (a mixed run decodes as garbage and finds nothing), optional padding.
# Only runs with an upper-case letter are decoded (``_runs``): snake_case words
# ("content_block_delta") and lower-case hex digests are not base64 of anything (16 base64
# characters of real data without one: p < 2e-6). Checked per match rather than by a lookahead
# in the pattern, which made the engine twice as slow on a body with no run at all.
# A run may follow "=" (KEY=<base64> in an env file, ?token=<base64>: session 12 found those were
# never decoded); one followed by "=" and more of the alphabet is a key, not a value.
_B64_RUN = re.compile(rb"(?<![A-Za-z0-9+/_-])[A-Za-z0-9+/_-]{%d,}={0,2}(?![A-Za-z0-9+/_=-])" % B64_MIN)
_UPPER = re.compile(rb"[A-Z]")
_HEX_UPPER = b"0123456789ABCDEF"  # upper-case hex digests are not base64 either
# The next line of wrapped base64: a whole line (a line break, a closing quote or the end after
# it), so "data: QUJD\nname: x" in YAML or prose after a run never joins it.
_BREAK = rb"(?:\\r\\n|\\n|\r?\n)"  # raw or JSON-escaped
_LINE_END = rb"(?=\\[rn]|[\r\n\"]|\Z)"
_WRAPPED = re.compile(_BREAK + rb"([A-Za-z0-9+/_-]+={0,2})" + _LINE_END)
# Any number of such lines of a multiple of 4 characters (no padding) in one C-level match:
# matching line by line cost ~1.7 µs a line, 30 of the 60 ms per MiB of streaming a wrapped
# base64 file (session 11).
_WRAPPED_FULL = re.compile(rb"(?:" + _BREAK + rb"(?:[A-Za-z0-9+/_-]{4})++" + _LINE_END + rb")*+")
_TO_STANDARD = bytes.maketrans(b"-_", b"+/")
_SEPARATOR = b"\n\x00\n"  # between decoded runs in the joined scan: no detector crosses it


def _b64decode(run: bytes) -> bytes | None:
    if b"\n" in run or b"\\" in run:  # a wrapped run (see _runs): drop the line breaks
        run = run.replace(b"\\r", b"").replace(b"\\n", b"").replace(b"\r", b"").replace(b"\n", b"")
    data = run.rstrip(b"=").translate(_TO_STANDARD)
    if len(data) % 4 == 1:
        data = data[:-1]  # one stray character (a run glued to a word): decode the rest
    try:
        return binascii.a2b_base64(data + b"=" * (-len(data) % 4), strict_mode=False)
    except binascii.Error:
        return None


def _run_matches(text: bytes, pos: int, skip: list[int] | None = None) -> Iterator[re.Match[bytes]]:
    """The matches of ``_B64_RUN`` at or after ``pos`` that :func:`_runs` may keep, in order.

    A match is a maximal stretch of the alphabet (its lookbehind and lookahead refuse a
    neighbour of the alphabet) of ``B64_MIN`` characters or more, plus padding: so it starts
    only where such a stretch starts. ``_runs`` keeps a run holding an upper-case letter, and a
    stretch without one only as the first line of wrapped base64 whose later lines have one
    (a line length multiple of 4, then a line break); :func:`first_run_candidate` finds the
    stretches that are either, 64 bytes at a time in C, and the others are never looked at.
    Measured (issue 16, session 11): a body with one base64 run early made Python look at every
    stretch of 16+ after it ("content_block_delta" in each event of an SSE stream: ~14 000
    per MiB, ~3.6 µs each, 50 ms per MiB); see docs/masking.md, "Session 11". ``skip``:
    ``skip[0]``, set by the consumer, is where the search goes on (the caller's matches
    starting before it are of no use)."""
    while True:
        if skip is not None:
            pos = max(pos, skip[0])
        start = first_run_candidate(text, pos)
        if start < 0:
            return
        m = _B64_RUN.match(text, start)
        if m is not None:
            yield m
        pos = start + 1  # the stretch starting at `start` is skipped, and so is its padding


def _first_run(text: bytes) -> int:
    """Where the first run with an upper-case letter starts, or -1 (the cheap common case).

    Such a run is a stretch of the alphabet of ``B64_MIN`` characters or more holding an
    upper-case letter, which :func:`first_upper_run` finds 64 bytes at a time (``_stretches.c``:
    ~0.2-0.5 ms per MiB of prose, JSON or SSE, where Hyperscan's window pattern took 1.8-2.4
    ms); it is a run when ``_B64_RUN`` matches there (not followed by ``=`` and more)."""
    start = first_upper_run(text)
    while start >= 0 and _B64_RUN.match(text, start) is None:
        start = first_upper_run(text, start + 1)  # the stretch starting at `start` is skipped
    return start


def _wrapped_end(text: bytes, a: int, b: int) -> int:
    """Where a run whose first line is ``text[a:b]`` ends: the line after a line of a multiple
    of 4 characters without padding joins it, and so on (full lines while they come, then one
    more line of any length)."""
    if (b - a) % 4 or text[b - 1] == 0x3D:
        return b
    b = _WRAPPED_FULL.match(text, b).end()  # type: ignore[union-attr]  # matches empty
    last = _WRAPPED.match(text, b)
    return b if last is None else last.end()


def _runs(text: bytes, rules: tuple[Rule, ...]) -> list[tuple[int, int]]:
    """Spans of the base64 runs worth decoding (not inside a mask token)."""
    first = _first_run(text)
    if first < 0:
        return []
    masked = prefilter_for(rules).hits(text).positions((MASKED,))  # cached if mask_text scanned this text
    tokens = [m.span() for m in MASK_TOKEN_RE.finditer(text, masked[0])] if masked else []
    ends = [b for _, b in tokens]
    out: list[tuple[int, int]] = []
    skip = [first]  # after a wrapped run: its lines are not searched again
    for m in _run_matches(text, first, skip):
        a, b = m.span()
        if out and a < out[-1][1]:
            continue  # already part of a wrapped run
        if a > 0 and text[a - 1] == 0x5C:  # "\n" + base64 in a JSON string: the "n" is not data
            a += 1
        # Wrapped base64 (GitHub's contents API, MIME, PEM-like bodies): lines of a multiple
        # of 4 characters joined by a line break, raw or JSON-escaped, are one run.
        b = _wrapped_end(text, a, b)
        if _UPPER.search(text, a, b) is None:
            # Every later line of this run joins on to the same end with a part of its bytes:
            # no upper-case letter either. Searching from each of them was quadratic (a base64
            # run, then lower-case lines of 60: 1.4 s for 128 KiB; session 11).
            skip[0] = b
            continue
        k = bisect.bisect_right(ends, a)  # the first token ending after the run starts
        if b - a >= B64_MIN and (k == len(tokens) or tokens[k][0] >= b) and \
                text[a:b].strip(_HEX_UPPER):
            out.append((a, b))
            skip[0] = b  # the matches of the lines joined into this run start before b
    return out


def _secret_kinds(blobs: list[bytes], rules: tuple[Rule, ...], depth: int) -> list[str | None]:
    """For each decoded blob, the kind of the first secret in it (or in base64 nested in it).

    One joined scan for all blobs, and one more for all the base64 nested in them."""
    kinds: list[str | None] = [None] * len(blobs)
    if not blobs:
        return kinds
    joined = _SEPARATOR.join(blobs)
    if _NONCANONICAL_ESCAPE.search(joined) is not None:  # rare: offsets change, blob by blob
        blobs = [canonical_json_strings(b) for b in blobs]
        joined = _SEPARATOR.join(blobs)
    starts, pos = [], 0
    for blob in blobs:
        starts.append(pos)
        pos += len(blob) + len(_SEPARATOR)
    for f in merge(c.finding for c in scan(joined, rules) if c.finding is not None):
        i = bisect.bisect_right(starts, f.start) - 1
        if kinds[i] is None:
            kinds[i] = f.kind
    if depth > 1:
        owners, nested = [], []
        for a, b in _runs(joined, rules):
            i = bisect.bisect_right(starts, a) - 1
            if kinds[i] is None and (d := _b64decode(joined[a:b])):
                owners.append(i)
                nested.append(d)
        for i, kind in zip(owners, _secret_kinds(nested, rules, depth - 1), strict=True):
            if kind is not None and kinds[i] is None:
                kinds[i] = kind
    return kinds


def mask_base64(text: bytes, rules: tuple[Rule, ...], hash_key: bytes | None = None,
                counts: dict[str, int] | None = None) -> bytes:
    """Mask every base64 run of ``text`` whose decoded bytes hold a secret (whole run)."""
    if not rules or len(text) < B64_MIN:
        return text
    runs = _runs(text, rules)
    if not runs:
        return text
    decoded = [_b64decode(text[a:b]) or b"" for a, b in runs]
    kinds = _secret_kinds(decoded, rules, NESTING)
    if not any(kinds):
        return text
    parts: list[bytes] = []
    at = 0
    for (a, b), kind in zip(runs, kinds, strict=True):
        if kind is None:
            continue
        parts += (text[at:a], mask_token(kind, text[a:b], hash_key))
        at = b
        if counts is not None:
            counts[kind] = counts.get(kind, 0) + 1
    parts.append(text[at:])
    return b"".join(parts)


def mask_decoded(text: bytes, rules: tuple[Rule, ...], hash_key: bytes | None = None,
                 counts: dict[str, int] | None = None, json_strings: bool = False) -> bytes:
    """The whole text pipeline: JSON escapes canonicalised (``json_strings``), the detectors,
    then base64 runs. Returns ``text`` itself when nothing was masked."""
    if not rules or not text:
        return text
    found: dict[str, int] = {}
    escaped = json_strings and prefilter_for(rules).hits(text).positions((JSON_ESCAPE,))  # the scan mask_text reuses
    view = canonical_json_strings(text) if escaped else text
    masked = mask_text(view, rules, hash_key, found, json_strings=json_strings)
    masked = mask_base64(masked, rules, hash_key, found)
    if not found:
        return text
    if counts is not None:
        for kind, n in found.items():
            counts[kind] = counts.get(kind, 0) + n
    return masked


# --- binary ---------------------------------------------------------------------------------

# Every other byte becomes a line feed (which no detector but a PEM block crosses), as in a
# view of the whole body: a finding stays within its run, as in a text body.
_PRINTABLE = bytes(c if c in (9, 10, 13) or 32 <= c < 127 else 10 for c in range(256))
_PRINTABLE_BYTES = frozenset(c for c in range(256) if _PRINTABLE[c] == c)  # those it keeps (C_PRINT)
# Before each run its LEAD bytes are scanned too (short runs, gaps as line feeds): a label in a
# short run (an SSN's "tin:", detectors.SSN_CONTEXT_BYTES) or a JSON key that says the value is
# not one reads as it does in the whole body. Longer lookbehinds (OAuth's token_type, 512 bytes)
# see the neighbouring runs closer together than in the body, so no fewer of them.
LEAD = 32


def _joined(whole: bytes, pieces: list[tuple[int, int]]) -> tuple[bytes, Callable[[int], int]]:
    """The pieces of ``whole`` joined by a NUL, and a map of its offsets to ``whole``'s. A NUL
    is what the gap between them was (no line wrap joins base64 lines across it); in the
    detectors' view (``_PRINTABLE``) it is a line feed, as every byte of a gap is in a view of
    the whole body."""
    joined = b"\x00".join([whole[start:end] for start, end in pieces])
    starts: list[int] = []  # of each piece in ``joined``: computed when first asked (a download's
    # random runs seldom hold a candidate: ~80 runs per 256 KiB batch, 4 us of its scan)

    def at_whole(i: int) -> int:
        if not starts:
            at = 0
            for start, end in pieces:
                starts.append(at)
                at += end - start + 1
        k = bisect.bisect_right(starts, i) - 1
        return pieces[k][0] + i - starts[k]

    return joined, at_whole


class BinaryScan(NamedTuple):
    """What :func:`binary_scan` found, at the offsets of the body (not its context)."""

    findings: list[Finding]  # merged; a base64 run with a secret inside is one, whole
    runs: list[tuple[int, int]]  # every base64 run decoded (a stream cuts them only aligned)
    tail: int  # where the printable bytes at the body's end start (len(body): none)
    # The earliest start of a match that more bytes may still change: an open PEM block, or one
    # a validator rejected before the context it reads after the match arrived (OAuth's
    # token_type); len(body): none. A stream holds it, as it holds the tail.
    undecided: int


def binary_scan(body: bytes, rules: tuple[Rule, ...], context: bytes = b"", *,
                phases: bool = False) -> BinaryScan:
    """The findings in the printable runs of ``RUN_MIN`` bytes or more of a binary body, base64
    runs among them decoded. ``context``: the bytes before ``body`` (a stream's, already sent),
    read for lookbehinds only. ``phases``: ``body`` may start inside a base64 run that began
    before it (a ranged response, widened by 64 KiB: a run longer than that), so a run at its
    first byte is decoded at each of the four alignments (``_leading_phases``) - decoded only
    from there, three in four cuts read noise and the secret in it went out (session 13).

    Only the runs (and their ``LEAD``) are scanned, joined (``_joined``), where they are found
    by ``_stretches.printable_runs`` (SSE2): random binary holds ~300 runs per MiB, so its scan
    is a few KiB of text instead of a view of the whole body and its base64 search (5 -> 0.6 ms
    per MiB; session 12, which made streamed binary bodies scanned at all). A body that is
    mostly text is a few long runs, scanned as text."""
    tail = printable_tail(body)
    bounds = printable_runs(body, RUN_MIN, lead=LEAD)
    # The context matters only to a run (or its lead) at the body's first bytes, or one that
    # crosses into it: otherwise the body alone is scanned - no copy of context + body (a
    # download's 256 KiB batch: ~25 us a copy, cold in the cache).
    if context and body and ((bounds and bounds[0] == 0)
                             or (context[-1] in _PRINTABLE_BYTES and body[0] in _PRINTABLE_BYTES)):
        whole, off = context + body, len(context)
        bounds = printable_runs(whole, RUN_MIN, lead=LEAD)
    else:
        whole, off = body, 0
    if not rules or not bounds:
        return BinaryScan([], [], tail, len(body))
    pieces = list(zip(bounds[::2], bounds[1::2], strict=True))  # spans of ``whole`` scanned, apart
    text_raw, at_whole = _joined(whole, pieces)
    text = text_raw.translate(_PRINTABLE)  # what the detectors scan (see _joined)
    findings = []
    undecided = len(body)
    for c in scan(text, rules):
        f = c.finding
        if f is not None:
            end = at_whole(f.end - 1) + 1 - off
            if end > 0:  # not wholly in the context (sent already)
                findings.append(Finding(max(0, at_whole(f.start) - off), end, f.kind))
        if c.open or (f is None and c.rule.lookahead and len(text) - c.match_end < c.rule.lookahead + SLACK):
            undecided = min(undecided, max(0, at_whole(c.match_start) - off))
    # Base64 runs of the body alone: not of the context, which would decode a run that a stream
    # cut (aligned) from the wrong start.
    if pieces[0][0] >= off:  # (random binary: the context rarely ends in a run)
        joined, at_own = text_raw, at_whole
    else:
        joined, at_own = _joined(whole, [(max(start, off), end) for start, end in pieces if end > off])
    runs = [(at_own(a) - off, at_own(b - 1) + 1 - off) for a, b in _runs(joined, rules)]
    if runs:
        blobs = [_b64decode(body[a:b]) or b"" for a, b in runs]
        shifted = _leading_phases(body, runs[0][1]) if phases and runs[0][0] == 0 else []
        kinds = _secret_kinds(blobs + [_b64decode(body[a:b]) or b"" for a, b in shifted], rules, NESTING)
        findings += [Finding(a, b, k) for (a, b), k in zip(runs, kinds[: len(runs)], strict=True) if k]
        findings += [Finding(0, b, k) for (_, b), k in zip(shifted, kinds[len(runs):], strict=True) if k]
    return BinaryScan(merge(findings), runs, tail, undecided)


def _leading_phases(body: bytes, end: int) -> list[tuple[int, int]]:
    """The other three alignments of a base64 run at ``body[0:end]`` that may have begun
    before the body (``binary_scan``'s ``phases``): each as a span to decode. A wrapped run
    cut inside a line: its lines are whole multiples of 4, so ``end % 4`` bytes are the cut
    line's rest - from there the line joins the next ones (``_wrapped_end``), which a run
    whose first line is not a multiple of 4 never does."""
    spans = [(k, end) for k in (1, 2, 3) if end - k >= B64_MIN]
    cut = end % 4
    if cut:
        wrapped = _wrapped_end(body, cut, end)
        if wrapped > end:
            spans = [(k, wrapped if k == cut else b) for k, b in spans]
    return spans


def mask_in_place(out: bytearray, original: bytes, findings: Iterable[Finding], hash_key: bytes | None,
                  counts: dict[str, int] | None = None) -> None:
    """Each finding of ``original`` replaced in ``out`` by a :func:`fitted_token`."""
    for f in findings:
        out[f.start : f.end] = fitted_token(f.kind, original[f.start : f.end], hash_key)
        if counts is not None:
            counts[f.kind] = counts.get(f.kind, 0) + 1


def fitted_token(kind: str, secret: bytes, hash_key: bytes | None) -> bytes:
    """A mask token exactly ``len(secret)`` long: padded with ``*``, or with the kind (and
    hash) cut short; below 9 bytes (``[MASKED:]``) only ``*`` fit."""
    n = len(secret)
    token = mask_token(kind, secret, hash_key)
    if len(token) <= n:
        return token.ljust(n, b"*")
    if n >= 9:  # the kind cut short, or whole and padded (a keyed token too long, a short kind)
        return (b"[MASKED:" + kind.encode()[: n - 9] + b"]").ljust(n, b"*")
    return b"*" * n


def mask_binary(body: bytes, rules: tuple[Rule, ...], hash_key: bytes | None = None,
                counts: dict[str, int] | None = None, *, phases: bool = False) -> bytes:
    """Mask secrets in the printable runs of a binary body in place, length preserving
    (base64 runs among them included, masked whole; ``phases``: see :func:`binary_scan`)."""
    if not rules or len(body) < RUN_MIN:
        return body
    findings = binary_scan(body, rules, phases=phases).findings
    if not findings:
        return body
    out = bytearray(body)
    mask_in_place(out, body, findings, hash_key, counts)
    return bytes(out)
