"""Approve: a ``require_approval`` decision is released only by a human's approval (or a grant).

For a flow Enforce decided ``require_approval``:

1. The canonical request digest (:func:`~chaperone_sidecar.approvals.digest.request_digest`:
   stable across re-signing, dates and SDK attempt ids) is computed from the request as the
   agent sent it, before credentials are injected, and stored in ``ctx.request_digest``.
2. The approvals façade (``services.approvals``, :class:`~chaperone_sidecar.approvals.service.
   ApprovalService`) answers: a cached grant (exact request, then action) passes at once;
   otherwise it opens an ApprovalRequest, or reuses the pending one of an earlier attempt of
   the same request, and then either **holds** the flow until a decision - bounded, awaited on
   the event loop (mitmproxy awaits async hooks per flow, so every other flow keeps moving) -
   or returns at once (**defer**).
3. approved -> the flow continues; ``ctx.approval_request``, ``ctx.approved_by`` and
   ``ctx.grant`` say by whom / which grant. denied / expired -> 403 with the reason and who
   decided. pending (defer, or the hold ran out) -> 403 naming the ApprovalRequest, its
   namespace and expiry, the approvers, the exact command an approver runs and "retry the same
   request after approval" - the retry then passes on the grant the approval left.

Mode and bound. A rule says ``hold`` or ``defer`` and ``holdSeconds``; the pod's setting
(``CHAPERONE_APPROVAL_MODE`` from the pod annotation / ``CHAPERONE_APPROVAL_TIMEOUT_SECONDS``,
mitmproxy options ``chaperone_approval_mode`` / ``chaperone_approval_hold_max``) can only make
it stricter, never weaker. **Decision**: ``hold`` is the stricter mode - the agent's call does
not return until a human decided, so the agent cannot work around a pending request - hence
``hold`` on either side holds, and a pod annotation saying ``defer`` does not weaken a policy's
``hold``. The pod's side counts only when the pod says it (the ``chaperone.dev/approval-mode``
annotation, read from the downward API; outside a pod, the option): the operator writes its
cluster default into every pod's environment, and that default must not turn a policy's
deliberate ``defer`` (e.g. for ``pods/exec``, which cannot wait) into a hold. The pod's bound
only caps how long one connection stays open (a hold that runs out answers "pending", it never
lets anything through). The one exception is a body known to stream, which is never held
(see When).

Refused grants. When the approvals façade refused cached grants that their ApprovalRequest does
not prove (forged, altered, replayed to another key, revoked; :mod:`~chaperone_sidecar.approvals.
proof`), the attempt is logged (warning, ``refused_grants``), counted
(``chaperone.approvals.refused_grants``) and recorded (``ctx.refused_grants`` -> the approval
event's ``refusedGrants``); the flow then goes through the normal approval path.

Remembered outcomes. A retry of a request (or, with ``action`` scope, an action) that was denied
or expired undecided is answered with that outcome - approver, reason, ApprovalRequest - for the
rule's ``rememberOutcomeSeconds`` (``remembered_until`` in the body), not with a new request.

When. Like Enforce, in ``request`` with the body in the digest - or in ``requestheaders``
when the body may leave before ``request`` (:func:`~.streaming.body_leaves_early`); the digest
then covers method, target and the significant headers but not the body (which was not
read), and the agent's retry has the same digest, so an approval still lets exactly that
retry through. **Decision**: a request whose body is known to stream (``Content-Length`` above
``stream_large_bodies``) is never held: holding it would buffer the upload in the proxy's
memory while the client keeps sending; it is answered in defer mode at once.

Fail closed: no approvals service, no approvers, or an apiserver that refuses the
ApprovalRequest -> 503 ``chaperone_approval_unavailable``; the flow is never forwarded.
The ApprovalRequest's ``bodyPreview`` is masked with every built-in detector before it leaves
the sidecar (approvers must not see the agent's secrets either).
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import replace
from typing import Any, Literal

from mitmproxy import ctx as mctx
from mitmproxy import exceptions, http
from opentelemetry import metrics

from .. import flowctx
from ..approvals import ApprovalUnavailable, BackendError
from ..approvals.digest import mcp_payload, request_digest
from ..approvals.objects import approvers_text
from ..contract import APPROVAL_MODE_ANNOTATION
from ..flowctx import request_of
from ..log_setup import flow_fields
from ..policy.masking.detectors import DETECTOR_NAMES, resolve_rules
from ..policy.masking.spans import mask_text
from ..policy.model import ApprovalRequirement, HTTPRequest
from ..services import SidecarServices
from ..snapshot import parse_downward_api
from .refusal import refuse
from .streaming import body_leaves_early

__all__ = ["Approve", "approve_command", "body_preview", "PREVIEW_BYTES"]

log = logging.getLogger("chaperone.approve")

PREVIEW_BYTES = 2048
RETRY_DELAYS = (0.2, 0.5, 1.0)  # transient backend failures: ~2 s in all, then refuse (503)
_TEXT_TYPES = ("json", "xml", "text/", "x-www-form-urlencoded", "yaml", "javascript")


def approve_command(name: str, namespace: str, *, standalone: bool = False) -> str:
    """The exact command an approver runs."""
    if standalone:
        return f"chaperone approve {name}"
    return (f"kubectl patch ar {name} -n {namespace} --type=merge "
            "-p '{\"spec\":{\"decision\":\"Approved\"}}'")


def body_preview(request: HTTPRequest, limit: int = PREVIEW_BYTES) -> str:
    """The start of a text body, masked with every built-in detector, for approvers to read."""
    if not request.body:
        return ""
    ctype = (request.header("content-type") or "").lower()
    if ctype and not any(t in ctype for t in _TEXT_TYPES):
        return f"<{len(request.body)} bytes of {ctype}>"
    head = request.body[:limit * 2]  # room for masks; the result is cut to `limit` characters
    text = mask_text(head, resolve_rules(DETECTOR_NAMES)).decode("utf-8", errors="replace")
    if len(text) > limit or len(request.body) > len(head):
        text = text[:limit] + f"... <{len(request.body)} bytes>"
    return text


class Approve:
    """Releases, holds or refuses ``require_approval`` flows through the approvals façade."""

    def __init__(self, services: SidecarServices) -> None:
        self.services = services
        self._pod_says_mode: bool | None = None
        meter = services.meter or metrics.get_meter("chaperone.sidecar")
        self.refused_grants = meter.create_counter(
            "chaperone.approvals.refused_grants", unit="{grant}",
            description="Cached grants refused because their ApprovalRequest does not prove them "
                        "(forged, altered, replayed or revoked)")

    def load(self, loader) -> None:
        config = self.services.config
        loader.add_option(
            "chaperone_approval_mode", str, config.approval_mode,
            "How this pod waits for approvals: 'hold' keeps the request open until decided "
            "(bounded), 'defer' answers 403 with the ApprovalRequest at once. 'defer' here or "
            "in the rule wins.",
            choices=("hold", "defer"),
        )
        loader.add_option(
            "chaperone_approval_hold_max", int, config.approval_timeout_seconds,
            "Longest time (seconds) a request is held for an approval, whatever the rule's "
            "holdSeconds says.",
        )

        self._pod_says_mode = self._explicit_pod_mode()

    def _explicit_pod_mode(self) -> bool:
        """Whether the pod itself chose its approval mode (see the module docstring)."""
        podinfo = self.services.config.podinfo_dir
        if podinfo is None or not podinfo.is_dir():
            return True  # not in a pod: the option is what the user set
        try:
            annotations = parse_downward_api((podinfo / "annotations").read_text())
        except OSError:
            return False
        return APPROVAL_MODE_ANNOTATION in annotations

    def configure(self, updated) -> None:
        if "chaperone_approval_hold_max" in updated and mctx.options.chaperone_approval_hold_max < 0:
            raise exceptions.OptionsError("chaperone_approval_hold_max must not be negative")

    # ------------------------------------------------------------------ hooks
    async def requestheaders(self, flow: http.HTTPFlow) -> None:
        if flow.response is not None or not body_leaves_early(flow):
            return  # buffered bodies are handled in `request`, with the body in the digest
        ctx = self._pending(flow)
        if ctx is not None and ctx.git_gate is not None:
            # A streamed git push: its ref updates arrive after this decision and its digest
            # is one no retry shares (gitgate.py), so an approval could never let it through.
            assert ctx.decision is not None
            refuse(flow, "blocked", f"{ctx.decision.message}: this push streamed (it is larger "
                   "than 1 MiB), and a streamed push cannot be held for approval; push it in "
                   "smaller parts, each of which can be approved", rule=ctx.decision.rule)
            return
        if ctx is not None:
            await self._approve(flow, ctx, early=True)

    async def request(self, flow: http.HTTPFlow) -> None:
        if flow.response is not None:
            return
        ctx = self._pending(flow)
        if ctx is not None:
            await self._approve(flow, ctx, early=bool(flow.request.stream))

    @staticmethod
    def _pending(flow: http.HTTPFlow) -> flowctx.FlowContext | None:
        """The FlowContext when this flow awaits approval and was not handled yet."""
        ctx = flowctx.get(flow)
        if ctx is None or ctx.decision is None or ctx.decision.effect != "require_approval":
            return None
        if ctx.request_digest:  # handled in requestheaders
            return None
        return ctx

    # ------------------------------------------------------------------ approving
    def _option(self, name: str, default: Any) -> Any:
        try:
            return getattr(mctx.options, name)
        except AttributeError:  # not loaded into a master (a bare unit test): the config's
            return default

    def _requirement(self, base: ApprovalRequirement, streamed: bool) -> ApprovalRequirement:
        config = self.services.config
        pod_mode = self._option("chaperone_approval_mode", config.approval_mode)
        if self._pod_says_mode is None:  # not loaded into a master (a bare unit test)
            self._pod_says_mode = self._explicit_pod_mode()
        if not self._pod_says_mode:
            pod_mode = base.mode  # the operator's default, not the pod's word: the policy decides
        # hold is the stricter mode: either side saying hold holds (a streamed body never is)
        mode: Literal["hold", "defer"] = (
            "defer" if streamed or (base.mode != "hold" and pod_mode != "hold") else "hold")
        hold_max = self._option("chaperone_approval_hold_max", config.approval_timeout_seconds)
        return replace(base, mode=mode, hold_seconds=max(0, min(base.hold_seconds, hold_max)))

    async def _approve(self, flow: http.HTTPFlow, ctx: flowctx.FlowContext, *,
                       early: bool) -> None:
        decision = ctx.decision
        assert decision is not None
        request = request_of(flow, body=not early)
        ctx.request_digest = request_digest(request, payload=mcp_payload(ctx.action))
        service = self.services.approvals
        if decision.approval is None or decision.rule is None or ctx.action is None:
            self._unavailable(flow, "the decision requires approval but names no approval "
                                    "requirement; refusing (fail closed)")
            return
        if service is None:
            self._unavailable(flow, "this gateway cannot open ApprovalRequests (no approvals "
                                    "backend), so requests that need approval are refused")
            return
        # A body known to stream is never held (it would pile up in memory while held).
        requirement = self._requirement(decision.approval, bool(flow.request.stream))
        recorder = self.services.recorder
        try:
            outcome = await self._request(
                service, identity=ctx.identity, connection=ctx.connection, action=ctx.action,
                digest=ctx.request_digest, rule=decision.rule, requirement=requirement,
                session_id=recorder.session_id if recorder is not None else "",
                body_preview=body_preview(request))
        except ApprovalUnavailable as exc:
            self._unavailable(flow, f"no ApprovalRequest could be opened: {exc}")
            return
        except Exception as exc:  # noqa: BLE001 - whatever failed, never forward unapproved
            log.exception("approval failed", extra=flow_fields(flow))
            self._unavailable(flow, f"the approval could not be processed: "
                                    f"{exc.__class__.__name__}: {exc}")
            return
        ctx.approval_request = outcome.name
        if refused := tuple(getattr(outcome, "refused_grants", ()) or ()):
            ctx.refused_grants = refused
            self.refused_grants.add(len(refused), {"connection": ctx.connection})
            log.warning("refused %d forged or invalid grant(s)", len(refused),
                        extra=flow_fields(flow, refused_grants=list(refused),
                                          approval_request=outcome.name))
        if outcome.state == "approved":
            ctx.approved_by = tuple(outcome.approvers)
            ctx.grant = outcome.grant
            log.info("approved (%s)", outcome.reason or outcome.state,
                     extra=flow_fields(flow, approval_request=outcome.name,
                                       approvers=list(outcome.approvers), grant=outcome.grant))
            return
        self._refuse(flow, ctx, outcome, requirement)

    @staticmethod
    async def _request(service: Any, **kwargs: Any) -> Any:
        """``service.request``, retried briefly while the backend's failure is transient (an
        apiserver restarting, 429/5xx): a hiccup should not refuse the agent at once."""
        for delay in RETRY_DELAYS:
            try:
                return await service.request(**kwargs)
            except ApprovalUnavailable as exc:
                cause = exc.__cause__
                if not (isinstance(cause, BackendError) and cause.transient):
                    raise
                log.info("approvals backend unavailable (%s); retrying in %ss", cause, delay)
                await asyncio.sleep(delay)
        return await service.request(**kwargs)

    # ------------------------------------------------------------------ refusals
    @property
    def _namespace(self) -> str:
        backend = self.services.approval_backend
        return (backend.namespace if backend is not None else "") or self.services.config.pod_namespace

    def _refuse(self, flow: http.HTTPFlow, ctx: flowctx.FlowContext, outcome: Any,
                requirement: ApprovalRequirement) -> None:
        decision = ctx.decision
        assert decision is not None
        name, namespace = outcome.name, self._namespace
        standalone = self.services.config.standalone
        command = approve_command(name, namespace, standalone=standalone)
        who = approvers_text(requirement)
        ar = {"name": name, "namespace": namespace, "expires_at": outcome.expires_at}
        approvers = {"users": list(requirement.approvers.users),
                     "groups": list(requirement.approvers.groups),
                     "min_approvals": requirement.min_approvals}
        grant = ("a retry of the same request" if requirement.grant_scope == "exact"
                 else "the same action") + f" passes for {requirement.grant_ttl_seconds}s"
        if outcome.state == "pending":
            waited = (f" (held {requirement.hold_seconds}s without a decision)"
                      if requirement.mode == "hold" else "")
            message = (f"{decision.message or 'This request needs approval'}: ApprovalRequest "
                       f"{name} in namespace {namespace} is waiting for {who}{waited}.")
            retry = ("Retry the same request (same method, URL, headers and body) after "
                     f"approval; {grant} after the approval. Retrying before a decision does "
                     f"not open another request: it reports this one again. After "
                     f"{outcome.expires_at or 'it expires'} a retry opens a new request.")
            refuse(flow, "approval_pending", message, rule=decision.rule,
                   how_to_get_access=(f"Ask an approver ({who}) to approve it by running: "
                                      f"{command} - then retry the same request."),
                   approval_request=ar, approvers=approvers, approve_command=command,
                   retry=retry)
            log.info("approval pending: %s", name, extra=flow_fields(flow, approval_request=name))
            return
        decided_by = outcome.approvers[0] if outcome.approvers else ""
        until = getattr(outcome, "remembered_until", "")
        same = "request" if requirement.grant_scope == "exact" else "action"
        remembered = (f" This is the answer to an earlier ApprovalRequest: retries of the same "
                      f"{same} get it until {until} without a new request." if until else "")
        after = (f"after {until} a retry opens a new ApprovalRequest" if until
                 else "a retry opens a new ApprovalRequest")
        if outcome.state == "denied":
            message = (f"ApprovalRequest {name} was {outcome.reason or 'denied'}; the request "
                       f"was not sent.{remembered}")
            how = ("A human decided against this request: do not retry it unchanged unless "
                   f"they ask you to ({after} for {who}). Ask "
                   f"{decided_by or 'the approver'} why, or change the request.")
            kind = "approval_denied"
        else:
            message = (f"ApprovalRequest {name} expired: {outcome.reason or 'no decision in time'}; "
                       f"the request was not sent.{remembered}")
            how = (f"Ask an approver ({who}) to be ready, then retry the same request "
                   f"({after}); it must be decided within {requirement.timeout_seconds}s.")
            kind = "approval_expired"
        extra: dict[str, Any] = {"remembered_until": until} if until else {}
        refuse(flow, kind, message, rule=decision.rule, how_to_get_access=how,
               approval_request=ar, reason=outcome.reason, decided_by=decided_by,
               approvers=approvers, **extra)
        log.info("approval %s: %s", outcome.state, name,
                 extra=flow_fields(flow, approval_request=name, decided_by=decided_by))

    @staticmethod
    def _unavailable(flow: http.HTTPFlow, message: str) -> None:
        refuse(flow, "approval_unavailable", message)
        log.warning("refused: %s", message, extra=flow_fields(flow))
