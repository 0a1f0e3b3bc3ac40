"""KubeStreams: what happens inside ``kubectl exec``/``attach``/``port-forward``, recorded and
masked (issue 15, docs/exec-sessions.md).

Route classified the upgrade request and Enforce judged it (``match.kubernetes.commands``,
``containers``, ``ports``); once the upstream answered ``101 Switching Protocols`` the stream
belongs to this addon. The protocols are parsed by :mod:`chaperone_sidecar.recording.k8s_streams`.

* **exec/attach over WebSocket** (the channel protocol, kubectl >= 1.30): each message is a
  ``stream`` event of the recording - channel (stdin, stdout, stderr, error, resize, close),
  direction, masked bytes (at most the connection's ``recording.maxBodyBytes`` per event,
  :data:`SESSION_CAP` per session), the exit status parsed from the error channel. stdout and
  stderr are masked **before the agent gets them** with the decision's response masks, one
  stream masker per channel, so a secret split across messages is still masked (the masker
  holds back only a tail that may still become a secret; see policy/masking/stream.py).
  **Decision**: the tail is held only after a frame that filled the 32 KiB copy buffer
  (:data:`FULL_FRAME`: the process is still writing); a shorter frame is delivered whole (its
  tail masked as final), because the only way to deliver held output later is an injected
  message, and mitmproxy queues those behind the upstream's close when both arrive together
  (then the output is lost). So a secret the process writes in two separate short writes is
  not masked - an agent that does that on purpose could as well ``rev`` the file: masking
  output catches accidents, command rules are the control. Output still held when the exit
  status arrives (a full last frame) is injected after the status; kubectl reads output until
  the connection closes.
  stdin is forwarded as typed and recorded masked with every mask of the decision.
* **port-forward through a SPDY tunnel** (``SPDY/3.1+portforward.k8s.io``, kubectl >= 1.31):
  each ``SYN_STREAM`` names its port; the port is judged again with the flow's policies
  (``match.kubernetes.ports``). A stream the policy does not allow is never forwarded: the
  sidecar answers it itself (``SYN_REPLY``, the refusal JSON on the error stream, FIN), so
  kubectl prints ``an error occurred forwarding L -> P: {...}`` and the tunnel stays up for
  allowed ports. To write those frames the sidecar re-encodes every header block of the tunnel
  with its own zlib contexts (``SpdyWriter``). The same holds for the channel protocol's
  port-forward (``?ports=``, judged at the handshake). Forwarded port data is **not masked**:
  the tunnel carries any protocol (HTTP with a Content-Length, TLS, PostgreSQL...) whose
  framing a changed length would break. It is recorded as sizes only, never content.
* **plain SPDY** (``POST`` + ``Upgrade: SPDY/3.1``, kubectl's fallback when WebSocket fails):
  refused before it is forwarded. **Decision**: the sidecar runs mitmproxy with ``rawtcp`` off
  and Route closes raw TCP flows, so a SPDY upgrade could not be relayed anyway; refusing it
  at the request says why instead of the connection dropping after the 101, and nothing reaches
  the kubelet that could not be recorded. A WebSocket answered with a subprotocol this module
  cannot read is refused the same way (what cannot be parsed cannot be masked).

Strict recording: a frame whose event cannot be written is not forwarded - the connection is
closed (a session cannot be answered with an HTTP refusal after its 101). Best-effort: the
frame passes and ``unrecorded`` counts the lost events.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass, field, replace
from typing import Any

from mitmproxy import ctx as mitmproxy_ctx
from mitmproxy import http

# Defines the websocket_* hooks (hooks.all_hooks), which the Pipeline dispatches by name; the
# HTTP layer imports it too, but the addon must not depend on who imported mitmproxy first.
from mitmproxy.proxy.layers import websocket as _websocket_layer  # noqa: F401

from .. import flowctx
from ..flowctx import FULL_BODY_CAP
from ..log_setup import flow_fields
from ..policy.classify.kubernetes import CONNECT_SUBRESOURCES
from ..policy.evaluator import evaluate
from ..policy.masking.masker import Masker
from ..policy.masking.stream import StreamMasker
from ..recording import k8s_streams as ks
from ..recording.events import encode_body, new_event
from ..recording.flow_events import identity_of
from ..recording.spool import SpoolUnavailable
from ..services import SidecarServices
from .refusal import build, refuse

__all__ = ["KubeStreams", "SESSION_CAP"]

log = logging.getLogger("chaperone.sessions")

SESSION_CAP = FULL_BODY_CAP  # recorded content bytes per session; later events keep sizes only
_OUTPUT = {1: "stdout", 2: "stderr"}
# A frame this long filled the streaming copy buffer (io.Copy's 32 KiB in the kubelet and the
# apiserver): the process is still writing, so a tail that may become a secret waits for the
# next frame. A shorter frame is what the process wrote before it paused: delivered whole.
FULL_FRAME = 32 * 1024
_FLUSH = b""  # content of an injected message that carries pending SPDY frames


@dataclass
class _Session:
    """One upgraded exec/attach/port-forward connection (``FlowContext.kube_stream``)."""

    protocol: ks.ChannelProtocol
    subresource: str
    started: float = field(default_factory=time.monotonic)
    output: Masker | None = None  # response masks (what the agent receives)
    recorded: Masker | None = None  # every mask (what the recording keeps)
    maskers: dict[int, StreamMasker] = field(default_factory=dict)  # channel -> held output
    recorded_bytes: int = 0
    ports: dict[int, str] = field(default_factory=dict)  # channel/stream id -> port
    kinds: dict[int, str] = field(default_factory=dict)  # SPDY stream id -> streamtype
    refused: set[int] = field(default_factory=set)  # SPDY streams the sidecar answered itself
    readers: dict[bool, ks.SpdyReader] = field(default_factory=dict)  # by from_client
    writers: dict[bool, ks.SpdyWriter] = field(default_factory=dict)  # by to which peer
    pending: list[tuple[str, Any]] = field(default_factory=list)  # SPDY frames for the agent
    exit: dict[str, Any] | None = None
    limit: int = 0  # recorded bytes per event (the connection's recording.maxBodyBytes)
    reported: dict[int, dict[str, int]] = field(default_factory=dict)  # channel -> counts seen


class KubeStreams:
    """Records and masks the content of exec/attach/port-forward sessions."""

    def __init__(self, services: SidecarServices) -> None:
        self.services = services
        self.unrecorded = 0

    # ------------------------------------------------------------------ hooks
    def requestheaders(self, flow: http.HTTPFlow) -> None:
        self._only_websocket(flow)  # a request whose body may leave early is classified now

    def request(self, flow: http.HTTPFlow) -> None:
        self._only_websocket(flow)  # the others are classified by Route in `request`

    def _only_websocket(self, flow: http.HTTPFlow) -> None:
        ctx = flowctx.get(flow)
        if flow.response is not None or ctx is None or not _connect(ctx):
            return
        upgrade = flow.request.headers.get("upgrade", "").strip().lower()
        if not upgrade or upgrade == "websocket":
            return
        refuse(flow, "blocked",
               f"{ctx.action.kubernetes.subresource if ctx.action and ctx.action.kubernetes else 'exec'}"
               f" over {flow.request.headers.get('upgrade', '')!r} is not relayed: Chaperone records "
               "and masks exec, attach and port-forward sessions over WebSocket only.", rule=None,
               how_to_get_access="Use kubectl 1.30 or newer (WebSocket is its default; do not set "
                                 "KUBECTL_REMOTE_COMMAND_WEBSOCKETS=false or "
                                 "KUBECTL_PORT_FORWARD_WEBSOCKETS=false).")

    def responseheaders(self, flow: http.HTTPFlow) -> None:
        ctx = flowctx.get(flow)
        response = flow.response
        if response is None or ctx is None or ctx.refused is not None or not _connect(ctx):
            return
        if response.status_code != 101:
            return
        chosen = response.headers.get("sec-websocket-protocol", "")
        protocol = ks.channel_protocol(chosen)
        if response.headers.get("upgrade", "").lower() != "websocket" or protocol is None:
            # Refused after the upstream switched: mitmproxy then closes both connections.
            refuse(flow, "blocked", f"the upstream switched to {response.headers.get('upgrade')!r}"
                   f" with subprotocol {chosen!r}, which Chaperone cannot read, so it cannot "
                   "record or mask it", rule=None)
            return
        kube = ctx.action.kubernetes if ctx.action is not None else None
        masks = ctx.decision.masks if ctx.decision is not None else ()
        session = _Session(protocol, kube.subresource if kube is not None else "exec",
                           limit=ctx.recording.body_limit)
        session.output = Masker(masks, direction="response") if masks else None
        session.recorded = Masker(masks, direction=None) if masks else None
        if protocol.spdy:
            session.readers = {True: ks.SpdyReader(), False: ks.SpdyReader()}
            session.writers = {True: ks.SpdyWriter(), False: ks.SpdyWriter()}
        ctx.kube_stream = session

    async def websocket_start(self, flow: http.HTTPFlow) -> None:
        ctx, session = _session(flow)
        if session is None:
            return
        kube = ctx.action.kubernetes if ctx.action is not None else None
        data: dict[str, Any] = {"channel": "open", "protocol": session.protocol.name,
                                "subresource": session.subresource}
        if kube is not None:
            data.update(pod=f"{kube.namespace}/{kube.name}", container=kube.container or None,
                        command=list(kube.command) or None, ports=list(kube.ports) or None)
        await self._record(flow, ctx, [data])

    async def websocket_message(self, flow: http.HTTPFlow) -> None:
        ctx, session = _session(flow)
        if session is None or flow.websocket is None or not flow.websocket.messages:
            return
        message = flow.websocket.messages[-1]
        try:
            if session.protocol.spdy:
                await self._spdy(flow, ctx, session, message)
            elif not message.injected:  # injected: flushed output, recorded when it was made
                await self._channels(flow, ctx, session, message)
        except ks.StreamError as exc:
            log.error("closing a %s session that cannot be parsed: %s", session.subresource, exc,
                      extra=flow_fields(flow))
            await self._record(flow, ctx, [{"channel": "error", "direction": _direction(message),
                                            "closed": f"unparseable stream: {exc}"}])
            message.drop()
            flow.kill()

    async def websocket_end(self, flow: http.HTTPFlow) -> None:
        ctx, session = _session(flow)
        if session is None:
            return
        events = []
        for channel, masker in session.maskers.items():  # the connection closed while held
            rest = masker.finish()
            if rest:
                events.append(self._data(session, _OUTPUT[channel], "out", rest,
                                         undelivered=True))
        websocket = flow.websocket
        events.append({"channel": "end", "exit": session.exit,
                       "closeCode": websocket.close_code if websocket is not None else None,
                       "durationMs": int((time.monotonic() - session.started) * 1000)})
        await self._record(flow, ctx, events, kill=False)
        ctx.kube_stream = None

    # ------------------------------------------------------------------ channel protocol
    async def _channels(self, flow: http.HTTPFlow, ctx: flowctx.FlowContext, session: _Session,
                        message: Any) -> None:
        parsed = ks.parse_channel_message(session.protocol, message.content)
        if parsed is None:
            return
        channel, payload = parsed.channel, parsed.payload
        if session.subresource == "portforward":
            await self._port_channel(flow, ctx, session, message, channel, payload)
            return
        if message.from_client:
            if channel == ks.CLOSE_CHANNEL and session.protocol.version >= 5:
                closed = ks.EXEC_CHANNELS.get(payload[0], str(payload[0])) if payload else "?"
                event: dict[str, Any] = {"channel": "close", "direction": "in", "closes": closed}
            elif channel == 4:
                event = self._data(session, "resize", "in", payload)
            else:
                event = self._data(session, ks.EXEC_CHANNELS.get(channel, str(channel)), "in",
                                   payload, mask=True)
            await self._record(flow, ctx, [event])
            return
        if channel in _OUTPUT:
            masker = session.maskers.get(channel)
            if masker is None and session.output is not None and session.output.active:
                masker = session.maskers[channel] = session.output.stream("text/plain")
            out = masker.feed(payload) if masker is not None else payload
            if masker is not None and len(payload) < FULL_FRAME:
                out += masker.finish()  # see FULL_FRAME and the module docstring
                session.maskers.pop(channel, None)
            counts = _counts(session, channel, masker)
            if masker is not None and channel not in session.maskers:
                session.reported.pop(channel, None)
            message.content = ks.channel_content(session.protocol, channel, out)
            event = self._data(session, _OUTPUT[channel], "out", out, masked=counts)
            if channel in session.maskers:
                event["held"] = session.maskers[channel].held
            await self._record(flow, ctx, [event])
            return
        if channel == 3:  # the exit status; output still held (a full last frame) follows it
            flushed = []
            for held_channel, masker in session.maskers.items():
                rest = masker.finish()
                if rest:
                    flushed.append((held_channel, rest, _counts(session, held_channel, masker)))
            session.maskers = {}
            status = payload
            status_counts: dict[str, int] = {}
            if session.output is not None and session.output.active:
                result = session.output.mask_bytes(payload, "application/json")
                status, status_counts = result.body, dict(result.counts)
            session.exit = ks.exit_status(status)
            events = [self._data(session, _OUTPUT[c], "out", rest, masked=n)
                      for c, rest, n in flushed]
            event = self._data(session, "error", "out", status, masked=status_counts)
            event["exit"] = session.exit
            events.append(event)
            await self._record(flow, ctx, events)
            message.content = ks.channel_content(session.protocol, channel, status)
            # kubectl reads output until the connection closes, after the status too. An
            # injected message is queued behind the frames of the read being handled, so if
            # the upstream's close came in the same read it is lost: the exit status, which
            # the agent acts on, is never the one risked.
            for c, rest, _ in flushed:
                self._inject(flow, ks.channel_content(session.protocol, c, rest), message.is_text)
            return
        await self._record(flow, ctx, [self._data(session, ks.EXEC_CHANNELS.get(channel, str(channel)),
                                                  "out", payload, mask=True)])

    async def _port_channel(self, flow: http.HTTPFlow, ctx: flowctx.FlowContext,
                            session: _Session, message: Any, channel: int, payload: bytes) -> None:
        """Channel-protocol port-forward: data ``2i``, error ``2i+1``; the server's first
        message on each channel starts with the port (2 bytes, little-endian)."""
        if not message.from_client and channel not in session.ports and len(payload) >= 2:
            session.ports[channel] = str(int.from_bytes(payload[:2], "little"))
            payload = payload[2:]
        kind = "error" if channel % 2 else "data"
        direction = "in" if message.from_client else "out"
        event: dict[str, Any] = {"channel": kind, "direction": direction,
                                 "port": session.ports.get(channel), "size": len(payload)}
        if kind == "error" and payload:
            event.update(self._data(session, "error", direction, payload, mask=True))
            event["port"] = session.ports.get(channel)
        await self._record(flow, ctx, [event])

    # ------------------------------------------------------------------ SPDY tunnel
    async def _spdy(self, flow: http.HTTPFlow, ctx: flowctx.FlowContext, session: _Session,
                    message: Any) -> None:
        from_client = message.from_client
        if message.injected:  # the frames the sidecar answers with, encoded in wire order
            out = bytearray()
            writer = session.writers[False]
            for kind, value in session.pending:
                out += writer.syn_reply(*value) if kind == "reply" else value
            session.pending = []
            if out:
                message.content = bytes(out)
            else:
                message.drop()
            return
        frames = session.readers[from_client].feed(message.content)
        writer = session.writers[from_client]
        out = bytearray()
        events: list[dict[str, Any]] = []
        answer = False
        for frame in frames:
            if frame.control and frame.type == ks.SYN_STREAM and from_client:
                port = frame.headers.get("port", "")
                kind = frame.headers.get("streamtype", "")
                session.kinds[frame.stream_id] = kind
                session.ports[frame.stream_id] = port
                refusal = self._judge_port(flow, ctx, port)
                events.append({"channel": "open", "direction": "in", "stream": frame.stream_id,
                               "streamType": kind, "port": port or None,
                               "refused": refusal["message"] if refusal else None})
                if refusal is not None:
                    session.refused.add(frame.stream_id)
                    self._answer(session, frame.stream_id, kind, refusal)
                    answer = True
                    continue
            if frame.stream_id in session.refused and from_client:
                continue  # the agent's frames of a refused stream go nowhere
            if not frame.control:
                kind = session.kinds.get(frame.stream_id, "")
                event: dict[str, Any] = {
                    "channel": kind or "data", "direction": "in" if from_client else "out",
                    "stream": frame.stream_id, "port": session.ports.get(frame.stream_id),
                    "size": len(frame.data)}
                if kind == "error" and frame.data:
                    event.update(self._data(session, "error", event["direction"], frame.data,
                                            mask=True))
                if frame.fin:
                    event["fin"] = True
                if frame.data or frame.fin:
                    events.append(event)
            elif frame.type in (3, 7):  # RST_STREAM, GOAWAY
                events.append({"channel": frame.kind.lower(), "stream": frame.stream_id,
                               "direction": "in" if from_client else "out"})
            out += writer.reencode(frame)
        if events:
            await self._record(flow, ctx, events)
        if out:
            message.content = bytes(out)
        else:
            message.drop()  # nothing complete yet (or only refused frames)
        if answer:
            self._inject(flow, _FLUSH, False)

    def _judge_port(self, flow: http.HTTPFlow, ctx: flowctx.FlowContext,
                    port: str) -> dict[str, Any] | None:
        """The refusal body for a stream to ``port``, or None when the policy allows it."""
        kube = ctx.action.kubernetes if ctx.action is not None else None
        snapshot = ctx.snapshot
        if kube is None or snapshot is None or ctx.action is None:
            return None
        ports = tuple(p.strip() for p in port.split(",")) if port else ("",)
        action = replace(ctx.action, kubernetes=replace(kube, ports=ports))
        decision = evaluate(snapshot.policies, action, ctx.identity, ctx.connection)
        if decision.effect == "allow":
            return None
        message = decision.message or f"port {port or '(none)'} is not allowed"
        if decision.effect == "require_approval":
            message = (f"forwarding port {port} needs approval ({message}); a port-forward "
                       "stream cannot wait for one: ask for the port in the URL (ports=) "
                       "or have the policy allow it")
        return build("blocked", message, rule=decision.rule, action=action,
                     connection=ctx.connection, request=flow.request)

    @staticmethod
    def _answer(session: _Session, stream_id: int, kind: str, refusal: dict[str, Any]) -> None:
        """Queue the sidecar's own answer to a refused stream: SYN_REPLY, then the refusal on
        an error stream, FIN."""
        session.pending.append(("reply", (stream_id, {}, 0)))
        body = json.dumps(refusal).encode() if kind == "error" else b""
        session.pending.append(("data", ks.data_frames(stream_id, body, ks.FLAG_FIN)))

    # ------------------------------------------------------------------ recording
    def _data(self, session: _Session, channel: str, direction: str, payload: bytes, *,
              mask: bool = False, masked: dict[str, int] | None = None,
              undelivered: bool = False) -> dict[str, Any]:
        """One frame as recorded: masked (``mask``: here, with every mask of the decision;
        output arrives masked already), bounded."""
        counts = dict(masked or {})
        if mask and payload and session.recorded is not None and session.recorded.active:
            result = session.recorded.mask_bytes(payload, "text/plain")
            payload = result.body
            for kind, n in result.counts.items():
                counts[kind] = counts.get(kind, 0) + n
        data: dict[str, Any] = {"channel": channel, "direction": direction, "size": len(payload)}
        room = max(0, min(session.limit, SESSION_CAP - session.recorded_bytes))
        if payload and room:
            kept = payload[:room]
            session.recorded_bytes += len(kept)
            stored = encode_body(kept)
            assert stored is not None
            stored.pop("size", None)
            data["data"] = stored
            if len(kept) < len(payload):
                data["truncated"] = True
        elif payload:
            data["omitted"] = "recording limit reached"
        if counts:
            data["masked"] = counts
        if undelivered:
            data["undelivered"] = True
        return data

    async def _record(self, flow: http.HTTPFlow, ctx: flowctx.FlowContext,
                      items: list[dict[str, Any]], *, kill: bool = True) -> None:
        recorder = self.services.recorder
        settings = ctx.recording
        if recorder is None or not settings.enabled or not items:
            return
        session = ctx.kube_stream
        elapsed = int((time.monotonic() - session.started) * 1000) if session is not None else None
        identity = identity_of(ctx.identity)
        events = [new_event("stream", flow=flow.id, identity=identity,
                            data={**item, "elapsedMs": elapsed}) for item in items]
        results = await recorder.append_many(events)
        lost = sum(1 for r in results if not isinstance(r, dict))
        if not lost:
            return
        self.unrecorded += lost
        for result in results:
            if isinstance(result, BaseException) and not isinstance(
                    result, (SpoolUnavailable, RuntimeError)):
                log.error("recording a session event failed: %r", result, extra=flow_fields(flow))
        mode = settings.mode or recorder.config.mode
        if kill and mode == "strict":
            log.error("recording unavailable (strict): closing the %s session",
                      session.subresource if session is not None else "kubernetes",
                      extra=flow_fields(flow))
            if flow.websocket is not None and flow.websocket.messages:
                flow.websocket.messages[-1].drop()
            flow.kill()

    @staticmethod
    def _inject(flow: http.HTTPFlow, content: bytes, is_text: bool) -> None:
        """Send a message to the agent after the one being handled (mitmproxy's
        ``inject.websocket``: queued, so injected messages keep their order)."""
        mitmproxy_ctx.master.commands.call("inject.websocket", flow, True, content, is_text)


def _connect(ctx: flowctx.FlowContext) -> bool:
    kube = ctx.action.kubernetes if ctx.action is not None else None
    return ctx.connection_type == "kubernetes" and kube is not None \
        and kube.subresource in CONNECT_SUBRESOURCES


def _session(flow: http.HTTPFlow) -> tuple[Any, _Session | None]:
    ctx = flowctx.get(flow)
    session = ctx.kube_stream if ctx is not None else None
    return ctx, session if isinstance(session, _Session) else None


def _direction(message: Any) -> str:
    return "in" if message.from_client else "out"


def _counts(session: _Session, channel: int, masker: StreamMasker | None) -> dict[str, int]:
    """What a channel's stream masker masked since it was last asked (its counts are
    cumulative)."""
    if masker is None:
        return {}
    seen = session.reported.get(channel, {})
    new = {k: v - seen.get(k, 0) for k, v in masker.counts.items() if v - seen.get(k, 0) > 0}
    session.reported[channel] = dict(masker.counts)
    return new
