"""A flow's data as a recorded event holds it: redaction, and bodies and identities in the
recording's vocabulary.

Why a module of its own, outside the addons: these are pure functions of a flow's data, with no
recorder, queue or mitmproxy hook in them, and two addons use them - Record (every event) and
Egress (the identity of a connection that never became a request) - while addons never import
each other. The Record addon decides *when* events are appended and what a failed append does;
this module decides *what* goes into them - and guarantees that a credential never does (header
values and query parameters whose name looks like one become :data:`REDACTED`; bodies are only
ever Mask's masked :class:`~chaperone_sidecar.flowctx.BodyCapture`).
"""

from __future__ import annotations

import functools
import re
from typing import Any

from mitmproxy import http
from mitmproxy.net.http import url

from ..flowctx import BodyCapture, FlowContext, RecordingSettings, RequestURL
from ..policy.masking.masker import Masker
from ..policy.model import Identity, MaskSpec
from .events import encode_body

__all__ = ["REDACTED", "redact_headers", "redact_url", "redact_text", "identity_of", "body_of", "pretty_url",
           "pretty_host_url", "recorded_url", "detectors"]

REDACTED = "[REDACTED]"
_SENSITIVE = re.compile(
    r"authorization|token|secret|passw|pwd|api[-_]?key|cookie|session|credential|signature|"
    r"^key$|^sig$|auth", re.IGNORECASE)


# ============================================================================ redaction

@functools.lru_cache(maxsize=1024)
def _sensitive_header(name: bytes, extra: str) -> bool:
    """Whether a header's value is a credential (by its name; ``extra``: the connection's
    injection header, lower case). Cached: a pod sends the same few header names again and
    again (the regex search was ~1/3 of ``redact_headers``, issue 16); 1,024 names bound it."""
    text = name.decode("utf-8", "surrogateescape")
    return bool(_SENSITIVE.search(text)) or bool(extra and text.lower() == extra)


def redact_headers(headers: http.Headers, extra: str = "", masker: Any = None) -> list[list[str]]:
    """Headers as ``[[name, value], ...]``: credential-like values redacted, the others
    masked (``Masker.mask_values``: values seen clean before are not scanned again, the rest
    in one joined scan). Names and values are decoded as mitmproxy's ``items(multi=True)``
    decodes them (UTF-8, surrogateescape), from the raw fields."""
    out: list[list[str]] = []
    kept: list[int] = []
    for name, value in headers.fields:
        if _sensitive_header(name, extra):
            out.append([name.decode("utf-8", "surrogateescape"), REDACTED])
        else:
            kept.append(len(out))
            out.append([name.decode("utf-8", "surrogateescape"), value.decode("utf-8", "surrogateescape")])
    if masker is None or not masker.active or not kept:
        return out
    for i, value in zip(kept, masker.mask_values([out[i][1] for i in kept]), strict=True):
        out[i][1] = value
    return out


def pretty_url(req: http.Request) -> str:
    """``req.pretty_url``, with the Host header's parse cached (mitmproxy parses it on every
    access, with an IDNA check; a pod talks to a few hosts). Same value as the property
    (``test_pretty_url_as_mitmproxy``)."""
    return pretty_host_url(req)[1]


def pretty_host_url(req: http.Request) -> tuple[str, str]:
    """``(req.pretty_host, req.pretty_url)`` with the Host header parsed once (mitmproxy parses
    it in each property, and the parse is most of their cost) - same values as the two
    properties (``test_pretty_host_and_url_as_mitmproxy``)."""
    header = req.host_header
    if not header:
        return req.host, (req.authority if req.first_line_format == "authority" else req.url)
    host, port = _authority(header) if len(header) <= 255 else url.parse_authority(header, check=False)
    if req.first_line_format == "authority":
        return host, req.authority
    return host, url.unparse(req.scheme, host, port or url.default_port(req.scheme) or 443, req.path)


@functools.lru_cache(maxsize=256)
def detectors(masks: tuple[MaskSpec, ...]) -> Masker:
    """Every mask of a decision, whatever its target, over values that are only recorded or
    exported (header values, the URL, summaries): compiled once (specs are frozen)."""
    return Masker(masks, direction=None)


def recorded_url(req: http.Request, ctx: FlowContext) -> RequestURL:
    """The request's host and recorded URL (:func:`pretty_host_url`; :func:`redact_url` with
    every mask of the flow's decision), kept on the flow's context: Record and Telemetry both
    need them and the second asks for free. Worked out again when what they come from changed
    since (the decision's masks, the request line, the Host header: mitmproxy replaces the
    header tuple on every change, so an unchanged one is the same object)."""
    masks = ctx.decision.masks if ctx.decision is not None else ()
    data = req.data
    source = (masks, data.method, data.scheme, data.authority, data.host, data.port, data.path,
              data.http_version, data.headers.fields)
    memo = ctx.request_url
    if memo is not None and memo.source == source:
        return memo
    host, full = pretty_host_url(req)
    memo = ctx.request_url = RequestURL(source, host, redact_url(full, detectors(masks) if masks else None))
    return memo


@functools.lru_cache(maxsize=256)
def _authority(header: str) -> tuple[str, int | None]:
    """mitmproxy's lenient authority parse, for headers up to 255 characters (256 bound it)."""
    return url.parse_authority(header, check=False)


@functools.lru_cache(maxsize=256)
def _identity_of(identity: Identity) -> dict[str, Any] | None:
    sa_ns, _, sa_name = identity.service_account.rpartition("/")
    out: dict[str, Any] = {
        "namespace": identity.pod_namespace or sa_ns, "pod": identity.pod_name,
        "podUID": identity.pod_uid, "serviceAccount": sa_name, "creator": identity.creator,
        "onBehalfOf": identity.on_behalf_of,
    }
    if identity.on_behalf_of_groups:
        out["onBehalfOfGroups"] = list(identity.on_behalf_of_groups)
    out = {k: v for k, v in out.items() if v}
    return out or None


def redact_url(url: str, masker: Any = None) -> str:
    """The URL with credential-like query parameters redacted (presigned URLs, ?token=...)."""
    base, sep, query = url.partition("?")
    if sep:
        parts = []
        for part in query.split("&"):
            name, eq, _ = part.partition("=")
            parts.append(f"{name}={REDACTED}" if eq and _SENSITIVE.search(name) else part)
        url = base + "?" + "&".join(parts)
    if masker is not None and masker.active:
        url = masker.mask_str(url)[0]
    return url


_QUERY_PARAM = re.compile(r"([?&])([^=&\s\"'#]+)=([^&\s\"'#]*)")


def redact_text(text: str) -> str:
    """Credential-like query parameters inside free text (a request line in a summary)."""
    return _QUERY_PARAM.sub(
        lambda m: f"{m[1]}{m[2]}={REDACTED}" if _SENSITIVE.search(m[2]) else m[0], text)


def identity_of(identity: Identity) -> dict[str, Any] | None:
    """The flow's identity in the recording's vocabulary (``recording.events.SessionIdentity``):
    a fresh dict each call, built once per identity (frozen; a sidecar serves a few)."""
    out = _identity_of(identity)
    if out is None:
        return None
    groups = out.get("onBehalfOfGroups")
    copy = dict(out)
    if groups is not None:
        copy["onBehalfOfGroups"] = list(groups)
    return copy


def body_of(capture: BodyCapture | None, raw_size: int, settings: RecordingSettings,
            what: str) -> dict[str, Any] | None:
    """A body as stored in an event (only ever the masked capture)."""
    if capture is None:
        if not raw_size:
            return None
        return {"size": raw_size, "omitted": f"the {what} body was not masked, so it is not recorded"}
    if not capture.recordable:
        omitted = {"size": capture.size, "omitted": "; ".join(capture.notes) or "not recordable"}
        return {**omitted, "binary": True} if capture.binary else omitted
    if not capture.size and not capture.data:
        return None
    if settings.body_limit == 0:
        return {"size": capture.size, "omitted": "recording.bodies is none"}
    stored = encode_body(bytes(capture.data[: settings.body_limit]))
    assert stored is not None
    stored["size"] = capture.size
    if capture.truncated or capture.size > settings.body_limit:
        stored["truncated"] = True
    if capture.counts:
        stored["masked"] = dict(capture.counts)
    if capture.binary:
        stored["binary"] = True
    if capture.streamed:
        stored["streamed"] = True
    if capture.notes:
        stored["notes"] = list(capture.notes)
    return stored
