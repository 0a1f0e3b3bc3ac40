"""Mask: secrets and personal data are replaced before the agent or the recording sees them.

The masks come from the flow's decision (``FlowContext.decision.masks``: the policies'
``masking`` and every matching ``mask`` rule); a ``Masker`` is compiled once per distinct set
and direction. Counts of what was masked in the response go to ``FlowContext.masked``.

**Responses** (what the agent receives). In ``responseheaders`` each response is put on one of
three paths - never buffered whole unless it is small and has a known length:

* *buffered* - ``Content-Length`` known and at most ``chaperone_mask_buffer`` (default: the
  config's ``stream_large_bodies``, never more than mitmproxy's own ``stream_large_bodies``, so
  mitmproxy can never switch a buffered body to unmasked streaming half-way): masked whole in
  ``response``: decoded under the policy's cap, masked, re-encoded with the same codings.
* *streamed* - ``text/event-stream``, no ``Content-Length`` (chunked, HTTP/2 without length) or
  a larger body: ``flow.response.stream`` is set to a callable wrapping the streaming masker
  (mitmproxy calls it with each chunk and once with ``b""`` at the end; it returns a list of
  chunks, never ``b""``, which HTTP/1 would frame as the terminating chunk). A compressed
  stream is decoded on the way and sent identity-encoded. ``Content-Length`` is dropped (masking
  changes the length) and HTTP/1.1 clients get ``Transfer-Encoding: chunked``.
* *whole body via the stream* - field rules (JSON paths) need the whole document, so a JSON
  body of unknown or large length is collected by the stream callable (up to the policy cap),
  masked at its end and sent as one chunk.

**Fail closed.** A body that cannot be masked is never passed on: an unknown Content-Encoding,
a body over the policy's ``maxBodyBytes`` after decompression (a gzip bomb), a corrupt
compressed body. Before the response started (buffered, or known at ``responseheaders``) the
agent gets a 502 JSON refusal (``chaperone_response_unmaskable``); the upstream body is drained
and dropped, never buffered. Once a stream has started, the rest is withheld and the flow is
killed, so the client sees a broken transfer rather than a silently shortened or unmasked one.
**Decision**: a stream is masked incrementally with bounded memory, so the size cap limits
what is *buffered* and what a compressed stream may *decompress to*; an identity-encoded stream
is masked to its end whatever its size (a 1 GiB download is masked, not refused).

**Binary** bodies (not a text type and not UTF-8): buffered ones have their printable ASCII
runs masked in place, length preserving (``policy/masking/decoded.py``), streamed ones too
(``policy/masking/stream.py``: only the printable bytes at the end are held). **Decision**:
when masks apply, a binary body is not kept for the recording (it cannot be shown to be
masked); the recording says ``binary`` with its size. Without masks it is kept as is, like
any body.

**Headers.** Response header values (all but Content-Length and Transfer-Encoding) are masked
in ``responseheaders``, before they go out, for every response; Record then stores the same
masked values. Request headers go upstream unchanged (see Requests).

**Kubernetes Secrets.** On a kubernetes connection a request on core ``secrets`` gets the
``SECRET_DATA`` mask unless a matching rule says ``mask: {kubernetesSecrets: reveal}``
(:func:`effective_masks`); a watch is masked line by line (``Masker.lines``). What is masked
and what is not, in one table: docs/masking.md.

**Requests**. **Decision**: what goes upstream is never modified - the request may be signed
(SigV4 covers the body hash), and the policy has no "rewrite upstream" option. Masks whose
target is ``request``/``both`` apply to the *recorded copy* of the request body only. Mask runs
after InjectCredentials, so the copy is the body as it goes upstream (headers and body of the
recorded request match):

* a buffered body is captured whole in ``request``;
* a body that streams (:func:`~.streaming.body_leaves_early` and ``flow.request.stream`` set at
  ``requestheaders``) is captured by a tee that **wraps** the stream function already installed
  - InjectCredentials' aws-chunked decoder, whose output is what goes upstream - and never
  replaces it;
* a body of unknown length is not forced to stream (Route and Enforce look at a body that was
  read): mitmproxy reads it and it is captured in ``request``, unless it grows past
  ``stream_large_bodies`` and mitmproxy streams it on by itself - then it has gone before
  anything could mask it, and the recording says so instead of holding it.

**Hand-off to Record.** For each direction Mask leaves a
:class:`~chaperone_sidecar.flowctx.BodyCapture` (the masked body as sent, truncated to the
connection's ``recording.maxBodyBytes`` - ``FlowContext.recording``, set by Route - plus size,
counts and notes) in ``FlowContext.bodies``. Record stores only what is in a capture, so a body
that was not masked never reaches the recording. Without masks the capture holds the body as is.

**Layout.** The addon first (which path a body takes, when to refuse), then the mechanics each
path runs: whole-body masking (:func:`mask_whole`), the ``flow.response.stream`` callables
mitmproxy calls chunk by chunk (pass through, stream-mask, collect-then-mask, discard in favour
of a refusal) and the tee that captures a streamed request body as it goes upstream. They are
one concern - masking a body - so they live in one module.
"""

from __future__ import annotations

import asyncio
import functools
import logging
from collections.abc import Coroutine, Iterable
from typing import Any

from mitmproxy import ctx as mctx
from mitmproxy import exceptions, http
from mitmproxy.utils import human

from .. import flowctx, helper_threads
from ..flowctx import BodyCapture
from ..log_setup import flow_fields
from ..policy.masking.encoding import (
    BodyTooLarge,
    MaskingError,
    StreamDecoder,
    UnsupportedEncoding,
    decode,
    encode,
    parse_content_encoding,
)
from ..policy.masking.lines import LineMasker
from ..policy.masking.masker import Masker, MaskResult
from ..policy.masking.ndjson import NDJSONMasker
from ..policy.masking.sse import SSEMasker
from ..policy.masking.stream import BINARY_BATCH, StreamMasker
from ..policy.model import MaskSpec
from ..services import SidecarServices
from . import refusal
from .streaming import body_leaves_early, header_value

__all__ = ["Mask", "UNMASKABLE", "SECRET_DATA", "effective_masks", "masker_for", "mask_whole",
           "stream_masker"]

log = logging.getLogger("chaperone.mask")

UNMASKABLE = "response_unmaskable"  # refusal kind (502, refusal.KINDS)
BINARY_NOTE = "binary body: not recorded (only its printable runs are masked)"
_STEP = 64 * 1024
DEFAULT_BUFFER = "1m"
_NO_BODY_STATUS = (204, 304)
_FRAMING = frozenset((b"content-length", b"transfer-encoding"))  # never rewritten

# Whole bodies from this size on (and every compressed one: it may decode to maxBodyBytes) are
# masked off the event loop, in one small dedicated pool: masking runs at ~15 MB/s on ordinary
# bodies and at ~2 MB/s on the worst hostile ones (docs/masking.md), so 64 KiB costs the loop
# at most ~30 ms, while a 1 MiB body an agent planted upstream would stall every flow of the pod
# for up to half a second (64 MiB: half a minute). Two workers: the pod has few cores, and the
# masking holds the GIL for its Python parts (the loop still gets it every switch interval).
# Queued bodies are ones mitmproxy already holds in memory: the pool adds no buffering. Its
# threads yield to the event loop (helper_threads: handing a body over never preempts the loop).
OFFLOAD_BYTES = 64 * 1024
_MASK_POOL = helper_threads.executor("chaperone-mask", 2)


# ============================================================================ masks

# Kubernetes Secret data is masked on kubernetes connections unless a rule reveals it
# (``mask: {kubernetesSecrets: reveal}``); see policy/masking/kubernetes.py. Target both: the
# recorded copy of a request that creates or updates a Secret is masked too.
SECRET_DATA = MaskSpec(target="both", kubernetes_secrets="mask")
_JSON_LINES = ("application/x-ndjson", "application/jsonl", "application/json-seq",
               "application/x-json-stream")


def effective_masks(ctx: flowctx.FlowContext) -> tuple[MaskSpec, ...]:
    """The decision's masks, plus ``SECRET_DATA`` on a request for core Secrets through a
    kubernetes connection that no matching rule opted out of."""
    masks = ctx.decision.masks if ctx.decision is not None else ()
    kube = ctx.action.kubernetes if ctx.action is not None else None
    if ctx.connection_type != "kubernetes" or kube is None or kube.api_group or \
            kube.resource != "secrets":
        return masks
    if any(m.kubernetes_secrets == "reveal" for m in masks):
        return masks
    return (*masks, SECRET_DATA)


def _json_lines(flow: http.HTTPFlow, ctx: flowctx.FlowContext) -> bool:
    """A stream of one JSON document per line: NDJSON, or a Kubernetes watch (served as plain
    ``application/json``, so the classified verb tells)."""
    assert flow.response is not None  # called at responseheaders
    content_type = header_value(flow.response.headers, b"content-type").lower()
    if _mime(flow.response.headers) in _JSON_LINES or "stream=watch" in content_type:
        return True
    kube = ctx.action.kubernetes if ctx.action is not None else None
    return kube is not None and kube.verb == "watch"


# ============================================================================ addon

class Mask:
    """Masks response bodies for the agent and both bodies for the recording."""

    def __init__(self, services: SidecarServices) -> None:
        self.services = services
        self.buffer_limit = human.parse_size(DEFAULT_BUFFER) or 0

    def load(self, loader) -> None:
        loader.add_option(
            "chaperone_mask_buffer", str,
            self.services.config.stream_large_bodies or DEFAULT_BUFFER,
            "Largest response body (Content-Length on the wire) that is buffered and masked "
            "whole; larger, chunked and SSE bodies are masked as they stream.",
        )

    def configure(self, updated) -> None:
        if "store_streamed_bodies" in updated and getattr(mctx.options, "store_streamed_bodies", False):
            log.warning("store_streamed_bodies is on: mitmproxy keeps every streamed body in "
                        "memory (unmasked on requests), so streams are no longer flat in memory")
        if "chaperone_mask_buffer" not in updated and "stream_large_bodies" not in updated:
            return
        try:
            limit = human.parse_size(mctx.options.chaperone_mask_buffer)
        except ValueError as exc:
            raise exceptions.OptionsError(f"chaperone_mask_buffer: {exc}") from None
        if limit is None:
            raise exceptions.OptionsError("chaperone_mask_buffer must be a size, e.g. 1m")
        # Never buffer past mitmproxy's own streaming threshold: past it mitmproxy would switch
        # a buffered body to plain streaming (no callable) half-way - unmasked.
        mitm = getattr(mctx.options, "stream_large_bodies", None)
        mitm_limit = human.parse_size(mitm) if mitm else None
        self.buffer_limit = min(limit, mitm_limit) if mitm_limit is not None else limit

    # ------------------------------------------------------------------ requests
    def requestheaders(self, flow: http.HTTPFlow) -> None:
        if flow.response is not None or not body_leaves_early(flow):
            return  # a buffered body is captured in `request`
        if not flow.request.stream:
            # Length unknown (chunked, HTTP/2 without Content-Length): mitmproxy reads it and
            # it is captured in `request` - unless it grows past stream_large_bodies and
            # mitmproxy streams it on by itself (see `request`). Not forced to stream here:
            # Route and Enforce look at a body that was read (classification, bodyRegex).
            return
        ctx = flowctx.get(flow)
        if ctx is None:
            return
        capture = self._capture(ctx, "request")
        if ctx.decision is None:
            capture.withhold("not recorded: the body streamed before a policy decision")
            return
        masker = masker_for(effective_masks(ctx), "request")
        stream = None
        if masker.active and not masker.can_stream(_mime(flow.request.headers) or None):
            # Field rules and Secret data need the whole document; a stream is not kept.
            capture.withhold("not recorded: the body streamed and its masks (field rules, "
                             "Kubernetes Secret data) need the whole document")
        elif masker.active:
            try:
                stream = stream_masker(masker, _mime(flow.request.headers) or None,
                                       header_value(flow.request.headers, b"content-encoding"))
            except MaskingError as exc:
                capture.withhold(f"not recorded: the body cannot be masked ({exc})")
        # Wrap what is there (InjectCredentials' aws-chunked decoder): replacing it would send
        # the upload upstream still chunk-framed.
        flow.request.stream = _RequestTee(capture, stream, flow.request.stream)

    def request(self, flow: http.HTTPFlow) -> Coroutine[Any, Any, None] | None:
        ctx = flowctx.get(flow)
        if ctx is None:
            return None
        if flow.request.stream:
            if ctx.bodies.get("request") is None:
                # A body of unknown length that mitmproxy switched to streaming by itself once
                # it grew past stream_large_bodies: it went upstream without passing a tee.
                capture = self._capture(ctx, "request")
                capture.streamed = True
                capture.withhold("not recorded: the body had no Content-Length and grew past "
                                 "stream_large_bodies, so it streamed upstream before it could "
                                 "be masked")
            return None  # streamed: captured by the tee
        capture = self._capture(ctx, "request")
        raw = flow.request.raw_content or b""
        capture.complete = True
        if not raw:
            return None
        if ctx.decision is None:
            capture.size = len(raw)
            capture.withhold("not recorded: no policy decision says how to mask it")
            return None
        masker = masker_for(effective_masks(ctx), "request")
        try:
            codings = parse_content_encoding(header_value(flow.request.headers, b"content-encoding"))
        except UnsupportedEncoding as exc:
            if masker.active:
                capture.size = len(raw)
                capture.withhold(f"not recorded: {exc}")
                return None
            codings = ()
        if not masker.active:
            _keep_unmasked(capture, raw, codings)
            return None
        if _off_loop(raw, codings):  # awaited by mitmproxy: other flows go on meanwhile
            return self._capture_request_off_loop(capture, masker, raw, _mime(flow.request.headers), codings)
        try:
            masked = mask_whole(masker, raw, _mime(flow.request.headers), codings)
        except MaskingError as exc:
            self._request_unmaskable(capture, raw, exc)
            return None
        self._capture_request(capture, masked)
        return None

    async def _capture_request_off_loop(self, capture: BodyCapture, masker: Masker, raw: bytes, mime: str,
                                        codings: tuple[str, ...]) -> None:
        try:
            masked = await _mask_off_loop(masker, raw, mime, codings)
        except MaskingError as exc:
            self._request_unmaskable(capture, raw, exc)
            return
        self._capture_request(capture, masked)

    @staticmethod
    def _request_unmaskable(capture: BodyCapture, raw: bytes, exc: MaskingError) -> None:
        capture.size = len(raw)
        capture.withhold(f"not recorded: the body could not be masked ({exc})")

    @staticmethod
    def _capture_request(capture: BodyCapture, masked: tuple[bytes, bytes, MaskResult]) -> None:
        _, plain, result = masked
        capture.set(plain)
        capture.counts = dict(result.counts)
        capture.binary = result.binary
        capture.notes += list(result.notes)
        if result.binary:
            capture.withhold(BINARY_NOTE)

    # ------------------------------------------------------------------ responses
    def responseheaders(self, flow: http.HTTPFlow) -> None:
        ctx = flowctx.get(flow)
        resp = flow.response
        if ctx is None or resp is None or ctx.refused is not None:
            return
        masker = masker_for(effective_masks(ctx), "response")
        # Headers first, and for every response (HEAD, 204, 304 too): they go out to the
        # agent right after this hook, whichever path the body takes.
        self._mask_headers(resp, masker, ctx)
        if flow.request.method.upper() == "HEAD" or resp.status_code < 200 or \
                resp.status_code in _NO_BODY_STATUS or _length(resp) == 0:
            return  # no body
        capture = self._capture(ctx, "response")
        mime, length = _mime(resp.headers), _length(resp)
        stream = bool(resp.stream) or mime == "text/event-stream" or length is None or \
            length > self.buffer_limit
        if not masker.active:
            if stream:
                resp.stream = _Passthrough(flow, capture)
            return
        _drop_digests(resp)
        try:
            codings = parse_content_encoding(header_value(resp.headers, b"content-encoding"))
        except UnsupportedEncoding as exc:
            self._refuse_early(flow, capture, str(exc))
            return
        ranged = _ranged(resp)  # a part of a representation: masked in place, at its offsets
        if not ranged and not masker.can_stream(mime or None):  # field rules: the whole document
            if length is not None and length > masker.max_body_bytes:
                self._refuse_early(flow, capture, str(BodyTooLarge(masker.max_body_bytes)))
            elif stream and _json_lines(flow, ctx):
                # A watch or NDJSON stream never ends: each line is a whole document.
                try:
                    lines = masker.lines(mime or None, header_value(resp.headers, b"content-encoding"))
                except MaskingError as exc:
                    self._refuse_early(flow, capture, str(exc))
                    return
                resp.stream = _MaskedStream(flow, capture, lines, ctx)
                if codings:
                    del resp.headers["content-encoding"]  # the line masker emits decoded lines
                self._unframe(flow)
            elif stream:
                resp.stream = _WholeBody(flow, capture, masker, ctx, mime, codings)
                self._unframe(flow)
            else:
                resp.stream = False
            return
        if not stream:
            resp.stream = False  # masked whole in `response`
            return
        sm = stream_masker(masker, mime or None, header_value(resp.headers, b"content-encoding"),
                           max_decoded_bytes=masker.max_body_bytes,
                           batch=BINARY_BATCH if length is not None else 0, in_place=ranged)
        resp.stream = _MaskedStream(flow, capture, sm, ctx)
        if codings:
            del resp.headers["content-encoding"]  # the masker emits the decoded body
        self._unframe(flow)

    def response(self, flow: http.HTTPFlow) -> Coroutine[Any, Any, None] | None:
        ctx = flowctx.get(flow)
        resp = flow.response
        if ctx is None or resp is None or ctx.refused is not None or resp.stream:
            return None  # refusals are Chaperone's own text; streams were handled chunk by chunk
        capture = ctx.bodies.get("response")
        if capture is None:  # no body expected at responseheaders
            capture = self._capture(ctx, "response")
        raw = resp.raw_content or b""
        capture.complete = True
        if not raw:
            return None
        masker = masker_for(effective_masks(ctx), "response")
        if not masker.active:
            try:
                codings = parse_content_encoding(header_value(resp.headers, b"content-encoding"))
            except UnsupportedEncoding:
                codings = ()
            _keep_unmasked(capture, raw, codings)
            return None
        try:
            codings = parse_content_encoding(header_value(resp.headers, b"content-encoding"))
            if _off_loop(raw, codings):  # awaited by mitmproxy: other flows go on meanwhile
                return self._mask_response_off_loop(flow, ctx, capture, masker, raw, codings)
            masked = mask_whole(masker, raw, _mime(resp.headers), codings, in_place=_ranged(resp))
        except MaskingError as exc:
            self._response_unmaskable(flow, capture, raw, exc)
            return None
        self._send_masked(flow, ctx, capture, raw, masked)
        return None

    async def _mask_response_off_loop(self, flow: http.HTTPFlow, ctx: flowctx.FlowContext, capture: BodyCapture,
                                      masker: Masker, raw: bytes, codings: tuple[str, ...]) -> None:
        assert flow.response is not None
        try:
            masked = await _mask_off_loop(masker, raw, _mime(flow.response.headers), codings,
                                          in_place=_ranged(flow.response))
        except MaskingError as exc:
            self._response_unmaskable(flow, capture, raw, exc)
            return
        self._send_masked(flow, ctx, capture, raw, masked)

    def _response_unmaskable(self, flow: http.HTTPFlow, capture: BodyCapture, raw: bytes,
                             exc: MaskingError) -> None:
        capture.size = len(raw)
        capture.withhold(f"refused: {exc}")
        self._refuse(flow, str(exc))

    @staticmethod
    def _send_masked(flow: http.HTTPFlow, ctx: flowctx.FlowContext, capture: BodyCapture, raw: bytes,
                     masked: tuple[bytes, bytes, MaskResult]) -> None:
        resp = flow.response
        assert resp is not None
        wire, plain, result = masked
        if wire is not raw:
            resp.raw_content = wire
            if not _has(resp.headers, b"transfer-encoding"):
                resp.headers["content-length"] = str(len(wire))
        _publish(ctx, capture, plain, result)

    # ------------------------------------------------------------------ helpers
    @staticmethod
    def _mask_headers(resp: http.Response, masker: Any, ctx: flowctx.FlowContext) -> None:
        """Mask response header values in place (``Masker.mask_values``: one joined scan,
        clean values cached); the counts go to ``FlowContext.masked`` like the body's.
        Framing headers (Content-Length, Transfer-Encoding) are never rewritten.

        The recording masked header values before (``recording.flow_events.redact_headers``), but
        nothing masked the headers sent to the agent: ``X-Debug-Key: AKIA...`` reached it.
        Masking them here, before they go out, fixes both: Record reads the same headers."""
        if not masker.active:
            return
        fields = [(name, value) for name, value in resp.headers.fields
                  if name.lower() not in _FRAMING]
        if not fields:
            return
        values = [v.decode("utf-8", "surrogateescape") for _, v in fields]
        masked = masker.mask_values(values)
        if masked == values:
            return
        out, i = [], 0
        for name, value in resp.headers.fields:
            if name.lower() in _FRAMING:
                out.append((name, value))
                continue
            if masked[i] != values[i]:
                for kind, n in masker.mask_str(values[i])[1].items():
                    ctx.masked[kind] = ctx.masked.get(kind, 0) + n
            out.append((name, masked[i].encode("utf-8", "surrogateescape")))
            i += 1
        resp.headers.fields = tuple(out)

    @staticmethod
    def _capture(ctx: flowctx.FlowContext, direction: str) -> BodyCapture:
        """A new capture for ``direction``, kept for Record in ``FlowContext.bodies``, bounded
        by the connection's recording settings (what Record would keep of it)."""
        capture = ctx.bodies[direction] = BodyCapture(ctx.recording.body_limit)
        return capture

    @staticmethod
    def _unframe(flow: http.HTTPFlow) -> None:
        """Masking changes the length: drop Content-Length; HTTP/1.1 clients get chunks."""
        assert flow.response is not None  # called once the response headers are in
        headers = flow.response.headers
        headers.pop("content-length", None)
        if flow.request.http_version == "HTTP/1.1" and "transfer-encoding" not in headers:
            headers["transfer-encoding"] = "chunked"

    def _refuse_early(self, flow: http.HTTPFlow, capture: BodyCapture, reason: str) -> None:
        """Refuse at ``responseheaders``: the refusal's headers go out instead of the
        upstream's, and the upstream body is drained and dropped (never buffered)."""
        capture.withhold(f"refused: {reason}")
        self._refuse(flow, reason)
        assert flow.response is not None  # _refuse set the refusal as the response
        flow.response.stream = _Discard(flow.response.raw_content or b"")

    def _refuse(self, flow: http.HTTPFlow, reason: str) -> None:
        log.warning("response refused, it cannot be masked: %s", reason, extra=flow_fields(flow))
        message = (f"The response to this request could not be masked, so Chaperone withheld "
                   f"it: {reason}. The request itself was sent to the target.")
        guidance = ("Ask for a smaller or uncompressed response (for example a narrower query, "
                    "a page size, or Accept-Encoding: identity); the masking limit is the "
                    "policy's masking.maxBodyBytes.")
        refusal.refuse(flow, UNMASKABLE, message, how_to_get_access=guidance)


# ============================================================================ body machinery

@functools.lru_cache(maxsize=256)
def masker_for(masks: tuple[MaskSpec, ...], direction: str | None) -> Masker:
    """The compiled ``Masker`` for a decision's masks in one direction (``None``: every spec,
    whatever its target); cached, since specs are frozen."""
    return Masker(masks, direction=direction)  # type: ignore[arg-type]


# Digests of the body as the upstream sent it (S3's flexible checksums, RFC 9530, Content-MD5):
# once the body may be masked they no longer hold, and an SDK that checks them refuses the
# masked body - boto3 >= 1.36 asks S3 for the checksum on every GetObject and raised
# FlexibleChecksumError on a masked object (session 12). Dropped whenever a body is masked.
_DIGESTS = (b"content-md5", b"digest", b"content-digest", b"repr-digest")


def _drop_digests(resp: http.Response) -> None:
    names = [name for name, _ in resp.headers.fields
             if name.lower() in _DIGESTS or name.lower().startswith(b"x-amz-checksum-")]
    for name in names:
        resp.headers.pop(name.decode("latin-1"), None)


def _ranged(resp: http.Response) -> bool:
    """A part of a representation (206): masked in place, length preserving, so its bytes stay
    at the offsets its Content-Range gives (ranges.TrimRanges cuts it to what was asked)."""
    return resp.status_code == 206


def _mime(headers: http.Headers) -> str:
    return header_value(headers, b"content-type").split(";", 1)[0].strip().lower()


def _has(headers: http.Headers, name: bytes) -> bool:
    """``name in headers`` for a lower-case ``name``, without the KeyError ``in`` raises and
    catches when the header is absent (issue 16)."""
    return any(key.lower() == name for key, _ in headers.fields)


def _length(message: http.Message) -> int | None:
    """Content-Length when it frames the body (not with Transfer-Encoding), else None.
    Read from the header fields directly: ``in``/``get`` raise and catch a KeyError for each
    missing header (most flows have no Transfer-Encoding; issue 16)."""
    length = None
    for key, value in message.headers.fields:
        name = key.lower()
        if name == b"transfer-encoding":
            return None
        if name == b"content-length":
            length = value if length is None else length + b", " + value
    text = length.decode("utf-8", "surrogateescape").strip() if length is not None else ""
    return int(text) if text.isdigit() else None


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
               codings: tuple[str, ...], in_place: bool = False) -> tuple[bytes, bytes, MaskResult]:
    """Decode (capped), mask, re-encode one whole body: (wire bytes, masked plain, result);
    ``in_place``: length preserving (``Masker.mask_bytes``; a ranged response).

    Raises ``MaskingError`` (``BodyTooLarge`` for bombs) when the body cannot be masked.
    """
    plain = decode(raw, codings, masker.max_body_bytes)
    if not codings and len(plain) > masker.max_body_bytes:
        raise BodyTooLarge(masker.max_body_bytes)
    result = masker.mask_bytes(plain, content_type or None, None, in_place=in_place)
    if not result.changed:
        return raw, plain, result
    return (encode(result.body, codings) if codings else result.body), result.body, result


def _off_loop(raw: bytes, codings: tuple[str, ...]) -> bool:
    """Whether a whole body is masked off the event loop (``OFFLOAD_BYTES``)."""
    return bool(codings) or len(raw) >= OFFLOAD_BYTES


async def _mask_off_loop(masker: Masker, raw: bytes, content_type: str,
                         codings: tuple[str, ...], in_place: bool = False) -> tuple[bytes, bytes, MaskResult]:
    """``mask_whole`` in the masking pool; the event loop serves other flows meanwhile."""
    loop = asyncio.get_running_loop()
    return await loop.run_in_executor(_MASK_POOL, mask_whole, masker, raw, content_type, codings, in_place)


# ============================================================================ stream callables

_NDJSON_TYPES = frozenset({"application/x-ndjson", "application/ndjson", "application/jsonl",
                           "application/x-jsonlines", "application/jsonlines"})


def stream_masker(masker: Masker, content_type: str | None, content_encoding: str | None, *,
                  max_decoded_bytes: int | None = None, batch: int = 0,
                  in_place: bool = False) -> StreamMasker | SSEMasker | NDJSONMasker:
    """The streaming masker for a body of this type: what its client reassembles is masked.

    * ``text/event-stream``: :class:`~..policy.masking.sse.SSEMasker` - events parsed, the
      streamed text of each Anthropic content block masked as one text across events, every
      other event masked whole, re-framed as valid SSE.
    * NDJSON / JSON Lines: :class:`~..policy.masking.ndjson.NDJSONMasker` - each record masked
      as a JSON document, the text fields a client concatenates (Ollama) across records.
    * anything else (chunked ``text/*``, JSON, unknown): the byte-level
      :class:`~..policy.masking.stream.StreamMasker`, which holds only a tail that could still
      become a secret; ``batch``: a binary body of known length is scanned in batches of that
      many bytes (``stream.BINARY_BATCH``); ``in_place`` (a ranged response, whatever its type):
      masked as a binary stream, length preserving.

    Raises ``UnsupportedEncoding`` for a Content-Encoding it cannot decode.
    """
    mime = _mime_of(content_type)
    if not in_place and (mime == "text/event-stream" or mime in _NDJSON_TYPES):
        codings = parse_content_encoding(content_encoding)
        decoder = StreamDecoder(codings, max_decoded_bytes or masker.max_body_bytes) if codings else None
        if mime == "text/event-stream":
            return SSEMasker(masker, decoder=decoder)
        return NDJSONMasker(masker, decoder=decoder)
    return masker.stream(content_type, content_encoding, max_decoded_bytes=max_decoded_bytes, batch=batch,
                         in_place=in_place)


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
                 masker: StreamMasker | SSEMasker | NDJSONMasker | LineMasker, ctx: flowctx.FlowContext) -> None:
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
