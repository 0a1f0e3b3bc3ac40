"""Content-Encoding decode (with a decompression cap) and re-encode: gzip, deflate, br.

The masker has to see plaintext, so a compressed body is decoded first. Decoding is always
incremental with a cap on the *output*: a gzip/br bomb (kilobytes that expand to gigabytes)
raises ``BodyTooLarge`` once the cap is passed, having held at most the cap plus one step in
memory; it is never expanded in full.

* gzip/deflate: ``zlib`` with ``max_length`` per call, so one step yields at most 64 KiB.
* br: the ``brotli`` module mitmproxy ships (1.1) has no output limit per call, so compressed
  input is fed in 8-byte pieces. A piece can only complete a metablock or two (at most 16 MiB
  each), so one step overshoots the cap by a bounded amount independent of the bomb's size:
  measured 8 MiB per piece on zero bombs at quality 1, 5 and 11 (32-byte pieces: 24 MiB). The
  price is ~45 ms per 400 KB of compressed input.

Multi-member gzip (concatenated members) is decoded member by member; trailing garbage after
the last member is dropped (browsers and curl ignore it too). Brotli has no members: bytes
after the end of a brotli stream are an error, as in browsers. An empty body decodes to
empty. "deflate" accepts both the zlib-wrapped form (RFC 9110) and raw deflate (what some
servers send).
"""

from __future__ import annotations

import zlib
from collections.abc import Iterable

import brotli

STEP = 64 * 1024  # largest zlib output per decompress call
BR_FEED = 8  # compressed bytes per brotli call (see module docstring)
SUPPORTED = ("gzip", "x-gzip", "deflate", "br", "identity")


class MaskingError(Exception):
    """A body that cannot be masked safely; the caller refuses it instead of passing it."""


class BodyTooLarge(MaskingError):
    """A body (after decompression) larger than the configured limit."""

    def __init__(self, limit: int, what: str = "body") -> None:
        super().__init__(f"{what} exceeds the masking limit of {limit} bytes")
        self.limit = limit


class UnsupportedEncoding(MaskingError):
    """A Content-Encoding this module does not decode (masking it blind would leak)."""


class DecodeError(MaskingError):
    """A body whose Content-Encoding does not decode (corrupt or truncated)."""


def parse_content_encoding(header: str | None) -> tuple[str, ...]:
    """Codings in the order they were applied, lowercased, ``identity`` dropped.

    Raises ``UnsupportedEncoding`` for anything but gzip/x-gzip/deflate/br/identity.
    """
    if not header:
        return ()
    codings = tuple(c.strip().lower() for c in header.split(",") if c.strip())
    for c in codings:
        if c not in SUPPORTED:
            raise UnsupportedEncoding(f"unsupported content-encoding {c!r}")
    return tuple("gzip" if c == "x-gzip" else c for c in codings if c != "identity")


class _Inflater:
    """Incremental gzip/deflate decoder yielding at most STEP bytes per output piece."""

    def __init__(self, coding: str) -> None:
        self.coding = coding
        self.obj: zlib._Decompress | None = None  # created on first bytes (deflate sniffing)
        self.pending = b""
        self.done = False  # the last gzip member / the deflate stream ended
        self.garbage = False  # bytes after the end that are not another gzip member

    def _new(self, first: bytes) -> zlib._Decompress:
        if self.coding == "gzip":
            return zlib.decompressobj(16 + zlib.MAX_WBITS)
        # zlib header: CM=8 and the 16-bit header is a multiple of 31; otherwise raw deflate.
        wrapped = first[0] & 0x0F == 8 and ((first[0] << 8) | first[1]) % 31 == 0
        return zlib.decompressobj(zlib.MAX_WBITS if wrapped else -zlib.MAX_WBITS)

    def _decompress(self, data: bytes) -> bytes:
        assert self.obj is not None
        try:
            return self.obj.decompress(data, STEP)
        except zlib.error as exc:
            raise DecodeError(f"{self.coding}: {exc}") from None

    def feed(self, data: bytes) -> Iterable[bytes]:
        if self.garbage:
            return  # everything after trailing garbage is dropped
        data = self.pending + data
        self.pending = b""
        while data or self.obj is not None:
            if self.obj is None:
                if self.done and (self.coding != "gzip" or not data.startswith(b"\x1f\x8b"[: len(data)])):
                    self.garbage = True  # trailing garbage after the last member: dropped
                    return
                if len(data) < 2:
                    self.pending = data
                    return
                self.obj, self.done = self._new(data), False
            out = self._decompress(data)
            if out:
                yield out
            if self.obj.eof:
                data, self.obj, self.done = self.obj.unused_data, None, True
                continue
            data = self.obj.unconsumed_tail
            # A full STEP may leave output pending inside zlib even with no input left.
            if not data and len(out) < STEP:
                return

    def finish(self) -> Iterable[bytes]:
        if self.obj is not None:
            while not self.obj.eof:
                out = self._decompress(self.obj.unconsumed_tail)
                if not out:
                    break
                yield out
            if not self.obj.eof:
                raise DecodeError(f"{self.coding}: truncated stream")
        elif self.pending and not self.done:
            raise DecodeError(f"{self.coding}: truncated stream")


class _Unbrotli:
    def __init__(self) -> None:
        self.obj = brotli.Decompressor()
        self.started = False

    def feed(self, data: bytes) -> Iterable[bytes]:
        self.started = self.started or bool(data)
        for i in range(0, len(data), BR_FEED):
            if self.obj.is_finished():
                raise DecodeError("br: data after the end of the stream")
            try:
                out = self.obj.process(data[i : i + BR_FEED])
            except brotli.error as exc:
                raise DecodeError(f"br: {exc}") from None
            if out:
                yield out

    def finish(self) -> Iterable[bytes]:
        if self.started and not self.obj.is_finished():  # an empty body is just empty
            raise DecodeError("br: truncated stream")
        return ()


class StreamDecoder:
    """Incremental decoder for a list of codings (as applied), with an optional output cap.

    ``feed(data)`` returns the decoded bytes available so far; ``finish()`` the rest and checks
    the stream was complete. Passing ``max_bytes`` makes either raise ``BodyTooLarge`` as soon
    as the total decoded size would exceed it.
    """

    def __init__(self, codings: Iterable[str], max_bytes: int | None = None) -> None:
        # Decode in reverse order of application: "gzip, br" was gzipped first, then brotli'd.
        self.stages = [_Unbrotli() if c == "br" else _Inflater(c) for c in reversed(tuple(codings))]
        self.max_bytes = max_bytes
        self.totals = [0] * len(self.stages)

    @property
    def total(self) -> int:
        """Decoded bytes produced so far."""
        return self.totals[-1] if self.totals else 0

    def _run(self, data: bytes, final: bool) -> bytes:
        # Generators all the way down: each stage consumes its predecessor's output piece by
        # piece, so nothing but the final output (capped) accumulates.
        pieces: Iterable[bytes] = [data] if data else []
        for i, stage in enumerate(self.stages):
            pieces = self._through(stage, pieces, final, i)
        return b"".join(pieces)

    def _through(self, stage: _Inflater | _Unbrotli, inputs: Iterable[bytes], final: bool,
                 i: int) -> Iterable[bytes]:
        for piece in inputs:
            yield from self._count(stage.feed(piece), i)
        if final:
            yield from self._count(stage.finish(), i)

    def _count(self, outputs: Iterable[bytes], i: int) -> Iterable[bytes]:
        for out in outputs:
            # Every stage is capped: a bomb nested inside another coding is refused before it
            # expands in full, even if the next stage would shrink it again.
            self.totals[i] += len(out)
            if self.max_bytes is not None and self.totals[i] > self.max_bytes:
                raise BodyTooLarge(self.max_bytes, "decompressed body")
            yield out

    def feed(self, data: bytes) -> bytes:
        return self._run(data, final=False)

    def finish(self) -> bytes:
        return self._run(b"", final=True)


def decode(body: bytes, codings: Iterable[str], max_bytes: int) -> bytes:
    """Decode a whole body; ``BodyTooLarge`` past ``max_bytes`` decoded bytes, ``DecodeError``
    on corrupt data. Memory: at most ``max_bytes`` plus one decompression step."""
    codings = tuple(codings)
    if not codings:
        if len(body) > max_bytes:
            raise BodyTooLarge(max_bytes)
        return body
    dec = StreamDecoder(codings, max_bytes)
    out = bytearray()
    # Feed the compressed body in slices so that the intermediate list of pieces per call
    # stays small; the output accumulates in one buffer bounded by the cap.
    for i in range(0, len(body), STEP):
        out += dec.feed(body[i : i + STEP])
    out += dec.finish()
    return bytes(out)


def encode(body: bytes, codings: Iterable[str]) -> bytes:
    """Re-apply codings in order. Brotli at quality 5 and gzip at level 6: fast, close ratio."""
    for c in codings:
        if c == "br":
            body = brotli.compress(body, quality=5)
        elif c in ("gzip", "x-gzip"):
            obj = zlib.compressobj(6, zlib.DEFLATED, 16 + zlib.MAX_WBITS)
            body = obj.compress(body) + obj.flush()
        elif c == "deflate":
            body = zlib.compress(body, 6)
        elif c != "identity":
            raise UnsupportedEncoding(f"unsupported content-encoding {c!r}")
    return body
