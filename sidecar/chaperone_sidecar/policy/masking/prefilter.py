"""One pass over a text for every detector: where each one can match at all (Hyperscan).

Before issue 16 each detector looked for its own candidates: a regex search over the whole
text, a ``bytes.find`` loop per anchor word, a ``lower()`` copy for case-insensitive anchors,
one more regex pass for base64 runs. On 1 MiB of text that was ~15-40 MB/s with every
detector on, although almost all of that text holds no candidate at all.

Now one Hyperscan database holds a *trigger* of every rule (``spans.Trigger``): a literal or a
short fixed-shape pattern that every match of the rule contains at a known place (``AKIA``,
``secret``, ``-----BEGIN ``, ``e[yw]`` + 8 base64url characters, 13 digits after a non-digit,
``@``, an SSN label word ...). One scan reports where each trigger occurs; a rule whose
triggers do not occur is skipped, and the others run their exact matcher (the same regexes
and validators as before) only at or around those places (see each finder in
``detectors.py`` for why that finds exactly what a scan of the whole text found). Measured
(docs/masking.md, "Engine choice"): Hyperscan scans 1 MiB of prose for all triggers in
~0.5 ms; RE2's one combined alternation needs ~1.7 ms and cannot report overlapping
occurrences; Python's ``re`` alternation ~240 ms.

A trigger may be *native* (``Trigger.native``): a function that returns exactly the positions
Hyperscan would report for its pattern, found without it. The card trigger is one
(``_stretches.card_head_ends``): its counted digit classes were 0.8-1.2 ms of the one pass's
1.5-1.7 ms per MiB of prose and JSON, the function ~0.2 ms. Its pattern stays the
specification (test_stretches.py compares the two); a database holds only the others.

Results are cached for the last text scanned in each thread (by identity; the cache holds a
reference, so the identity cannot be reused): the whole-body pipeline scans the same bytes
object for the detectors and then for base64 runs when nothing was masked. Only texts up to
``CACHE_MAX`` (4 MiB) are kept, so a large body is not held after its masking (a larger one is
scanned twice: ~2 ms per MiB more). Hyperscan's
scratch space is per thread (the scan releases the GIL). The engine - the system's
``libhs.so.5`` or the ``hyperscan`` wheel - is :mod:`.hs_compile`'s choice.
"""

from __future__ import annotations

import ctypes
import threading
from collections import defaultdict
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from .hs_compile import compile_database
from .libhs import HS_FLAG_CASELESS


@dataclass(frozen=True, slots=True)
class Trigger:
    """A Hyperscan pattern every match of a rule contains.

    ``width``: the fixed length of every match, so its start is ``end - width`` (literals and
    fixed-shape patterns); ``None`` reports end offsets. ``native``: a function that returns
    the end offsets Hyperscan reports for ``pattern`` in a text (sorted), used instead of a
    scan (see the module docstring)."""

    pattern: bytes
    width: int | None = None
    caseless: bool = False
    native: Callable[[bytes], list[int]] | None = field(default=None, compare=False)
    # Triggers key the hits of every scan (``Hits``), looked up ~80 times per body: the
    # generated __hash__ (a Python call hashing a tuple of the fields) was most of the time of
    # masking a clean 1 KiB body (issue 16, session 6); the hash is computed once instead.
    _hash: int = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "_hash", hash((self.pattern, self.width, self.caseless)))

    def __hash__(self) -> int:
        return self._hash


def literal(word: bytes, caseless: bool = True) -> Trigger:
    """A literal trigger (Hyperscan metacharacters escaped)."""
    escaped = b"".join(b"\\x%02x" % c if not chr(c).isalnum() else bytes((c,)) for c in word)
    return Trigger(escaped, len(word), caseless)


class Hits:
    """Where the triggers of one scan occurred: per trigger, sorted positions (starts for
    fixed-width triggers, ends otherwise)."""

    __slots__ = ("_by_trigger", "_merged")

    def __init__(self, by_trigger: dict[Trigger, list[int]]) -> None:
        self._by_trigger = by_trigger
        self._merged: dict[tuple[Trigger, ...], list[int]] = {}

    def positions(self, triggers: tuple[Trigger, ...]) -> list[int]:
        """Sorted, unique positions of any of ``triggers``."""
        if not self._by_trigger:  # a clean text: no trigger at all (the common case)
            return []
        if len(triggers) == 1:
            return self._by_trigger.get(triggers[0], [])
        merged = self._merged.get(triggers)
        if merged is None:
            # Most texts hold few of the triggers: a rule with none of them or one costs no set
            # (the binary scan of a small text per 16 KiB chunk: 40 % of it was these sets).
            present = [self._by_trigger[t] for t in triggers if t in self._by_trigger]
            if len(present) <= 1:
                merged = present[0] if present else []
            else:
                merged = sorted({p for found in present for p in found})
            self._merged[triggers] = merged
        return merged


CACHE_MAX = 4 << 20  # the last text of a thread is cached only up to this size


class Prefilter:
    """One compiled Hyperscan database for a set of triggers."""

    def __init__(self, triggers: Iterable[Trigger]) -> None:
        self.triggers: tuple[Trigger, ...] = tuple(dict.fromkeys(triggers))
        self.trigger_set = frozenset(self.triggers)
        self._scanned = tuple(t for t in self.triggers if t.native is None)
        self._native = tuple((t, t.native) for t in self.triggers if t.native is not None)
        flags = [HS_FLAG_CASELESS if t.caseless else 0 for t in self._scanned]
        # compiled in a child process, loaded serialized: the compiler's pages stay out (hs_compile)
        self._db = compile_database([t.pattern for t in self._scanned], flags) if self._scanned else None
        self._local = threading.local()
        _release_freed_heap()

    def _scratch(self) -> Any:  # the engine's Scratch (hs_compile: the system library or the wheel)
        assert self._db is not None
        scratch = getattr(self._local, "scratch", None)
        if scratch is None:
            scratch = self._local.scratch = self._db.scratch.clone()
        return scratch

    def hits(self, text: bytes) -> Hits:
        """Trigger positions in ``text`` (cached for the last text of this thread)."""
        last = getattr(self._local, "last", None)
        if last is not None and last[0] is text:
            return last[1]
        # Only the triggers that occur get a list (a clean text: none; one per trigger was a
        # third of a clean 1 KiB body's scan, session 6).
        ends: defaultdict[int, list[int]] = defaultdict(list)
        if text and self._db is not None:
            self._db.scan(text, match_event_handler=_collect, context=ends, scratch=self._scratch())
        by_trigger: dict[Trigger, list[int]] = {}
        for i, found in ends.items():
            t = self._scanned[i]
            # Hyperscan reports in order of end offset; equal-width starts keep that order.
            found.sort()  # in end order already, but Hyperscan does not promise it for all engines
            by_trigger[t] = [e - t.width for e in found] if t.width is not None else found
        for t, native in self._native:
            if text and (found := native(text)):
                by_trigger[t] = [e - t.width for e in found] if t.width is not None else found
        result = Hits(by_trigger)
        # Larger texts are not kept: the cache would hold them until the thread's next scan.
        self._local.last = (text, result) if len(text) <= CACHE_MAX else None
        return result


# Where a mask token may start: findings inside one are dropped (``spans.scan``), runs inside
# one are not decoded (``decoded._runs``).
MASKED = literal(b"[MASKED:", caseless=False)
# Where a JSON string escapes printable ASCII or "/" (``decoded.canonical_json_strings``'s
# pattern): a JSON body without one is scanned as it is. Python's re searched for it at ~2 GB/s
# (0.5 ms per MiB of JSON holding "\u00e9" escapes); in the one pass it costs nothing: with it
# the database of every detector scans 1 MiB of prose in 0.13 ms instead of 0.54 (JSON 0.12 /
# 0.31, SSE 0.11 / 0.31; libvectorscan5 here). Measured, not designed: another literal ("zzzq")
# gains less, a lone backslash loses; it is how the compiler groups the literals.
JSON_ESCAPE = Trigger(rb"\\(?:u00[2-7][0-9A-Fa-f]|/)")
# In every database besides the rules' own triggers.
SHARED_TRIGGERS = (MASKED, JSON_ESCAPE)


def _release_freed_heap() -> None:
    """Give the heap Hyperscan's compiler freed back to the system (glibc keeps it otherwise):
    measured ~7 MB of the sidecar's RSS for the database of every detector. Not glibc: no-op."""
    try:
        ctypes.CDLL(None).malloc_trim(0)
    except (OSError, AttributeError):
        pass


def _collect(id_: int, start: int, end: int, flags: int, ends: Any) -> None:  # ends: defaultdict[int, list[int]]
    # Called once per trigger hit (a flood: once per few bytes): no cast() call in here.
    ends[id_].append(end)
