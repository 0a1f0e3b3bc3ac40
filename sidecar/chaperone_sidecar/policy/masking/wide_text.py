"""UTF-16 and UTF-32 text: masked as the text it is, not as the binary it looks like (session 13).

Why: the detectors read bytes as ASCII-compatible text. UTF-16 puts a NUL beside every ASCII
character (``A\\x00K\\x00I\\x00A\\x00``), so a UTF-16 body was binary to the masker and its
printable runs were single characters: every secret in it reached the agent. Windows writes
such files by default - PowerShell 5's ``Out-File`` and ``>``, ``reg export``, Excel's
"Unicode text", SQL Server exports - and they end up in buckets and behind HTTP APIs. UTF-32
(three NULs a character) is rarer; it costs nothing more here.

What: :func:`codec_of` recognises such a body by its byte order mark or its charset (without a
mark, RFC 2781 reads ``utf-16`` as big-endian; so is ``utf-32`` read). The masker transcodes
it to UTF-8, masks it as text (tokens, field rules, decoded views: all a UTF-8 body gets) and
writes the result back in the body's own encoding, mark included; a stream does the same chunk
by chunk (:class:`Transcoder`, incremental both ways, so a character cut between chunks is
joined). Lengths change as with any masked text body. A trailing part of a character (an odd
byte after UTF-16: appended by an agent to make the body invalid, so that it is masked as
binary) is kept as it is, after the masked text. Lone surrogates pass through unchanged
(``surrogatepass``).

**Decision: both views, and the label too.** A body is masked first as its bytes are (as
binary, in place: length preserving, so the code units stay aligned), then as the text its
mark - or, without one, its ``charset=utf-16``/``utf-16le``/``utf-16be``/``utf-32...`` - says
it is. Why both: the label may be the agent's. S3 answers with whatever
``response-content-type`` asks for, and the first version of this module, trusting
``charset=utf-16le`` alone, read an ASCII object as UTF-16 (its bytes paired into CJK
characters) and let every key in it out (found by trying the content types an agent can choose;
``test_mask.py``). Trusting only the mark instead let a server that honours
``Accept-Charset: utf-16le`` (and writes no mark, as Java's ``UTF-16LE`` does not) send its
secrets past. Masked both ways, a label can hide nothing: ASCII secrets are found in the
bytes, UTF-16 ones in the text. Not here: UTF-16 with neither mark nor label (binary to the
masker, as before), and a ranged part (masked in place as binary: its bytes must keep their
offsets).
"""

from __future__ import annotations

import codecs

__all__ = ["Transcoder", "WideText", "codec_of", "from_utf8", "to_utf8"]

# UTF-32's marks first: UTF-32LE's (FF FE 00 00) begins with UTF-16LE's.
_MARKS = ((codecs.BOM_UTF32_LE, "utf-32-le"), (codecs.BOM_UTF32_BE, "utf-32-be"),
          (codecs.BOM_UTF16_LE, "utf-16-le"), (codecs.BOM_UTF16_BE, "utf-16-be"))
_CHARSETS = {"utf-16": "utf-16-be", "utf-16le": "utf-16-le", "utf-16be": "utf-16-be",
             "utf-32": "utf-32-be", "utf-32le": "utf-32-le", "utf-32be": "utf-32-be"}
HEAD = 4  # the bytes codec_of reads


class WideText:
    """A body's wide encoding: the codec, its byte order mark (``b""`` when only the charset
    said so) and its code unit."""

    __slots__ = ("codec", "mark", "unit")

    def __init__(self, codec: str, mark: bytes) -> None:
        self.codec, self.mark, self.unit = codec, mark, 4 if "32" in codec else 2


def codec_of(head: bytes, content_type: str | None = None) -> WideText | None:
    """The wide encoding of a body from its first ``HEAD`` bytes (a byte order mark) or, without
    one, the charset of its content type; else None."""
    for mark, codec in _MARKS:
        if head.startswith(mark):
            return WideText(codec, mark)
    for param in (content_type or "").split(";")[1:]:
        name, _, value = param.partition("=")
        if name.strip().lower() == "charset":
            named = _CHARSETS.get(value.strip().strip('"').lower())
            if named is not None:
                return WideText(named, b"")
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
