"""InjectCredentials: the connection's real credentials replace whatever the agent sent.

For every flow that is going to be forwarded (allowed, or approved) the connection's
``CredentialInjector`` (``services.injectors.get(connection)``) is applied to
``flow.request`` in place: the agent's credentials are stripped and the held ones added - AWS
requests are re-signed with SigV4 (and pointed at ``aws.endpointURL`` when the connection sets
one, before signing), http connections get their header/bearer token, anthropic ``x-api-key``,
kubernetes a bearer token. See :mod:`chaperone_sidecar.credentials`.

Fail closed. Credentials that are not available (no Secret mounted, a file missing, an STS
exchange that failed) -> 503 ``chaperone_credentials_unavailable``; a request the injector
cannot sign (an expired presigned URL, broken aws-chunked framing) -> 400
``chaperone_invalid_request``; any other failure -> 503. The request is never forwarded with
the agent's own credentials, and a flow without a connection or without a policy decision is
refused rather than forwarded untouched.

When it runs - last. A signature covers the body (SigV4's payload hash), so the request must
be final when it is signed: this addon must be the last one that changes what goes upstream.
It runs in the ``request`` hook (after every earlier addon's ``request`` hook) or - when the
body may leave before that hook (:func:`~.streaming.body_leaves_early`: it streams, or its length
is unknown) - in ``requestheaders``, the last moment before the headers leave; S3 then signs
``UNSIGNED-PAYLOAD``, and an ``aws-chunked`` upload gets the decoder the injector returns
installed as ``flow.request.stream`` (a :class:`ChainedStream`: the decoder first, then any
stream function an earlier addon installed). Contract for other addons: one that changes
requests, or installs a request stream function, comes *before* this one in ``ADDON_ORDER``
(or, if it must come after, wraps the stream function it finds instead of replacing it, as
Mask's recording tee and Telemetry's byte counter do). An
addon may declare ``mutates_request = True``; :meth:`InjectCredentials.running` logs an error
when such an addon comes after this one, and a streamed upload whose decoder was replaced
(never called) is logged as an error in ``request``.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from mitmproxy import ctx as mctx
from mitmproxy import http

from .. import flowctx
from ..credentials.credential_sources import CredentialsUnavailable, InjectionError
from ..log_setup import flow_fields
from ..services import SidecarServices
from .refusal import refuse
from .streaming import body_leaves_early

__all__ = ["InjectCredentials", "ChainedStream", "order_problems"]

log = logging.getLogger("chaperone.credentials")

_FORWARDED = ("allow", "require_approval")  # a require_approval flow gets here only approved


def order_problems(chain: list[Any], addon: Any) -> list[str]:
    """Addons after ``addon`` in ``chain`` that declare ``mutates_request`` (they would change
    a request after it was signed)."""
    try:
        position = next(i for i, a in enumerate(chain) if a is addon)
    except StopIteration:
        return []
    return [f"{type(a).__name__} mutates requests but runs after {type(addon).__name__}: "
            "requests it changes would leave with a stale signature"
            for a in chain[position + 1:] if getattr(a, "mutates_request", False)]


def _chunks(out: Any) -> list[bytes]:
    if isinstance(out, (bytes, bytearray)):
        return [bytes(out)] if out else []
    return [bytes(c) for c in out if c]


class ChainedStream:
    """``flow.request.stream`` running ``first`` (the aws-chunked decoder) and then the stream
    function that was installed before (if any). Returns a list of chunks and never ``b""``
    mid-body, which mitmproxy would send as the terminating chunk of a chunked upload."""

    def __init__(self, first: Callable[[bytes], Any], then: Any = None) -> None:
        self.first = first
        self.then = then if callable(then) else None
        self.called = False  # mitmproxy calls it at least once (with b"" at the end)

    def __call__(self, data: bytes) -> list[bytes]:
        self.called = True
        out = b"".join(_chunks(self.first(data)))
        if self.then is None:
            return [out] if out else []
        if out:
            chunks = _chunks(self.then(out))
            return chunks + (_chunks(self.then(b"")) if not data else [])
        return _chunks(self.then(b"")) if not data else []


class InjectCredentials:
    """Applies the connection's ``CredentialInjector`` to every forwarded request."""

    def __init__(self, services: SidecarServices) -> None:
        self.services = services

    def running(self) -> None:
        # The Pipeline (addons/pipeline.py) registers Chaperone's addons as one: look inside.
        chain = [c for a in mctx.master.addons.chain for c in (getattr(a, "children", None) or [a])]
        for problem in order_problems(chain, self):
            log.error("addon order: %s", problem)

    # ------------------------------------------------------------------ hooks
    def requestheaders(self, flow: http.HTTPFlow) -> None:
        if flow.response is not None or not body_leaves_early(flow):
            return  # buffered bodies are signed in `request`, once final
        self._inject(flow, streamed=True)

    def request(self, flow: http.HTTPFlow) -> None:
        if flow.response is not None:
            return
        ctx = flowctx.get(flow)
        if ctx is not None and ctx.injected:  # done in requestheaders (a streamed body, sent)
            chained = ctx.decoder
            if chained is not None and not chained.called:
                log.error("the aws-chunked decoder was replaced by a later addon's stream "
                          "function: the upload went out undecoded", extra=flow_fields(flow))
            return
        self._inject(flow, streamed=bool(flow.request.stream))

    # ------------------------------------------------------------------ injecting
    def _inject(self, flow: http.HTTPFlow, *, streamed: bool) -> None:
        ctx = flowctx.ensure(flow)
        ctx.injected = True
        if not ctx.connection:
            refuse(flow, "no_connection", "no ClaudeConnection was determined for this request, "
                                          "so it cannot carry credentials; refusing", rule=None)
            log.error("refused: a flow without a connection reached credential injection",
                      extra=flow_fields(flow))
            return
        if ctx.decision is None or ctx.decision.effect not in _FORWARDED:
            refuse(flow, "blocked", "no policy decision lets this request through; refusing "
                                    "(fail closed)", rule=None)
            log.error("refused: an unjudged flow reached credential injection",
                      extra=flow_fields(flow))
            return
        try:
            registry = self.services.injectors
            if registry is None:
                raise CredentialsUnavailable("this gateway holds no credentials")
            injector = registry.get(ctx.connection)
            decoder = injector.apply(flow.request)
        except CredentialsUnavailable as exc:
            self._refuse(flow, "credentials_unavailable", f"credentials of connection "
                         f"{ctx.connection!r} are unavailable: {exc}")
            return
        except InjectionError as exc:
            self._refuse(flow, "invalid_request", f"the request cannot be sent through "
                         f"connection {ctx.connection!r}: {exc}")
            return
        except Exception as exc:  # noqa: BLE001 - never forward what could not be signed
            log.exception("credential injection failed", extra=flow_fields(flow))
            self._refuse(flow, "credentials_unavailable", "the credentials could not be applied: "
                         f"{exc.__class__.__name__}")
            return
        if decoder is not None:
            if not streamed:  # the injector decodes buffered bodies itself; cannot happen
                self._refuse(flow, "invalid_request", "an aws-chunked body could not be decoded")
                return
            flow.request.stream = ctx.decoder = ChainedStream(decoder, flow.request.stream)

    @staticmethod
    def _refuse(flow: http.HTTPFlow, kind: str, message: str) -> None:
        refuse(flow, kind, message, rule=None)
        log.warning("refused: %s", message, extra=flow_fields(flow))
