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

from .spans import MASK_TOKEN_RE, Finding, Rule, mask_text, mask_token, merge, scan, string_spans

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
_WRAPPED = re.compile(rb"(?:\\r\\n|\\n|\r?\n)([A-Za-z0-9+/_-]+={0,2})(?=\\[rn]|[\r\n\"]|\Z)")
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


def _first_run(text: bytes) -> int:
    """Where the first run with an upper-case letter starts, or -1 (the cheap common case)."""
    for m in _B64_RUN.finditer(text):
        # islower(): cased and no upper-case letter (hex digests, snake_case) - cheaper than a search
        if not m.group().islower() and _UPPER.search(text, m.start(), m.end()) is not None:
            return m.start()
    return -1


def _runs(text: bytes) -> list[tuple[int, int]]:
    """Spans of the base64 runs worth decoding (not inside a mask token)."""
    first = _first_run(text)
    if first < 0:
        return []
    tokens = [m.span() for m in MASK_TOKEN_RE.finditer(text)] if b"[MASKED:" in text else []
    ends = [b for _, b in tokens]
    out: list[tuple[int, int]] = []
    for m in _B64_RUN.finditer(text, first):
        a, b = m.span()
        if out and a < out[-1][1]:
            continue  # already part of a wrapped run
        if a > 0 and text[a - 1] == 0x5C:  # "\n" + base64 in a JSON string: the "n" is not data
            a += 1
        # Wrapped base64 (GitHub's contents API, MIME, PEM-like bodies): lines of a multiple
        # of 4 characters joined by a line break, raw or JSON-escaped, are one run.
        line = b - a
        while line % 4 == 0 and text[b - 1] != 0x3D and (c := _WRAPPED.match(text, b)):
            line, b = c.end() - c.start(1), c.end()
        if _UPPER.search(text, a, b) is None:
            continue
        k = bisect.bisect_right(ends, a)  # the first token ending after the run starts
        if b - a >= B64_MIN and (k == len(tokens) or tokens[k][0] >= b) and \
                text[a:b].strip(_HEX_UPPER):
            out.append((a, b))
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
        for a, b in _runs(joined):
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
    runs = _runs(text)
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
    view = canonical_json_strings(text) if json_strings else text
    masked = mask_text(view, rules, hash_key, found, json_strings=json_strings)
    masked = mask_base64(masked, rules, hash_key, found)
    if not found:
        return text
    if counts is not None:
        for kind, n in found.items():
            counts[kind] = counts.get(kind, 0) + n
    return masked


# --- binary ---------------------------------------------------------------------------------

# Printable ASCII, tab, CR and LF stay; every other byte becomes a line feed (which no detector
# but a PEM block crosses), so a scan of the copy sees exactly the printable runs, at the same
# offsets as in the body.
_PRINTABLE = bytes(c if c in (9, 10, 13) or 32 <= c < 127 else 10 for c in range(256))


def _fitted_token(kind: str, secret: bytes, hash_key: bytes | None) -> bytes:
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
                counts: dict[str, int] | None = None) -> bytes:
    """Mask secrets in the printable runs of a binary body in place, length preserving
    (base64 runs among them included, masked whole)."""
    if not rules or len(body) < RUN_MIN:
        return body
    view = body.translate(_PRINTABLE)
    findings = [c.finding for c in scan(view, rules) if c.finding is not None]
    runs = _runs(body)  # not the view: its line feeds stand for binary bytes, not line wraps
    if runs:
        kinds = _secret_kinds([_b64decode(body[a:b]) or b"" for a, b in runs], rules, NESTING)
        findings += [Finding(a, b, k) for (a, b), k in zip(runs, kinds, strict=True) if k]
    if not findings:
        return body
    out = bytearray(body)
    for f in merge(findings):
        out[f.start : f.end] = _fitted_token(f.kind, body[f.start : f.end], hash_key)
        if counts is not None:
            counts[f.kind] = counts.get(f.kind, 0) + 1
    return bytes(out)
