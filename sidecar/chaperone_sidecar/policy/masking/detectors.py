"""Built-in secret detectors: compiled byte regexes plus validators.

Everything works on ``bytes``: secrets are ASCII, so a byte regex finds them in any
ASCII-compatible body without a decode/encode round trip, and a chunk boundary that splits a
multi-byte UTF-8 character (streaming) cannot confuse it. A detector is one or more ``Rule``s;
a rule's regex proposes candidates, its validator (Luhn, SSA rules, JWT header, context) keeps
the real ones, and the named group ``s`` (or the whole match) is what gets replaced.

Design choices that keep false positives down, each documented at its rule:

* AWS secret keys are only recognised after a credential label (``aws_secret_access_key``,
  ``SecretAccessKey``, ``"secretAccessKey":`` ...). A bare 40-character base64 run is far more
  often a hash, a blob or an id than a key, and masking every one would wreck ordinary bodies.
* US SSNs need an SSN label within 32 bytes before the number *and* must pass the SSA rules
  (see ``_ssn_ok``); random 9-digit numbers (ids, amounts, timestamps) are never masked bare.
* Credit cards need the Luhn check, a card-network prefix and a card-like grouping.

Every quantifier is bounded so that a match has a known maximum length (``Rule.max_len``);
``stream.py`` relies on that to size its overlap window. The one exception is an unterminated
PEM block (BEGIN without END), whose key material is masked as an open-ended run.

Scanning and replacement (``[MASKED:kind]`` tokens) live in ``spans.py``.
"""

from __future__ import annotations

import base64
import binascii
import bisect
import json
import re
from collections.abc import Iterable, Iterator

from ._stretches import card_head_ends
from .prefilter import Trigger, literal
from .spans import MASK_TOKEN_RE, MatchLike, Rule, SpanMatch, anchored, at_offset, prefilter_for

PEM_BODY_MAX = 8 * 1024  # longest PEM body matched as a closed BEGIN..END block

# A token may start after a JSON/string escape such as \n (the "n" is not part of the token),
# otherwise only where the previous byte is not a token byte or a backslash. The backslash rule
# keeps a match from starting inside an escape, which would turn valid JSON into invalid JSON.
_ESC = rb'(?<=\\[nrtbf/"])'


def _lb(token_class: bytes) -> bytes:
    return rb"(?:" + _ESC + rb"|(?<![\\" + token_class + rb"]))"


# --- validators ---------------------------------------------------------------------------


def _not_token(value: bytes) -> bool:
    return MASK_TOKEN_RE.fullmatch(value) is None


def _header_ok(header: bytes) -> bool:
    # A real JWT header is a JSON object naming its algorithm; this is what separates a token
    # from any dotted base64-ish identifier.
    try:
        decoded = json.loads(base64.urlsafe_b64decode(header + b"=" * (-len(header) % 4)))
    except (ValueError, binascii.Error):
        return False
    return isinstance(decoded, dict) and isinstance(decoded.get("alg"), str)


def _jwt_ok(text: bytes, m: MatchLike) -> bool:
    return _header_ok(m.group("h"))


def _bare_bearer_ok(text: bytes, m: MatchLike) -> bool:
    # Without an Authorization label, "Bearer <word>" is usually prose; a token has letters
    # and digits and some length.
    tok = m.group("s")
    return len(tok) >= 16 and any(c in b"0123456789" for c in tok) and tok.lower() != tok.upper()


_TOKEN_TYPE_RE = re.compile(rb'(?i)\\?"token_type\\?"[ \t]*:[ \t]*\\?"bearer')
_CTX = 512


def _oauth_ok(text: bytes, m: MatchLike) -> bool:
    # access/refresh/id tokens count as bearer tokens when "token_type": "Bearer" is in the
    # same object; looking 512 bytes either way covers any realistic token response.
    window = text[max(0, m.start() - _CTX) : m.end() + _CTX]
    return _TOKEN_TYPE_RE.search(window) is not None and _not_token(m.group("s"))


# Normalised key (lowercase, alphanumerics only) suffixes that name a secret, and keys that end
# like one but are not (pagination cursors, token accounting of LLM APIs, token_type ...).
_SECRET_SUFFIXES = (
    "password", "passwd", "pwd", "passphrase", "secret", "secretkey", "secretaccesskey",
    "secretstring", "secretbinary", "token", "apikey", "apisecret", "accesskey", "privatekey",
    "credential", "credentials", "connectionstring", "authorization", "cookie", "sessionid",
    "signingkey", "encryptionkey", "masterkey",
)
_NOT_SECRET = frozenset({
    "nexttoken", "nextpagetoken", "pagetoken", "continuationtoken", "nextcontinuationtoken",
    "synctoken", "paginationtoken", "tokentype", "starttoken", "resumptiontoken", "marker",
    "tokenizer", "stoptoken", "eostoken", "bostoken", "padtoken",
})


def secret_key_name(key: str) -> bool:
    """True when a JSON key names a secret (``password``, ``client_secret``, ``apiKey`` ...)."""
    norm = "".join(c for c in key.lower() if c.isalnum())
    return norm not in _NOT_SECRET and norm.endswith(_SECRET_SUFFIXES)


def _json_key_ok(text: bytes, m: MatchLike) -> bool:
    return secret_key_name(m.group("key").decode("ascii", "replace")) and _not_token(m.group("s"))


# Luhn's doubled digit (2d, minus 9 past 9) as a byte table: the doubled positions are summed
# by ``translate`` + ``sum`` in C, not digit by digit in Python (a hostile run of digit groups
# puts a window through this at every group).
_LUHN_DOUBLE = bytes.maketrans(b"0123456789", bytes((0, 2, 4, 6, 8, 1, 3, 5, 7, 9)))


def _luhn(digits: bytes) -> bool:
    # Digits at odd positions from the right count once, the others doubled (see _LUHN_DOUBLE).
    odd, even = digits[-1::-2], digits[-2::-2]
    return (sum(odd) - 48 * len(odd) + sum(even.translate(_LUHN_DOUBLE))) % 10 == 0


def _card_digits_ok(digits: bytes) -> bool:
    """13-19 digits of a card network that pass Luhn."""
    if not 13 <= len(digits) <= 19:
        return False
    # Card networks: Visa 4, Mastercard 51-55/2221-2720, Amex/Diners/JCB 3, Discover/
    # UnionPay/Maestro 5-6. Excludes e.g. 13-digit epoch milliseconds (leading 1).
    first = digits[0] - 48
    if not (first in (3, 4, 5, 6) or (first == 2 and 2221 <= int(digits[:4]) <= 2720)):
        return False
    return _luhn(digits)


_NOT_DIGITS = bytes(c for c in range(256) if not 48 <= c <= 57)


def _card_ok(text: bytes, m: MatchLike) -> bool:
    return _card_digits_ok(m.group("s").translate(None, _NOT_DIGITS))


_DIGITS_RE = re.compile(rb"\d+")


# Card layouts of a window of digit groups (``_card_runs``): one group of 13-19 digits, or a
# first group of 4 digits then 4-digit groups and a last one of 1-4 (4-4-4-4, 4-4-4-4-3 ...),
# or Amex 4-6-5 / Diners 4-6-4; one separator throughout. A new layout needs its head in
# ``_CARD_TRIGGER`` (a stretch without a trigger is never searched) and in ``_layouts`` of
# tests/sidecar/policy/masking/test_detectors.py.


# Every card _card_runs yields lies inside one maximal stretch of digits and separators and
# holds one of its layouts' heads: 13 digits in a row (one group of 13-19), 4-4-4 and one digit
# more (4-4-4-x), or 4-6-4 (Amex 4-6-5, Diners 4-6-4), each separator a space or a dash. The
# trigger is such a head on to the end of its stretch (the first other byte, or the end of the
# text): Hyperscan reports one end per stretch, not one per digit - a flood of digit groups
# ("1 " * 500000) would otherwise cost a Python callback per byte pair (prefilter.py). It may
# fire for a stretch that holds no card (the finder then yields nothing there), never miss one.
# Until issue 16 session 8 it was any 13 digits with optional single separators after a
# non-digit, "(?:^|[^0-9])[0-9](?:[ \-]?[0-9]){12}": 3.1 / 3.9 ms per MiB of log prose / API
# JSON, where digits are everywhere, against 1.5 / 2.0 ms for the layout heads (the optional
# separator between every two digits kept a dozen NFA states alive on every digit).
# Since session 10 the trigger's ends are found by ``_stretches.card_head_ends`` (64 bytes at a
# time, ~0.2 ms per MiB; this pattern in the one pass was 0.8-1.2 ms of it on prose and JSON):
# the pattern is its specification, test_stretches.py compares the two.
_CARD_TRIGGER = Trigger(rb"[0-9]{4}(?:[0-9]{9}|[ \-][0-9]{4}[ \-][0-9]{4}[ \-][0-9]|[ \-][0-9]{6}[ \-][0-9]{4})"
                        rb"[0-9 \-]*(?:[^0-9 \-]|$)", native=card_head_ends)
_STRETCH_CHARS = b"0123456789 -"


def _card_find(text: bytes, pos: int, ends: list[int]) -> Iterator[SpanMatch]:
    """The cards of each stretch of digits and separators that holds a trigger.

    A run of digit groups consists of those bytes only, so it lies inside one maximal stretch
    of them, and every card in it holds the start of a trigger (``_CARD_TRIGGER``), whose end
    marks the stretch's end: searching runs stretch by stretch (from ``pos``, up to the
    stretch's end, lookbehinds seeing before it) finds exactly the cards a search of the whole
    text finds (a stretch without a trigger holds none). ``ends``: the triggers' end offsets
    (one byte past the stretch, or the text's end).
    """
    done = pos
    for e in ends[bisect.bisect_right(ends, pos):]:
        hi = e - 1 if text[e - 1] not in _STRETCH_CHARS else e  # the stretch's end
        if hi <= done:
            continue  # a stretch already searched
        lo = done + len(text[done:hi].rstrip(_STRETCH_CHARS))
        yield from _card_runs(text, lo, hi)
        done = hi


def _card_runs(text: bytes, lo: int, hi: int) -> Iterator[SpanMatch]:
    """For each run of digit groups, every grouping of whole groups that is a card.

    A greedy regex would take "4111 1111 1111 1111 12" (card + expiry) as one 18-digit
    number, fail Luhn and let the card through; trying the windows of groups does not. Each
    group that can start a card is tried on its own (the longest valid window from it wins),
    so the result depends only on the card's own groups and their neighbours - never on how
    long the run before it is: an agent-chosen prefix ("0" * 30 + " 4111 1111 1111 1111")
    cannot push a card out of view. Windows hold at most 19 digits, so the work per group is
    bounded. Overlapping cards are merged by the caller. The match spans the window.
    """
    for run in _CARD_RUN_RE.finditer(text, lo, hi):
        a, b = run.span()
        if b - a > 19 and b" " not in text[a:b] and b"-" not in text[a:b]:
            continue  # one group longer than any card (a digest's digits, a timestamp)
        # Glued to a word or the integer part of a decimal: the last group cannot end a card.
        after = text[b : b + 2]
        glued = after[:1].isalnum() or (after[:1] in (b".", b",") and after[1:].isdigit())
        groups = [m.span() for m in _DIGITS_RE.finditer(text, a, b)]
        sizes = [e - s for s, e in groups]
        seps = text[a:b].translate(None, _DIGIT_BYTES)  # seps[k]: the one between groups k, k+1
        n = len(groups)
        last = n - 1 - glued
        # fours[k]: how many groups from k on have 4 digits; same[k]: how many separators from
        # seps[k] on equal it. A window i..j (i a 4-digit group) has the 4-4-...-x layout
        # shape when fours[i] >= j - i, and one separator when same[i] >= j - i: each window
        # is judged in constant time, and only windows of that shape reach Luhn.
        fours, same = [0] * (n + 1), [0] * n
        for k in range(n - 1, -1, -1):
            fours[k] = fours[k + 1] + 1 if sizes[k] == 4 else 0
            if k < n - 1:
                same[k] = same[k + 1] + 1 if k < n - 2 and seps[k + 1] == seps[k] else 1
        for i in range(min(n, last + 1)):
            # A window of several groups starts with a 4-digit one (the layouts), a window of
            # one group has 13-19 digits: no other group starts a card. Skipping the rest
            # up front keeps a run of short groups ("1 1 1 ...") at one test per group.
            first = sizes[i]
            if first != 4:
                if 13 <= first <= 19:
                    m = SpanMatch(text, groups[i][0], groups[i][1], groups[i])
                    if _card_ok(text, m):
                        yield m
                continue
            total, end = 0, i  # end: one past the last group that still fits in 19 digits
            while end < n and total + sizes[end] <= 19:
                total += sizes[end]
                end += 1
            top = min(end - 1, last)
            total -= sum(sizes[top + 1 : end])  # the digits of groups i..j, j from top down
            start = groups[i][0]
            for j in range(top, i, -1):  # one group of 4 digits alone is too short
                if total < 13:
                    break  # a shorter window has fewer digits still
                k = j - i
                if same[i] >= k and ((fours[i] >= k and sizes[j] <= 4)
                                     or (k == 2 and sizes[i + 1] == 6 and sizes[j] in (4, 5))):
                    stop = groups[j][1]
                    if _card_digits_ok(text[start:stop].translate(None, _NOT_DIGITS)):
                        yield SpanMatch(text, start, stop, (start, stop))
                        break
                total -= sizes[j]


_DIGIT_BYTES = b"0123456789"


_SSN_CONTEXT_RE = re.compile(
    rb"SSN|(?<![A-Za-z])[Ss]sns?(?![a-z])|(?i:social[ \t_.-]*sec|\bss\#|soc\.?[ \t_-]*sec"
    rb"|tax[ \t_-]*(?:payer[ \t_-]*)?id|\bi?tin\b)"
)
SSN_CONTEXT_BYTES = 32


def ssn_valid(area: int, group: int, serial: int) -> bool:
    """SSA rules: area 001-665, 667-899; group 01-99; serial 0001-9999."""
    return 0 < area < 900 and area != 666 and group != 0 and serial != 0


_OTHER_KEY_RE = re.compile(rb'"[^"]*"[ \t]*:')


def _ssn_ok(text: bytes, m: MatchLike) -> bool:
    # Context rule: a 9-digit number is only an SSN right after an SSN label (within 32 bytes:
    # a JSON key like "ssn"/"socialSecurityNumber", "SSN:", "taxpayer id" ...) with no other
    # JSON key in between (so {"ssn": "...", "id": "..."} does not lend its label to "id").
    # Without it, order numbers, amounts and ids would be masked en masse; see the measured
    # rate in the tests.
    if not ssn_valid(int(m.group("a")), int(m.group("g")), int(m.group("n"))):
        return False
    before = text[max(0, m.start() - SSN_CONTEXT_BYTES) : m.start()]
    label = None
    for label in _SSN_CONTEXT_RE.finditer(before):  # noqa: B007 - keeps the last label found
        pass
    return label is not None and _OTHER_KEY_RE.search(before, label.end()) is None


_FILE_TLDS = frozenset(b"png jpg jpeg gif svg webp ico css js json map txt html".split())


def _email_ok(text: bytes, m: MatchLike) -> bool:
    value = m.group("s")
    local, _, domain = value.rpartition(b"@")
    # "logo@2x.png" (retina assets) and "git@github.com" (clone URLs) are not personal data,
    # and masking the latter would break an agent's git workflow.
    return domain.rsplit(b".", 1)[-1].lower() not in _FILE_TLDS and local != b"git"


# --- where anchored finders start matching (see spans.anchored) ----------------------------


_KEY_QUOTE_MAX = 101  # keys are at most 100 bytes: the quote is at most this far before a key word


def _quote_before(text: bytes, i: int) -> Iterable[int]:
    q = text.rfind(b'"', max(0, i - _KEY_QUOTE_MAX), i)
    return (q,) if q >= 0 else ()


_LOCAL_REV = re.compile(rb"[A-Za-z0-9._%+-]{1,65}")
# What every address has right after its "@" (_EMAIL_ADDRESS: a label, a dot, a letter or
# digit). Most "@" are not addresses - in the printable runs of random binary, 19 per 256 KiB
# download batch, 13 of the ~50 us of its scan - and this one match turns them away (issue 16).
_DOMAIN_HEAD = re.compile(rb"[A-Za-z0-9][A-Za-z0-9-]{0,62}\.[A-Za-z0-9]")


def _email_find(text: bytes, pos: int, ats: list[int]) -> Iterator[re.Match[bytes]]:
    """Addresses at each "@": the bounded pattern from where the local part starts (walking
    back over it; one byte later too, for a local part that follows an escape such as "\\n":
    the "n" is a local-part character but not part of the address); failing that, the last 64
    local-part characters and the longest domain without boundaries - a local part glued to a
    longer run, or a top-level domain glued to more letters, no longer hides the address (the
    rest of the run stays)."""
    for i in ats[bisect.bisect_left(ats, pos):]:  # every "@" (the trigger) from pos on
        if _DOMAIN_HEAD.match(text, i + 1) is None:
            continue
        found = None
        local = _LOCAL_REV.match(text[max(0, i - 65) : i][::-1])
        if local is not None:
            starts = [i - local.end(), i - local.end() + 1]
            for pattern in (_EMAIL_RE, _EMAIL_LEFT_RE):  # a glued top-level domain: no right boundary
                for start in starts:
                    if start >= pos and (found := pattern.match(text, start)) is not None:
                        break
                if found is not None:
                    break
            if found is None and local.end() > 64:  # a local part glued to a longer run
                start = i - 64
                esc = text.rfind(b"\\", max(0, start - 5), start)
                if esc >= 0:  # never start inside an escape (\u0041): JSON must stay JSON
                    start = max(start, esc + (6 if text[esc + 1 : esc + 2] == b"u" else 2))
                if start >= pos:
                    found = _EMAIL_GLUED_RE.match(text, start)
        if found is not None:
            yield found


def _lb1(first: bytes, token_class: bytes) -> bytes:
    """_lb written *after* the first character (class ``first``) so the pattern starts with a
    character class, which the engine can skip to quickly."""
    return (rb"(?:(?<=\\[nrtbf/\"]" + first + rb")|(?<![\\" + token_class + rb"]" + first + rb"))")


# --- the rules ------------------------------------------------------------------------------

_F = re.ASCII
_SP = rb"[ \t]{0,16}"  # bounded, like every quantifier here (see Rule.max_len)
_KEYVAL = rb"(?:\\?[\"'])?" + _SP + rb"(?:[:=]|=>|>)" + _SP + rb"(?:\\?[\"'])?"  # "key": "  key=  <key>
_B64TOK = rb"A-Za-z0-9._~+/=-"  # bearer token alphabet (RFC 6750 b64token)
_PEM_RUN = rb"(?:[A-Za-z0-9+/=\s:,.]|\\[nrt/])*"

_AUTH_RE = re.compile(rb"(?i:authorization)" + _KEYVAL
                      + rb"(?i:bearer)[ \t]{1,16}(?P<s>[" + _B64TOK + rb"]{1,8192})", _F)
_BEARER_RE = re.compile(_lb(rb"A-Za-z0-9")
                        + rb"(?i:bearer)[ \t]{1,16}(?P<s>[" + _B64TOK + rb"]{16,8192})", _F)
_OAUTH_RE = re.compile(rb'"(?:access_token|refresh_token|id_token)\\?"' + _SP + b":" + _SP + rb'\\?"(?P<s>['
                       + _B64TOK + rb"]{1,8192})", _F)
_AWS_SECRET_RE = re.compile(rb"(?i:secret[_-]?(?:access[_-]?)?key)" + _KEYVAL
                            + rb"(?P<s>[A-Za-z0-9/+]{40})(?![A-Za-z0-9/+=])", _F)
_JSON_KEY_RE = re.compile(rb'"(?P<key>[A-Za-z0-9_.$-]{1,100})\\?"' + _SP + b":" + _SP
                          + rb'"(?P<s>(?:[^"\\\r\n]|\\.){1,4096})', _F)
_EMAIL_ADDRESS = (rb"(?P<s>[A-Za-z0-9._%+-]{1,64}@"
                  rb"(?:[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?\.){1,8}[A-Za-z]{2,24})")
_EMAIL_RE = re.compile(_lb(rb"A-Za-z0-9._%+-") + _EMAIL_ADDRESS + rb"(?![A-Za-z0-9-])", _F)
# Without the boundaries: an address glued into a longer run ("x" * 70 + "alice@example.com",
# "alice@example.com" + "x" * 30) is still readable to anyone who looks for the "@".
_EMAIL_GLUED_RE = re.compile(_EMAIL_ADDRESS, _F)
_EMAIL_LEFT_RE = re.compile(_lb(rb"A-Za-z0-9._%+-") + _EMAIL_ADDRESS, _F)
# A run of digit groups (13 digits or more: a card's least), as long as it goes (the finder's
# work per group is bounded). It may
# also start at a group boundary inside a longer run (after "<digit><separator>"): where a
# stream resumes scanning after a cut it made between groups of a long run.
_CARD_RUN_RE = re.compile(rb"(?P<s>\d(?:" + _lb1(rb"\d", rb"0-9A-Za-z.-") + rb"|(?<=\d[ -]\d))(?:[ -]?\d){12,})", _F)
_SECRET_KEY_ANCHORS = (b"pass", b"pwd", b"secret", b"token", b"key", b"credential", b"auth",
                       b"cookie", b"session", b"connection")

_AWS_ID_RE = re.compile(rb"(?P<s>A(?:KIA|SIA|BIA|CCA|3T[A-Z0-9])[A-Z0-9]{16})", _F)
_AWS_ID_ANCHORS = (b"akia", b"asia", b"abia", b"acca", b"a3t")
_JWT_RE = re.compile(rb"(?P<s>(?P<h>e[yw][A-Za-z0-9_-]{8,1024})\.[A-Za-z0-9_-]{2,8192}\.[A-Za-z0-9_-]{0,2048})", _F)


def _jwt_find(text: bytes, pos: int, heads: list[int]) -> Iterator[re.Match[bytes]]:
    """JWTs, also glued to a prefix of token characters.

    No left boundary: "AAAAeyJhbGci..." is a JWT to anyone who looks for "eyJ". A prefix
    that itself starts like a header ("eyXXXXeyJhbGci...") makes the leftmost match fail
    validation; the real header is then a suffix of that header run, so every later "ey"/"ew"
    inside it is tried (at most the header's 1024 characters; the header is checked before
    the whole token is matched again).

    ``heads``: where the trigger (``e[yw]`` + 8 base64url characters, how every match starts)
    occurs; the leftmost match from a point is at the first of them there that matches.
    """
    at = pos
    while (m := _first_match(_JWT_RE, text, heads, at)) is not None:
        if _jwt_ok(text, m):
            yield m
            at = m.end()
            continue
        h_end = m.end("h")
        q = m.start() + 1
        found = None
        while found is None:
            q = min((i for i in (text.find(b"ey", q, h_end - 9), text.find(b"ew", q, h_end - 9)) if i >= 0),
                    default=-1)
            if q < 0:
                break
            if _header_ok(text[q:h_end]):
                found = _JWT_RE.match(text, q)
            q += 1
        if found is not None and _jwt_ok(text, found):
            yield found
            at = found.end()
        else:
            at = h_end


def _first_match(pattern: re.Pattern[bytes], text: bytes, starts: list[int], at: int) -> re.Match[bytes] | None:
    """``pattern.search(text, at)`` for the JWT pattern, whose matches start only at ``starts``.

    Walks the list by index (a slice per call copied the rest of it: quadratic in a flood of
    heads, 3.4 s for 512 KiB of ``eyJhbGciOi.``). A start whose header cannot end in a dot -
    the header is all of the base64url run from it, so that run must end at a "." within
    1026 bytes - is skipped without running the pattern, which would scan up to 1 KiB of the
    run first (a run of "ey" * 500000 holds half a million starts).
    """
    run_end = -1
    for k in range(bisect.bisect_left(starts, at), len(starts)):
        i = starts[k]
        if i >= run_end:  # a later start inside the same run shares its end
            run_end = _B64URL_RUN.match(text, i).end()  # type: ignore[union-attr]  # matches empty
        if run_end - i > _JWT_HEADER_MAX or text[run_end : run_end + 1] != b".":
            continue
        if (m := pattern.match(text, i)) is not None:
            return m
    return None


_B64URL_RUN = re.compile(rb"[A-Za-z0-9_-]*")
_JWT_HEADER_MAX = 2 + 1024  # "e[yw]" and up to 1024 more (_JWT_RE's group h)


class _JwtOpenFrom:
    """``open_from`` of the JWT rule (``stream._open_start``): the start at a trigger, unless
    the header from it can no longer end in a dot - the same test as ``_first_match``: its
    base64url run already holds more than ``_JWT_HEADER_MAX`` bytes, or ends at a byte that
    is not a dot. Without it a stream retried the partial pattern at every "ey" of a run, each
    try scanning up to 1 KiB: 14 s of CPU per MiB of "ey" fed in 4 KiB chunks (session 11).
    The run's end is shared by the triggers inside it (the last one is remembered, with the
    text it belongs to, as one tuple: the masking pool's threads share this object). The text
    is held by reference, not by ``id`` - a freed text's id can come back with other bytes;
    so the last window a stream searched stays alive until the next search."""

    def __init__(self) -> None:
        self._last: tuple[bytes | None, int, int] = (None, 0, 0)

    def __call__(self, text: bytes, i: int) -> tuple[int, ...]:
        last_text, run_start, run_end = self._last
        if last_text is not text or not run_start <= i < run_end:
            run_start, run_end = i, _B64URL_RUN.match(text, i).end()  # type: ignore[union-attr]  # matches empty
            self._last = (text, run_start, run_end)
        if run_end - i > _JWT_HEADER_MAX or (run_end < len(text) and text[run_end] != 0x2E):
            return ()
        return (i,)


_SSN_RE = re.compile(
    rb"(?P<s>(?P<a>\d" + _lb1(rb"\d", rb"0-9A-Za-z.$#/-")
    + rb"\d\d)(?P<sep>[ -]?)(?P<g>\d{2})(?P=sep)(?P<n>\d{4}))(?![0-9A-Za-z]|[./-]\d)", _F)
_SSN_MAX = 11
_SSN_LABELS = (b"ssn", b"social", b"soc", b"ss#", b"tax", b"tin")


def _ssn_find(text: bytes, pos: int, labels: list[int]) -> Iterator[re.Match[bytes]]:
    """Numbers that may follow an SSN label (``_ssn_ok``): the label lies within the 32 bytes
    before the number and holds one of ``_SSN_LABELS`` (the trigger), so a number can only
    start up to 32 bytes after a trigger. Those windows are searched (merged, in order);
    no number spans a window's start (a letter of the label), so the matches there are those
    of a search of the whole text."""
    i, n = bisect.bisect_left(labels, pos - SSN_CONTEXT_BYTES), len(labels)
    while i < n:
        a, b = labels[i], labels[i] + SSN_CONTEXT_BYTES
        i += 1
        while i < n and labels[i] <= b:
            b = labels[i] + SSN_CONTEXT_BYTES
            i += 1
        for m in _SSN_RE.finditer(text, max(a, pos), b + _SSN_MAX + SLACK):
            if m.start() > b:
                break
            yield m


SLACK = 4  # bytes the lookahead of a pattern reads past its match (at most 2)


_PEM_HEAD = rb"-----BEGIN (?P<label>(?:[A-Z0-9]{1,16} ){0,3}PRIVATE KEY(?: BLOCK)?)-----"
_PEM_RE = re.compile(
    _PEM_HEAD + rb"(?:(?P<body>.{0,%d}?)-----END (?P=label)-----|" % PEM_BODY_MAX + _PEM_RUN + rb")",
    _F | re.DOTALL)
# The same with the closed-block alternative disabled (same groups; ``body`` never set): what
# _PEM_RE matches where no END marker is within reach.
_PEM_OPEN_RE = re.compile(_PEM_HEAD + rb"(?:(?P<body>(?!))|" + _PEM_RUN + rb")", _F | re.DOTALL)
_PEM_END = b"-----END "
_PEM_REACH = PEM_BODY_MAX + 128  # from a BEGIN to the latest start of its END (header <= 84 bytes)


def _pem_find(text: bytes, pos: int, heads: list[int]) -> Iterator[re.Match[bytes]]:
    """The matches of ``_PEM_RE`` in order, each at a BEGIN (``heads``) not inside the last one,
    without the lazy 8 KiB body search at a BEGIN with no END marker within reach (there only
    the key-material alternative can match: ``_PEM_OPEN_RE``). A flood of BEGIN lines searched
    8 KiB each: 3.5-4 s of CPU per MiB; the END markers are now found once per text (session 11)."""
    ends: list[int] | None = None
    at = pos
    for i in heads[bisect.bisect_left(heads, pos):]:
        if i < at:
            continue
        if ends is None:
            ends = [m.start() for m in re.finditer(re.escape(_PEM_END), text)]
        k = bisect.bisect_left(ends, i)
        pattern = _PEM_RE if k < len(ends) and ends[k] < i + _PEM_REACH else _PEM_OPEN_RE
        m = pattern.match(text, i)
        if m is not None:
            yield m
            at = max(m.end(), m.start() + 1)


_JWT_TRIGGER = Trigger(rb"e[yw][A-Za-z0-9_\-]{8}", 10)


RULES: dict[str, tuple[Rule, ...]] = {
    "aws-access-key-id": (
        # Access key ids only: AKIA long-term, ASIA STS, ABIA/ACCA service keys, A3T legacy.
        # (AIDA/AROA... are public unique ids, not credentials.) No word boundaries: an id is
        # always 20 characters, so one glued into a longer run ("AAAAAKIA...", "...EXAMPLEZZ")
        # is still readable to anyone who knows the prefix. Every occurrence is tried (the
        # anchored finder), so a decoy "AKIA" just before the real one cannot shift the match.
        Rule("aws-access-key-id", _AWS_ID_RE, max_len=20, triggers=tuple(map(literal, _AWS_ID_ANCHORS)),
             find=anchored(_AWS_ID_RE, at_offset(0)), open_from=at_offset(0), open_tail=4),
    ),
    "aws-secret-key": (
        # Context required (see module docstring): a credential label (...secret...key), a
        # separator, then exactly 40 characters of the secret-key alphabet.
        Rule("aws-secret-key", _AWS_SECRET_RE, max_len=100, triggers=(literal(b"secret"),),
             find=anchored(_AWS_SECRET_RE, at_offset(0)), open_from=at_offset(0), open_tail=6),
    ),
    "private-key": (
        # A closed block is masked whole (any content, headers included, escaped newlines in
        # JSON too); a BEGIN with no END within PEM_BODY_MAX masks the key-material run after it.
        Rule("private-key", _PEM_RE,
            max_len=PEM_BODY_MAX + 200, triggers=(literal(b"-----BEGIN ", caseless=False),),
            find=_pem_find, continuation=re.compile(_PEM_RUN, _F), open_from=at_offset(0), open_tail=11),
    ),
    "jwt": (
        # header.payload.signature in base64url; the header must start like a JSON object
        # ("ey" for '{"', "ew" for '{\n') and decode to one with "alg". A JWT glued to other
        # token characters is still one (see _jwt_find).
        Rule("jwt", _JWT_RE, max_len=11300, triggers=(_JWT_TRIGGER,), validate=_jwt_ok, find=_jwt_find,
             open_from=_JwtOpenFrom(), open_tail=10),
    ),
    "bearer-token": (
        # "Authorization: Bearer x" (header dumps, JSON, curl lines): anything after Bearer.
        Rule("bearer-token", _AUTH_RE, max_len=8300, triggers=(literal(b"authorization"),),
             validate=lambda t, m: _not_token(m.group("s")), find=anchored(_AUTH_RE, at_offset(0)),
             open_from=at_offset(0), open_tail=13),
        # "Bearer x" without the label: only token-looking values (see _bare_bearer_ok).
        Rule("bearer-token", _BEARER_RE, max_len=8220, triggers=(literal(b"bearer"),),
             validate=_bare_bearer_ok, find=anchored(_BEARER_RE, at_offset(0)), open_from=at_offset(0), open_tail=6),
        # OAuth token responses: {"access_token": "...", "token_type": "Bearer"}.
        Rule("bearer-token", _OAUTH_RE, max_len=8300,
             triggers=tuple(map(literal, (b"access_token", b"refresh_token", b"id_token"))),
             validate=_oauth_ok, lookahead=_CTX, lookbehind=_CTX, find=anchored(_OAUTH_RE, at_offset(1)),
             open_from=at_offset(1), open_tail=1 + 13),
    ),
    "secret-json-key": (
        # Any string value under a secret-named key; the key is kept, the value (escapes and
        # all, up to 4096 characters) is masked. The name test is in secret_key_name().
        Rule("secret-json-key", _JSON_KEY_RE, max_len=8400, triggers=tuple(map(literal, _SECRET_KEY_ANCHORS)),
             validate=_json_key_ok, find=anchored(_JSON_KEY_RE, _quote_before),
             # A key that becomes a secret's has a key word within 101 bytes after its quote:
             # one already there, or one still to come (the last 101 + 10 bytes).
             open_from=_quote_before, open_tail=_KEY_QUOTE_MAX + 11),
    ),
    "email": (
        # The pattern without boundaries (a superset, what a stream's partial match holds);
        # the finder prefers the bounded match and falls back to the glued one (_email_find).
        Rule("email", _EMAIL_GLUED_RE, max_len=64 + 1 + 8 * 64 + 24, triggers=(literal(b"@"),),
             validate=_email_ok, find=_email_find),
    ),
    "credit-card": (
        # 13-19 digits, bare or grouped 4-4-4-x / 4-6-5 with one consistent separator; the
        # groupings inside a run of digit groups are tried by _card_find (a window is at most
        # 19 digits and 4 separators: max_len bounds what a stream holds for a run's end).
        Rule("credit-card", _CARD_RUN_RE, max_len=90, triggers=(_CARD_TRIGGER,), validate=_card_ok,
             find=_card_find, runs=True),
    ),
    "us-ssn": (
        Rule("us-ssn", _SSN_RE, max_len=_SSN_MAX, triggers=tuple(map(literal, _SSN_LABELS)),
             validate=_ssn_ok, lookbehind=SSN_CONTEXT_BYTES, find=_ssn_find),
    ),
}
DETECTOR_NAMES: tuple[str, ...] = tuple(RULES)
ALL = "all"


def validate_detectors(names: Iterable[str]) -> list[str]:
    """One error message per unknown detector name (``all`` is accepted)."""
    known = set(DETECTOR_NAMES) | {ALL}
    return [
        f"unknown detector {name!r} (known: {', '.join(DETECTOR_NAMES)}, all)"
        for name in names if name not in known
    ]


def resolve_rules(names: Iterable[str]) -> tuple[Rule, ...]:
    """The rules for the given names (``all`` = every detector), unknown names ignored."""
    wanted = set(names)
    if ALL in wanted:
        wanted = set(DETECTOR_NAMES)
    return tuple(rule for name in DETECTOR_NAMES if name in wanted for rule in RULES[name])


# The trigger database of every detector, compiled once at import (~0.1 s, Hyperscan) rather
# than on the first masked body; every subset of the built-in rules scans with it.
prefilter_for(resolve_rules([ALL]))

