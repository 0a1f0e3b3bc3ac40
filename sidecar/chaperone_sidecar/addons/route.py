"""Route: which ClaudeConnection a request belongs to, and what it is (the classified Action).

How the target is found, per listener:

* **explicit** (``regular`` mode): the request's host and port - the ``CONNECT`` authority for
  HTTPS, the absolute URL for plain HTTP.
* **transparent**: the original destination is only an IP, so the name comes from the TLS SNI
  (HTTPS) or the ``Host`` header (HTTP). The request's host is then set to that name, so the
  upstream connection goes to what the policy judged - not to whatever IP the client dialled
  with a well-known name in its SNI.
* **reverse** (a connection's ``baseURL`` swapped for ``http://127.0.0.1:PORT``): the listener
  port names the connection; a path in ``baseURL`` is prefixed to the request path.

Then the ``Host`` header (``:authority``) must name the same host: a request that says one
host in CONNECT/SNI and another in ``Host`` (domain fronting) is refused, because the policy
and the credentials would apply to a different target than the one that answers (400
``invalid_request``).

A host no connection covers is answered with 403 ``no_connection`` listing the connections
that do exist and their hosts, so an agent can correct itself. The upstream is never contacted
(with ``connection_strategy=lazy`` not even for the TLS handshake with the agent).

Classification (``policy.classify``) runs once per flow on the hot path: at ``requestheaders``
on the headers alone when the body may leave before the ``request`` hook (``body_leaves_early``:
the other addons judge such flows there), otherwise at ``request`` with the body, because some
actions live in the body (AWS query and JSON protocols, Anthropic models and tools). An early
flow whose body was read after all is classified again with it.

Only HTTP is proxied: raw TCP, UDP and DNS flows (a CONNECT tunnel carrying something that is
not TLS/HTTP) are closed, since no hook could judge them. ``Alt-Svc`` response headers are
removed so clients do not learn a QUIC route around the proxy.
"""

from __future__ import annotations

import logging
from typing import Any

from mitmproxy import http, tcp, udp
from mitmproxy.proxy import mode_specs

from .. import flowctx
from ..logging import flow_fields
from ..policy.classify import classify
from ..policy.model import HTTPRequest
from ..routing import Connection, base_url_parts, normalize_host, split_host
from ..sources import Snapshot
from . import refusal
from .streaming import body_leaves_early

__all__ = ["Route", "SNAPSHOT_KEY", "snapshot_of", "request_of"]

log = logging.getLogger("chaperone.route")

SNAPSHOT_KEY = "chaperone.snapshot"
_MISMATCH = "the request is addressed to"


def snapshot_of(flow: Any, services: Any) -> Snapshot:
    """The snapshot this flow was routed with (the current one if Route did not run)."""
    snap = flow.metadata.get(SNAPSHOT_KEY)
    return snap if snap is not None else services.snapshot()


def request_of(flow: http.HTTPFlow, *, body: bool = True) -> HTTPRequest:
    """The policy engine's view of ``flow.request`` (body decoded when ``body`` and available)."""
    req = flow.request
    path, _, query = req.path.partition("?")
    content = b""
    if body and not req.stream and req.raw_content:
        try:
            content = req.get_content(strict=False) or b""
        except ValueError:
            content = req.raw_content or b""
    return HTTPRequest(method=req.method, scheme=req.scheme, host=normalize_host(req.host),
                       port=req.port, path=path, query=query,
                       headers=tuple(req.headers.items(multi=True)), body=content)


class Route:
    """Sets ``FlowContext.connection``/``connection_type``/``action``; refuses unknown hosts."""

    def __init__(self, services):
        self.services = services

    # ------------------------------------------------------------------ hooks
    def requestheaders(self, flow: http.HTTPFlow) -> None:
        if flow.response is not None:
            return
        ctx = flowctx.ensure(flow)
        snap = flow.metadata[SNAPSHOT_KEY] = self.services.snapshot()
        conn, host, port, problem = self._resolve(flow, snap)
        if problem:
            kind = "invalid_request" if problem.startswith(_MISMATCH) else "no_connection"
            refusal.refuse(flow, kind, problem, rule=None, host=host, port=port,
                           connections=snap.routes.describe())
            log.info("refused: %s", problem, extra=flow_fields(flow, host=host, port=port))
            return
        assert conn is not None
        ctx.connection, ctx.connection_type = conn.name, conn.type
        if body_leaves_early(flow):  # the others judge it now, on the headers
            ctx.action = classify(request_of(flow, body=False), conn.type)

    def request(self, flow: http.HTTPFlow) -> None:
        if flow.response is not None:
            return
        ctx = flowctx.get(flow)
        if ctx is None or not ctx.connection:
            return
        if ctx.action is not None and (flow.request.stream or not flow.request.raw_content):
            return  # classified on the headers and there is no read body to add
        ctx.action = classify(request_of(flow), ctx.connection_type)

    def responseheaders(self, flow: http.HTTPFlow) -> None:
        # Alt-Svc would tell the client it may reach the origin over QUIC/another port directly,
        # around the proxy; the sidecar only serves what it proxies.
        if flow.response is not None and "alt-svc" in flow.response.headers:
            del flow.response.headers["alt-svc"]

    def tcp_start(self, flow: tcp.TCPFlow) -> None:
        log.warning("closing a raw TCP flow to %s: only HTTP(S) is proxied",
                    _address(flow.server_conn.address), extra={"flow": flow.id})
        flow.kill()

    def udp_start(self, flow: udp.UDPFlow) -> None:
        log.warning("closing a UDP flow to %s: only HTTP(S) is proxied",
                    _address(flow.server_conn.address), extra={"flow": flow.id})
        flow.kill()

    def dns_request(self, flow: Any) -> None:
        log.warning("closing a DNS flow: only HTTP(S) is proxied", extra={"flow": flow.id})
        flow.kill()

    # ------------------------------------------------------------------ routing
    def _resolve(self, flow: http.HTTPFlow, snap: Snapshot
                 ) -> tuple[Connection | None, str, int, str]:
        """(connection, host, port, refusal message or "")."""
        req = flow.request
        mode = flow.client_conn.proxy_mode
        if isinstance(mode, mode_specs.ReverseMode):
            return self._reverse(flow, snap, mode)
        host, port = normalize_host(req.host), req.port
        claimed = normalize_host(split_host(req.host_header)[0]) if req.host_header else ""
        if isinstance(mode, mode_specs.TransparentMode):
            name = normalize_host(flow.client_conn.sni or "") if req.scheme == "https" else ""
            name = name or claimed
            if name and name != host:
                req.host = name  # upstream goes to the judged name, not the dialled IP
                host = name
        conn = snap.routes.match(host, port)
        if conn is None:
            return None, host, port, self._no_connection(host, port, snap)
        if claimed and claimed != host:
            return None, host, port, (
                f"{_MISMATCH} {host} but its Host header names {claimed}; "
                "send requests for a host with that host in the Host header")
        return conn, host, port, ""

    def _reverse(self, flow: http.HTTPFlow, snap: Snapshot, mode: Any
                 ) -> tuple[Connection | None, str, int, str]:
        req = flow.request
        listen = mode.custom_listen_port
        conn = snap.routes.for_reverse_port(listen) if listen is not None else None
        host = normalize_host(req.host)
        if conn is None or not conn.base_url:
            return None, host, req.port, (f"the reverse-mode listener on port {listen} no longer "
                                          "belongs to any ClaudeConnection with a baseURL")
        scheme, base_host, base_port, base_path = base_url_parts(conn.base_url)
        if (host, req.port) != (base_host, base_port):
            # The listener was set up for another baseURL; the proxy reconfigures itself
            # shortly. Never send this connection's credentials to the old target.
            return None, host, req.port, (f"ClaudeConnection {conn.name} now points to "
                                          f"{conn.base_url}; retry in a moment")
        if base_path and not (req.path == base_path or req.path.startswith(base_path + "/")
                              or req.path.startswith(base_path + "?")):
            req.path = base_path + (req.path if req.path.startswith("/") else "/" + req.path)
        return conn, host, req.port, ""

    @staticmethod
    def _no_connection(host: str, port: int, snap: Snapshot) -> str:
        names = ", ".join(f"{c.name} ({', '.join(c.hosts) or 'no hosts'})"
                          for c in snap.routes.connections.values())
        where = f"{host}:{port}" if port not in (80, 443) else host
        if not names:
            return (f"no ClaudeConnection covers {where}: this pod has no connections at all, so "
                    "every request is refused")
        return f"no ClaudeConnection covers {where}; the connections of this pod are: {names}"


def _address(address: Any) -> str:
    if not address:
        return "?"
    return f"{address[0]}:{address[1]}"
