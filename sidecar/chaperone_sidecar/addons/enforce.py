"""Enforce: evaluate the AccessPolicies on the classified request; refuse what they block.

For every routed flow the compiled policies of the flow's snapshot are evaluated
(:func:`~chaperone_sidecar.policy.evaluator.evaluate`) with the identity, connection and action
Identify and Route put into the ``FlowContext``, and the ``Decision`` is stored there
(``ctx.decision``) for Approve, Mask, Record and Telemetry.

* **block** - answered with 403 ``chaperone_blocked`` (see :mod:`.refusal`): the rule's message,
  the rule, the action as classified and how to get access (naming the policy, its namespace
  and its approvers). ``flow.response`` is set, so the upstream is never contacted.
* **rate limits** - for a flow that is not blocked, every ``rateLimit`` rule that matched is
  counted with the services' rate limiter (Redis when configured: shared by all sidecars).
  Over a limit: 429 ``chaperone_rate_limited`` with ``Retry-After``, and the decision is
  stored with effect ``rate_limited``. If the limiter cannot count (Redis down) the flow is
  refused with 503 (fail closed: a limit that cannot be counted is not a limit).
* **allow** / **require_approval** - the flow continues (Approve handles the latter).

When it runs. The ``request`` hook has the whole body, which body-based judgments need, so
that is where flows are judged - unless the body may leave before that hook
(:func:`~.streaming.body_leaves_early`): a ``Content-Length`` above the sidecar's streaming size
(1 MiB; Route streams it, :func:`~.streaming.stream_large`), and a body of unknown length
(HTTP/1 chunked, HTTP/2 without ``Content-Length``), which mitmproxy buffers but streams on its
own once it grew past ``READ_LIMIT`` (64 MiB, mitmproxy's ``stream_large_bodies``). Such flows
are judged in ``requestheaders`` on the headers (and the classification Route made from them) -
unless something judges them by their **body** (:func:`_body_needs`):

* a ``bodyRegex`` rule that could match them - limit: the policy's ``masking.maxBodyBytes``
  (default 64 MiB);
* an MCP POST (its JSON-RPC messages: method, tool, arguments) - 4 MiB, the classifier's;
* an Anthropic POST (model, tools) - 32 MiB, the API's own request limit;
* an AWS query/ec2-protocol POST (``Action=`` and the resource parameters live in the form body;
  one the headers name may be contradicted there) - 8 MiB, the classifier's form limit;
* an AWS JSON-protocol call (or S3 ``DeleteObjects``) when a rule tests ``aws.resources``: the
  identifiers are in the body - 1 MiB (JSON) / 8 MiB (XML), the resource extractor's limits.

Every limit is capped at ``READ_LIMIT``; the smallest that applies wins. Then:

* a ``Content-Length`` within it: streaming is switched off, mitmproxy buffers the body (it
  never streams it on its own below ``READ_LIMIT``), Route classifies it with the body and it is
  judged in ``request`` - whatever its size relative to the streaming size;
* a larger ``Content-Length``: refused with 413 naming the limit and what raises it;
* a ``POST``/``PUT``/``PATCH`` or chunked body without a length: refused with 411 - its size is
  known only once read, and past ``READ_LIMIT`` mitmproxy would stream it unjudged;
* anything else (an HTTP/2 ``GET`` without ``Content-Length``, which normally has no body) is
  judged on the headers - and if a body was read after all (under ``READ_LIMIT``), judged again
  with it in ``request``; a stricter result wins. The one case a body judgment cannot see is a
  body without ``Content-Length`` on such a method that exceeds ``READ_LIMIT``.

A streamed git push is the exception: its gate (gitgate.py) judges the ref updates before any
byte leaves, so it is not switched to buffering.

A flow without a classified action (Route did not run or could not classify) is blocked:
nothing is forwarded unjudged; so is an MCP body the classifier cannot read unambiguously
(``MCPAction.invalid``: not JSON, duplicate keys, too large, streamed unread), with 400
``invalid_request``.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, replace
from typing import Any

from mitmproxy import ctx as mctx
from mitmproxy import http
from mitmproxy.utils import human

from .. import flowctx
from ..approvals.ratelimit import MemoryRateLimiter, check_limits
from ..flowctx import request_body, request_of
from ..log_setup import flow_fields
from ..policy.classify.anthropic import MAX_BODY as ANTHROPIC_MAX_BODY
from ..policy.classify.aws import MAX_FORM_BODY as AWS_MAX_FORM_BODY
from ..policy.classify.aws_resources import MAX_JSON_BODY as AWS_MAX_JSON_BODY
from ..policy.classify.aws_resources import MAX_XML_BODY as AWS_MAX_XML_BODY
from ..policy.classify.mcp import MAX_BODY as MCP_MAX_BODY
from ..policy.evaluator import describe_action, describe_identity, evaluate
from ..policy.masking.encoding import BodyTooLarge, MaskingError, decode, parse_content_encoding
from ..policy.model import Decision, RateLimit, RuleRef
from ..services import SidecarServices
from ..snapshot import Snapshot
from .refusal import refuse
from .streaming import READ_LIMIT, body_leaves_early

__all__ = ["Enforce", "DEFAULT_BODY_LIMIT", "blocked_guidance"]

log = logging.getLogger("chaperone.enforce")

DEFAULT_BODY_LIMIT = 64 * 1024 * 1024  # the CRD's default masking.maxBodyBytes
RATE_LIMITER_RETRY = "5"  # Retry-After when the limiter itself is unavailable
_RANK = {"allow": 1, "require_approval": 2, "rate_limited": 3, "block": 3}
_BODY_METHODS = frozenset({"POST", "PUT", "PATCH"})


def _stream_size() -> int | None:
    """mitmproxy's ``stream_large_bodies`` in bytes (None when unset or outside a master)."""
    try:
        return human.parse_size(mctx.options.stream_large_bodies)
    except (AttributeError, ValueError):
        return None


@dataclass(frozen=True)
class _BodyNeed:
    """Something that judges this request by its body, and how much of it it reads."""
    limit: int
    reader: str  # what reads it, for the refusal ("rule 'x' of AccessPolicy ns/p inspects ...")
    raise_it: str  # which field raises the limit, or why none does
    rule: RuleRef | None = None


@dataclass(frozen=True)
class _BodyRules:
    """Rules of the flow's bucket that read its body: bodyRegex (and its limit), aws.resources."""
    body: RuleRef | None
    limit: int
    resources: RuleRef | None


def _body_needs(flow: http.HTTPFlow, ctx: flowctx.FlowContext, rules: _BodyRules) -> list[_BodyNeed]:
    """What judges this request by its body: a ``bodyRegex`` rule that could match it, and the
    classifiers that find the action in the body (MCP JSON-RPC messages, an Anthropic request's
    model and tools, an AWS query-protocol ``Action=``). Each limit is capped at what the sidecar
    reads at all (``READ_LIMIT``, and mitmproxy's own ``stream_large_bodies`` when lower)."""
    action = ctx.action
    assert action is not None
    cap = min(READ_LIMIT, _stream_size() or READ_LIMIT)
    needs: list[_BodyNeed] = []
    ref, limit = rules.body, rules.limit
    if ref is not None:
        needs.append(_BodyNeed(min(limit, cap), f"rule {ref.rule!r} of AccessPolicy {ref.policy} "
                               "inspects request bodies (bodyRegex)",
                               f"the policy's masking.maxBodyBytes raises it, up to {cap}", ref))
    post = request_of(flow, body=False).method == "POST"
    if action.mcp is not None and post:
        needs.append(_BodyNeed(min(MCP_MAX_BODY, cap), "an MCP request is judged on its JSON-RPC "
                               "messages", "the MCP classifier's fixed limit; no field raises it"))
    if ctx.connection_type == "anthropic" and post:
        needs.append(_BodyNeed(min(ANTHROPIC_MAX_BODY, cap), "an Anthropic request is judged on "
                               "its body (model, tools)", "the Anthropic API's own request limit; "
                               "no field raises it"))
    aws = action.aws
    form = "x-www-form-urlencoded" in flow.request.headers.get("content-type", "").lower()
    # Query/ec2 protocol: Action= and the resource parameters are in the form body (an Action=
    # there conflicting with the URL's is refused only if the body is read); an operation the
    # headers do not name may be one of those too.
    if aws is not None and post and (form or not aws.operation or aws.protocol in ("query", "ec2")):
        needs.append(_BodyNeed(min(AWS_MAX_FORM_BODY, cap), "an AWS query-protocol call names its "
                               "operation and resources in its body (Action=...)", "the AWS "
                               "classifier's fixed limit for form bodies; no field raises it"))
    # JSON protocols: the resource identifiers (SecretId, TableName...) are in the JSON body,
    # parsed up to the extractor's limit; past it no resource is derived and a rule on
    # resources would not hold - so such a body is read, or refused when larger.
    # S3 DeleteObjects likewise lists its keys in the XML body.
    in_body = {"json": AWS_MAX_JSON_BODY, "rest-json": AWS_MAX_JSON_BODY}.get(aws.protocol if aws else "")
    if aws is not None and aws.operation == "DeleteObjects":
        in_body = AWS_MAX_XML_BODY
    if aws is not None and rules.resources is not None and in_body is not None \
            and request_of(flow, body=False).method in _BODY_METHODS:
        needs.append(_BodyNeed(min(in_body, cap), f"rule {rules.resources.rule!r} of "
                               f"AccessPolicy {rules.resources.policy} tests aws.resources, which "
                               "this call names in its body", "the AWS resource extractor's "
                               "fixed limit; no field raises it"))
    return needs


def _approvers_of(policy: Any) -> str:
    spec = getattr(policy, "spec", None) or {}
    approvers = spec.get("approvers") or {}
    who = []
    if approvers.get("users"):
        who.append("users " + ", ".join(approvers["users"]))
    if approvers.get("groups"):
        who.append("members of groups " + ", ".join(approvers["groups"]))
    return " or ".join(who)


def _policy_ref(key: str) -> str:
    namespace, _, name = key.partition("/")
    return f"AccessPolicy {name} in namespace {namespace}" if name else f"AccessPolicy {key}"


def blocked_guidance(decision: Decision, snapshot: Any, ctx: flowctx.FlowContext) -> str:
    """``how_to_get_access`` of a block: which policy to change, whom to ask."""
    action = ctx.action
    what = (action.name or describe_action(action)) if action is not None else "this request"
    who = describe_identity(ctx.identity)
    conn = f"connection {ctx.connection!r}" if ctx.connection else "this connection"
    policies = {p.key: p for p in snapshot.policies} if snapshot is not None else {}
    if decision.rule is not None:
        key = decision.rule.policy
        approvers = _approvers_of(policies.get(key))
        ask = f"its approvers ({approvers}) or the team that owns namespace " \
              f"{key.split('/', 1)[0]}" if approvers else \
              f"the team that owns namespace {key.split('/', 1)[0]}"
        return (f"Rule {decision.rule.rule!r} of {_policy_ref(key)} blocks {what} on {conn}; "
                f"retrying the same request will be refused again. To get access, ask {ask} "
                f"to allow {what} for {who} in that policy, or to change the rule to "
                f"requireApproval so a human can approve each call "
                f"(kubectl get accesspolicy {key.split('/', 1)[-1]} -n {key.split('/', 1)[0]} "
                f"-o yaml shows the policy).")
    applicable = snapshot.policies.applicable(ctx.connection, ctx.identity) if snapshot else ()
    if applicable:
        keys = ", ".join(p.key for p in applicable)
        approvers = "; ".join(f"{p.key}: {a}" for p in applicable if (a := _approvers_of(p)))
        extra = f" (approvers: {approvers})" if approvers else ""
        return (f"No rule of the AccessPolicies governing {conn} ({keys}) allows {what}, and "
                f"they deny by default. Ask the owners of those policies{extra} to add an allow "
                f"or requireApproval rule for {what} for {who}.")
    namespace = ctx.identity.pod_namespace or "this namespace"
    return (f"No AccessPolicy governs {conn} for {who}, so everything through it is refused. "
            f"Ask the team that owns namespace {namespace} to create an AccessPolicy for "
            f"{conn} whose subjects include {who}.")


class Enforce:
    """Stores the policy ``Decision`` in the FlowContext; refuses blocked and rate-limited flows."""

    def __init__(self, services: SidecarServices) -> None:
        self.services = services
        self._own_limiter: Any = None  # only when the services have none

    def _snapshot(self, ctx: flowctx.FlowContext) -> Snapshot:
        """The snapshot the flow was routed with (the current one if Route did not run)."""
        return ctx.snapshot if ctx.snapshot is not None else self.services.snapshot()

    # ------------------------------------------------------------------ hooks
    async def requestheaders(self, flow: http.HTTPFlow) -> None:
        if flow.response is not None or not body_leaves_early(flow):
            return  # a buffered body is judged in `request`, with the body
        ctx = flowctx.ensure(flow)
        if ctx.decision is not None:
            return
        snapshot = self._snapshot(ctx)
        ctx.early = True
        if ctx.action is not None and self._read_first(flow, ctx, snapshot):
            return
        await self._enforce(flow, ctx, snapshot, b"")

    async def request(self, flow: http.HTTPFlow) -> None:
        if flow.response is not None:
            return
        ctx = flowctx.ensure(flow)
        if ctx.action is not None and not flow.request.stream and flow.request.raw_content and \
                self._unreadable(flow, ctx, self._snapshot(ctx)):
            return
        if ctx.decision is not None:
            # Judged on the headers because the length was unknown, but the body was buffered
            # after all: judge again with it (a body rule may be stricter).
            if ctx.early and not flow.request.stream and flow.request.raw_content:
                await self._rejudge(flow, ctx, request_body(flow))
            return
        if flow.request.stream:
            # Streaming was switched on after our requestheaders hook: the body is gone already.
            log.error("a streamed request reached the request hook unjudged",
                      extra=flow_fields(flow))
        body = request_body(flow)  # b"" when streamed
        await self._enforce(flow, ctx, self._snapshot(ctx), body)

    # ------------------------------------------------------------------ judging
    async def _enforce(self, flow: http.HTTPFlow, ctx: flowctx.FlowContext, snapshot: Any,
                       body: bytes) -> None:
        if ctx.action is None:
            ctx.decision = Decision("block", message="the request could not be classified, so no "
                                                     "policy can judge it; refusing (fail closed)")
            refuse(flow, "blocked", ctx.decision.message, rule=None,
                   how_to_get_access="Send the request through a host covered by a "
                                     "ClaudeConnection, as a well-formed HTTP request.")
            log.warning("refused an unclassified request", extra=flow_fields(flow))
            return
        if ctx.action.mcp is not None and ctx.action.mcp.invalid:
            # An MCP body Chaperone cannot read unambiguously (classify/mcp.py) could be read
            # differently by the server: fail closed, whatever the policies say.
            ctx.decision = Decision("block", message=f"this MCP request cannot be judged: "
                                                     f"{ctx.action.mcp.invalid}; refusing (fail closed)")
            refuse(flow, "invalid_request", ctx.decision.message, rule=None,
                   how_to_get_access="Send one well-formed JSON-RPC 2.0 message (or batch) as UTF-8 "
                                     "JSON without duplicate keys, with a Content-Length.")
            return
        decision = evaluate(snapshot.policies, ctx.action, ctx.identity, ctx.connection, body)
        ctx.decision = decision
        if decision.effect == "block":
            refuse(flow, "blocked", decision.message, rule=decision.rule,
                   how_to_get_access=blocked_guidance(decision, snapshot, ctx))
            log.info("blocked: %s", decision.message, extra=flow_fields(flow))
            return
        if decision.rate_limits and not await self._within_limits(flow, ctx, decision):
            return
        if log.isEnabledFor(logging.DEBUG):  # flow_fields is not free (issue 16)
            log.debug("decision %s", decision.effect, extra=flow_fields(flow))

    async def _rejudge(self, flow: http.HTTPFlow, ctx: flowctx.FlowContext, body: bytes) -> None:
        old = ctx.decision
        assert old is not None and ctx.action is not None
        new = evaluate(self._snapshot(ctx).policies, ctx.action, ctx.identity,
                       ctx.connection, body)
        if _RANK.get(new.effect, 0) <= _RANK.get(old.effect, 0):
            return  # not stricter: the decision (and its rate-limit count) stands
        ctx.decision = new
        log.info("judged again with the body: %s -> %s", old.effect, new.effect,
                 extra=flow_fields(flow))
        if new.effect == "block":
            refuse(flow, "blocked", new.message, rule=new.rule,
                   how_to_get_access=blocked_guidance(new, self._snapshot(ctx), ctx))

    def _read_first(self, flow: http.HTTPFlow, ctx: flowctx.FlowContext, snapshot: Any) -> bool:
        """A request judged early whose judgment needs its body (:func:`_body_needs`): True when
        it was handled - switched to buffering, judged (with the body) in ``request``; or
        refused - False when it is judged on its headers now."""
        if ctx.git_gate is not None:
            # A streamed git push: its gate judges the commands before any byte leaves
            # (gitgate.py); buffering would switch the gate off, and the pack is compressed.
            return False
        needs = _body_needs(flow, ctx, self._body_rule(ctx, snapshot))
        if not needs:
            return False
        need = min(needs, key=lambda n: n.limit)  # every reader must get the whole body
        length = flow.request.headers.get("content-length", "").strip()
        if length.isdigit() and int(length) <= need.limit:
            flow.request.stream = False  # read the body; judged (with it) in `request`
            ctx.early = False
            return True
        if length.isdigit():
            why, status = f"this body ({length} bytes) is larger than {need.limit} bytes", 413
        elif flow.request.method.upper() in _BODY_METHODS or \
                "chunked" in flow.request.headers.get("transfer-encoding", "").lower():
            why, status = "this body has no Content-Length (chunked or HTTP/2 without one)", 411
        else:
            return False  # probably no body (HTTP/2 GET): judged now, again if a body is read
        message = f"{need.reader}, and {why}, so it cannot be judged before it is sent"
        how = (f"Send the body with a Content-Length header of at most {need.limit} bytes "
               f"({need.raise_it}).")
        if need.rule is not None:
            how = how[:-1] + (f", or ask the owners of AccessPolicy {need.rule.policy} to narrow "
                              "the rule so it does not apply to this request.")
        ctx.decision = Decision("block", rule=need.rule, message=message)
        refuse(flow, "blocked" if need.rule is not None else "invalid_request", message,
               rule=need.rule, status=status, how_to_get_access=how, limit_bytes=need.limit)
        log.info("refused a body that must be judged but cannot be read first: %s", why,
                 extra=flow_fields(flow))
        return True

    def _unreadable(self, flow: http.HTTPFlow, ctx: flowctx.FlowContext, snapshot: Any) -> bool:
        """A read body something judges (:func:`_body_needs`) that is larger than its limit once
        decoded (a compressed body: the limit is on what it decodes to, as the upstream will see
        it), or that does not decode: refused (True). Judged on anything less, a pattern past
        the limit or inside an undecodable encoding would pass."""
        needs = _body_needs(flow, ctx, self._body_rule(ctx, snapshot))
        if not needs:
            return False
        need = min(needs, key=lambda n: n.limit)
        header = flow.request.headers.get("content-encoding")
        try:
            decode(flow.request.raw_content or b"", parse_content_encoding(header), need.limit)
            return False
        except BodyTooLarge:
            why, status = f"this body (decoded) is larger than {need.limit} bytes", 413
            how = f"Send at most {need.limit} bytes of (decoded) body ({need.raise_it})."
        except MaskingError as exc:  # unsupported or corrupt Content-Encoding
            why, status = f"its Content-Encoding {header!r} cannot be decoded ({exc})", 415
            how = "Send the body uncompressed, or gzip/deflate/br encoded."
        message = f"{need.reader}, and {why}, so it cannot be judged"
        ctx.decision = Decision("block", rule=need.rule, message=message)
        refuse(flow, "blocked" if need.rule is not None else "invalid_request", message,
               rule=need.rule, status=status, how_to_get_access=how, limit_bytes=need.limit)
        log.info("refused a body that must be judged but cannot be: %s", why, extra=flow_fields(flow))
        return True

    @staticmethod
    def _body_rule(ctx: flowctx.FlowContext, snapshot: Any) -> _BodyRules:
        """The first rule that could match this request and tests its body, and the body limit;
        the first that tests ``aws.resources`` (in a JSON body for JSON protocols)."""
        action = ctx.action
        assert action is not None
        aws = action.aws
        bucket = (action.connection_type, action.method, aws.action.lower() if aws else "",
                  action.host.rstrip(".").lower())
        found: RuleRef | None = None
        resources: RuleRef | None = None
        limit = 0
        for policy in snapshot.policies.applicable(ctx.connection, ctx.identity):
            decisive, side = policy.candidates(*bucket)
            for rule in (*decisive, *side):
                fields = {c.field for c in rule.conditions}
                if "match.aws.resources" in fields:
                    resources = resources or rule.ref
                if "match.bodyRegex" in fields:
                    found = found or rule.ref
                    masking = (policy.spec or {}).get("masking") or {}
                    limit = max(limit, int(masking.get("maxBodyBytes", DEFAULT_BODY_LIMIT)))
        return _BodyRules(found, limit, resources)

    # ------------------------------------------------------------------ rate limits
    @property
    def limiter(self) -> Any:
        limiter = self.services.rate_limiter
        if limiter is None:
            if self._own_limiter is None:
                self._own_limiter = MemoryRateLimiter()
            limiter = self._own_limiter
        return limiter

    async def _within_limits(self, flow: http.HTTPFlow, ctx: flowctx.FlowContext,
                             decision: Decision) -> bool:
        try:
            verdict, limit = await check_limits(self.limiter, decision.rate_limits, ctx.identity,
                                                ctx.connection)
        except Exception as exc:  # noqa: BLE001 - Redis down or similar: fail closed
            source = decision.rate_limits[0].source
            ctx.decision = replace(decision, effect="rate_limited", rule=source, message=(
                f"the rate limit of this request cannot be counted right now ({exc.__class__.__name__}); "
                "refusing rather than exceeding it"))
            refuse(flow, "rate_limited", ctx.decision.message, rule=source, status=503,
                   headers={"Retry-After": RATE_LIMITER_RETRY},
                   retry_after_seconds=int(RATE_LIMITER_RETRY),
                   how_to_get_access="This is a temporary problem of the gateway's rate "
                                     f"limiter: retry in {RATE_LIMITER_RETRY} seconds.")
            log.warning("rate limiter unavailable: %s: %s", exc.__class__.__name__, exc,
                        extra=flow_fields(flow))
            return False
        if verdict.allowed:
            return True
        assert limit is not None
        retry = verdict.retry_after_header
        message = (f"rate limit exceeded: at most {limit.requests} request"
                   f"{'s' if limit.requests != 1 else ''} per {limit.period_seconds}s per "
                   f"{limit.per}")
        if limit.source is not None:
            message += f" (rule {limit.source.rule!r} of AccessPolicy {limit.source.policy})"
        ctx.decision = replace(decision, effect="rate_limited", rule=limit.source, message=message)
        refuse(flow, "rate_limited", message, rule=limit.source, headers={"Retry-After": retry},
               retry_after_seconds=int(retry), limit=_limit_info(limit))
        log.info("rate limited: %s", message, extra=flow_fields(flow, retry_after=retry))
        return False


def _limit_info(limit: RateLimit) -> dict[str, Any]:
    return {"requests": limit.requests, "period_seconds": limit.period_seconds, "per": limit.per}
