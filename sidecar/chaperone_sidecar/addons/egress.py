"""Egress: transparent-mode connections that never became an HTTP request are recorded.

In transparent mode the init container's rules send *every* outbound TCP connection of the
agents to the sidecar, whatever its port or address (docs/injection.md section 9). What is
HTTP or TLS-wrapped HTTP becomes a flow: Route judges its host (SNI / Host header) on the
original port and refuses what no ClaudeConnection declares, and Record records that flow
like any other. Everything else never becomes a flow and so would pass unseen: a protocol
that is not HTTP (SSH, a database, raw bytes - ``rawtcp`` is off, the HTTP layer rejects it),
a client that waits for the server to speak first, a TLS handshake the agent aborts because it
does not trust the interception CA. None of those is ever forwarded (``connection_strategy``
is lazy: the upstream is only contacted for a judged request), but an agent's attempt to get
out is worth knowing about. So when such a connection closes, this addon appends an ``error``
event (``kind: connection``) naming the original destination, the SNI if any and why nothing
was forwarded, and logs it.

Registered by the proxy runtime in transparent mode only, outside the per-flow pipeline: its
hooks are connection hooks, and ``requestheaders`` merely marks a connection as having carried
a request. A connection that carried one is Record's; a recording failure here refuses nothing
(nothing was forwarded) and is logged.
"""

from __future__ import annotations

import logging
import time
from typing import Any

from mitmproxy import connection, http, tls
from mitmproxy.proxy import mode_specs

from ..policy.model import Identity
from ..recording.events import new_event
from ..recording.flow_events import identity_of
from ..services import SidecarServices

__all__ = ["Egress"]

log = logging.getLogger("chaperone.egress")


def _address(address: Any) -> str:
    if not address:
        return "?"
    host, port = address[0], address[1]
    return f"[{host}]:{port}" if ":" in str(host) else f"{host}:{port}"


class Egress:
    """Records transparent-mode connections closed without any HTTP request."""

    def __init__(self, services: SidecarServices) -> None:
        self.services = services
        config = services.config
        self.identity = identity_of(Identity(
            service_account=config.service_account_ref, pod_namespace=config.pod_namespace,
            pod_name=config.pod_name, pod_uid=config.pod_uid, creator=config.creator))
        self._open: dict[str, dict[str, Any]] = {}  # client connection id -> what we know
        self.recorded = 0

    # ------------------------------------------------------------------ hooks
    def client_connected(self, client: connection.Client) -> None:
        if not isinstance(client.proxy_mode, mode_specs.TransparentMode):
            return
        self._open[client.id] = {"start": time.time(), "requests": 0, "tls_failed": False,
                                 "destination": None}

    def next_layer(self, nextlayer: Any) -> None:
        # The transparent layer has set the server address to the original destination
        # (SO_ORIGINAL_DST) before it asks for the next layer.
        state = self._open.get(nextlayer.context.client.id)
        if state is not None and state["destination"] is None:
            state["destination"] = nextlayer.context.server.address

    def requestheaders(self, flow: http.HTTPFlow) -> None:
        state = self._open.get(flow.client_conn.id)
        if state is not None:
            state["requests"] += 1

    def tls_failed_client(self, data: tls.TlsData) -> None:
        state = self._open.get(data.context.client.id)
        if state is not None:
            state["tls_failed"] = True

    async def client_disconnected(self, client: connection.Client) -> None:
        state = self._open.pop(client.id, None)
        if state is None or state["requests"]:
            return
        destination = _address(state["destination"])
        if state["tls_failed"]:
            why = ("the agent's TLS handshake with the sidecar failed (a client trusting "
                   "only other CAs cannot go around the sidecar)")
        else:
            why = ("no HTTP request was made: only HTTP and HTTPS are proxied, any other "
                   "protocol (or a client waiting for the server to speak first) is closed")
        message = f"connection to {destination} closed; nothing was forwarded: {why}"
        data = {"kind": "connection", "phase": "connection", "destination": destination,
                "sni": client.sni or None, "transport": client.transport_protocol,
                "message": message,
                "durationMs": int(round((time.time() - state["start"]) * 1000))}
        # info, not warning: a client may also open a connection it then does not use
        # (happy eyeballs, pre-connecting pools); the recording keeps every such attempt.
        log.info("transparent connection to %s closed without a request; nothing was "
                 "forwarded", destination, extra={"fields": {"destination": destination,
                                                             "sni": client.sni}})
        recorder = self.services.recorder
        if recorder is None:
            return
        try:
            sealed = await recorder.append(new_event("error", flow=client.id, data=data,
                                                     identity=self.identity))
        except Exception as exc:  # noqa: BLE001 - nothing was forwarded; log and go on
            log.error("recording a refused connection failed: %r", exc)
            return
        if sealed is not None:  # best-effort recorders answer None for a lost event
            self.recorded += 1
