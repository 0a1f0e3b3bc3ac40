"""Mask's body machinery: the captures handed to Record and the stream callables.

Split out of :mod:`.mask` so that module holds only the addon's decisions (which path a body
takes, when to refuse) while this one holds the mechanics each path runs: a response body
masked whole (:func:`mask_whole`), the ``flow.response.stream`` callables mitmproxy calls
chunk by chunk (pass through, stream-mask, collect-then-mask, discard in favour of a refusal),
and the tee that captures a streamed request body as it goes upstream. Nothing here decides
*whether* to mask; that is :class:`~.mask.Mask`'s job. :mod:`.mask` re-exports the public
names (``BodyCapture``, ``captured``, ``masker_for``, ``BODIES_KEY``), so importers keep using
``chaperone_sidecar.addons.mask``.

A :class:`BodyCapture` is the hand-off to Record: Record stores only what a capture holds, so
a body that was not masked never reaches the recording (see :mod:`.mask`, "Hand-off").
"""

from __future__ import annotations

import functools
import logging
from typing import Any, Iterable

from mitmproxy import http

from .. import flowctx
from ..log_setup import flow_fields
from ..policy.masking import (
    BodyTooLarge,
    Masker,
    MaskingError,
    MaskResult,
    StreamDecoder,
    StreamMasker,
    decode,
    encode,
    parse_content_encoding,
)
from ..policy.masking.ndjson import NDJSONMasker
from ..policy.masking.sse import SSEMasker
from ..policy.model import MaskSpec

__all__ = ["BodyCapture", "BODIES_KEY", "BINARY_NOTE", "captured", "masker_for", "mask_whole",
           "stream_masker"]

# The same logger as the addon: a stream aborted here is Mask's warning to operators.
log = logging.getLogger("chaperone.mask")

BODIES_KEY = "chaperone.bodies"
BINARY_NOTE = "binary body: passed through unmasked, not recorded (it cannot be masked)"
_STEP = 64 * 1024


# ============================================================================ capture

class BodyCapture:
    """One body as it was masked, kept (bounded) for the recording.

    ``data`` holds at most ``limit`` bytes of the masked body - decoded (identity) when the
    wire body was compressed; ``size`` counts every byte of it. ``recordable`` is False when
    the body must not be recorded at all (it could not be masked, or no decision said how).
    """

    __slots__ = ("limit", "data", "size", "counts", "binary", "streamed", "recordable", "notes",
                 "complete", "cut")

    def __init__(self, limit: int) -> None:
        self.limit = max(0, limit)
        self.data = bytearray()
        self.size = 0
        self.counts: dict[str, int] = {}
        self.binary = False
        self.streamed = False
        self.recordable = True
        self.notes: list[str] = []
        self.complete = False  # the whole body went through (end of stream / buffered)
        self.cut = False  # data is a prefix even if size does not show it (decoded prefix)

    def add(self, chunk: bytes) -> None:
        self.size += len(chunk)
        room = self.limit - len(self.data)
        if room > 0 and chunk and self.recordable:
            self.data += chunk[:room]

    def set(self, body: bytes) -> None:
        self.data = bytearray(body[: self.limit]) if self.recordable else bytearray()
        self.size = len(body)
        self.complete = True

    def withhold(self, reason: str) -> None:
        """Nothing of this body may be recorded (it could not be masked)."""
        self.recordable = False
        self.data = bytearray()
        self.notes.append(reason)

    @property
    def truncated(self) -> bool:
        return self.cut or self.size > len(self.data)

    @property
    def masked(self) -> int:
        return sum(self.counts.values())

    def __repr__(self) -> str:
        return (f"BodyCapture(size={self.size}, kept={len(self.data)}, masked={self.counts}, "
                f"binary={self.binary}, streamed={self.streamed}, recordable={self.recordable})")


def captured(flow: Any, direction: str) -> BodyCapture | None:
    """The capture Mask left for ``direction`` (``"request"`` or ``"response"``), if any."""
    bodies = flow.metadata.get(BODIES_KEY)
    return bodies.get(direction) if bodies else None


def _new_capture(flow: Any, direction: str, limit: int) -> BodyCapture:
    capture = BodyCapture(limit)
    flow.metadata.setdefault(BODIES_KEY, {})[direction] = capture
    return capture


@functools.lru_cache(maxsize=256)
def masker_for(masks: tuple[MaskSpec, ...], direction: str | None) -> Masker:
    """The compiled ``Masker`` for a decision's masks in one direction (``None``: every spec,
    whatever its target); cached, since specs are frozen."""
    return Masker(masks, direction=direction)  # type: ignore[arg-type]


def _mime(headers: http.Headers) -> str:
    return headers.get("content-type", "").split(";", 1)[0].strip().lower()


def _length(message: http.Message) -> int | None:
    """Content-Length when it frames the body (not with Transfer-Encoding), else None."""
    if "transfer-encoding" in message.headers:
        return None
    value = message.headers.get("content-length", "").strip()
    return int(value) if value.isdigit() else None


def _keep_unmasked(capture: BodyCapture, raw: bytes, codings: tuple[str, ...]) -> None:
    """No masks apply: keep the body (decoded when compressed, for a readable recording).

    Decoding stops once ``capture.limit`` bytes are there, so a bomb costs nothing here.
    """
    capture.complete = True
    if not codings:
        capture.set(raw)
        return
    decoder = StreamDecoder(codings, None)
    out = bytearray()
    try:
        for i in range(0, len(raw), _STEP):
            out += decoder.feed(raw[i : i + _STEP])
            if len(out) > capture.limit:
                capture.set(bytes(out[: capture.limit]))
                capture.cut = True
                return
        out += decoder.finish()
    except MaskingError as exc:
        capture.set(raw)
        capture.notes.append(f"kept as sent (compressed): it could not be decoded ({exc})")
        return
    capture.set(bytes(out))


def mask_whole(masker: Masker, raw: bytes, content_type: str,
               codings: tuple[str, ...]) -> tuple[bytes, bytes, MaskResult]:
    """Decode (capped), mask, re-encode one whole body: (wire bytes, masked plain, result).

    Raises ``MaskingError`` (``BodyTooLarge`` for bombs) when the body cannot be masked.
    """
    plain = decode(raw, codings, masker.max_body_bytes)
    if not codings and len(plain) > masker.max_body_bytes:
        raise BodyTooLarge(masker.max_body_bytes)
    result = masker.mask_bytes(plain, content_type or None, None)
    if not result.changed:
        return raw, plain, result
    return (encode(result.body, codings) if codings else result.body), result.body, result


# ============================================================================ stream callables

_NDJSON_TYPES = frozenset({"application/x-ndjson", "application/ndjson", "application/jsonl",
                           "application/x-jsonlines", "application/jsonlines"})


def stream_masker(masker: Masker, content_type: str | None, content_encoding: str | None, *,
                  max_decoded_bytes: int | None = None) -> StreamMasker | SSEMasker | NDJSONMasker:
    """The streaming masker for a body of this type: what its client reassembles is masked.

    * ``text/event-stream``: :class:`~..policy.masking.sse.SSEMasker` - events parsed, the
      streamed text of each Anthropic content block masked as one text across events, every
      other event masked whole, re-framed as valid SSE.
    * NDJSON / JSON Lines: :class:`~..policy.masking.ndjson.NDJSONMasker` - each record masked
      as a JSON document, the text fields a client concatenates (Ollama) across records.
    * anything else (chunked ``text/*``, JSON, unknown): the byte-level
      :class:`~..policy.masking.stream.StreamMasker`, which holds only a tail that could still
      become a secret.

    Raises ``UnsupportedEncoding`` for a Content-Encoding it cannot decode.
    """
    mime = _mime_of(content_type)
    if mime == "text/event-stream" or mime in _NDJSON_TYPES:
        codings = parse_content_encoding(content_encoding)
        decoder = StreamDecoder(codings, max_decoded_bytes or masker.max_body_bytes) if codings else None
        if mime == "text/event-stream":
            return SSEMasker(masker, decoder=decoder)
        return NDJSONMasker(masker, decoder=decoder)
    return masker.stream(content_type, content_encoding, max_decoded_bytes=max_decoded_bytes)


def _mime_of(content_type: str | None) -> str:
    return (content_type or "").split(";", 1)[0].strip().lower()


class _Stream:
    """Base of the ``flow.response.stream`` callables: capture what goes out, fail closed."""

    def __init__(self, flow: http.HTTPFlow, capture: BodyCapture) -> None:
        self.flow = flow
        self.capture = capture
        self.failed = False
        capture.streamed = True

    def _out(self, chunks: Iterable[bytes]) -> list[bytes]:
        out = [c for c in chunks if c]  # b"" would end an HTTP/1 chunked body
        for chunk in out:
            self.capture.add(chunk)
        return out

    def fail(self, reason: str) -> list[bytes]:
        """Withhold the rest and kill the flow: the client sees a broken transfer."""
        self.failed = True
        self.capture.notes.append(f"stream aborted: {reason}")
        log.warning("response stream aborted, rest withheld: %s", reason,
                    extra=flow_fields(self.flow))
        if self.flow.killable:
            self.flow.kill()
        return []


class _Passthrough(_Stream):
    """No masks apply: stream unchanged (SSE and large bodies must not be buffered)."""

    def __call__(self, data: bytes) -> list[bytes]:
        if not data:
            self.capture.complete = True
            return []
        return self._out((data,))


class _MaskedStream(_Stream):
    """The streaming masker (detectors; decoding a compressed stream under the cap)."""

    def __init__(self, flow: http.HTTPFlow, capture: BodyCapture,
                 masker: StreamMasker | SSEMasker | NDJSONMasker, ctx: flowctx.FlowContext) -> None:
        super().__init__(flow, capture)
        self.masker = masker
        self.ctx = ctx
        self.base = dict(ctx.masked)

    def __call__(self, data: bytes) -> list[bytes]:
        if self.failed:
            return []
        try:
            out = self._out(self.masker(data))
        except MaskingError as exc:
            return self.fail(str(exc))
        if self.masker.binary and self.capture.recordable:
            self.capture.binary = True
            self.capture.withhold(BINARY_NOTE)
        if not data:  # end of the body (or an empty HTTP/2 frame): publish counts and notes
            self.capture.complete = True
            self.capture.counts = dict(self.masker.counts)
            merged = dict(self.base)
            for kind, n in self.masker.counts.items():
                merged[kind] = merged.get(kind, 0) + n
            self.ctx.masked = merged
            for error in self.masker.errors:
                if error not in self.capture.notes:
                    self.capture.notes.append(error)
        return out


class _WholeBody(_Stream):
    """Field rules need the whole JSON document: collect (capped), mask at the end."""

    def __init__(self, flow: http.HTTPFlow, capture: BodyCapture, masker: Masker,
                 ctx: flowctx.FlowContext, content_type: str, codings: tuple[str, ...]) -> None:
        super().__init__(flow, capture)
        self.masker = masker
        self.ctx = ctx
        self.content_type = content_type
        self.codings = codings
        self.buf = bytearray()

    def __call__(self, data: bytes) -> list[bytes]:
        if self.failed:
            return []
        if data:
            self.buf += data
            if len(self.buf) > self.masker.max_body_bytes:
                self.buf = bytearray()
                return self.fail(str(BodyTooLarge(self.masker.max_body_bytes)))
            return []
        raw, self.buf = bytes(self.buf), bytearray()
        try:
            wire, plain, result = mask_whole(self.masker, raw, self.content_type, self.codings)
        except MaskingError as exc:
            return self.fail(str(exc))
        _publish(self.ctx, self.capture, plain, result)
        return [wire] if wire else []


def _publish(ctx: flowctx.FlowContext, capture: BodyCapture, plain: bytes, result: MaskResult) -> None:
    capture.set(plain)
    capture.counts = dict(result.counts)
    capture.binary = result.binary
    capture.notes += list(result.notes)
    if result.binary:
        capture.withhold(BINARY_NOTE)
    for kind, n in result.counts.items():
        ctx.masked[kind] = ctx.masked.get(kind, 0) + n


class _Discard:
    """Replaces an upstream body by a refusal sent in its place (the refusal's headers went
    out instead of the upstream's; its body goes out at the end, the upstream's is dropped)."""

    def __init__(self, body: bytes) -> None:
        self.body = body

    def __call__(self, data: bytes) -> list[bytes]:
        if data or not self.body:
            return []
        body, self.body = self.body, b""
        return [body]


class _RequestTee:
    """A streamed request body goes upstream unchanged; a masked copy is captured.

    ``then`` is the stream function that was installed before (InjectCredentials' aws-chunked
    decoder, or mitmproxy's plain ``True``): it is wrapped, never replaced - it runs first and
    the tee captures what it lets through, i.e. the body as it goes upstream.
    """

    def __init__(self, capture: BodyCapture, masker: StreamMasker | SSEMasker | NDJSONMasker | None,
                 then: Any = None) -> None:
        self.capture = capture
        self.masker = masker
        self.then = then if callable(then) else None
        capture.streamed = True

    def __call__(self, data: bytes) -> list[bytes]:
        if self.then is None:
            out = [data] if data else []
        else:
            out = [c for c in _chunks(self.then(data)) if c]  # b"" would end a chunked body
        for chunk in out:
            self._capture(chunk)
        if not data:
            self._capture(b"")  # end of the body: flush the masker
            self.capture.complete = True
        return out

    def _capture(self, data: bytes) -> None:
        if self.masker is None:
            self.capture.add(data)
        elif self.capture.recordable:
            try:
                for chunk in self.masker(data):
                    self.capture.add(chunk)
            except MaskingError as exc:
                self.capture.withhold(f"not recorded: the body could not be masked ({exc})")
            if self.masker.binary and self.capture.recordable:
                self.capture.binary = True
                self.capture.withhold(BINARY_NOTE)
            self.capture.counts = dict(self.masker.counts)
        else:
            self.capture.size += len(data)


def _chunks(out: Any) -> list[bytes]:
    """What a stream function returned (bytes or an iterable of chunks) as a list of bytes."""
    if out is None:
        return []
    if isinstance(out, (bytes, bytearray)):
        return [bytes(out)]
    return [bytes(c) for c in out]
