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

import re
from typing import Any

from mitmproxy import http

from ..flowctx import BodyCapture, RecordingSettings
from ..policy.model import Identity
from .events import encode_body

__all__ = ["REDACTED", "redact_headers", "redact_url", "redact_text", "identity_of", "body_of"]

REDACTED = "[REDACTED]"
_SENSITIVE = re.compile(
    r"authorization|token|secret|passw|pwd|api[-_]?key|cookie|session|credential|signature|"
    r"^key$|^sig$|auth", re.IGNORECASE)


# ============================================================================ redaction

def redact_headers(headers: http.Headers, extra: str = "", masker: Any = None) -> list[list[str]]:
    """Headers as ``[[name, value], ...]``: credential-like values redacted, the others
    masked (``Masker.mask_values``: values seen clean before are not scanned again, the rest
    in one joined scan)."""
    out: list[list[str]] = []
    kept: list[int] = []
    for name, value in headers.items(multi=True):
        if _SENSITIVE.search(name) or (extra and name.lower() == extra):
            value = REDACTED
        else:
            kept.append(len(out))
        out.append([name, value])
    if masker is None or not masker.active or not kept:
        return out
    for i, value in zip(kept, masker.mask_values([out[i][1] for i in kept]), strict=True):
        out[i][1] = value
    return out


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
    """The flow's identity in the recording's vocabulary (``recording.events.SessionIdentity``)."""
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
