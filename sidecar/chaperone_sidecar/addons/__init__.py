"""Chaperone's mitmproxy addons and their documented order.

mitmproxy calls every addon's hook in list order, so the order *is* the pipeline. Each addon is
one concern, constructed as ``Addon(services)`` (the typed
:class:`~chaperone_sidecar.services.SidecarServices`), and they share per-flow state only through
the :class:`~chaperone_sidecar.flowctx.FlowContext` in ``flow.metadata["chaperone"]`` - no other
``flow.metadata`` key.

Rules every addon follows:

* Hooks start with guard clauses. Once a flow is refused (``flow.response`` set by an addon in
  ``requestheaders``/``request``, ``ctx.refused`` holds the body), later addons leave the
  request alone - only Record and Telemetry still look at it.
* Refusals go through :func:`chaperone_sidecar.addons.refusal.refuse` (one JSON shape).
* The snapshot (connections, routes, compiled policies) is read once per flow by Route and kept
  in ``FlowContext.snapshot``, so every addon of a flow sees the same configuration generation.
* Addons never import each other (``tests/sidecar/addons/test_structure.py`` enforces it): an
  addon module imports, of this package, only the shared helpers :mod:`.refusal` and
  :mod:`.streaming`. What two addons share lives outside the package: the per-flow types in
  :mod:`chaperone_sidecar.flowctx` (``BodyCapture``, ``RecordingSettings``, ``request_of``),
  the recorded form of a flow in :mod:`chaperone_sidecar.recording.flow_events`. This module
  (the composition root) and :mod:`.pipeline` (which dispatches to them) are not addons.
* Egress (:mod:`.egress`) is an addon outside this list: the proxy runtime registers it in
  transparent mode only, next to the pipeline (its hooks are connection hooks).

=====================  ====================================================================
addon (module)         responsibility; FlowContext fields read -> written
=====================  ====================================================================
1. Identify            Who is calling: pod namespace/name/uid/ServiceAccount and creator from
   (identify)          the config; the optional on-behalf-of OIDC token
                       (``X-Chaperone-On-Behalf-Of``) verified against the issuer's JWKS.
                       Removes **every** client-sent ``X-Chaperone-*`` header (no spoofing).
                       Invalid token -> 401 ``unauthenticated``, never forwarded.
                       -> ``identity`` (``requestheaders``)
2. Route               Which ClaudeConnection: by host (explicit), by SNI/Host header
   (route)             (transparent; the upstream is then the name, not the original IP),
                       by listener (reverse). Streams a body above the sidecar's streaming
                       size (``streaming.stream_large``; mitmproxy itself only past
                       ``READ_LIMIT``). Classifies the request (``classify``): from
                       headers at ``requestheaders``, refined with the body at ``request``
                       unless the body streams. No connection -> 403 ``no_connection`` naming
                       the host and the connections that exist. Raw TCP/UDP flows are closed.
                       -> ``snapshot``, ``connection``, ``connection_type``, ``method``,
                       ``recording``, ``action``
3. Enforce             Evaluates the compiled policies (``evaluate``) and the policy rate
   (enforce)           limits. block -> 403 ``blocked``; over a limit -> 429. Reads first a
                       body judged by content (bodyRegex, MCP, Anthropic, AWS query), up to
                       its limit: larger 413, no length 411.
                       snapshot, identity, connection, action -> ``decision``, ``early``
4. Approve             For ``require_approval``: a cached grant passes; otherwise opens (or
   (approve)           reuses) an ApprovalRequest and holds the flow (bounded, async) or
                       answers 403 with its name (defer). decision -> ``approval_request``,
                       ``approved_by``, ``grant``, ``request_digest``
4b. KubeStreams        exec/attach/port-forward sessions: refuses the plain SPDY upgrades
   (sessions)          policy and approvals let through (only WebSocket is relayed); after
                       the 101 parses the channel protocol or the SPDY tunnel, masks
                       stdout/stderr/status before the agent gets them, judges each
                       port-forward stream's port, records every frame as a ``stream``
                       event (strict: unrecordable -> connection closed).
                       action, decision, snapshot, recording -> ``kube_stream`` (private)
4c. WidenRanges        With response masks in force, a single ``Range: bytes=a-b`` goes up
   (ranges)            widened by ``ranges.PAD`` on each side (before the signature); other
                       Range forms are dropped (the whole body comes back, masked).
                       decision -> ``requested_range``, (request)
5. InjectCredentials   Replaces the agent's credentials with the connection's (AWS SigV4
   (credentials)       re-signing, header/bearer tokens, x-api-key); the last addon that
                       changes the request. A streamed aws-chunked upload gets its decoder as
                       ``flow.request.stream``. connection -> (request)
6. Mask                Masks responses, streaming-safe. Never changes the request: captures a
   (mask)              masked copy of its body for the recording (as sent upstream), for a
                       streamed body with a tee that *wraps* the stream function in place (the
                       aws-chunked decoder), never replaces it. decision.masks, recording ->
                       ``masked``, ``bodies``
6a. TrimRanges         A widened 206 (masked in place by Mask, length preserving) cut back to
   (ranges)            the range asked for, Content-Range restored; one that does not cover
                       it -> 502 ``response_unmaskable``. requested_range -> (response)
6b. McpTools           MCP ``tools/list`` results (JSON, or SSE events as they stream) lose
   (mcp_tools)         the tools the policy blocks for this identity whatever the arguments,
                       so the model never sees them; wraps Mask's response stream, never
                       replaces it. snapshot, identity, connection, action -> (response)
6c. ToolUse            The tool_use blocks of LLM answers: recorded as ``tool-use`` events,
   (tool_use)          judged by tool-use rules (a blocked one becomes a text block before
                       the SDK sees it; SSE held from block start to stop only when rules
                       apply), kept per pod as link candidates; later flows of the pod get
                       the best content match. Wraps Mask's response stream (judges masked
                       text), never replaces it. snapshot, identity, action -> ``tool_use``
                       (private), ``caused_by`` (read by Record)
7. Record              Appends request/response/decision/approval events (masked) to the
   (record)            session recording, before the request leaves. everything (bodies:
                       only Mask's captures) -> (recording); may refuse (strict mode)
8. Telemetry           OpenTelemetry span and metrics per flow. everything -> (spans,
   (telemetry)         metrics); ``upstream_started``, ``upstream_latency``
=====================  ====================================================================

Why this order: identity and connection are inputs of the policy; the policy decides before
anything leaves (approval only for what the policy sent there); credentials are added only to
requests that will be forwarded, after every check, and by the last addon that changes the
request (a signature covers it; ``InjectCredentials.running`` reports a ``mutates_request``
addon placed after it); masking runs after injection, so the recorded request - headers and
body - is what went upstream, and before recording, so the recording only ever holds the
masked form; telemetry last sees the final state.

Streaming: an addon that needs to act before a request leaves does so in ``requestheaders``
when :func:`~.streaming.body_leaves_early` says the body may leave before ``request`` (it
streams, or its length is unknown). An addon after InjectCredentials that wants to see a
streamed body wraps ``flow.request.stream`` (calls the function it found first), never
replaces it - replacing it would drop the aws-chunked decoder and send the upload still
chunk-framed. Mask and Telemetry do so.
"""

from __future__ import annotations

from typing import Any

from ..services import SidecarServices
from .approve import Approve
from .credentials import InjectCredentials
from .enforce import Enforce
from .identify import Identify
from .mask import Mask
from .mcp_tools import McpTools
from .ranges import TrimRanges, WidenRanges
from .record import Record
from .route import Route
from .sessions import KubeStreams
from .telemetry import Telemetry
from .tool_use import ToolUse

__all__ = ["ADDON_ORDER", "build_addons"]

# The addon classes in pipeline order - the single place the order is defined.
ADDON_ORDER: tuple[type[Any], ...] = (
    Identify,
    Route,
    Enforce,
    Approve,
    KubeStreams,
    WidenRanges,
    InjectCredentials,
    Mask,
    TrimRanges,
    McpTools,
    ToolUse,
    Record,
    Telemetry,
)


def build_addons(services: SidecarServices) -> list[Any]:
    """The Chaperone addons in order, each constructed with ``services``."""
    return [addon(services) for addon in ADDON_ORDER]
