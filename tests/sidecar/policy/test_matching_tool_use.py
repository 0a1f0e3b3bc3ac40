"""Tool-use rules (match.anthropic.toolUses / toolInputRegex): compiled with field-path errors,
matched on the model's tool_use blocks, never taken for a decision about the request."""

from __future__ import annotations

import json

import pytest

from chaperone_sidecar.policy.compiler import PolicyErrors, compile_policies, compile_policy
from chaperone_sidecar.policy.evaluator import evaluate
from chaperone_sidecar.policy.matching_tool_use import ToolUse
from chaperone_sidecar.policy.model import Action, AnthropicAction, Identity
from chaperone_sidecar.policy.tool_use import blocked_text, judge, response_rules

API = "chaperone.dev/v1alpha1"
ME = Identity(service_account="team-a/claude", pod_namespace="team-a", pod_name="agent-0")


def policy(*rules: dict, name: str = "p", **spec) -> dict:
    return {"apiVersion": API, "kind": "AccessPolicy", "metadata": {"name": name, "namespace": "team-a"},
            "spec": {"defaultEffect": "allow", "rules": list(rules), **spec}}


NO_RM = {"name": "no-rm", "match": {"anthropic": {"toolUses": ["bash", "Bash"],
                                                   "toolInputRegex": r"rm\s+-(rf|fr)\s+/"}},
         "block": {"message": "no recursive deletes of /"}}


def llm(model: str = "claude-x") -> Action:
    return Action("anthropic", "POST", "https", "api.anthropic.com", 443, "/v1/messages",
                  name="anthropic:messages", anthropic=AnthropicAction(model=model, models=(model,)))


def rules_for(*policies: dict, action: Action | None = None):
    result = compile_policies(policies, "team-a")
    assert result.ok, result.errors
    return result.policies, response_rules(result.policies, action or llm(), ME, "claude")


def test_only_block_and_clear_field_paths():
    bad = policy({"name": "ask", "match": {"anthropic": {"toolUses": ["Bash(rm:*)"], "toolInputRegex": "(x"}},
                  "requireApproval": {"approvers": {"users": ["alice"]}}},
                 {"name": "allow-it", "match": {"anthropic": {"toolInputRegex": "ls"}}, "allow": {}},
                 {"name": "spaces", "match": {"anthropic": {"toolUses": ["my tool"]}}, "block": {}})
    with pytest.raises(PolicyErrors) as err:
        compile_policy(bad)
    text = str(err.value)
    assert "spec.rules[0].requireApproval: a rule with match.anthropic.toolUses or toolInputRegex " \
           "judges the tool_use blocks of the model's response and can only block" in text
    assert 'spec.rules[0].match.anthropic.toolUses[0]: "Bash(rm:*)" can never match a tool name' in text
    assert "match the tool, \"Bash\", and its input with toolInputRegex" in text
    assert "spec.rules[0].match.anthropic.toolInputRegex: invalid regular expression" in text
    assert "spec.rules[1].allow: a rule with match.anthropic.toolUses" in text
    assert "spec.rules[2].match.anthropic.toolUses[0]" in text and "whitespace" in text
    # the CRD schema knows the fields (unknown fields are errors there)
    compile_policy(policy(NO_RM))


def test_a_tool_use_rule_never_decides_the_request():
    policies, _ = rules_for(policy(NO_RM, defaultEffect="allow"))
    decision = evaluate(policies, llm(), ME, "claude")
    assert decision.effect == "allow" and decision.rule is None
    # ... also with other rules around it; default block stays the default's word
    policies, _ = rules_for(policy(NO_RM, {"name": "llm", "match": {"methods": ["POST"]}, "allow": {}},
                                   defaultEffect="block"))
    decision = evaluate(policies, llm(), ME, "claude")
    assert decision.effect == "allow" and decision.rule.rule == "llm"
    explained = evaluate(policies, llm(), ME, "claude", explain=True).explanation
    assert any("no-rm (block of tool_use blocks in the answer) matches" in line for line in explained), explained


def test_block_matches_name_and_input_of_the_same_block():
    _, rules = rules_for(policy(NO_RM))
    assert [r.ref.rule for r in rules] == ["no-rm"]
    rm = ToolUse("toolu_1", "bash", {"command": "rm -rf /"})
    verdict = judge(rules, rm)
    assert verdict is not None and str(verdict.rule) == "team-a/p#no-rm"
    assert verdict.message == "no recursive deletes of /" and "rm -rf /" in verdict.reason
    assert judge(rules, ToolUse("toolu_2", "bash", {"command": "ls /"})) is None
    assert judge(rules, ToolUse("toolu_3", "str_replace_editor", {"command": "rm -rf /"})) is None
    # the refusal names the rule, never echoes the input
    assert "rm -rf" not in blocked_text(rm, verdict) and "team-a/p#no-rm" in blocked_text(rm, verdict)


@pytest.mark.parametrize("value", [
    {"command": "echo hi\nrm -rf /"},  # a newline in a script is a real newline
    {"command": ["sh", "-c", "rm  -fr /"]},  # nested lists, other flag order
    {"deep": {"er": [{"cmd": "sudo rm -rf /var"}]}},
])
def test_regex_is_searched_in_every_string_value(value):
    _, rules = rules_for(policy(NO_RM))
    assert judge(rules, ToolUse("t", "bash", value)) is not None


def test_escapes_are_decoded_and_an_unparsed_input_fails_closed():
    _, rules = rules_for(policy(NO_RM))
    # the wire had "rm -rf \u002f": judged after JSON decoding
    value = json.loads('{"command": "rm -rf \\u002f"}')
    assert judge(rules, ToolUse("t", "bash", value)) is not None
    truncated = ToolUse("t", "bash", None, raw='{"command": "ls', parsed=False, complete=False)
    assert judge(rules, truncated) is not None  # cannot be judged: matches (fail closed)
    # a name-only rule does not care about the input
    _, only_name = rules_for(policy({"name": "no-web", "match": {"anthropic": {"toolUses": ["web_*"]}},
                                     "block": {}}))
    assert judge(only_name, ToolUse("t", "web_fetch", {"url": "x"})) is not None
    assert judge(only_name, ToolUse("t", "bash", None, parsed=False)) is None


def test_request_side_conditions_select_the_answers_judged():
    scoped = dict(NO_RM, match={"anthropic": {"models": ["claude-opus-*"], "toolUses": ["bash"]}})
    _, rules = rules_for(policy(scoped), action=llm("claude-haiku-1"))
    assert rules == ()
    _, rules = rules_for(policy(scoped), action=llm("claude-opus-9"))
    assert len(rules) == 1
    other_sa = dict(NO_RM, match={**NO_RM["match"], "subjects": [{"serviceAccount": "someone-else"}]})
    _, rules = rules_for(policy(other_sa))
    assert rules == ()
    # policy order decides which rule speaks first
    first = dict(NO_RM, name="a-rule", block={"message": "first"})
    _, rules = rules_for(policy(NO_RM, name="b"), policy(first, name="a"))
    assert judge(rules, ToolUse("t", "bash", {"command": "rm -rf /"})).message == "first"
