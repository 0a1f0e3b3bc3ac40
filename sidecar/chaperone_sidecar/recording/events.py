"""Session events: the schema, canonical JSON, and the hash chain that makes a recording tamper-evident.

Why a chain: a recording is evidence of what an agent did. Each event carries ``prev`` (the hash
of the event before it) and its own ``hash``, so removing, reordering or editing any stored event
breaks a link that ``verify`` can point at. The first event's ``prev`` is a per-session genesis
value, so events cannot be spliced from one session into another.

Canonical form: JSON with sorted keys, no whitespace, UTF-8 (not ``\\u`` escapes), no NaN. An
event's *canonical bytes* are the canonical JSON of the event **without** its ``hash`` field;
``hash`` is the lowercase hex SHA-256 of those bytes. A stored line is the canonical JSON of the
whole event (``hash`` included) followed by ``\\n``. Avoid floats in payloads (use integer
milliseconds): they are canonical in Python, but not every language prints them the same way.

The recorder never masks: bodies reach it already masked by the masking addon, and are stored as
given (text when valid UTF-8, base64 otherwise).

Encoding: the canonical form is defined by the standard library's encoder (``_CANONICAL``);
:func:`canonical_json` produces the same bytes with orjson whenever the value is made of
exactly ``dict`` (``str`` keys), ``list``, ``tuple``, ``str``, ``int``, ``bool`` and ``None``
(:func:`_plain`: no float - orjson writes exponents differently and NaN as ``null`` - no
subclass, nothing orjson would serialize that the standard library refuses), and falls back to
the standard library for everything else and whatever orjson refuses (ints beyond 64 bits, lone
surrogates, depth), so results and errors are the standard library's. Measured (issue 16,
session 5, bench/bench_recording.py's events, best of 9 alternating runs on a loaded machine):
the standard library's sorted-keys C encoder ~45 µs per event, orjson ~3-7 µs plus ~8-10 µs
for the type walk; a whole seal 25-33 µs before, 14-23 µs after. The differential test
(tests/sidecar/recording/test_canonical_json.py) compares both on generated values.
"""

from __future__ import annotations

import base64
import hashlib
import json
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import orjson

EVENT_TYPES = (
    "session-start", "request", "response", "decision", "approval", "error", "session-end",
    "stream",  # one frame of an exec/attach/port-forward session (addons/sessions.py)
    "tool-use",  # a tool_use block of an LLM answer (addons/tool_use.py)
)
SCHEMA_VERSION = 1
GENESIS_DOMAIN = b"chaperone/recording/v1/genesis\x00"


# One encoder, built once: ``json.dumps`` with non-default options builds a new one per call.
_CANONICAL = json.JSONEncoder(
    sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False,
).encode


# orjson with sorted keys; subclasses, datetimes and dataclasses are handed to ``default`` (there
# is none, so they raise) instead of being serialized as the standard library would not.
_ORJSON_OPTIONS = (orjson.OPT_SORT_KEYS | orjson.OPT_PASSTHROUGH_SUBCLASS
                   | orjson.OPT_PASSTHROUGH_DATETIME | orjson.OPT_PASSTHROUGH_DATACLASS)
_ORJSON = orjson.dumps
_SCALARS = frozenset((str, int, bool, type(None)))
_MAX_DEPTH = 200  # orjson refuses beyond 254 levels; deeper values take the stdlib's path


def _plain(value: Any, depth: int = 0) -> bool:
    """Whether ``value`` holds only types whose orjson encoding is the canonical one: exactly
    dict (str keys), list, tuple, str, int, bool, None - no float, no subclass."""
    kind = type(value)
    if kind is dict:
        if depth > _MAX_DEPTH:
            return False
        for key, item in value.items():
            if type(key) is not str or (type(item) not in _SCALARS and not _plain(item, depth + 1)):
                return False
        return True
    if kind is list or kind is tuple:
        if depth > _MAX_DEPTH:
            return False
        for item in value:
            if type(item) not in _SCALARS and not _plain(item, depth + 1):
                return False
        return True
    return kind in _SCALARS


def canonical_json(value: Any) -> bytes:
    """Canonical JSON bytes: sorted keys, no spaces, UTF-8, NaN/Infinity refused."""
    if _plain(value):
        try:
            return _ORJSON(value, option=_ORJSON_OPTIONS)
        except orjson.JSONEncodeError:
            pass  # ints beyond 64 bits, lone surrogates: the standard library decides (as ever)
    return _CANONICAL(value).encode("utf-8")


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def genesis_hash(session: str) -> str:
    """The ``prev`` of a session's first event: binds the chain to the session id."""
    return sha256_hex(GENESIS_DOMAIN + session.encode("utf-8"))


def event_hash(event: Mapping[str, Any]) -> str:
    """SHA-256 of the event's canonical bytes (every field except ``hash`` itself)."""
    return sha256_hex(canonical_json({k: v for k, v in event.items() if k != "hash"}))


def format_time(moment: datetime) -> str:
    """RFC 3339 UTC with microseconds, e.g. ``2025-01-02T03:04:05.123456Z``."""
    if moment.tzinfo is None:
        raise ValueError("event times must be timezone-aware")
    if moment.tzinfo is not UTC:
        moment = moment.astimezone(UTC)
    if moment.year < 1000:  # strftime writes such years unpadded ("5-01-02T..."): as ever
        return moment.strftime("%Y-%m-%dT%H:%M:%S.%fZ")
    # isoformat of a UTC time ends in "+00:00"; half the cost of strftime (issue 16)
    return moment.isoformat(timespec="microseconds")[:-6] + "Z"


def utc_now() -> datetime:
    return datetime.now(UTC)


def encode_body(body: bytes | str | None, **extra: Any) -> dict[str, Any] | None:
    """A body as stored: ``{"text": ...}`` when UTF-8, else ``{"base64": ...}``, plus ``size``.

    ``extra`` carries what the masker knows (e.g. ``truncated=True``, ``masked=3``).
    """
    if body is None:
        return None
    raw = body.encode("utf-8") if isinstance(body, str) else bytes(body)
    try:
        stored: dict[str, Any] = {"text": raw.decode("utf-8")}
    except UnicodeDecodeError:
        stored = {"base64": base64.b64encode(raw).decode("ascii")}
    stored["size"] = len(raw)
    stored.update(extra)
    return stored


def decode_body(stored: Mapping[str, Any] | None) -> bytes:
    """Inverse of :func:`encode_body` (``b""`` for a missing body)."""
    if not stored:
        return b""
    if "base64" in stored:
        return base64.b64decode(stored["base64"])
    return str(stored.get("text", "")).encode("utf-8")


@dataclass(frozen=True)
class SessionIdentity:
    """Who a recording speaks for: the pod (downward API), its creator (admission) and an
    optional end user. Not :class:`chaperone_sidecar.policy.model.Identity` (what policies
    match on): this is the recorded, serialisable form (:meth:`to_dict`)."""

    namespace: str = ""
    pod: str = ""
    pod_uid: str = ""
    service_account: str = ""
    creator: str = ""
    on_behalf_of: str = ""

    def to_dict(self) -> dict[str, str]:
        names = {"pod_uid": "podUID", "service_account": "serviceAccount",
                 "on_behalf_of": "onBehalfOf"}
        return {names.get(k, k): v for k, v in self.__dict__.items() if v}


def who(identity: Mapping[str, Any] | None) -> str:
    """A short human label for an identity: the end user, else the creator, else the pod's SA."""
    identity = identity or {}
    if identity.get("onBehalfOf"):
        return str(identity["onBehalfOf"])
    if identity.get("creator"):
        return str(identity["creator"])
    if identity.get("serviceAccount"):
        return f"system:serviceaccount:{identity.get('namespace', '')}:{identity['serviceAccount']}"
    return str(identity.get("pod", "") or "?")


def new_event(type: str, *, flow: str | None = None, data: Mapping[str, Any] | None = None,
              identity: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """An unsealed event as callers hand it to ``Recorder.append`` (seq/time/hashes come later)."""
    if type not in EVENT_TYPES:
        raise ValueError(f"unknown event type {type!r}; expected one of {', '.join(EVENT_TYPES)}")
    event: dict[str, Any] = {"type": type, "data": dict(data or {})}
    if flow is not None:
        event["flow"] = flow
    if identity is not None:
        event["identity"] = dict(identity)
    return event


class Chain:
    """The running end of one session's chain: next ``seq`` and the last event's hash."""

    def __init__(self, session: str, seq: int = 0, last_hash: str | None = None) -> None:
        self.session = session
        self.seq = seq
        self.last_hash = last_hash or genesis_hash(session)

    def seal(self, event: Mapping[str, Any]) -> tuple[dict[str, Any], bytes]:
        """Stamp seq/prev/hash onto a copy of ``event``; return it and its stored line.

        Raises ValueError when the event cannot be canonical JSON (then the chain is unchanged).
        """
        sealed = {k: v for k, v in event.items() if k not in ("hash", "prev", "seq")}
        sealed["v"] = SCHEMA_VERSION
        sealed["session"] = self.session
        sealed["seq"] = self.seq
        sealed["prev"] = self.last_hash
        try:
            # Encode once. The top-level keys are split around "hash" in sorted order, so the
            # hashed bytes (without "hash") and the stored line (with it) are both made of
            # the same two encodings - byte-identical to encoding each whole dict. The hashed
            # bytes are fed to the hash piece by piece and the line is joined once: a recorded
            # body is copied once here, not three times (64 KiB body: 44.5 -> 39.4 us).
            low = memoryview(canonical_json({k: v for k, v in sealed.items() if k < "hash"}))[1:-1]
            high = memoryview(canonical_json({k: v for k, v in sealed.items() if k > "hash"}))[1:-1]
            hasher = hashlib.sha256(b"{")
            hasher.update(low)
            if low and high:
                hasher.update(b",")
            hasher.update(high)
            hasher.update(b"}")
            digest = hasher.hexdigest()
            line = b"".join((b"{", low, b"," if low else b"", b'"hash":"', digest.encode(), b'"',
                             b"," if high else b"", high, b"}\n"))
            sealed["hash"] = digest
        except (TypeError, ValueError, UnicodeEncodeError) as exc:
            raise ValueError(f"event is not canonical-JSON serialisable: {exc}") from None
        self.seq += 1
        self.last_hash = sealed["hash"]
        return sealed, line


@dataclass(frozen=True)
class ChainProblem:
    """One broken link: where (object key or file, line, seq) and what was expected vs found."""

    where: str
    line: int
    seq: int | None
    kind: str
    expected: str = ""
    found: str = ""

    def __str__(self) -> str:
        text = f"{self.where} line {self.line} (seq {self.seq}): {self.kind}"
        if self.expected or self.found:
            text += f": expected {self.expected}, found {self.found}"
        return text

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


class ChainChecker:
    """Re-validates stored lines in order, across chunks; used by ``verify`` and spool recovery.

    Checks per line: UTF-8, JSON object, stored bytes are exactly its canonical form, session,
    seq continuity, ``prev`` equals the previous hash, ``hash`` equals the recomputed hash. After
    a bad line the checker resynchronises on what the line claims (when it can be parsed), so one
    edit is reported once rather than as a cascade.
    """

    def __init__(self, session: str, seq: int = 0, last_hash: str | None = None) -> None:
        self.session = session
        self.seq = seq
        self.last_hash: str | None = last_hash or genesis_hash(session)  # None: resynchronising
        self.events = 0

    def check_line(self, where: str, line_no: int, line: bytes) -> tuple[dict | None, list[ChainProblem]]:
        """Check one stored line (with or without its trailing newline)."""
        expected_seq = self.seq
        problems: list[ChainProblem] = []

        def bad(kind: str, expected: Any = "", found: Any = "") -> None:
            problems.append(ChainProblem(where, line_no, expected_seq, kind, str(expected),
                                         str(found)))

        body = line[:-1] if line.endswith(b"\n") else line
        try:
            event = json.loads(body.decode("utf-8"))
            if not isinstance(event, dict):
                raise ValueError("not a JSON object")
        except (UnicodeDecodeError, ValueError) as exc:
            bad("unreadable event", "a canonical JSON object", f"{type(exc).__name__}: {exc}")
            self.seq, self.last_hash = expected_seq + 1, None  # resync on the next line
            return None, problems
        resync = self.last_hash is None
        if canonical_json(event) != body:
            bad("bytes differ from the canonical form", "canonical JSON", "altered bytes")
        if event.get("session") != self.session:
            bad("session mismatch", self.session, event.get("session"))
        if not resync and event.get("seq") != expected_seq:
            bad("seq mismatch", expected_seq, event.get("seq"))
        if not resync and event.get("prev") != self.last_hash:
            bad("prev does not match the previous event's hash", self.last_hash, event.get("prev"))
        recomputed = event_hash(event)
        authentic = event.get("hash") == recomputed
        if not authentic:
            bad("hash mismatch", recomputed, event.get("hash"))
        if event.get("type") not in EVENT_TYPES:
            bad("unknown event type", "|".join(EVENT_TYPES), event.get("type"))
        self.events += 1
        # Resynchronise: an authentic line (its own hash holds) is trusted about its seq (an
        # event was removed before it); an edited line keeps the position's numbering.
        claimed = event.get("seq")
        self.seq = claimed + 1 if (authentic or resync) and isinstance(claimed, int) else expected_seq + 1
        stored_hash = event.get("hash")
        self.last_hash = stored_hash if isinstance(stored_hash, str) else None
        return event, problems


def split_lines(data: bytes) -> tuple[list[bytes], bytes]:
    """Complete ``\\n``-terminated lines and the torn tail after the last newline (maybe b"").

    Only ``\\n`` ends a line (canonical JSON escapes every control character): a raw CR in a
    corrupt line leaves it one line, as :func:`outline` counts it (``bytes.splitlines`` split there).
    """
    cut = data.rfind(b"\n") + 1
    return [line + b"\n" for line in data[: cut - 1].split(b"\n")] if cut else [], data[cut:]


def outline(data: bytes) -> tuple[int, bytes, bytes, int]:
    """(complete lines, the first, the last, where the torn tail after the last newline starts)
    of a segment - what its ``shipped.jsonl`` entry needs, without splitting it into lines:
    ``memchr`` (``bytes.find``) per line: a 1 MiB segment of 64 KiB events ~15 us and one of
    1 KiB events ~120 us, where splitting copied every line (270-740 us and ~350 us) and
    ``bytes.count`` looks at each byte (~250 us). The shipper reads each segment once."""
    cut = data.rfind(b"\n") + 1
    if not cut:
        return 0, b"", b"", 0
    count, at, find = 0, -1, data.find
    while (at := find(b"\n", at + 1, cut)) >= 0:
        count += 1
    return count, data[: data.find(b"\n") + 1], data[data.rfind(b"\n", 0, cut - 1) + 1 : cut], cut


def iter_events(data: bytes) -> Iterator[dict[str, Any]]:
    """Parse the complete lines of a chunk, without checking them (for display)."""
    for line in split_lines(data)[0]:
        try:
            yield json.loads(line)
        except ValueError:
            continue
