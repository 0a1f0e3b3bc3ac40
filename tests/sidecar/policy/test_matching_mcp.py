"""match.mcp: one call must satisfy every field; batches judged by their strictest call."""

from __future__ import annotations

import json

import pytest

from chaperone_sidecar.policy.classify import classify
from chaperone_sidecar.policy.compiler import compile_policies, validate_policy
from chaperone_sidecar.policy.evaluator import evaluate
from chaperone_sidecar.policy.model import HTTPRequest, Identity, MCPAction, MCPCall


def policy(rules, default="allow"):
    return {"apiVersion": "chaperone.dev/v1alpha1", "kind": "AccessPolicy",
            "metadata": {"name": "p", "namespace": "ns"}, "spec": {"defaultEffect": default, "rules": rules}}


def decide(rules, *messages, default="allow"):
    result = compile_policies([policy(rules, default)])
    assert result.ok, result.errors
    body = json.dumps(messages[0] if len(messages) == 1 else list(messages)).encode()
    a = classify(HTTPRequest("POST", "http", "mcp.local", 80, "/mcp", body=body), "mcp")
    d = evaluate(result.policies, a, Identity(), "files")
    return d.effect, d.rule.rule if d.rule else None


def tc(i, name, **args):
    return {"jsonrpc": "2.0", "id": i, "method": "tools/call", "params": {"name": name, "arguments": args}}


ETC = {"name": "etc", "match": {"mcp": {"tools": ["delete_file"],
                                        "arguments": [{"path": "$.path", "values": ["/etc/*"]}]}}, "block": {}}


def test_fields_hold_for_the_same_call_not_across_a_batch():
    assert decide([ETC], tc(1, "delete_file", path="/tmp/x"), tc(2, "read_file", path="/etc/passwd")) == ("allow", None)
    assert decide([ETC], tc(1, "read_file", path="/tmp"), tc(2, "delete_file", path="/etc/passwd")) == ("block", "etc")


@pytest.mark.parametrize("path", ["/etc/passwd", "/tmp/../etc/passwd", "//etc/passwd", "/%65tc/passwd",
                                  "\\etc\\passwd"])
def test_argument_paths_are_also_matched_normalised(path):
    assert decide([ETC], tc(1, "delete_file", path=path)) == ("block", "etc")


def test_allow_needs_every_call_of_a_batch():
    rules = [{"name": "reads", "match": {"mcp": {"tools": ["read_*"]}}, "allow": {}}]
    assert decide(rules, tc(1, "read_file", path="/a"), default="block") == ("allow", "reads")
    assert decide(rules, tc(1, "read_file", path="/a"), tc(2, "delete_file", path="/a"), default="block")[0] == "block"


def test_lists_regexes_and_descendants():
    rules = [{"name": "force", "match": {"mcp": {"arguments": [{"path": "$..force", "values": ["true"]}]}},
              "block": {}},
             {"name": "rm", "match": {"mcp": {"arguments": [{"path": "$.argv", "regex": "^rm$"}]}}, "block": {}}]
    assert decide(rules, tc(1, "git", opts={"deep": {"force": True}}))[1] == "force"
    assert decide(rules, tc(1, "run", argv=["rm", "-rf", "/"]))[1] == "rm"
    assert decide(rules, tc(1, "run", argv=["ls"])) == ("allow", None)


def test_resources_and_methods():
    rules = [{"name": "no-secrets", "match": {"mcp": {"resources": ["file:///secrets/*"]}}, "block": {}},
             {"name": "no-sampling", "match": {"mcp": {"methods": ["prompts/*"]}}, "block": {}}]
    read = {"jsonrpc": "2.0", "id": 1, "method": "resources/read", "params": {"uri": "file:///tmp/../secrets/k"}}
    assert decide(rules, read)[1] == "no-secrets"
    prompt = {"jsonrpc": "2.0", "id": 1, "method": "prompts/get", "params": {"name": "x"}}
    assert decide(rules, prompt)[1] == "no-sampling"


def test_the_tools_list_probe_hides_only_unconditional_blocks():
    rules = [ETC, {"name": "no-exec", "match": {"mcp": {"tools": ["exec"]}}, "block": {}}]
    result = compile_policies([policy(rules)])
    base = classify(HTTPRequest("POST", "http", "h", 80, "/mcp", body=b"{}"), "mcp")

    def probe(tool):
        from dataclasses import replace
        a = replace(base, mcp=MCPAction(calls=(MCPCall("tools/call", tool=tool, probe=True),)))
        return evaluate(result.policies, a, Identity(), "c").effect
    assert probe("exec") == "block" and probe("delete_file") == "allow"


def test_compiler_errors_name_the_field():
    bad = policy([{"name": "x", "match": {"mcp": {"methods": ["tools/calls"], "tools": ["Bash(rm)"],
                                                  "arguments": [{"path": "$..[", "values": ["a"]},
                                                                {"path": "$.a"}, {"path": "$.b", "regex": "("}]}},
                   "block": {}}])
    errors = [str(e) for e in validate_policy(bad)[1]]
    assert any(e.startswith("spec.rules[0].match.mcp.methods[0]: unknown MCP method") and "tools/call?" in e
               for e in errors)
    assert any(e.startswith("spec.rules[0].match.mcp.tools[0]:") for e in errors)
    assert any(e.startswith("spec.rules[0].match.mcp.arguments[0].path:") for e in errors)
    assert any(e.startswith("spec.rules[0].match.mcp.arguments[1]: needs values") for e in errors)
    assert any(e.startswith("spec.rules[0].match.mcp.arguments[2].regex: invalid regular") for e in errors)
    mixed = policy([{"name": "x", "match": {"mcp": {"tools": ["a"]}, "anthropic": {"tools": ["a"]}}, "block": {}}])
    assert any("can never hold together" in str(e) for e in validate_policy(mixed)[1])


def test_a_tools_call_sent_as_a_notification_is_judged_all_the_same():
    rules = [{"name": "no-delete", "match": {"mcp": {"tools": ["delete_file"]}}, "block": {}}]
    note = {"jsonrpc": "2.0", "method": "tools/call", "params": {"name": "delete_file", "arguments": {}}}
    assert decide(rules, note) == ("block", "no-delete")


def test_large_arguments_are_matched_but_never_cached():
    from chaperone_sidecar.policy import matching_mcp

    before = matching_mcp._parsed_small.cache_info().currsize
    assert decide([ETC], tc(1, "delete_file", path="/etc/x", pad="p" * 200_000)) == ("block", "etc")
    assert matching_mcp._parsed_small.cache_info().currsize == before
