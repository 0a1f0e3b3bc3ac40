"""Evaluate compiled AccessPolicies for one classified request: allow, block or require approval.

Applicability. A policy applies to a request when

* its ``connections`` globs match the ClaudeConnection's name (empty or absent: every
  connection), and
* its ``subjects`` match the caller (empty or absent: everyone): ``serviceAccount`` is compared
  with the pod's ``namespace/name`` (a bare ``name`` means the policy's namespace), ``user`` with
  the pod's creator or the verified on-behalf-of user, ``group`` with either one's groups.

Precedence (the same order the CRD documents):

1. No policy applies: **block** (fail closed) - an agent is never let through a connection no
   AccessPolicy governs for it.
2. Among all matching decision rules of all applicable policies, **block beats requireApproval
   beats allow**. Ties (same effect) go to the first policy by ``namespace/name``, then the first
   rule in that policy's list, so the deciding rule is deterministic.
3. No decision rule matches: the strictest ``defaultEffect`` of the applicable policies decides
   (block if any of them says block).
4. On top of the decision, every applicable policy's ``masking`` and every matching ``mask`` and
   ``rateLimit`` rule are collected into ``Decision.masks`` / ``Decision.rate_limits`` (the
   sidecar's masker and limiter apply them; a rate-limited request is refused with 429 there).

For requireApproval the decision carries an ``ApprovalRequirement`` with the rule's approvers
and grant, falling back to the policy's, then to the CRD defaults (15 minutes, exact request).

Speed: the plain path only runs the per-request tests of rules in the request's bucket (see
:mod:`.matching`) and stops looking at decision rules once a block matched; ``explain=True``
additionally walks every rule with every condition to report which matched and why. That is for
``chaperone policy test --explain`` and debugging, not for the per-flow path.
"""

from __future__ import annotations

from dataclasses import replace
from typing import cast

from .globs import quote as _q
from .matching import CompiledPolicy, CompiledPolicySet, CompiledRule, MatchContext
from .model import Action, Decision, Effect, Identity, MaskSpec, RateLimit

__all__ = ["evaluate", "describe_identity", "describe_action"]

_BLOCK = 3


def evaluate(policies: CompiledPolicySet, action: Action, identity: Identity, connection: str,
             body: bytes = b"", *, explain: bool = False) -> Decision:
    """The decision for ``action`` by ``identity`` through ``connection``; never raises."""
    applicable = policies.applicable(connection, identity)
    if not applicable:
        decision = Decision(
            "block", message=f"no AccessPolicy governs connection {_q(connection)} for "
                             f"{describe_identity(identity)}; refusing (fail closed)")
        return _explained(decision, policies, applicable, action, identity, connection, body) if explain else decision

    ctx = MatchContext(action, identity, body)
    aws = action.aws
    bucket = (action.connection_type, action.method, aws.action.lower() if aws is not None else "", ctx.host)
    best: CompiledRule | None = None
    best_rank = 0
    masks: list[MaskSpec] = []
    limits: list[RateLimit] = []
    for policy in applicable:
        decisive, side = policy.candidates(*bucket)
        if best_rank < _BLOCK:
            for rule in decisive:
                # Only a strictly stronger rule replaces the current one: ties keep the earlier
                # policy/rule, which is what makes the tie-break deterministic.
                if rule.rank > best_rank and rule.matches(ctx):
                    best, best_rank = rule, rule.rank
                    if best_rank == _BLOCK:
                        break
        if policy.masking is not None:
            masks.append(policy.masking)
        for rule in side:
            if rule.matches(ctx):
                if rule.mask is not None:
                    masks.append(rule.mask)
                elif rule.rate_limit is not None:
                    limits.append(rule.rate_limit)

    if best is not None:
        # a decisive rule's effect is allow, block or require_approval: a Decision effect
        decision = Decision(cast(Effect, best.effect), rule=best.ref, message=best.message, approval=best.approval,
                            masks=tuple(masks), rate_limits=tuple(limits))
    else:
        strict = [p.key for p in applicable if p.default_effect == "block"]
        if strict:
            decision = Decision("block", message=(
                f"no rule of the AccessPolicies for connection {_q(connection)} allows "
                f"{describe_action(action)}; denied by default ({', '.join(strict)})"),
                masks=tuple(masks), rate_limits=tuple(limits))
        else:
            decision = Decision("allow", masks=tuple(masks), rate_limits=tuple(limits))
    return _explained(decision, policies, applicable, action, identity, connection, body) if explain else decision


def describe_identity(identity: Identity) -> str:
    """One line naming the caller, e.g. ``serviceAccount team-a/claude, creator alice``."""
    parts = []
    if identity.service_account:
        parts.append(f"serviceAccount {identity.service_account}")
    if identity.creator:
        groups = f" (groups {', '.join(identity.creator_groups)})" if identity.creator_groups else ""
        parts.append(f"creator {identity.creator}{groups}")
    if identity.on_behalf_of:
        groups = f" (groups {', '.join(identity.on_behalf_of_groups)})" if identity.on_behalf_of_groups else ""
        parts.append(f"on behalf of {identity.on_behalf_of}{groups}")
    return ", ".join(parts) or "an anonymous caller"


def describe_action(action: Action) -> str:
    """One line naming the request, e.g. ``s3:DeleteBucket (DELETE https://b.s3.amazonaws.com/)``."""
    default_port = (action.scheme, action.port) in (("https", 443), ("http", 80))
    port = "" if default_port or not action.port else f":{action.port}"
    query = f"?{action.query}" if action.query else ""
    url = f"{action.method} {action.scheme}://{action.host}{port}{action.path}{query}"
    return f"{action.name} ({url})" if action.name else url


# ---------------------------------------------------------------------------- explanations

def _why_applies(policy: CompiledPolicy, connection: str, identity: Identity) -> tuple[bool, str]:
    if policy.connections is None:
        conn = "connections: all"
    else:
        hit = policy.connections.first_match(connection)
        if hit is None:
            return False, f"connection {_q(connection)} matches none of {_q(policy.connections.patterns)}"
        conn = f"connection {_q(connection)} matches {_q(hit)}"
    if policy.subjects is None:
        return True, f"{conn}; subjects: everyone"
    why = policy.subjects.why(identity)
    if why is None:
        return False, f"{conn}, but the caller matches none of its subjects {_q(policy.subjects.entries)}"
    return True, f"{conn}; subject {why}"


def _rule_matches(rule: CompiledRule, ctx: MatchContext) -> tuple[bool, list[str]]:
    """Check every condition of a rule (no bucketing, no shortcuts) and say why."""
    if rule.connection_type not in (None, ctx.action.connection_type):
        return False, [f"only matches {rule.connection_type} connections"]
    reasons = []
    for cond in rule.conditions:
        value = cond.value(ctx)
        if not cond.test(ctx):
            return False, [f"{cond.field}: {_q(value)} matches none of {_q(cond.patterns)}"]
        reasons.append(f"{cond.field}: {_q(value)} matches {_q(cond.patterns)}")
    return True, reasons or ["no conditions (matches every request)"]


def _explained(decision: Decision, policies: CompiledPolicySet, applicable: tuple[CompiledPolicy, ...],
               action: Action, identity: Identity, connection: str, body: bytes) -> Decision:
    lines = [f"caller: {describe_identity(identity)}",
             f"request: {describe_action(action)} on {action.connection_type} connection {_q(connection)}"]
    if action.errors:
        lines.append(f"classification problems: {'; '.join(action.errors)}")
    if not len(policies):
        lines.append("no AccessPolicies are loaded")
    for policy in policies:
        applies, why = _why_applies(policy, connection, identity)
        lines.append(f"policy {policy.key}: {'applies' if applies else 'does not apply'} ({why})")
    ctx = MatchContext(action, identity, body)
    matched_decisions = []
    for policy in applicable:
        for rule in policy.rules:
            ok, reasons = _rule_matches(rule, ctx)
            if ok:
                effect = f"{rule.effect} of tool_use blocks in the answer" if rule.tool_use else rule.effect
                lines.append(f"rule {rule.ref} ({effect}) matches: {'; '.join(reasons)}")
                if rule.rank:
                    matched_decisions.append(rule)
    if not applicable:
        lines.append(f"decision: block - {decision.message}")
    elif decision.rule is not None:
        others = [f"{r.ref} ({r.effect})" for r in matched_decisions if r.ref != decision.rule]
        also = f"; outranked or tied later: {', '.join(others)}" if others else ""
        lines.append(f"decision: {decision.effect} by rule {decision.rule} "
                     f"(block beats require_approval beats allow; ties go to the first policy, then rule){also}")
    else:
        defaults = ", ".join(f"{p.key}={p.default_effect}" for p in applicable)
        lines.append(f"decision: {decision.effect} - no allow/block/requireApproval rule matched; "
                     f"defaultEffect of applicable policies: {defaults} (block if any says block)")
    if decision.approval is not None:
        a = decision.approval
        lines.append(f"approval: users {_q(a.approvers.users)} groups {_q(a.approvers.groups)}, "
                     f"{a.min_approvals} needed, mode {a.mode}, grant {a.grant_scope} for {a.grant_ttl_seconds}s")
    for mask in decision.masks:
        source = f"rule {mask.source}" if mask.source else "policy-wide masking"
        lines.append(f"mask ({source}): detectors {_q(mask.detectors)} fields {_q(mask.fields)} target {mask.target}")
    for limit in decision.rate_limits:
        lines.append(f"rate limit (rule {limit.source}): {limit.requests} per {limit.period_seconds}s per {limit.per}")
    return replace(decision, explanation=tuple(lines))
