"""What the sidecar's addons know about one flow: the one channel between them.

Each addon owns one concern (identify, route, enforce, approve, inject credentials, mask,
record, trace) and they run in a fixed order (see ``addons/__init__.py``). They talk to each
other only through the :class:`FlowContext` stored under ``flow.metadata[KEY]`` - never through
other ``flow.metadata`` keys and never by importing each other - so every addon can be tested
alone with ``mitmproxy.test.tflow`` by putting a ``FlowContext`` on the flow.

What Route fills for the others: the :class:`~.snapshot.Snapshot` the flow was routed with
(``snapshot``: every addon of a flow sees the same configuration generation), the method the
policy judges (``method``; :func:`request_of` is the policy's and the approvals' view of the
request) and the connection's recording settings (``recording``). Mask leaves a
:class:`BodyCapture` per direction in ``bodies`` for Record. The types of that hand-off live
here, next to the context, because two addons use them and addons never import each other.

Some fields are one addon's own memory of the flow across its hooks (marked "private" below):
they are kept here too, typed, rather than in ad-hoc ``flow.metadata`` keys.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from .policy.masking.encoding import MaskingError, decode, parse_content_encoding
from .policy.model import Action, Decision, HTTPRequest, Identity
from .routing import normalize_host
from .snapshot import Snapshot

__all__ = ["KEY", "FlowContext", "RecordingSettings", "BodyCapture", "RequestURL", "RecordProgress",
           "TelemetryProgress", "FULL_BODY_CAP", "get", "ensure", "request_of", "request_body"]

KEY = "chaperone"
# The most a request body is decompressed to for the policy's view (request_of): the largest
# body any judgment reads (streaming.READ_LIMIT).
DECODE_CAP = 64 * 1024 * 1024
FULL_BODY_CAP = 16 * 1024 * 1024  # ``bodies: full`` still stops here (the CRD's maxBodyBytes max)


# ============================================================================ recording settings

@dataclass(frozen=True)
class RecordingSettings:
    """A connection's ``spec.recording`` (CRD defaults when absent); Route sets it per flow."""

    enabled: bool = True
    bodies: str = "truncated"  # full | truncated | none
    max_body_bytes: int = 65536
    mode: str = ""  # strict | best-effort; "" = the recorder's own mode (no connection)

    @property
    def body_limit(self) -> int:
        """Bytes of each (masked) body kept in the recording."""
        if not self.enabled or self.bodies == "none":
            return 0
        if self.bodies == "full":
            return FULL_BODY_CAP
        return max(0, min(self.max_body_bytes, FULL_BODY_CAP))

    @classmethod
    def from_spec(cls, spec: Mapping[str, Any] | None) -> RecordingSettings:
        spec = spec if isinstance(spec, Mapping) else {}
        bodies = spec.get("bodies", "truncated")
        size = spec.get("maxBodyBytes", 65536)
        mode = spec.get("mode", "strict")
        return cls(enabled=spec.get("enabled", True) is not False,
                   bodies=bodies if bodies in ("full", "truncated", "none") else "truncated",
                   max_body_bytes=size if isinstance(size, int) and size >= 0 else 65536,
                   mode=mode if mode in ("strict", "best-effort") else "strict")


# ============================================================================ body capture

class BodyCapture:
    """One body as Mask masked it, kept (bounded) for the recording - Mask's hand-off to Record.

    ``data`` holds at most ``limit`` bytes of the masked body - decoded (identity) when the
    wire body was compressed; ``size`` counts every byte of it. ``recordable`` is False when
    the body must not be recorded at all (it could not be masked, or no decision said how).
    Record stores only what a capture holds, so a body that was not masked never reaches the
    recording.
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


# ============================================================================ request URL

@dataclass(frozen=True)
class RequestURL:
    """The request's host and its URL as recorded (credential-like query parameters redacted,
    the decision's detectors applied), worked out once per flow: Record builds it for the
    request event, Telemetry reuses it for ``server.address`` and ``url.full`` (issue 16: the
    Host header parse and the URL's masking ran twice per flow). ``source`` is what it was
    worked out from (:func:`~.recording.flow_events.recorded_url`): one whose source no longer
    matches the flow is worked out again."""

    source: tuple[Any, ...]
    host: str
    url: str


# ============================================================================ private progress

@dataclass
class RecordProgress:
    """Record's own memory of a flow across its hooks (private to Record)."""

    request: bool = False  # the request (and decision) events were appended
    off: bool = False  # recording.enabled: false for this flow's connection
    streamed_request: bool = False  # recorded in requestheaders, the body in the response event
    decided: tuple[Decision | None, dict[str, Any] | None] = (None, None)  # (decision, refused) recorded
    end: bool = False  # the response or error event was appended


@dataclass
class TelemetryProgress:
    """Telemetry's own memory of a flow across its hooks (private to Telemetry)."""

    request: Any = None  # the byte-counting wrapper of a streamed request body
    response: Any = None  # the byte-counting wrapper of a streamed response body
    done: bool = False  # the span and metrics were recorded


# ============================================================================ the context

# Frozen, so one instance serves every new context (Identify and Route replace them per flow;
# building a frozen dataclass per flow was ~2/3 of FlowContext's construction, issue 16).
_NO_IDENTITY = Identity()
_DEFAULT_RECORDING = RecordingSettings()


@dataclass
class FlowContext:
    identity: Identity = _NO_IDENTITY
    connection: str = ""  # ClaudeConnection name; "" when no connection covers the host
    connection_type: str = ""  # aws | http | kubernetes | anthropic
    snapshot: Snapshot | None = None  # what Route routed the flow with (None: Route did not run)
    method: str = ""  # the method the policy judges when not the request line's (Route)
    recording: RecordingSettings = _DEFAULT_RECORDING  # the connection's (Route)
    action: Action | None = None
    decision: Decision | None = None
    early: bool = False  # Enforce judged it in requestheaders, on the headers alone
    approval_request: str = ""  # ApprovalRequest name, when one was opened or reused
    approved_by: tuple[str, ...] = ()  # approvers whose decision released the flow
    grant: str = ""  # "exact" | "action" when a cached grant let the flow through
    refused_grants: tuple[str, ...] = ()  # cached grants refused as unproven (forgery attempts)
    refused: dict[str, Any] | None = None  # the JSON error body sent to the agent, if refused
    masked: dict[str, int] = field(default_factory=dict)  # masked kinds -> count (response)
    bodies: dict[str, BodyCapture] = field(default_factory=dict)  # Mask's captures, by direction
    request_digest: str = ""  # sha256:... of the canonical request (approvals, grants)
    request_url: RequestURL | None = None  # host and recorded URL (recorded_url; Record, Telemetry)
    started: float = field(default_factory=time.monotonic)
    upstream_started: float = 0.0
    upstream_latency: float = 0.0
    # private: one addon's memory of the flow across its own hooks
    injected: bool = False  # InjectCredentials ran (or refused) for this flow
    decoder: Any = None  # InjectCredentials: the aws-chunked ChainedStream it installed
    # ToolUse: the tool_use the model asked for that this action most likely carries out
    # (recorded as the request event's causedBy; evidence, never read by a policy decision)
    caused_by: dict[str, Any] | None = None
    record: RecordProgress = field(default_factory=RecordProgress)
    tool_use: Any = None  # ToolUse: its memory of an LLM answer (rules, judged blocks)
    kube_stream: Any = None  # KubeStreams: an exec/attach/port-forward session's stream state
    git_gate: Any = None  # Route: the gate holding a streamed git push's body (gitgate.py)
    # WidenRanges -> TrimRanges: the byte range the agent asked for (first, last or None: to the
    # end); the request went upstream widened by ranges.PAD on both sides
    requested_range: tuple[int, int | None] | None = None
    telemetry: TelemetryProgress = field(default_factory=TelemetryProgress)


def get(flow) -> FlowContext | None:
    return flow.metadata.get(KEY)


def ensure(flow) -> FlowContext:
    ctx = flow.metadata.get(KEY)
    if ctx is None:
        ctx = flow.metadata[KEY] = FlowContext()
    return ctx


def request_of(flow: Any, *, body: bool = True) -> HTTPRequest:
    """The policy engine's view of ``flow.request`` (body decoded when ``body`` and available),
    with the method the policy judges (``FlowContext.method``, set by Route)."""
    req = flow.request
    path, _, query = req.path.partition("?")
    ctx = get(flow)
    method = (ctx.method if ctx is not None else "") or req.method
    return HTTPRequest(method=method, scheme=req.scheme, host=normalize_host(req.host),
                       port=req.port, path=path, query=query,
                       headers=tuple(req.headers.items(multi=True)),
                       body=request_body(flow) if body else b"")


def request_body(flow: Any) -> bytes:
    """``request_of(flow).body`` without building the rest of the view (Enforce judges every
    buffered request with its body; issue 16)."""
    req = flow.request
    if req.stream or not req.raw_content:
        return b""
    # Decoded with a cap (a gzip bomb stops there) and as servers decode (trailing garbage
    # after a gzip member dropped). Undecodable or over the cap: the raw bytes, as before -
    # Enforce refuses such a body wherever the body is judged (addons/enforce.py).
    try:
        return decode(req.raw_content, parse_content_encoding(req.headers.get("content-encoding")),
                      DECODE_CAP)
    except MaskingError:
        return req.raw_content
