"""Identify: who is calling, on every flow; and no client may speak for Chaperone.

The pod's identity (namespace, name, uid, ServiceAccount) and its creator come from the
sidecar's configuration - the downward API and the creator JSON the webhook wrote into the
sidecar's own (immutable) env; when that is empty, the ``chaperone.dev/creator`` annotation
from the podinfo files. An agent cannot change any of it.

Per request, an agent (or its harness) may add ``X-Chaperone-On-Behalf-Of: <OIDC ID token>``
for the human it acts for. The token is verified (:mod:`chaperone_sidecar.oidc`); a valid one
sets ``identity.on_behalf_of``/``on_behalf_of_groups``, an invalid one - or any such header
when no issuer is configured, or more than one of them - is answered with 401
``unauthenticated`` and never forwarded.

Every request header starting with ``X-Chaperone-`` is removed before anything else looks at
the request (headers and trailers): those names belong to the gateway, and a client that sent
one must not reach the target with it or make a later addon believe it.
"""

from __future__ import annotations

import logging
from dataclasses import replace

from mitmproxy import http

from .. import flowctx
from ..config import SidecarConfig, parse_creator_annotation
from ..contract import CREATOR_ANNOTATION
from ..log_setup import flow_fields
from ..oidc import TokenInvalid
from ..policy.model import Identity
from ..services import SidecarServices
from ..snapshot import parse_downward_api
from . import refusal

__all__ = ["Identify", "HEADER_PREFIX", "ON_BEHALF_OF", "base_identity"]

log = logging.getLogger("chaperone.identify")

HEADER_PREFIX = "x-chaperone-"
_PREFIX_BYTES = HEADER_PREFIX.encode()  # as raw field names are lower-cased (ASCII)
ON_BEHALF_OF = "x-chaperone-on-behalf-of"


def base_identity(config: SidecarConfig) -> Identity:
    """The identity every flow of this sidecar starts with."""
    creator, groups = config.creator, config.creator_groups
    if not creator and config.podinfo_dir is not None:
        try:
            annotations = parse_downward_api((config.podinfo_dir / "annotations").read_text())
        except OSError:
            annotations = {}
        creator, groups = parse_creator_annotation(annotations.get(CREATOR_ANNOTATION, ""))
    return Identity(
        service_account=config.service_account_ref,
        pod_namespace=config.pod_namespace,
        pod_name=config.pod_name,
        pod_uid=config.pod_uid,
        creator=creator,
        creator_groups=tuple(groups),
    )


def strip_chaperone_headers(headers: http.Headers) -> list[tuple[str, str]]:
    """Remove every ``X-Chaperone-*`` field; returns the removed (name, value) pairs."""
    # Every request passes here: the raw names are checked first, and only the fields that
    # match are decoded (mitmproxy's items(multi=True) decodes every name and value; issue 16).
    if not any(k.lower().startswith(_PREFIX_BYTES) for k, _ in headers.fields):
        return []
    # The fields themselves are dropped: deleting by the decoded name missed a name whose
    # str.lower() differs from its bytes' (the Kelvin sign lower-cases to "k") - a KeyError that
    # left the header, an on-behalf-of token included, in the forwarded request.
    removed: list[tuple[str, str]] = []
    kept: list[tuple[bytes, bytes]] = []
    for raw_name, raw_value in headers.fields:
        name = raw_name.decode("utf-8", "surrogateescape")
        if name.lower().startswith(HEADER_PREFIX):
            removed.append((name, raw_value.decode("utf-8", "surrogateescape")))
        else:
            kept.append((raw_name, raw_value))
    if removed:
        headers.fields = tuple(kept)
    return removed


class Identify:
    """Fills ``FlowContext.identity``; strips ``X-Chaperone-*``; verifies on-behalf-of tokens."""

    def __init__(self, services: SidecarServices) -> None:
        self.services = services
        self.base = base_identity(services.config)

    async def requestheaders(self, flow: http.HTTPFlow) -> None:
        ctx = flowctx.ensure(flow)
        ctx.identity = self.base
        removed = strip_chaperone_headers(flow.request.headers)
        if not removed or flow.response is not None:
            return
        tokens = [v for k, v in removed if k.lower() == ON_BEHALF_OF]
        if not tokens:
            return
        if len(tokens) > 1:
            self._refuse(flow, "send at most one X-Chaperone-On-Behalf-Of header")
            return
        verifier = self.services.oidc
        if verifier is None:
            self._refuse(flow, "X-Chaperone-On-Behalf-Of was sent, but this gateway has no OIDC "
                               "issuer configured to verify it; send the request without it")
            return
        try:
            verified = await verifier.verify(tokens[0])
        except TokenInvalid as exc:
            self._refuse(flow, f"the on-behalf-of token was not accepted: {exc}")
            return
        ctx.identity = replace(self.base, on_behalf_of=verified.username,
                               on_behalf_of_groups=verified.groups)

    def request(self, flow: http.HTTPFlow) -> None:
        # Trailers arrive with the body; they must not smuggle gateway headers either.
        if flow.request.trailers:
            strip_chaperone_headers(flow.request.trailers)

    @staticmethod
    def _refuse(flow: http.HTTPFlow, message: str) -> None:
        refusal.refuse(flow, "unauthenticated", message, rule=None)
        log.warning("refused: %s", message, extra=flow_fields(flow))
