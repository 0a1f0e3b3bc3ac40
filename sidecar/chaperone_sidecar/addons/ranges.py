"""Ranged reads under masking: each byte range widened on the way up, cut back on the way down.

Why: every response is masked on its own. A ``206 Partial Content`` that ends inside a secret
(``Range: bytes=0-99`` cutting an access key at byte 100) holds a part of it that no detector
matches, and the next range (``bytes=100-``) holds the rest: both reached the agent unmasked.
Not only an agent set on it: ``aws s3 cp`` reads objects over 8 MiB in 8 MiB ranges, and a key
that straddles a part boundary came out whole in the downloaded file (session 12).

What: with response masks in force, :class:`WidenRanges` (before InjectCredentials, which signs
the request) asks upstream for ``PAD`` more bytes on each side of a single range
(``bytes=a-b``, ``bytes=a-``). Mask masks a 206 in place, length preserving, so every byte stays
at the offset its Content-Range gives (and parallel parts still assemble into one file).
:class:`TrimRanges` (after Mask) cuts the widened part back to what was asked and restores
Content-Range. A secret no longer than ``PAD`` that straddles a range's edge lies whole inside
both neighbours' widened parts, so each masks its share. **Decisions**: several ranges or a
suffix (``bytes=-500``), or another unit, are not widened: the Range header is dropped and the
agent gets the whole representation (200), masked like any body - RFC 9110 lets a server ignore
Range, and clients handle it. S3's other slice, ``GetObject?partNumber=N`` (one part as it was
uploaded), loses its ``partNumber`` on an aws connection the same way. A 206 whose
Content-Range does not cover the first byte asked for is refused (502), never passed on at the
wrong offsets. A base64 run that starts more than ``PAD`` before a range begins before the
widened part too, at an alignment it does not show: Mask decodes a run at a 206's first byte at
all four (``binary_scan``'s ``phases``) - from the widened start alone, an agent picking its
range's offset read three in four secrets inside a long base64 blob (session 13). Limits: the
recording shows the widened Range header and, the body being masked as binary, no body.

Two classes because one addon has one place in the pipeline: widening must precede the
signature, trimming must follow masking. They share ``FlowContext.requested_range``.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable, Iterable

from mitmproxy import http

from .. import flowctx
from ..log_setup import flow_fields
from ..policy.masking.masker import Masker
from ..services import SidecarServices
from .refusal import refuse
from .streaming import header_value

__all__ = ["PAD", "TrimRanges", "WidenRanges"]

log = logging.getLogger("chaperone.ranges")

# Bytes added on each side: more than any secret (jwt ~11 KiB) and its base64 (~15 KiB), and the
# stream masker's longest held run step (stream.B64_HOLD, 32 KiB).
PAD = 64 * 1024
_SINGLE = re.compile(r"bytes=(\d+)-(\d*)")
_CONTENT_RANGE = re.compile(r"bytes (\d+)-(\d+)/(\d+|\*)")
_UNMASKABLE = "response_unmaskable"  # refusal.KINDS: 502, the response withheld


class WidenRanges:
    """``Range: bytes=a-b`` -> ``bytes=(a-PAD)-(b+PAD)`` when the response will be masked."""

    def __init__(self, services: SidecarServices) -> None:
        self.services = services

    def request(self, flow: http.HTTPFlow) -> None:
        ctx = flowctx.get(flow)
        if ctx is None or flow.response is not None or ctx.decision is None or \
                flow.request.method.upper() == "HEAD":
            return  # refused, or not judged: nothing goes up; HEAD: no body to mask
        value = header_value(flow.request.headers, b"range")
        part = ctx.connection_type == "aws" and "partNumber" in flow.request.query
        if not (value or part) or not Masker(ctx.decision.masks, direction="response").active:
            return
        if part:  # S3's GetObject?partNumber=N: a 206 of one uploaded part, cut where the uploader cut
            del flow.request.query["partNumber"]
            log.info("partNumber dropped under masking: the whole object is sent", extra=flow_fields(flow))
        if not value:
            return
        single = _SINGLE.fullmatch(value.strip())
        last = int(single[2]) if single and single[2] else None
        if single is None or (last is not None and last < int(single[1])):
            # Several ranges, a suffix, another unit: the whole representation, masked whole.
            del flow.request.headers["range"]
            flow.request.headers.pop("if-range", None)
            log.info("Range %r dropped under masking: the whole body is sent", value, extra=flow_fields(flow))
            return
        first = int(single[1])
        ctx.requested_range = (first, last)
        widened = f"bytes={max(0, first - PAD)}-" + ("" if last is None else str(last + PAD))
        flow.request.headers["range"] = widened


class TrimRanges:
    """A widened 206 cut back to the range asked for; its Content-Range and length restored."""

    def __init__(self, services: SidecarServices) -> None:
        self.services = services

    def responseheaders(self, flow: http.HTTPFlow) -> None:
        ctx = flowctx.get(flow)
        resp = flow.response
        if ctx is None or resp is None or ctx.requested_range is None or ctx.refused is not None:
            return
        if resp.status_code != 206:
            return  # 200: the server sent the whole representation (416 and errors: as they are)
        if not callable(resp.stream):
            return  # buffered: cut in `response`, once Mask has masked it
        trim = _trim(flow, ctx.requested_range)
        if trim is None:
            return  # refused
        skip, count = trim
        resp.stream = _Trim(resp.stream, skip, count)  # Mask dropped Content-Length (unframed)

    def response(self, flow: http.HTTPFlow) -> None:
        ctx = flowctx.get(flow)
        resp = flow.response
        if ctx is None or resp is None or ctx.requested_range is None or ctx.refused is not None or \
                resp.status_code != 206 or resp.stream:
            return
        trim = _trim(flow, ctx.requested_range)
        if trim is None:
            return
        skip, count = trim
        resp.raw_content = (resp.raw_content or b"")[skip : skip + count]
        resp.headers["content-length"] = str(len(resp.raw_content))


def _trim(flow: http.HTTPFlow, requested: tuple[int, int | None]) -> tuple[int, int] | None:
    """(bytes to skip, bytes to keep) of a widened 206, its Content-Range set to what was asked;
    None when it does not cover the first byte asked for (then refused: 502)."""
    resp = flow.response
    assert resp is not None
    value = header_value(resp.headers, b"content-range").strip()
    span = _CONTENT_RANGE.fullmatch(value)
    first, last = requested
    if span is None or not int(span[1]) <= first <= int(span[2]):
        log.warning("a widened range came back as %r: withheld", value, extra=flow_fields(flow))
        refuse(flow, _UNMASKABLE, "The partial response did not cover the range asked for, so "
               "Chaperone could not cut it back to that range after masking it.",
               how_to_get_access="Ask for the whole object, or a single range bytes=first-last.")
        return None
    start, end, total = int(span[1]), int(span[2]), span[3]
    last = end if last is None else min(last, end)
    resp.headers["content-range"] = f"bytes {first}-{last}/{total}"
    return first - start, last - first + 1


class _Trim:
    """A stream callable's output, less its first ``skip`` bytes and past ``count`` more."""

    def __init__(self, inner: Callable[[bytes], Iterable[bytes] | bytes], skip: int, count: int) -> None:
        self.inner, self.skip, self.left = inner, skip, count

    def __call__(self, data: bytes) -> list[bytes]:
        out: list[bytes] = []
        result = self.inner(data)
        for chunk in [result] if isinstance(result, bytes) else result:
            if self.skip:
                cut = min(self.skip, len(chunk))
                chunk, self.skip = chunk[cut:], self.skip - cut
            if self.left <= 0 or not chunk:
                continue
            chunk = chunk[: self.left]
            self.left -= len(chunk)
            out.append(chunk)
        return out
