"""Undo ``Content-Encoding: aws-chunked`` so a streaming S3 upload can be re-signed.

Why: SigV4 streaming uploads wrap the body in aws-chunked framing. With
``STREAMING-AWS4-HMAC-SHA256-PAYLOAD`` every chunk carries a signature chained from the seed
(header) signature; the sidecar replaces the seed signature, so every chunk signature the agent
computed becomes invalid and cannot be recomputed without re-framing the whole body. With
``STREAMING-UNSIGNED-PAYLOAD-TRAILER`` (what botocore >= 1.36 and the AWS CLI send for
PutObject/UploadPart over HTTPS) the chunks are unsigned but a checksum trails the body.

**Decision**: the sidecar removes the framing and sends a plain body with a correct
``Content-Length``; the payload is then signed the normal way (see ``aws_sigv4``). Trailing
checksums (``x-amz-checksum-crc32: ...``) become ordinary headers, which S3 verifies just as it
verifies trailers, so the end-to-end integrity check the agent asked for is kept. The trailer
signature (``x-amz-trailer-signature``) is dropped with the chunk signatures.

Buffered bodies are decoded in place. For bodies the proxy streams (``raw_content is None``)
``unwrap_request`` sets the headers from ``x-amz-decoded-content-length`` and returns an
``AwsChunkedDecoder`` to install as mitmproxy's ``request.stream`` callable; a trailing checksum
arrives after the headers were sent and is dropped (with ``x-amz-sdk-checksum-algorithm``).
"""

from __future__ import annotations

import re

from .credential_sources import InjectionError
from .request import HTTPLike

_HEX = re.compile(rb"[0-9a-fA-F]{1,16}")
_TOKEN = re.compile(r"[A-Za-z0-9!#$%&'*+.^_`|~-]+")
_MAX_LINE = 8192  # a size line or trailer line longer than this is not aws-chunked
_DROPPED_TRAILERS = frozenset({"x-amz-trailer-signature"})


class AwsChunkedDecoder:
    """Incremental aws-chunked decoder: ``feed`` bytes in any split, get payload bytes out.

    Also usable directly as a mitmproxy stream callable: called with ``b""`` at the end of the
    stream, it checks that the final chunk was seen. ``trailers`` holds ``(name, value)`` pairs
    (names lower-cased) once the body is complete.
    """

    def __init__(self) -> None:
        self._pending = b""  # unparsed tail of the previous feed (an incomplete line)
        self._state = "size"  # size -> data -> crlf -> size ... -> trailers -> done
        self._remaining = 0
        self.trailers: list[tuple[str, str]] = []
        self.decoded_length = 0

    @property
    def done(self) -> bool:
        return self._state == "done"

    def feed(self, data: bytes) -> bytes:
        buf = self._pending + data if self._pending else data
        view = memoryview(buf)
        pos, end = 0, len(buf)
        out: list[bytes | memoryview] = []
        while pos < end:
            if self._state == "data":
                take = min(self._remaining, end - pos)
                out.append(view[pos:pos + take])
                pos += take
                self._remaining -= take
                if not self._remaining:
                    self._state = "crlf"
                continue
            if self._state == "crlf":
                if end - pos < 2:
                    break
                if buf[pos:pos + 2] != b"\r\n":
                    raise InjectionError("aws-chunked body: chunk data not followed by CRLF")
                pos += 2
                self._state = "size"
                continue
            if self._state == "done":
                if buf[pos:].strip():
                    raise InjectionError("aws-chunked body: data after the final chunk")
                pos = end
                break
            nl = buf.find(b"\r\n", pos)
            if nl < 0:
                if end - pos > _MAX_LINE:
                    raise InjectionError("aws-chunked body: line too long")
                break
            line = bytes(view[pos:nl])
            pos = nl + 2
            if self._state == "size":
                self._size_line(line)
            else:
                self._trailer_line(line)
        self._pending = bytes(view[pos:]) if pos < end else b""
        payload = b"".join(out)
        self.decoded_length += len(payload)
        return payload

    def _size_line(self, line: bytes) -> None:
        # "<hex-size>[;chunk-signature=<sig>]": the signature is dropped with the framing.
        size = line.split(b";", 1)[0].strip()
        if not _HEX.fullmatch(size):
            raise InjectionError("aws-chunked body: malformed chunk size line")
        self._remaining = int(size, 16)
        self._state = "data" if self._remaining else "trailers"

    def _trailer_line(self, line: bytes) -> None:
        if not line:
            self._state = "done"
            return
        name, sep, value = line.decode("latin-1").partition(":")
        name = name.strip().lower()
        if not sep or not _TOKEN.fullmatch(name) or "\r" in value or "\n" in value:
            raise InjectionError("aws-chunked body: malformed trailer")
        if name not in _DROPPED_TRAILERS:
            self.trailers.append((name, value.strip()))

    def finish(self) -> None:
        """End of input: the final (zero) chunk must have been seen."""
        if self._state == "trailers" and not self._pending:
            self._state = "done"  # some clients end right after the last trailer line
        if self._state != "done" or self._pending.strip():
            raise InjectionError("aws-chunked body is truncated")

    def __call__(self, data: bytes) -> bytes:
        if not data:
            self.finish()
            return b""
        return self.feed(data)


def decode_aws_chunked(body: bytes) -> tuple[bytes, list[tuple[str, str]]]:
    """Whole-body decode: ``(payload, trailers)``; raises ``InjectionError`` when malformed."""
    decoder = AwsChunkedDecoder()
    payload = decoder.feed(body)
    decoder.finish()
    return payload, decoder.trailers


def is_aws_chunked(request: HTTPLike, content_sha256: str | None = None) -> bool:
    """Content-Encoding names aws-chunked, or the payload hash is a ``STREAMING-*`` marker
    (pass ``content_sha256`` when the header was already removed)."""
    encodings = [e.strip().lower() for e in request.headers.get("content-encoding", "").split(",")]
    if content_sha256 is None:
        content_sha256 = request.headers.get("x-amz-content-sha256", "")
    return "aws-chunked" in encodings or content_sha256.upper().startswith("STREAMING-")


def unwrap_request(request: HTTPLike) -> AwsChunkedDecoder | None:
    """Turn an aws-chunked request into a plain one (headers and, if buffered, the body).

    Returns ``None`` when the body was decoded in place, or the decoder the proxy must run
    over a streamed body.
    """
    headers = request.headers
    declared = headers.get("x-amz-decoded-content-length")
    if declared is not None and not declared.strip().isdigit():
        raise InjectionError("x-amz-decoded-content-length is not a number")
    encodings = [e.strip() for e in headers.get("content-encoding", "").split(",")
                 if e.strip() and e.strip().lower() != "aws-chunked"]
    for name in ("content-encoding", "transfer-encoding", "x-amz-decoded-content-length",
                 "x-amz-trailer"):
        headers.pop(name, None)
    if encodings:  # e.g. "gzip,aws-chunked": the payload itself stays gzip
        headers["Content-Encoding"] = ",".join(encodings)

    if request.raw_content is None:
        if declared is None:
            raise InjectionError(
                "streamed aws-chunked upload without x-amz-decoded-content-length")
        headers["Content-Length"] = declared.strip()
        headers.pop("x-amz-sdk-checksum-algorithm", None)  # its trailer cannot follow
        return AwsChunkedDecoder()

    payload, trailers = decode_aws_chunked(request.raw_content)
    if declared is not None and int(declared) != len(payload):
        raise InjectionError(
            f"aws-chunked body decodes to {len(payload)} bytes, "
            f"x-amz-decoded-content-length says {int(declared)}")
    for name, value in trailers:
        headers[name] = value
    request.raw_content = payload
    headers["Content-Length"] = str(len(payload))
    return None
