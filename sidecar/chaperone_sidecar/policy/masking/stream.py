"""Streaming masker for chunked and SSE bodies: chunks in, masked chunks out.

A secret split across chunks must still be masked, so the masker holds back the tail of what
it has received until that tail can no longer be part of a secret. What is held:

* **Only a tail that could still become a match.** For every rule the masker asks where the
  earliest match could start that reaches the end of the data - a match already touching the
  end (it may grow), or a *prefix* of one (``sec`` of ``secret_key=``, a trailing word that
  may be the local part of an address, an ``ey...`` that may be a JWT). That is the rule's
  pattern followed by ``\\Z`` under the ``regex`` module's partial matching (``_open_start``),
  which is what ``re`` lacks. Everything before the earliest such start is decided now:
  prose flows word by word, SSE events and lines flow as they arrive, and an LLM's text
  deltas are held only while their tail may still be a secret. (Before, a line without a line
  feed was held up to 32 KiB.) A rule whose pattern the ``regex`` module cannot compile falls
  back to the old bound for that rule: the last line feed (no detector but ``private-key``
  matches across one), or ``WINDOW`` before the end of a longer line.
* The search is cheap: a match is at most ``Rule.max_len`` long, so only the last
  ``max_len`` bytes can hold its start, and a position found not to start an open match never
  does later (more data only extends the text), so each call searches from where the last
  one stopped. Every match is bounded (``Rule.max_len``): the longest is a ``jwt`` (~11
  KiB), then the OAuth bearer rule (8 KiB + 512 bytes of context it reads after the token), a
  ``secret-json-key`` value (4096 characters, ~8.4 KiB escaped) and ``private-key`` (8 KiB
  body + markers); held data stays below the longest match plus one chunk.
* A candidate that reaches the end of the data (it may still grow, or its validator needs
  bytes that have not arrived) holds everything from its start; so does a PEM BEGIN marker
  until its END arrives or ``PEM_BODY_MAX`` has passed.

PEM blocks longer than that: with no END within ``PEM_BODY_MAX`` (8 KiB) after BEGIN, the
marker and the key material after it become one ``[MASKED:private-key]`` and the masker
stays in *continuation* mode, dropping further key material (base64, whitespace, escaped
newlines) across any number of chunks until a byte that cannot be key material (the ``-`` of
the END marker, a quote ...). The END line itself passes. The whole-body masker does the same
with the same input: a stream masks exactly like the buffered body, whatever the chunking
(property-tested), except that keyed hash tokens of such over-long blocks differ.

Findings are masked in place as soon as they are final; when a replacement leaves a token
glued to other token characters the window is scanned again (as ``spans.mask_text`` does).
In JSON mode (JSON, NDJSON, SSE) JSON string state is carried across chunks (strings never
contain a raw LF, so it resets per line), and a bare number replaced by a token is quoted.

**Decoded views** (what ``decoded.py`` gives a buffered body, issue 11):

* *JSON escapes* (JSON mode): escapes of printable ASCII (``\\u0041``) and ``\\/`` are decoded
  on the way in, before the detectors, so ``"\\u0041KIA..."`` is seen as the key it is - also
  an escape cut between two chunks (at most ``\\u00X`` waits for the next one). **Decision**:
  a stream goes out in that canonical form whether or not anything was masked (a buffered
  body keeps its bytes unless masked): holding every string until it closes, to put its
  original bytes back, would hold a long string whole. The JSON means the same; only
  ``\\u0022`` / ``\\u005c`` stay escaped (as ``\\"`` / ``\\\\``).
* *Base64 runs* (any text stream): the masked output passes a last stage that holds a run
  which may still continue at its end (base64 characters, raw or JSON-escaped line breaks of
  wrapped base64) and scans every complete run with ``decoded.mask_base64`` (a secret inside
  masks the whole run, as in a buffered body). A run longer than ``B64_HOLD`` (32 KiB) is
  scanned where it stands and released in steps that keep its last ``B64_KEEP`` (16 KiB, more
  than any encoded secret) and stay aligned to 4 characters or whole lines, so memory stays
  bounded and no secret straddles what went out unseen; of such a run only the part from
  the secret on is masked.

**Binary streams** (a non-text type whose first bytes are not UTF-8; ``_binary``, session 12 -
they passed through unscanned, so a tar of text files or a Latin-1 log over 1 MiB reached the
agent unmasked): the printable runs are masked in place, length preserving, exactly as
``decoded.mask_binary`` masks the whole body (property-tested over any cuts). Held: the printable
bytes at the end, which may still become (part of) a secret; of a run longer than
``BINARY_LONG`` (text in a tar) all but the last ``BINARY_KEEP`` bytes go, never through a finding
that may still grow nor unaligned through a base64 run; a base64 run or PEM block masked there
goes on being masked to its end (``_sealing``). Random binary costs ~0.65 ms per MiB in 64 KiB
chunks (``_stretches.printable_runs`` finds the ~300 runs per MiB; only they are scanned).

Credit-card runs of digit groups are held whole up to ``RUN_HOLD`` (4 KiB); a longer run (an
agent-chosen prefix) is cut between groups well before the end - cards are windows of whole
groups judged on their own, so the scan resumes there exactly as a whole-body scan.

Field rules need a whole JSON document and are not applied here (``Masker.can_stream`` tells
the caller when to buffer instead). A body with a Content-Encoding is decoded on the way in
(capped against bombs) and emitted *identity-encoded*: the caller drops Content-Encoding and
Content-Length from the forwarded headers.
"""

from __future__ import annotations

import bisect
import codecs
import functools
import re
from collections.abc import Callable, Iterable

import regex

from ._stretches import printable_tail
from .decoded import binary_scan, mask_base64, mask_in_place
from .detectors import ALL, resolve_rules
from .encoding import BodyTooLarge, DecodeError, MaskingError, StreamDecoder
from .spans import (
    MAX_ROUNDS,
    Finding,
    Rule,
    adjacent,
    apply,
    ends_in_string,
    mask_token,
    merge,
    prefilter_for,
    scan,
    string_spans,
)
from .wide_text import HEAD, Transcoder, codec_of

WINDOW = 32 * 1024
CONTEXT = 1024  # emitted bytes kept for lookbehinds and validator context (SSN label, OAuth)
SLACK = 4  # bytes the lookahead assertions read past a match end (at most 2 today)
SNIFF_BYTES = 512
# Held this much after a drain (a flood of overlapping matches is one finding until it ends: an
# AKIA or a@b.c flood), the next drain waits until the held data has doubled. Each drain scans
# all that is held, so draining per chunk was quadratic: a 1 MiB AKIA flood in 64 KiB chunks
# 7.1 s, 2 MiB ~28 s; streamed LLM text of "AKIA" deltas (4 bytes a chunk) 5.1 s for 8 KiB
# (session 11). Doubling makes it linear. A normal stream holds less (a word, an open match at
# the end); one holding a long open match (a JWT being streamed) releases what follows it at
# the next doubling instead of the next chunk - later, never different.
FLOOD_HOLD = 1024
# What a stream may hold between chunks. A flood of overlapping matches is held until it ends
# (it is one finding: no byte of it may go out), and an upstream - one the agent can write to,
# such as a bucket - could send one without end: the sidecar held it all (2 MiB of "AKIA" in
# 64 KiB chunks: 2 MiB held, nothing sent, 3.9 s of CPU on the event loop; session 13). Past
# this the stream fails (``BodyTooLarge``: Mask withholds the rest and kills the flow) - what a
# buffered body may be by default (``chaperone_mask_buffer``), 4x what any other stream holds
# (measured: a 256 KiB download batch, 16-32 KiB of a base64 run, 2.5 KiB of digit groups).
MAX_HELD = 1 << 20
RUN_HOLD = 4096  # a digit-group run up to this long is held whole when it crosses a cut
RUN_MARGIN = 64  # a longer one is cut this far (or more) before the cut, between groups
RUN_BACKOFF = 2048  # a cut is moved back to the start of a word at most this far
# Bytes of the tokens detectors match (spans.adjacent): a cut between two of them splits a word.
_TOKEN_BYTES = frozenset(b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789._%+-/=~@")


# A binary stream holds the printable bytes at its end (a run that may continue); of one longer
# than BINARY_LONG (text in a tar, a base64 blob) all but the last BINARY_KEEP bytes go: more than
# any secret (jwt ~11 KiB), encoded (~15 KiB), so one that starts before the cut is all there.
BINARY_LONG = 64 * 1024
BINARY_KEEP = 16 * 1024
# What a binary stream of known length (a download) gathers before each scan: the scan costs
# ~20 us a call whatever the size, and mitmproxy hands a download over in 16-64 KiB chunks -
# random bytes in 16 KiB chunks cost 1.4 ms per MiB, gathered 0.3 (session 12). A stream of
# unknown length (a watch, a live protocol) is scanned chunk by chunk: it may wait on the next.
BINARY_BATCH = 256 * 1024
B64_HOLD = 32 * 1024  # a base64 run held longer than this is scanned in steps (see _base64)
B64_KEEP = 16 * 1024  # ... keeping this much of it for the next step
# What a held base64 run may consist of: its alphabets, padding, raw and escaped line breaks.
_RUN_BYTES = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/_-=\r\n\\"
# Run bytes -> "a", others -> " ", for a long run at the end: ``bytes.rstrip`` with a set of 68
# bytes looks each byte up in the set (~9 ns a byte: 0.6 ms for a 64 KiB chunk of base64), a
# translate of the whole buffer then one byte ~2.5 ns - but the common run at the end is short.
_RUN_CLASS = bytes(0x61 if c in _RUN_BYTES else 0x20 for c in range(256))
# What a PEM block masked whole may go on with (its key material, see detectors._PEM_RUN), as
# the same kind of class.
_PEM_CLASS = bytes(0x61 if c in _RUN_BYTES + b" \t:,." else 0x20 for c in range(256))
# What a held stretch of run bytes may start with before its run: line breaks (raw or escaped),
# and the key of a KEY=<base64> (decoded._B64_RUN starts the run after the "="). A long run's
# steps are aligned to the run, not to these.
_RUN_LEAD = re.compile(rb"(?:\\[rn]|[\r\n])*(?:[A-Za-z0-9+/_-]{0,256}=+(?=[A-Za-z0-9+/_-]))?")
_ESCAPES = re.compile(rb"\\\\|\\(?:u00[2-7][0-9A-Fa-f]|/)")
_PARTIAL_ESCAPE = re.compile(rb"(?:u[0-9A-Fa-f]{0,3})?")


_BREAKS = (b"\\r\\n", b"\\n", b"\r\n", b"\n", b"\\r", b"\r", b"\\")  # at the end; cut ones too
_LINE_BREAK = re.compile(rb"\\r\\n|\\n|\r\n|\n")


def _run_hold(buf: bytes) -> int:
    """Where a base64 run that may still continue starts at the end of ``buf`` (``len(buf)``:
    none). A run touching the end may grow; one followed by a line break only continues as
    wrapped base64 (``decoded._runs``), i.e. when its last line has a multiple of 4 characters
    and no padding. A run followed by a lone backslash is held too: cut there, the run would be
    decoded with the backslash glued to it (and judged clean), while whole it ends in ``\\n``."""
    window = buf[-256:]
    kept = len(window.rstrip(_RUN_BYTES))
    if kept or len(window) == len(buf):
        start = len(buf) - len(window) + kept
    else:  # a run longer than the window
        start = len(buf.translate(_RUN_CLASS).rstrip(b"a"))
    if start == len(buf):
        return start
    tail = buf[start:]
    brk = next((b for b in _BREAKS if tail.endswith(b)), None)
    if brk is None or brk == b"\\":  # a lone backslash: what it escapes has not arrived
        return start
    last = _LINE_BREAK.split(tail[: len(tail) - len(brk)])[-1]
    return start if last and len(last) % 4 == 0 and not last.endswith(b"=") else len(buf)


def _unsent(masked: bytes, original: bytes, sent: int) -> bytes:
    """What of ``masked`` (``original`` after ``mask_base64``) is still to go out when the
    first ``sent`` bytes of ``original`` - the start of its first run - are out already: the
    rest, or the whole masked text when that run was masked (its token follows the part that
    went out, which ``_releasable`` proved to decode to bytes no secret includes)."""
    if not sent:
        return masked
    return masked[sent:] if masked[:sent] == original[:sent] else masked


RELEASE_MAX = 64  # a held run longer than this is held until it ends (the test is per byte value)
_B64_CHARS = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/_-"
_SIXTETS = {c: i for i, c in enumerate(b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/")} | {
    ord("-"): 62, ord("_"): 63}  # decoded._b64decode reads the URL-safe alphabet the same way
_NESTED_RUN = re.compile(rb"[A-Za-z0-9+/_-]{16}")


def _releasable(run: bytes, rules: tuple[Rule, ...]) -> int:
    """How many leading characters of ``run`` - base64 characters at the end of a stream, a
    run that may still continue - can go out before the run ends, without revealing one bit
    of a secret that the run, once whole, may turn out to encode.

    The base64 view (``decoded.mask_base64``) decodes a run from its first character and
    masks the whole run when the decoded bytes hold a secret. ``q`` characters reveal the
    first ``6q`` bits of the decoding. What has arrived fixes the first ``6k // 8`` bytes;
    when it also fixes the 6 high bits of the next one, the 4 values that byte can take are
    tried (every byte from 0x80 up matches the ASCII patterns alike), otherwise the next byte
    is taken as any byte (one test instead of 16 or 64 per delta). A byte can go
    out (its bits) only if, for every such value, no rule has a match - complete, or partial
    up to the end (``regex`` partial matching, as ``_open_start``) - starting at or before it,
    no base64 run that could be nested in the decoding (16 characters, or a run reaching the
    end) starts at or before it, and no backslash is anywhere (a JSON escape may rewrite what
    follows it, ``decoded.canonical_json_strings``). A rule's pattern is a superset of what
    its finder reports, so a match starting later is all a later finding can be: the
    released characters decode to bytes before any secret the whole run holds (the same
    guarantee as the steps of a long run, ``B64_HOLD``). ``Hello`` decodes to
    ``1d e9 65`` and a byte in ``a0..a3``: nothing can start there, so it goes out at once.
    """
    k = len(run)
    bits = 0
    for c in run:
        bits = bits << 6 | _SIXTETS[c]
    full, part = divmod(6 * k, 8)
    known = (bits >> part).to_bytes(full, "big")
    if part != 6:  # 0, 2 or 4 bits of the next byte: taken as any byte (one test, not 16 or 64)
        block = min(_first_secret_byte(known, rules, full), full)
        return min(k, 8 * block // 6)
    low = (bits & 0x3F) << 2
    block = full + 1
    for v in dict.fromkeys(min(v, 0x80) for v in range(low, low + 4)):  # bytes >= 0x80 match alike
        block = min(block, _first_secret_byte(known + bytes((v,)), rules, block))
        if block == 0:
            return 0
    return k if block > full else min(k, 8 * block // 6)


def _first_secret_byte(text: bytes, rules: tuple[Rule, ...], limit: int) -> int:
    """The first index of ``text`` (below ``limit``) where a secret, or a nested run, may
    start with more data; ``limit`` when none does (see ``_releasable``)."""
    if b"\\" in text:
        return 0
    block = limit
    for rule in rules:
        pattern = _open_pattern(rule.pattern)
        if pattern is None:
            return 0
        m = pattern.search(text, 0, partial=True)
        if m is not None:
            block = min(block, m.start())
        m2 = rule.pattern.search(text)  # a complete match that does not reach the end
        if m2 is not None:
            block = min(block, m2.start())
    tail = len(text.rstrip(_B64_CHARS))
    if tail < len(text):  # a run reaching the end may still become a nested one
        block = min(block, tail)
    nested = _NESTED_RUN.search(text)
    if nested is not None:
        block = min(block, nested.start())
    return block


def _canonical_escape(m: re.Match[bytes]) -> bytes:
    esc = m.group()
    if esc == b"\\\\":
        return esc  # an escaped backslash: what follows it is not an escape
    if esc == b"\\/":
        return b"/"
    c = int(esc[2:], 16)
    return b'\\"' if c == 0x22 else b"\\\\" if c == 0x5C else bytes((c,))


_REGEX_FLAGS = ((re.IGNORECASE, regex.IGNORECASE), (re.MULTILINE, regex.MULTILINE),
                (re.DOTALL, regex.DOTALL), (re.VERBOSE, regex.VERBOSE), (re.ASCII, regex.ASCII))


@functools.lru_cache(maxsize=256)
def _open_pattern(pattern: re.Pattern[bytes]) -> regex.Pattern[bytes] | None:
    """``pattern`` anchored at the end of the data, for partial matching; None when the
    ``regex`` module cannot compile it (the rule then falls back to line/window holds)."""
    flags = 0
    for ours, theirs in _REGEX_FLAGS:
        if pattern.flags & ours:
            flags |= theirs
    try:
        return regex.compile(b"(?:" + pattern.pattern + b")\\Z", flags)
    except (regex.error, TypeError, ValueError):
        return None


def compile_partial_patterns(rules: Iterable[Rule]) -> int:
    """Compile (and cache) the partial-match patterns of ``rules``; how many compiled."""
    return sum(_open_pattern(rule.pattern) is not None for rule in rules)


# Every detector's partial-match pattern, compiled once at import (~5-30 ms with the ``regex``
# module, +0.2 MB) like the trigger database (detectors.py), not by the first streamed response
# of the process on the event loop.
compile_partial_patterns(resolve_rules([ALL]))


def _open_start(text: bytes, rule: Rule, pos: int, anchors: list[int] | None = None) -> int | None:
    """The earliest start at or after ``pos`` of a match of ``rule`` that reaches the end of
    ``text`` or could with more data (a partial match); None when there is none. The rule's
    own pattern is used (custom finders only pick among its matches, so this is a superset).

    With ``anchors`` (the rule's trigger positions in ``text``) and a ``rule.open_from``, a
    match that may still become a finding can only start where the finder would try it for a
    trigger (``open_from``), or so close to the end that its trigger has not fully arrived
    (``open_tail``): only those starts are tried, in order - the first that matches is the
    search's answer among the matches that matter - without scanning ``max_len`` bytes per
    rule and chunk. For the rules whose matches start at their trigger that is exactly the
    search's answer; for ``secret-json-key`` it leaves out keys that can never be a secret's
    (no key word after their quote, none able to arrive within reach), which need no hold.

    A closed PEM block (``body`` matched up to its END marker) is skipped: the lazy body stops
    at the first END, so more data cannot change that match, although the pattern could
    still run on over the END (which would hold 8 KiB after every key).
    """
    pattern = _open_pattern(rule.pattern)
    assert pattern is not None
    if anchors is not None and rule.open_from is not None:
        return _open_start_at(text, rule, pattern, pos, anchors, rule.open_from)
    while True:
        m = pattern.search(text, pos, partial=True)
        if m is None:
            return None
        if rule.continuation is not None and not m.partial:
            closed = rule.pattern.match(text, m.start())
            if closed is not None and closed.group("body") is not None and closed.end() < len(text):
                pos = m.start() + 1
                continue
        return m.start()


def _open_start_at(text: bytes, rule: Rule, pattern: regex.Pattern[bytes], pos: int,
                   anchors: list[int], open_from: Callable[[bytes, int], Iterable[int]]) -> int | None:
    """``_open_start`` trying only the starts the triggers allow (see there)."""
    tail = len(text) - rule.open_tail
    starts = sorted({s for a in anchors[bisect.bisect_left(anchors, pos):] for s in open_from(text, a)
                     if pos <= s < tail})
    for start in [*starts, *range(max(pos, tail, 0), len(text))]:
        m = pattern.match(text, start, partial=True)
        if m is None:
            continue
        if rule.continuation is not None and not m.partial:
            closed = rule.pattern.match(text, start)
            if closed is not None and closed.group("body") is not None and closed.end() < len(text):
                continue
        return start
    return None


def required_window(rules: Iterable[Rule]) -> int:
    """The smallest safe window: twice the longest bounded match (with its lookahead).

    Twice, because a finding just before the cut may be overlapped by a match that starts
    inside it and has not fully arrived; such a match is shorter than the longest one, so a
    finding ending more than that before the end of the data is final.
    """
    return 2 * max((r.max_len + r.lookahead for r in rules), default=0) + 64


class DecodedStream:
    """The stream-callable protocol every stream masker here shares (``StreamMasker``,
    ``SSEMasker``, ``NDJSONMasker``): a Content-Encoding decoded on the way in, ``_push`` masks.

    ``__call__`` is mitmproxy's ``flow.response.stream`` (or ``request.stream``): mitmproxy 11
    calls it with each received chunk and once with ``b""`` at the end of the message
    (``state_stream_response_body`` in ``mitmproxy/proxy/layers/http/__init__.py``). It returns
    a *list* of chunks, empty when nothing is ready: returning ``b""`` would make the HTTP/1
    layer frame an empty chunk, i.e. ``0\\r\\n\\r\\n``, which terminates a chunked body early.
    """

    decoder: StreamDecoder | None
    errors: list[str]

    def feed(self, data: bytes) -> bytes:
        if self.decoder is not None:
            data = self.decoder.feed(data)
        return self._push(data, final=False)

    def finish(self) -> bytes:
        tail = b""
        if self.decoder is not None:
            try:
                tail = self.decoder.finish()
            except MaskingError as exc:  # what was received has been masked; note and end
                self.errors.append(str(exc))
        return self._push(tail, final=True)

    def __call__(self, data: bytes) -> list[bytes]:
        out = self.feed(data) if data else self.finish()
        return [out] if out else []

    def _push(self, data: bytes, final: bool) -> bytes:
        raise NotImplementedError


class StreamMasker(DecodedStream):
    """Feed chunks, get masked chunks; ``finish()`` returns the rest.

    Also usable directly as mitmproxy's stream callable (:class:`DecodedStream`). An HTTP/2
    DATA frame with no payload also arrives as ``b""``; it is treated as end of stream
    (everything held is flushed) and later chunks are still masked, but a secret straddling
    such a frame may then escape (upstreams send empty frames only with END_STREAM in
    practice).
    """

    def __init__(self, rules: tuple[Rule, ...], hash_key: bytes | None = None, *,
                 window: int = WINDOW, decoder: StreamDecoder | None = None, sniff: bool = False,
                 json_mode: bool = False, release_runs: bool = False, batch: int = 0,
                 in_place: bool = False, wide: bool = False, content_type: str | None = None) -> None:
        """``sniff``: decide text/binary from the first bytes (binary: ``_binary``).
        ``json_mode``: JSON lines (JSON, NDJSON, SSE): tokens replacing bare values are quoted.
        ``release_runs``: a held base64 run goes out as far as its decoding cannot be part of a
        secret (``_releasable``; streamed LLM text, where every trailing word is such a run).
        ``batch``: a binary stream is scanned once this many bytes have gathered (a body of
        known length - a download - whose latency no one waits on chunk by chunk; see
        ``BINARY_BATCH``). ``in_place``: masked as a binary stream whatever it holds (length
        preserving: a ranged response, whose bytes must stay at their offsets). ``wide``: a
        stream starting with a UTF-16 (or UTF-32) byte order mark, or whose ``content_type``
        names such a charset, is masked as its bytes are (in place) and then as the text it is
        (``wide_text``: both views, the label may be the agent's)."""
        needed = required_window(rules)
        if window < needed:
            raise ValueError(f"window {window} is smaller than the longest match ({needed})")
        if any(r.lookbehind > CONTEXT for r in rules):
            raise ValueError(f"a rule reads more than {CONTEXT} bytes before its match")
        self.rules = rules
        self.hash_key = hash_key
        self.window = window
        self.decoder = decoder
        self.counts: dict[str, int] = {}
        self.errors: list[str] = []  # e.g. a truncated compressed stream at finish
        self.binary: bool | None = True if in_place else None if sniff else False  # None: not decided yet
        self.in_place = in_place  # also: it may start inside a base64 run (binary_scan's phases)
        self._buf = b""  # received, not yet emitted (settled findings may be masked already)
        self._ctx = b""  # tail of the emitted output (masked), for the adjacency rule
        # The same tail as received (unmasked): lookbehinds and validator context (an SSN label,
        # a token_type) read the text as a whole-body scan's first round does - also a label
        # that ended up inside a masked finding.
        self._raw_ctx = b""
        self._cont: Rule | None = None
        # Partial matching (see the module docstring); rules it cannot handle use _line_base.
        self._eager = tuple(r for r in rules if _open_pattern(r.pattern) is not None)
        self._lazy = len(self._eager) < len(rules)
        # Finders that split runs (credit-card digit groups): a cut falls between the groups of
        # a run only where no card window can cross it (see ``_run_cut``).
        self._runs = tuple(r for r in rules if r.runs)
        self._frontier = 0  # in _buf: no open match of any rule starts before it
        self.json_mode = json_mode
        self._in_string = False  # JSON mode: the held data starts inside a string
        self._esc = b""  # JSON mode: an escape cut by the chunk's end (at most "\\u00X")
        self._b64 = b""  # masked output held while a base64 run at its end may continue
        self.release_runs = release_runs
        self._b64_sent = 0  # leading bytes of _b64 already emitted (release_runs; _b64 is one run)
        self._b64_mid = False  # _b64 starts inside a long run (after a step): never released early
        self._pending: list[bytes] = []  # received while a flood is held, not drained yet
        self._pending_len = 0
        self._drain_at = 0  # with a flood held: drain when _buf and _pending reach this size
        self.batch = batch
        self._sealed = 0  # binary: leading bytes of _buf masked already (a finding crossing the cut)
        self._sealing = False  # binary: that finding may go on; what continues it is masked too
        self._seal_class = _RUN_CLASS  # ... as long as its bytes are of this class (0x61)
        self._wide_sniff = wide  # the first HEAD bytes decide (a byte order mark), or the charset
        self._content_type = content_type
        self._bytes_view: StreamMasker | None = None  # a wide stream's first view: its bytes, in place
        self._head = b""  # the first bytes, while they wait for HEAD of them
        self._wide: Transcoder | None = None


    @property
    def held(self) -> int:
        """Bytes received but not yet emitted."""
        return (len(self._esc) + len(self._buf) + self._pending_len + len(self._b64) - self._b64_sent
                + len(self._head) + (self._wide.held if self._wide is not None else 0)
                + (self._bytes_view.held if self._bytes_view is not None else 0))

    # --- internals --------------------------------------------------------------------------

    def _push(self, data: bytes, final: bool) -> bytes:
        if self._wide_sniff:
            self._head += data
            if len(self._head) < HEAD and not final:
                return b""
            data, self._head, self._wide_sniff = self._head, b"", False
            wide = codec_of(data[:HEAD], self._content_type)
            if wide is not None:
                self._wide, self.binary = Transcoder(wide), False
                self._bytes_view = StreamMasker(self.rules, self.hash_key, in_place=True)
        if self._wide is not None:
            assert self._bytes_view is not None
            data = self._bytes_view._push(data, final)
            for kind, n in self._bytes_view.counts.items():  # what it masked, counted here once
                self.counts[kind] = self.counts.get(kind, 0) + n
            self._bytes_view.counts.clear()
            try:
                data = self._wide.inward(data, final)
            except UnicodeDecodeError as exc:
                raise DecodeError(f"a {self._wide.wide.codec} body that does not decode: {exc.reason}") from None
        released = self._settle(data, final)
        if self._wide is not None:
            released = self._wide.outward(released, final)
        if self.held > MAX_HELD:
            raise BodyTooLarge(MAX_HELD, "data held unsettled (a flood of overlapping matches)")
        return released

    def _settle(self, data: bytes, final: bool) -> bytes:
        """``data`` in: what can go out (masked) released, the rest held."""
        if self.json_mode and self.rules and self.binary is not True:
            data = self._unescape(data, final)
        if self._drain_at and not final and len(self._buf) + self._pending_len + len(data) < self._drain_at:
            # A flood is held (FLOOD_HOLD): gathered in a list (``+=`` would copy all that is
            # held per chunk), drained once it has doubled - the same output, as any chunking.
            self._pending.append(data)
            self._pending_len += len(data)
            return self._base64(b"", final)
        tail = b""  # a batch's printable end, held aside while the batch is scanned (_split_tail)
        if self._pending:  # one copy of what is held and gathered (a 256 KiB batch: ~25 us a copy)
            last: bytes | memoryview = data
            if self.binary and self.rules and not final and not self._sealing:
                last, tail = _split_tail(data)
            self._buf = b"".join([self._buf, *self._pending, last])
            self._pending, self._pending_len = [], 0
        else:
            self._buf += data
        if self.binary is None:
            if len(self._buf) < SNIFF_BYTES and not final:
                return b""
            self.binary = not _looks_text(self._buf[:SNIFF_BYTES], final)
        if not self.rules:
            passed, self._buf = self._buf, b""
            return passed
        if self.binary:
            released = self._binary(final)
            self._buf += tail
            self._drain_at = max(2 * len(self._buf) if len(self._buf) >= FLOOD_HOLD else 0,
                                 len(self._buf) + self.batch if self.batch else 0)
            return released
        out: list[bytes] = []
        if self._cont is None or self._continue(final):
            self._drain(final, out)
        self._drain_at = 2 * len(self._buf) if len(self._buf) >= FLOOD_HOLD else 0
        return self._base64(b"".join(out), final)

    def _binary(self, final: bool) -> bytes:
        """A binary stream: its printable runs masked in place, length preserving, as
        ``decoded.mask_binary`` masks a whole body. The printable bytes at the end are held (a
        run that may continue); of a run longer than ``BINARY_LONG`` all but ``BINARY_KEEP``
        bytes go, never through a finding that may still grow nor unaligned through a base64
        run (the rest is decoded from the cut). A finding masked that may go on past what has
        arrived (a base64 run with only run bytes after it, a PEM block reaching the end) is
        masked on while its bytes go on (``_sealing``), as a whole body masks the whole run."""
        buf = self._buf
        if self._sealing:
            end = _sealed_end(buf, self._sealed, self._seal_class)
            if end > self._sealed:
                buf = buf[: self._sealed] + b"*" * (end - self._sealed) + buf[end:]
            self._sealed, self._sealing = end, end == len(buf) and not final
        found = binary_scan(buf, self.rules, self._raw_ctx, phases=self.in_place)
        n = len(buf)
        cut = n
        if not final:
            cut = found.tail if n - found.tail <= BINARY_LONG else n - BINARY_KEEP
            if found.undecided >= n - BINARY_LONG:
                cut = min(cut, found.undecided)
            for _ in range(4):  # moved back to a finding's start, it may land in a base64 run
                before = cut
                for f in found.findings:
                    if f.start < cut < f.end and f.start >= n - BINARY_LONG:
                        cut = f.start  # held whole: it may still grow
                for a, b in found.runs:
                    if a < cut < b:
                        cut = a if a >= n - BINARY_LONG else _aligned(buf, a, cut)
                if cut == before:
                    break
        masks = [f for f in found.findings if f.start < cut]
        sealed = self._sealed if self._sealing else 0
        if not masks:
            released, self._buf = buf[:cut], buf[cut:]
        else:
            out = bytearray(buf)
            mask_in_place(out, buf, masks, self.hash_key, self.counts)
            runs = set(found.runs)
            for f in masks if not final else ():
                run = (f.start, f.end) in runs
                if f.end == n or (run and _sealed_end(buf, f.end, _RUN_CLASS) == n):
                    out[f.end : n] = b"*" * (n - f.end)  # the run may go on: masked on
                    sealed, self._sealing = n, True
                    self._seal_class = _RUN_CLASS if run else _PEM_CLASS
            released, self._buf = bytes(out[:cut]), bytes(out[cut:])
        self._sealed = max(0, sealed - cut)
        self._raw_ctx = (self._raw_ctx + buf[max(0, cut - CONTEXT) : cut])[-CONTEXT:]
        return released

    def _unescape(self, data: bytes, final: bool) -> bytes:
        """JSON mode: escapes of printable ASCII (``\\u0041``) and ``\\/`` decoded, so the
        detectors see what a JSON parser returns (the canonical form ``decoded.py`` gives a
        buffered body: ``\\u0022`` becomes ``\\"``, ``\\u005c`` ``\\\\``). An escape cut by
        the chunk's end waits for the next chunk. Outside strings valid JSON has no
        backslash, so escapes are recognised by backslash parity alone, in C."""
        data = self._esc + data
        self._esc = b""
        if b"\\" not in data:
            return data
        if not final:
            j = data.rfind(b"\\", max(0, len(data) - 6))
            if j >= 0 and _PARTIAL_ESCAPE.fullmatch(data, j + 1):
                b = j
                while b > 0 and data[b - 1] == 0x5C:
                    b -= 1
                if (j - b) % 2 == 0:  # the backslash at j starts an escape (is not escaped)
                    data, self._esc = data[:j], data[j:]
        if b"\\u00" in data or b"\\/" in data:
            data = _ESCAPES.sub(_canonical_escape, data)
        return data

    def _base64(self, data: bytes, final: bool) -> bytes:
        """Base64 runs of the masked output decoded and scanned (``decoded.mask_base64``: a
        secret inside masks the whole run). A run that may still continue at the end (base64
        characters, line breaks raw or escaped) is held until it ends; one longer than
        ``B64_HOLD`` is scanned as it is and released but for its last ``B64_KEEP`` bytes
        (a whole line or four characters at a time, so the rest still decodes in step): a
        secret (at most ``jwt``'s ~11 KiB, ~15 KiB encoded) never straddles what was
        released unseen. With ``release_runs``, the start of a held run goes out early as far
        as ``_releasable`` allows; it stays in ``_b64`` (``_b64_sent`` bytes of it are out),
        so the run is still decoded and judged whole when it ends."""
        buf = self._b64 + data
        if not buf:
            return b""
        sent, self._b64_sent = self._b64_sent, 0
        cut = len(buf) if final else _run_hold(buf)
        if cut >= len(buf) - B64_HOLD:
            block, self._b64 = buf[:cut], buf[cut:]
            out = _unsent(mask_base64(block, self.rules, self.hash_key, self.counts), block, sent) if cut else b""
            if cut:
                self._b64_mid = False  # what is held now starts a new run
            else:
                self._b64_sent = sent  # the run goes on
            if self.release_runs and self._b64 and not self._b64_mid:
                out += self._release_run()
            return out
        masked = mask_base64(buf, self.rules, self.hash_key, self.counts)
        if masked is not buf:  # a secret in what is held: the run goes out masked whole
            self._b64 = b""
            self._b64_mid = False
            return _unsent(masked, buf, sent)
        keep = len(buf) - B64_KEEP
        line = max(buf.rfind(b"\n", cut, keep) + 1, buf.rfind(b"\\n", cut, keep) + 2)
        start = _RUN_LEAD.match(buf, cut).end()  # type: ignore[union-attr]  # matches empty
        release = line if line > cut + 1 else start + (keep - start) // 4 * 4
        self._b64 = buf[release:]
        self._b64_mid = True
        self._b64_sent = max(0, sent - release)
        return buf[min(sent, release):release]

    def _release_run(self) -> bytes:
        """The start of the held run that ``_releasable`` lets go now (not yet sent)."""
        run = self._b64
        if len(run) > RELEASE_MAX or run.strip(_B64_CHARS):  # long, or line breaks / padding
            return b""
        q = _releasable(run, self.rules)
        if q <= self._b64_sent:
            return b""
        out, self._b64_sent = run[self._b64_sent : q], q
        return out

    def _continue(self, final: bool) -> bool:
        """Drop key material of an over-long PEM block; True when the block has ended."""
        assert self._cont is not None and self._cont.continuation is not None
        buf = self._buf
        run = self._cont.continuation.match(buf)
        assert run is not None  # the continuation pattern matches the empty string too
        end = run.end()
        if not final and (end == len(buf) or (end == len(buf) - 1 and buf.endswith(b"\\"))):
            self._buf = buf[end:]  # a lone trailing backslash may start an escape: keep it
            return False
        self._buf = buf[end:]
        self._cont = None
        return True

    def _emit(self, out: list[bytes], data: bytes) -> None:
        if data:
            out.append(data)
            self._ctx = (self._ctx + data)[-CONTEXT:]

    def _base(self, window: bytes, off: int) -> int:
        """Everything of ``_buf`` before this may be emitted as far as *open* matches go (the
        candidates found by ``scan`` may hold more): the earliest start of a match that
        reaches the end or may still grow (``_open_start``), searched from ``_frontier`` and
        within each rule's longest match before the end."""
        n = len(window) - off
        base = n
        # No detector matches across a line feed but private-key, whose open block the scan
        # holds as a candidate: the search starts after the last line feed (as the old bound).
        line = window.rfind(b"\n", off) + 1
        hits = prefilter_for(self.rules).hits(window)  # the same window is scanned next: cached
        for rule in self._eager:
            pos = max(off + self._frontier, len(window) - rule.max_len - SLACK, off, line)
            start = _open_start(window, rule, pos, hits.positions(rule.triggers))
            if start is not None:
                base = min(base, start - off)
        if self._lazy:  # a rule without partial matching: whole lines, or a window behind
            line = max(line - off, 0)
            if n >= 2 * self.window:  # rescan once per window of new data, not per chunk
                line = max(line, n - self.window)
            base = min(base, line)
        for rule in self._runs:  # a run crossing the cut: hold it (or its end)
            start = _run_crossing(window, rule, off, off + base) if 0 < base < n else None
            if start is not None:
                base = _run_cut(window, start, off + base) - off
        self._frontier = base
        return base

    def _label_start(self, window: bytes, off: int, cut: int) -> int | None:
        """The earliest start (in ``_buf``, before ``cut``) of a match that could continue
        past ``cut`` - a label whose value begins at the cut - or None. Only searched when a
        word is held because it may change: ``_base`` found no open match reaching the end
        (the glued word broke it), but once the glue is masked the label matches, as in the
        whole-body scan's next round."""
        head = window[: off + cut]
        hits = prefilter_for(self.rules).hits(window)  # cached: this window was just scanned
        found: int | None = None
        for rule in self._eager:
            pos = max(off, len(head) - rule.max_len - SLACK)
            start = _open_start(head, rule, pos, hits.positions(rule.triggers))
            if start is not None and start < len(head) and (found is None or start - off < found):
                found = start - off
        return found

    def _drain(self, final: bool, out: list[bytes]) -> None:
        """Emit what is decided; may enter continuation mode for an over-long PEM block."""
        for round_ in range(MAX_ROUNDS):
            buf, n = self._buf, len(self._buf)
            if not n:
                return
            window, off = self._raw_ctx + buf, len(self._raw_ctx)
            if final:
                base = n
            else:
                base = self._base(window, off)
                if base <= 0:
                    return
            cands = scan(window, self.rules, pos=off)
            findings = [Finding(f.start - off, f.end - off, f.kind)
                        for f in merge(c.finding for c in cands if c.finding is not None)]
            spans = [(c.match_start - off, c.match_end - off) for c in cands]
            unsettled: list[tuple[int, int]] = []  # may still change with more data
            cont: tuple[int, int, Rule] | None = None  # an over-long PEM block running at the end
            if not final:
                for c, (s, e) in zip(cands, spans, strict=True):
                    if c.open and c.match_start + c.rule.max_len + SLACK <= len(window):
                        if (e == n or (e == n - 1 and buf.endswith(b"\\"))) and (cont is None or s < cont[0]):
                            cont = (s, e, c.rule)
                    elif c.open or _undecided(window, c.match_end, c.rule.lookahead):
                        unsettled.append((s, e))  # END may still come / may grow / needs context
            held = min((s for s, _ in unsettled), default=n)
            cont_f: Finding | None = None
            for f in findings:
                if any(f.start < e and s < f.end for s, e in unsettled):
                    held = min(held, f.start)
                elif cont is not None and f.start <= cont[0] < f.end:
                    cont_f = f
                    held = min(held, f.start)
            # ``base`` bounds the cut like ``held``: an open match may start right there, so a
            # finding crossing it may still be overlapped (and merged) - never move past it.
            limit = min(base, held)
            cut = _safe_cut(limit, limit, spans + [(f.start, f.end) for f in findings])
            if not final and 0 < cut < n and buf[cut - 1] in _TOKEN_BYTES and buf[cut] in _TOKEN_BYTES:
                # Never cut a word: a replacement right after it (a key glued to an address)
                # makes a boundary that a later scan of the whole text would match against.
                start = cut - 1
                while start > max(0, cut - RUN_BACKOFF) and buf[start - 1] in _TOKEN_BYTES:
                    start -= 1
                if start == 0 or buf[start - 1] not in _TOKEN_BYTES:  # runs longer are cut
                    cut = _safe_cut(start, start, spans + [(f.start, f.end) for f in findings])
                    # The held word may still change (a key glued to its end is masked), and a
                    # label before it may then match ("secret_key = " + the 40 characters
                    # before a glued AKIA): hold a match that could start before the word.
                    label = self._label_start(window, off, cut)
                    if label is not None:
                        cut = _safe_cut(label, label, spans + [(f.start, f.end) for f in findings])
            if not final and 0 < cut < n:
                # Nor a run of digit groups: a card glued to a word may become one once the word
                # is masked ("4111 ... 1111AKIA..." after the key id's token), as in a whole body.
                for rule in self._runs:
                    run_start = _run_crossing(window, rule, off, off + cut)
                    if run_start is not None:
                        cut = _run_cut(window, run_start, off + cut) - off
            # Only findings before the cut are final: one after it could still be overlapped
            # by a match that has not fully arrived (and the union must be masked).
            settled = [f for f in findings if f.end <= cut and f is not cont_f]
            strings = string_spans(buf, self._in_string) if self.json_mode and settled else None
            if settled and round_ < MAX_ROUNDS - 1 and adjacent(buf, settled, self._ctx):
                # A replacement creates a new boundary: mask in place and scan again.
                self._buf = apply(buf, settled, self.hash_key, self.counts, strings=strings)
                self._frontier = 0  # the text changed: search it again
                continue
            self._emit(out, apply(buf, settled, self.hash_key, self.counts, 0, cut, strings))
            self._raw_ctx = (self._raw_ctx + buf[:cut])[-CONTEXT:]
            self._buf = buf[cut:]
            self._frontier = max(0, self._frontier - cut)
            if self.json_mode:
                self._in_string = ends_in_string(buf[:cut], self._in_string)
            if cont_f is not None and cut == cont_f.start:
                # Mask from the block's start to what has arrived; keep dropping key material.
                self._emit(out, mask_token(cont_f.kind, buf[cut : cont_f.end], self.hash_key))
                self._raw_ctx = (self._raw_ctx + buf[cut : cont_f.end])[-CONTEXT:]
                self.counts[cont_f.kind] = self.counts.get(cont_f.kind, 0) + 1
                if self.json_mode:
                    self._in_string = ends_in_string(buf[cut : cont_f.end], self._in_string)
                self._buf = buf[cont_f.end :]  # empty, or a lone backslash
                self._frontier = 0
                self._cont = cont[2] if cont else None
            return


_RUN_CHARS = b"0123456789 -"


def _run_crossing(window: bytes, rule: Rule, lo: int, cut: int) -> int | None:
    """Where a run of ``rule`` that crosses ``cut`` starts (not before ``lo``), or None.
    Only the stretch of digits and separators around the cut is searched: a run longer than
    ``RUN_HOLD`` is cut between groups anyway, so a start found later than its real one (a
    group boundary, where the pattern may start too) is as good."""
    if window[cut - 1] not in _RUN_CHARS or window[cut] not in _RUN_CHARS:
        return None
    low = max(lo, cut - RUN_HOLD - 2 * RUN_MARGIN)
    m = rule.pattern.search(window, low + len(window[low:cut].rstrip(_RUN_CHARS)))
    return m.start() if m is not None and m.start() < cut < m.end() else None


def _run_cut(window: bytes, start: int, cut: int) -> int:
    """Where to cut a run of digit groups that starts at ``start`` and crosses ``cut``.

    A run up to ``RUN_HOLD`` bytes is held whole. Cards are windows of whole groups (at most
    19 digits and 4 separators, judged on their own groups and the run's end), so a longer run
    may be cut at a group boundary ``RUN_MARGIN`` bytes before ``cut``: every window starting
    before it has arrived whole and is decided (one crossing the cut is a finding, which the
    cut steps back over), and the scan resumes at that group. Inside a group already longer
    than a card the cut may fall anywhere: no card starts or ends there.
    """
    if cut - start <= RUN_HOLD:
        return start
    p = cut - RUN_MARGIN
    sep = max(window.rfind(b" ", start, p), window.rfind(b"-", start, p))
    if sep >= 0 and p - sep - 1 <= 19:
        return sep + 1
    return p


def _undecided(window: bytes, end: int, lookahead: int) -> bool:
    """A match ending at ``end`` may still change: it reaches the end of the data, or its
    lookahead assertions (a few bytes, never across a line feed) or its validator's context
    (``lookahead`` bytes) are not all here yet."""
    if end + lookahead + SLACK <= len(window):
        return False
    return lookahead > 0 or b"\n" not in window[end : end + SLACK]


def _safe_cut(cut: int, held: int, spans: list[tuple[int, int]]) -> int:
    """Move ``cut`` off any span it would split: forward past complete ones while that stays
    at or before ``held``, otherwise back to the earliest crossing start (then only back)."""
    backwards = False
    while True:
        crossing = [(s, e) for s, e in spans if s < cut < e]
        if not crossing:
            return cut
        end = max(e for _, e in crossing)
        if not backwards and end <= held:
            cut = end
        else:
            backwards = True
            cut = min(s for s, _ in crossing)


def _sealed_end(buf: bytes, start: int, cls: bytes) -> int:
    """Where the bytes of the class ``cls`` (``_RUN_CLASS``, ``_PEM_CLASS``) from ``start`` end."""
    end = buf.translate(cls).find(b" ", start)
    return len(buf) if end < 0 else end


def _split_tail(last: bytes) -> tuple[bytes | memoryview, bytes]:
    """A batch's last chunk split before the printable bytes at its end, which are held aside
    while the batch is scanned: the batch then ends where ``_binary`` would cut it, and goes out
    whole, as joined, instead of as a copy of all but its tail (a batch of random bytes ends in
    printable bytes 3 times in 8: one process, 64 MiB in 64 KiB chunks, 0.63 -> 0.33 ms per MiB;
    in the proxy, whose heap reuses its blocks, ~0.01). A chunk wholly printable, or with a tail
    longer than ``BINARY_LONG`` (which ``_binary`` releases in part), is not split."""
    start = printable_tail(last)
    if start == 0 or len(last) - start > BINARY_LONG:
        return last, b""
    return memoryview(last)[:start], last[start:]


def _aligned(buf: bytes, start: int, cut: int) -> int:
    """A cut at or before ``cut`` in the base64 run starting at ``start`` from which the rest
    still decodes in step: after its last line break (a wrapped run's lines are multiples of
    four characters), or a multiple of four characters into it."""
    line = buf.rfind(b"\n", start, cut)
    return line + 1 if line >= 0 else start + (cut - start) // 4 * 4


def _looks_text(sample: bytes, final: bool) -> bool:
    """UTF-8 without NUL bytes (a cut multi-byte character at the sample's end is fine)."""
    if b"\x00" in sample:
        return False
    try:
        codecs.getincrementaldecoder("utf-8")().decode(sample, final=final)
    except UnicodeDecodeError:
        return False
    return True


__all__ = ["BINARY_BATCH", "WINDOW", "StreamMasker", "required_window"]
