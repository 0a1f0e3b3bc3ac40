"""``LineMasker``: whole-body masking applied line by line to a JSON-lines stream.

Field rules and Kubernetes Secret masking need a parsed JSON document, so a body they apply
to is normally collected whole. A Kubernetes watch (``?watch=true``: one JSON event per line,
open for minutes) or an NDJSON stream never ends, so collecting it would hold the agent's
events back until the server closes the stream. Each line of such a stream is a complete
JSON document, so each is masked on its own by ``Masker.mask_bytes`` (field rules, Secret
data, detectors, decoded views) as soon as its line feed arrives: events flow with no added
latency beyond their own length.

Memory: one line is held at most; a line longer than the masking cap (``max_body_bytes``)
raises ``BodyTooLarge`` (the caller withholds the rest of the stream). A Content-Encoding is
decoded on the way in (capped, like the stream masker) and the output is identity-encoded.
The interface is the stream masker's (``__call__`` with each chunk and ``b""`` at the end,
``counts``, ``binary``, ``errors``), so the same mitmproxy stream callable drives it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from .encoding import BodyTooLarge, StreamDecoder

if TYPE_CHECKING:  # the Masker builds LineMaskers; a runtime import would be circular
    from .masker import Masker


class LineMasker:
    """Feed chunks, get masked complete lines; ``b""`` flushes a last line without LF."""

    def __init__(self, masker: Masker, content_type: str | None = None,
                 decoder: StreamDecoder | None = None) -> None:
        self.masker = masker
        self.content_type = content_type
        self.decoder = decoder
        self.max_line = masker.max_body_bytes
        self.buf = bytearray()
        self.counts: dict[str, int] = {}
        self.binary = False
        self.errors: list[str] = []

    def __call__(self, data: bytes) -> list[bytes]:
        end = not data
        if self.decoder is not None:
            data = self.decoder.finish() if end else self.decoder.feed(data)
        self.buf += data
        cut = self.buf.rfind(b"\n") + 1
        if end:
            cut = len(self.buf)
        if len(self.buf) - cut > self.max_line:
            self.buf = bytearray()
            raise BodyTooLarge(self.max_line, "line of a JSON-lines stream")
        if not cut:
            return []
        block = bytes(self.buf[:cut])
        del self.buf[:cut]
        out = b"".join(self._line(line) for line in block.splitlines(keepends=True))
        return [out] if out else []

    def _line(self, line: bytes) -> bytes:
        body = line.rstrip(b"\r\n")
        if not body.strip():
            return line
        result = self.masker.mask_bytes(body, self.content_type)
        for kind, n in result.counts.items():
            self.counts[kind] = self.counts.get(kind, 0) + n
        for note in result.notes:
            if note not in self.errors:
                self.errors.append(note)
        return result.body + line[len(body):]
