"""git's smart-HTTP wire format: pkt-line framing, side-band, report-status and ``ERR``.

Two users, one format: the git classifier (``policy/classify/git.py``) reads the pkt-lines a
client sends to ``git-receive-pack``; the refusal module (``addons/refusal.py``) writes the
answers ``git`` itself prints. Both follow git's ``Documentation/gitprotocol-common.txt``,
``gitprotocol-pack.txt`` and ``gitprotocol-http.txt``:

* a pkt-line is four lower-case hex digits of length (including the four) and the payload;
  ``0000`` is a flush, ``0001`` a delimiter, ``0002`` a response end (protocol v2); payloads are
  at most 65516 bytes;
* a ``receive-pack`` answer is the report-status: ``unpack ok`` then ``ok <ref>`` or
  ``ng <ref> <reason>`` per command and a flush; when the client asked for ``side-band-64k``
  (or ``side-band``) the report travels inside band 1, band 2 carries progress text (printed as
  ``remote: ...``) and band 3 a fatal error;
* ``ERR <message>`` as the first pkt-line of an answer makes every git client die with
  ``remote error: <message>`` (advertisements and upload-pack answers).

**Decision**: a refusal of a push is a report-status, not an ``ERR``, whenever the request's
commands are known and the client asked for report-status: git then prints, per ref,
``! [remote rejected] main -> main (<reason>)`` and the reasons name the rule and the
ApprovalRequest; the longer explanation goes to band 2 when side-band is on.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Literal

__all__ = ["FLUSH", "MAX_PAYLOAD", "PktError", "Truncated", "Pkt", "read_pkt", "pkt",
           "err_pkt", "sideband_error", "report_status", "one_line"]

FLUSH = b"0000"
MAX_PAYLOAD = 65516  # LARGE_PACKET_MAX (65520) minus the length prefix
_SIDEBAND_MAX = {"side-band-64k": 65515, "side-band": 999}  # payload per band packet, minus the band byte


class PktError(ValueError):
    """The bytes are not pkt-lines."""


class Truncated(PktError):
    """The pkt-line does not end within the bytes given (more of the body is needed)."""


@dataclass(frozen=True, slots=True)
class Pkt:
    kind: Literal["data", "flush", "delim", "end"]
    payload: bytes
    end: int  # offset just after this pkt-line


_SPECIAL: dict[int, Literal["flush", "delim", "end"]] = {0: "flush", 1: "delim", 2: "end"}


def read_pkt(buf: bytes | bytearray | memoryview, pos: int = 0) -> Pkt:
    """The pkt-line starting at ``pos``; raises :class:`Truncated` or :class:`PktError`."""
    head = bytes(buf[pos:pos + 4])
    if len(head) < 4:
        raise Truncated(f"pkt-line length cut off at offset {pos}")
    try:
        if not all(c in b"0123456789abcdefABCDEF" for c in head):
            raise ValueError
        length = int(head, 16)
    except ValueError:
        raise PktError(f"not a pkt-line length at offset {pos}: {head!r}") from None
    if length in _SPECIAL:
        return Pkt(_SPECIAL[length], b"", pos + 4)
    if length < 4 or length - 4 > MAX_PAYLOAD:
        raise PktError(f"invalid pkt-line length {length} at offset {pos}")
    if pos + length > len(buf):
        raise Truncated(f"pkt-line of {length} bytes at offset {pos} cut off")
    return Pkt("data", bytes(buf[pos + 4:pos + length]), pos + length)


def pkt(payload: bytes) -> bytes:
    """One data pkt-line."""
    if len(payload) > MAX_PAYLOAD:
        raise ValueError(f"pkt-line payload of {len(payload)} bytes exceeds {MAX_PAYLOAD}")
    return b"%04x" % (len(payload) + 4) + payload


def one_line(text: str, limit: int = 1000) -> str:
    """``text`` on one line of printable characters (reasons and ERR messages are one line)."""
    flat = " ".join(text.split())
    flat = "".join(ch if ch.isprintable() else "?" for ch in flat)
    return flat if len(flat) <= limit else flat[:limit - 3] + "..."


def err_pkt(message: str) -> bytes:
    """``ERR <message>``: git dies printing ``remote error: <message>``."""
    return pkt(b"ERR " + one_line(message, 4000).encode("utf-8", "replace") + b"\n")


def sideband_error(message: str) -> bytes:
    """A fatal error on side-band 3: git dies printing ``remote error: <message>``. For a push
    whose client demultiplexes the answer (it asked for side-band), where a plain ``ERR`` line
    would read as "bad band"."""
    return pkt(b"\x03" + one_line(message, 4000).encode("utf-8", "replace") + b"\n") + FLUSH


def _sideband(band: int, data: bytes, limit: int) -> bytes:
    out = bytearray()
    for start in range(0, len(data), limit):
        out += pkt(bytes([band]) + data[start:start + limit])
    return bytes(out)


def report_status(results: Iterable[tuple[str, str | None]], *, capabilities: Iterable[str],
                  progress: Iterable[str] = ()) -> bytes:
    """The body of a ``receive-pack`` answer: ``unpack ok`` and ``ok``/``ng`` per ref.

    ``results``: (ref, None for ok or the reason for ng). ``progress``: lines for band 2
    (``remote: ...``), sent only when the client asked for side-band. Reasons are one line.
    """
    caps = set(capabilities)
    report = bytearray(pkt(b"unpack ok\n"))
    for ref, reason in results:
        line = f"ok {ref}" if reason is None else f"ng {ref} {one_line(reason)}"
        report += pkt(line.encode("utf-8", "replace") + b"\n")
    report += FLUSH
    band = next((b for b in ("side-band-64k", "side-band") if b in caps), None)
    if band is None:
        return bytes(report)
    limit = _SIDEBAND_MAX[band]
    text = "".join(one_line(line, 4000) + "\n" for line in progress).encode("utf-8", "replace")
    return _sideband(2, text, limit) + _sideband(1, bytes(report), limit) + FLUSH
