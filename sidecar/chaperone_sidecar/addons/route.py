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

Streaming: a ``Content-Length`` above the sidecar's streaming size (config
``stream_large_bodies``, 1 MiB) is set to stream first thing in ``requestheaders``
(:func:`~.streaming.stream_large`) - Chaperone's rule, not mitmproxy's, whose own threshold is
``READ_LIMIT`` so that a body Enforce chooses to read stays buffered (see streaming.py).

Classification (``policy.classify``) runs once per flow on the hot path: at ``requestheaders``
on the headers alone when the body may leave before the ``request`` hook (``body_leaves_early``:
the other addons judge such flows there), otherwise at ``request`` with the body, because some
actions live in the body (AWS query and JSON protocols, Anthropic models and tools). An early
flow whose body was read after all is classified again with it.

**One canonical request** (issue 11, items 6-8). Once the connection is known, and before
anything is classified or forwarded:

* the path is canonicalised with the connection's rules (:mod:`..policy.classify.paths`:
  ``//admin``, ``/x/../admin`` and ``/%61dmin`` become ``/admin``) and **the canonical path is
  what is forwarded**, so the upstream serves what the policy judged - whatever it would have
  made of the original. A path that stays ambiguous (``%2F``, ``\\``, ``%25XX``, ``;``, a
  trailing dot or space, control characters) is refused with 400 ``invalid_request`` naming
  the ``spec.pathNormalization`` field that would allow it;
* method overrides (``X-HTTP-Method-Override``, ``X-HTTP-Method``, ``X-Method-Override``,
  ``_method=`` in the query or in a form body) are removed (``spec.methodOverride: strip``, the
  default; a ``_method`` field in a multipart body is refused, since rewriting it would lose
  the parts' headers), so the upstream executes the method the policy judged; with
  ``methodOverride: honor`` they are forwarded and the request is judged as the overridden
  method (conflicting overrides: 400);
* a kubernetes ``exec``/``attach``/``portforward`` request is judged - and digested for
  approvals - as ``POST`` whatever its method: kubectl opens these with a WebSocket ``GET`` and
  falls back to an SPDY ``POST`` when that fails, and both are the one action ``create``; so the
  fallback finds the ApprovalRequest the first attempt opened instead of opening a second.

The method the policy judges, when it is not the request line's, is kept in
``FlowContext.method``; :func:`~chaperone_sidecar.flowctx.request_of` (the policy's and the
approvals' view of the request) uses it. The request line itself is not changed.

What Route hands the later addons, all through the :class:`~chaperone_sidecar.flowctx.FlowContext`:
the snapshot it routed with (``snapshot``: read once per flow, so every addon of the flow sees
the same configuration generation), the connection and its type, the judged method, the
classified ``action`` and the connection's ``recording`` settings (Mask and Record read them).

**A streamed git push** (an ``http`` connection's ``POST .../git-receive-pack`` whose body
leaves before ``request``: over 1 MiB, as git sends a large push) is judged on its headers with
its ref updates *pending* (only services and repositories decide), and its body is held back by
a :class:`~chaperone_sidecar.gitgate.GitPushGate` until the commands have arrived: they are then
classified and the policies evaluated again, and a stricter result lets nothing of the push
through and answers it with the refusal (in ``responseheaders``/``response``, whatever the
upstream said to the no-op it got). An HTTP/2 push without ``Content-Length`` is forwarded as
HTTP/1.1 with chunked framing (mitmproxy 11 would send such a body to an HTTP/1 upstream
unframed). See docs/git.md.

Only HTTP is proxied: raw TCP, UDP and DNS flows (a CONNECT tunnel carrying something that is
not TLS/HTTP) are closed, since no hook could judge them. ``Alt-Svc`` response headers are
removed so clients do not learn a QUIC route around the proxy.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import replace
from typing import Any
from urllib.parse import unquote_plus

from mitmproxy import http, tcp, udp
from mitmproxy.proxy import mode_specs
from mitmproxy.utils import human

from .. import flowctx
from ..flowctx import RecordingSettings, request_of
from ..gitgate import GitPushGate
from ..log_setup import flow_fields
from ..policy.classify import classify
from ..policy.classify.git import pending_push
from ..policy.classify.http import OVERRIDE_HEADERS, OVERRIDE_PARAMS, is_method, override_method
from ..policy.classify.kubernetes import is_connect_request
from ..policy.classify.paths import PathRules, canonical_path, path_rules
from ..policy.evaluator import evaluate
from ..policy.matching import RANK
from ..policy.model import Decision
from ..routing import Connection, base_url_parts, normalize_host, split_host
from ..services import SidecarServices
from ..snapshot import Snapshot
from . import refusal
from .streaming import body_leaves_early, stream_large

__all__ = ["Route"]

_MAX_RECORDING_MEMO = 1024  # connections whose recording settings Route keeps built

log = logging.getLogger("chaperone.route")
_OVERRIDE_NAMES = frozenset(name.encode() for name in OVERRIDE_HEADERS)  # lower case, as fields compare

_MISMATCH = "the request is addressed to"


class Route:
    """Sets ``FlowContext.snapshot``/``connection``/``connection_type``/``method``/``recording``/
    ``action``; refuses unknown hosts."""

    def __init__(self, services: SidecarServices) -> None:
        self.services = services
        config = getattr(services, "config", None)
        self._stream_size = human.parse_size(getattr(config, "stream_large_bodies", None) or "1m")
        # connection name -> (its spec.recording object, the settings built from it): built once
        # per configuration generation instead of per flow (issue 16; published specs are
        # replaced, never changed in place - a new snapshot brings new objects)
        self._recording: dict[str, tuple[Any, RecordingSettings]] = {}

    def _recording_settings(self, name: str, recording: Any) -> RecordingSettings:
        known = self._recording.get(name)
        if known is not None and known[0] is recording:
            return known[1]
        if len(self._recording) >= _MAX_RECORDING_MEMO:
            self._recording.clear()  # connections come and go: bounded
        settings = RecordingSettings.from_spec(recording)
        self._recording[name] = (recording, settings)
        return settings

    # ------------------------------------------------------------------ hooks
    def requestheaders(self, flow: http.HTTPFlow) -> None:
        if flow.response is not None:
            return
        # Chaperone's streaming size, applied here rather than by mitmproxy (streaming.py).
        stream_large(flow, self._stream_size)
        ctx = flowctx.ensure(flow)
        snap = ctx.snapshot = self.services.snapshot()
        conn, host, port, problem = self._resolve(flow, snap)
        if problem:
            kind = "invalid_request" if problem.startswith(_MISMATCH) else "no_connection"
            refusal.refuse(flow, kind, problem, rule=None, host=host, port=port,
                           connections=snap.routes.describe())
            log.info("refused: %s", problem, extra=flow_fields(flow, host=host, port=port))
            return
        assert conn is not None
        ctx.connection, ctx.connection_type = conn.name, conn.type
        recording = conn.spec.get("recording") if isinstance(conn.spec, Mapping) else None
        ctx.recording = self._recording_settings(conn.name, recording)
        rules = path_rules(conn.type, conn.spec)
        problem = self._canonical(flow, ctx, conn.type, conn.spec, rules)
        if problem:
            refusal.refuse(flow, "invalid_request", problem, rule=None,
                           how_to_get_access="Send the request with a plain path (and one method, "
                                             "in the request line), then retry.")
            log.info("refused: %s", problem, extra=flow_fields(flow, host=host, port=port))
            return
        if body_leaves_early(flow):  # the others judge it now, on the headers
            ctx.action = classify(request_of(flow, body=False), conn.type, rules)
            if ctx.action.git is not None and conn.type == "http":
                self._gate_push(flow, ctx, conn.type, rules)

    def request(self, flow: http.HTTPFlow) -> None:
        if flow.response is not None:
            return
        ctx = flowctx.get(flow)
        if ctx is None or not ctx.connection:
            return
        if ctx.action is not None and (flow.request.stream or not flow.request.raw_content):
            return  # classified on the headers and there is no read body to add
        snap = ctx.snapshot if ctx.snapshot is not None else self.services.snapshot()
        conn = snap.connection(ctx.connection)
        rules = path_rules(conn.type, conn.spec) if conn is not None else None
        problem = self._body_override(flow, ctx, conn.spec if conn is not None else {})
        if problem:
            ctx.action = None
            refusal.refuse(flow, "invalid_request", problem, rule=None,
                           how_to_get_access="Send the method in the request line, without a "
                                             "_method form field, then retry.")
            log.info("refused: %s", problem, extra=flow_fields(flow))
            return
        ctx.action = classify(request_of(flow), ctx.connection_type, rules)

    # ------------------------------------------------------------------ canonical request
    @staticmethod
    def _canonical(flow: http.HTTPFlow, ctx: flowctx.FlowContext, ctype: str, spec: Any,
                   rules: PathRules) -> str:
        """Rewrite the request into its canonical form; a refusal message when it is ambiguous."""
        req = flow.request
        path, sep, query = req.path.partition("?")
        canonical, problem = canonical_path(path, rules)
        if problem:
            return problem
        honor = isinstance(spec, Mapping) and spec.get("methodOverride") == "honor"
        if not honor:
            # pop() of a missing header costs a scan of every field and a KeyError: look once
            if any(name.lower() in _OVERRIDE_NAMES for name, _ in req.headers.fields):
                for name in OVERRIDE_HEADERS:
                    req.headers.pop(name, None)
            if query:
                query = _without_params(query, OVERRIDE_PARAMS)
                sep = "?" if query else ""
        rewritten = canonical + (sep + query if sep else "")
        if rewritten != req.path:
            req.path = rewritten  # forward what the policy judges
        if honor:
            method, problem = override_method(request_of(flow, body=False))
            if problem:
                return problem
            if method != req.method.upper():
                ctx.method = method
        if ctype == "kubernetes" and is_connect_request(request_of(flow, body=False)):
            ctx.method = "POST"  # WebSocket GET and SPDY POST: one action
        return ""

    @staticmethod
    def _body_override(flow: http.HTTPFlow, ctx: flowctx.FlowContext, spec: Any) -> str:
        """``_method`` in a form body (what Rails, Laravel and Symfony read first): removed from
        a urlencoded body, refused in a multipart one (re-encoding it would lose the parts'
        headers); judged as the method with ``methodOverride: honor``. A refusal or ""."""
        req = flow.request
        if req.stream or not req.raw_content:
            return ""
        ctype = req.headers.get("content-type", "").lower()
        if "application/x-www-form-urlencoded" in ctype:
            fields = [(k, v) for k, v in req.urlencoded_form.items(multi=True)]
        elif "multipart/form-data" in ctype:
            fields = [(k.decode("utf-8", "replace"), v.decode("utf-8", "replace"))
                      for k, v in req.multipart_form.items(multi=True)]
        else:
            return ""
        values = [v for k, v in fields if k.strip() in OVERRIDE_PARAMS]
        if not values:
            return ""
        if isinstance(spec, Mapping) and spec.get("methodOverride") == "honor":
            method, problem = override_method(request_of(flow, body=False))
            if problem:
                return problem
            wanted = {v.strip().upper() for v in values}
            if method != req.method.upper():  # a header or query override as well
                wanted.add(method)
            if len(wanted) != 1 or not all(map(is_method, wanted)):
                return (f"the request carries conflicting or invalid method overrides "
                        f"({', '.join(sorted(wanted))}); send one method, in the request line")
            ctx.method = wanted.pop()
            return ""
        if "multipart/form-data" in ctype:
            return ("the multipart body carries a _method form field, which would make the "
                    "upstream execute another method than the one judged; this connection does "
                    "not honour method overrides (spec.methodOverride: strip)")
        req.urlencoded_form = [(k, v) for k, v in fields if k.strip() not in OVERRIDE_PARAMS]
        return ""

    def responseheaders(self, flow: http.HTTPFlow) -> None:
        # Alt-Svc would tell the client it may reach the origin over QUIC/another port directly,
        # around the proxy; the sidecar only serves what it proxies.
        if flow.response is not None and any(k.lower() == b"alt-svc" for k, _ in flow.response.headers.fields):
            del flow.response.headers["alt-svc"]  # (looked for in the raw fields: no KeyError when absent)
        self._gate_refusal(flow)  # now, so no addon starts streaming the upstream's answer

    def response(self, flow: http.HTTPFlow) -> None:
        self._gate_refusal(flow)  # again: reading the upstream's body replaced the content

    # ------------------------------------------------------------------ streamed git pushes
    @staticmethod
    def _gate_push(flow: http.HTTPFlow, ctx: flowctx.FlowContext, ctype: str, rules: PathRules) -> None:
        """A streamed git push: judged on its headers with its updates pending, its body held
        back by a :class:`~chaperone_sidecar.gitgate.GitPushGate` until they are judged."""
        action = ctx.action
        assert action is not None and action.git is not None
        pending = pending_push(action)
        if pending is action:
            return  # not a push
        ctx.action = pending
        base = request_of(flow, body=False)
        length = flow.request.headers.get("content-length", "").strip()

        def judge(held: bytes, complete: bool) -> Decision | None:
            exact = classify(replace(base, body=held), ctype, rules)
            ctx.action = exact
            snapshot, before = ctx.snapshot, ctx.decision
            if snapshot is None or before is None:
                return Decision("block", message="the push was not judged on its headers; "
                                                 "refusing (fail closed)")
            decision = evaluate(snapshot.policies, exact, ctx.identity, ctx.connection)
            if RANK.get(decision.effect, 3) <= RANK.get(before.effect, 3) and \
                    (complete or exact.git is None or exact.git.commands is not None):
                return None
            if RANK.get(decision.effect, 3) <= RANK.get(before.effect, 3):
                decision = Decision("block", message="the push's ref updates could not be read "
                                                     "from the start of its body; refusing (fail closed)")
            elif decision.effect == "require_approval":  # a stream function cannot hold it
                decision = Decision("block", rule=decision.rule, message=(
                    f"{decision.message}: this push streamed (it is larger than 1 MiB), and a "
                    "streamed push cannot be held for approval; push it in smaller parts, each "
                    "of which can be approved"))
            ctx.decision = decision
            log.info("streamed git push refused on its ref updates: %s", exact.summary,
                     extra=flow_fields(flow))
            return decision

        req = flow.request
        if (req.is_http2 or req.is_http3) and not length:
            # mitmproxy 11 forwards an HTTP/2 body of unknown length to an HTTP/1 upstream
            # without any framing (the upstream reads it as empty). As an HTTP/1.1 request with
            # chunked framing it is framed for an HTTP/1 upstream, and the framing header is
            # dropped (h2's normalisation) for an HTTP/2 one; Host carries the authority.
            if "host" not in req.headers and req.authority:
                req.headers.insert(0, "Host", req.authority)
            req.authority = ""
            req.http_version = "HTTP/1.1"
            req.headers["transfer-encoding"] = "chunked"
        gate = GitPushGate(judge, int(length) if length.isdigit() else None)
        req.stream = gate
        ctx.git_gate = gate

    @staticmethod
    def _gate_refusal(flow: http.HTTPFlow) -> None:
        """Answer a push whose gate closed with the refusal, whatever the upstream said to the
        ``0000`` it got instead (gitgate.py)."""
        ctx = flowctx.get(flow)
        gate = ctx.git_gate if ctx is not None else None
        if gate is None or gate.verdict is None or flow.response is None:
            return
        decision: Decision = gate.verdict
        refusal.refuse(flow, "blocked", decision.message, rule=decision.rule)

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


def _without_params(query: str, names: tuple[str, ...]) -> str:
    """``query`` without the parameters named ``names`` (others kept byte for byte).

    Some servers (Rack before 3) also split on ``;``: a part that hides one behind a ``;`` goes.
    """
    kept = [part for part in query.split("&")
            if not any(unquote_plus(sub.partition("=")[0]).strip() in names
                       for sub in part.split(";"))]
    return "&".join(kept)


def _address(address: Any) -> str:
    if not address:
        return "?"
    return f"{address[0]}:{address[1]}"
