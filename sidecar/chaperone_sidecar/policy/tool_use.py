"""Judging the model's ``tool_use`` blocks with the tool-use rules of the applicable policies.

:func:`response_rules` picks, once per LLM request, the tool-use rules
(:mod:`.matching_tool_use`) whose request-side conditions hold for it (the policy applies to the
connection and caller; type, methods, hosts and every other condition of the rule match the
request). :func:`judge` then decides each block of the answer: the first matching rule in
policy order (policies by ``namespace/name``, rules in list order) blocks it; no match lets it
through. There is no default effect for responses: ``defaultEffect`` is about requests.
"""

from __future__ import annotations

from dataclasses import dataclass

from .globs import quote as _q
from .matching import CompiledPolicySet, CompiledRule, MatchContext
from .matching_tool_use import ToolUse
from .model import Action, Identity, RuleRef

__all__ = ["Verdict", "response_rules", "judge", "blocked_text"]


@dataclass(frozen=True)
class Verdict:
    """A blocked tool_use: the rule, its message, and why it matched."""

    rule: RuleRef
    message: str
    reason: str


def response_rules(policies: CompiledPolicySet, action: Action, identity: Identity,
                   connection: str) -> tuple[CompiledRule, ...]:
    """The tool-use rules that judge the answer to this request, in precedence order."""
    ctx: MatchContext | None = None
    host = action.host.rstrip(".").lower()
    out: list[CompiledRule] = []
    for policy in policies.applicable(connection, identity):
        for rule in policy.rules:
            if rule.tool_use is None:
                continue
            if rule.connection_type not in (None, action.connection_type):
                continue
            if rule.methods is not None and action.method not in rule.methods:
                continue
            if rule.hosts is not None and not rule.hosts.match(host):
                continue
            ctx = ctx or MatchContext(action, identity)
            if rule.matches(ctx):
                out.append(rule)
    return tuple(out)


def judge(rules: tuple[CompiledRule, ...], tool_use: ToolUse) -> Verdict | None:
    """The verdict of the first rule matching ``tool_use``, None when it may pass."""
    for rule in rules:
        assert rule.tool_use is not None  # response_rules returns tool-use rules only
        reason = rule.tool_use.why(tool_use)
        if reason is not None:
            return Verdict(rule.ref, rule.message, reason)
    return None


def blocked_text(tool_use: ToolUse, verdict: Verdict) -> str:
    """The text that replaces a blocked tool_use block: for the model on its next turn (the
    agent sends the assistant turn back) and for the person watching the agent. It names the
    rule, not the part of the input that matched (that is in the recording): nothing of a
    blocked input is echoed back."""
    return (f"[Chaperone blocked tool_use {tool_use.id} ({tool_use.name}): rule {verdict.rule} - "
            f"{verdict.message}. The tool was not run and no tool_result is expected for it; do "
            "not retry it in another form - ask the user instead.]")


def incomplete_text(tool_use: ToolUse) -> str:
    """The text that replaces a tool_use whose stream ended before it was complete."""
    return (f"[Chaperone withheld tool_use {tool_use.id or '?'} ({_q(tool_use.name)}): the "
            "stream ended before its input was complete, so it could not be judged.]")
