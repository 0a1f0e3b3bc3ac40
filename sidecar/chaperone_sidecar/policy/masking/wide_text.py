"""UTF-16 and UTF-32 text: masked as the text it is, not as the binary it looks like (session 13).

Why: the detectors read bytes as ASCII-compatible text. UTF-16 puts a NUL beside every ASCII
character (``A\\x00K\\x00I\\x00A\\x00``), so a UTF-16 body was binary to the masker and its
printable runs were single characters: every secret in it reached the agent. Windows writes
such files by default - PowerShell 5's ``Out-File`` and ``>``, ``reg export``, Excel's
"Unicode text", SQL Server exports - and they end up in buckets and behind HTTP APIs. UTF-32
(three NULs a character) is rarer; it costs nothing more here.

What: :func:`codec_of` recognises such a body by its byte order mark. The masker transcodes
it to UTF-8, masks it as text (tokens, field rules, decoded views: all a UTF-8 body gets) and
writes the result back in the body's own encoding, mark included; a stream does the same chunk
by chunk (:class:`Transcoder`, incremental both ways, so a character cut between chunks is
joined). Lengths change as with any masked text body. A trailing part of a character (an odd
byte after UTF-16: appended by an agent to make the body invalid, so that it is masked as
binary) is kept as it is, after the masked text. Lone surrogates pass through unchanged
(``surrogatepass``).

**Decision: the mark, never the charset.** A ``charset=utf-16le`` in the content type was
honoured at first, and it made an ASCII body unreadable to the detectors (read as UTF-16, its
bytes pair up into CJK characters): an agent asking S3 for ``response-content-type=text/plain;
charset=utf-16le`` - S3 sends back whatever type it is asked for - got every key in the object
(found by trying the content types an agent can choose; ``test_wide_text.py``). The bytes of a
body come from whoever wrote it; its labels may come from the agent. Not here, then: UTF-16
without a mark (binary to the masker, as before), and a ranged part (masked in place as binary:
its bytes must keep their offsets).
"""

from __future__ import annotations

import codecs

__all__ = ["Transcoder", "WideText", "codec_of", "from_utf8", "to_utf8"]

# UTF-32's marks first: UTF-32LE's (FF FE 00 00) begins with UTF-16LE's.
_MARKS = ((codecs.BOM_UTF32_LE, "utf-32-le"), (codecs.BOM_UTF32_BE, "utf-32-be"),
          (codecs.BOM_UTF16_LE, "utf-16-le"), (codecs.BOM_UTF16_BE, "utf-16-be"))
HEAD = 4  # the bytes codec_of reads


class WideText:
    """A body's wide encoding: the codec, its byte order mark and its code unit."""

    __slots__ = ("codec", "mark", "unit")

    def __init__(self, codec: str, mark: bytes) -> None:
        self.codec, self.mark, self.unit = codec, mark, 4 if "32" in codec else 2


def codec_of(head: bytes) -> WideText | None:
    """The wide encoding of a body from its first ``HEAD`` bytes (a byte order mark), else None."""
    for mark, codec in _MARKS:
        if head.startswith(mark):
            return WideText(codec, mark)
    return None


def to_utf8(body: bytes, wide: WideText) -> tuple[bytes, bytes] | None:
    """``(text as UTF-8, stray bytes at the end)``, or None when the body does not decode (a
    UTF-32 code point out of range): then it is masked as what it looks like."""
    data = body[len(wide.mark):]
    cut = len(data) - len(data) % wide.unit
    try:
        return data[:cut].decode(wide.codec, "surrogatepass").encode("utf-8", "surrogatepass"), data[cut:]
    except UnicodeDecodeError:
        return None


def from_utf8(text: bytes, wide: WideText, stray: bytes = b"") -> bytes:
    """UTF-8 (masked) back to the body's encoding: its mark, the text, the stray bytes."""
    return wide.mark + text.decode("utf-8", "surrogatepass").encode(wide.codec, "surrogatepass") + stray


class Transcoder:
    """A wide stream to UTF-8 on the way in, the masked UTF-8 back on the way out; each way
    holds at most a cut character (and the mark, until it has gone out once)."""

    def __init__(self, wide: WideText) -> None:
        self.wide = wide
        self._skip = len(wide.mark)  # mark bytes still to drop from the input
        self._in = codecs.getincrementaldecoder(wide.codec)("surrogatepass")
        self._out = codecs.getincrementaldecoder("utf-8")("surrogatepass")
        self._stray = b""  # the input's trailing part of a character, sent last as it came
        self._marked = False

    def inward(self, data: bytes, final: bool) -> bytes:
        """Raises UnicodeDecodeError for input that is no such text (a UTF-32 value over
        U+10FFFF); an incomplete last character is not an error (see ``from_utf8``)."""
        if self._skip:
            data, self._skip = data[self._skip:], max(0, self._skip - len(data))
        text = self._in.decode(data, False)
        if final:  # (reset: an empty HTTP/2 frame ends a stream that may go on - see StreamMasker)
            self._stray = self._in.getstate()[0]
            self._in.reset()
        return text.encode("utf-8", "surrogatepass")

    def outward(self, text: bytes, final: bool) -> bytes:
        out = self._out.decode(text, final).encode(self.wide.codec, "surrogatepass")
        if not self._marked and (out or final):
            out, self._marked = self.wide.mark + out, True
        if final:
            out, self._stray = out + self._stray, b""
        return out

    @property
    def held(self) -> int:
        """Bytes of a cut character held (either way)."""
        return len(self._in.getstate()[0]) + len(self._out.getstate()[0])
