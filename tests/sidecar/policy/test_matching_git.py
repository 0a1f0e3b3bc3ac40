"""``match.git`` rules compiled and evaluated: per-update semantics, fail closed on unknowns."""

from __future__ import annotations

import pytest

from chaperone_sidecar.policy.compiler import PolicyErrors, compile_policies, compile_policy
from chaperone_sidecar.policy.evaluator import evaluate
from chaperone_sidecar.policy.model import Action, GitAction, GitCommand, Identity

ZERO = "0" * 40
A, B = "a" * 40, "b" * 40
WHO = Identity(service_account="agents/claude")


def policy(*rules, default="block"):
    return {"apiVersion": "chaperone.dev/v1alpha1", "kind": "AccessPolicy",
            "metadata": {"name": "git", "namespace": "agents"},
            "spec": {"defaultEffect": default, "rules": list(rules)}}


def push(*commands, repo="org/app", phase="rpc", service="push") -> Action:
    git = GitAction(service, repo, phase, commands)
    return Action("http", "POST", "https", "git.example", 443, f"/{repo}/git-receive-pack",
                  name=f"git:{service}", git=git)


def cmd(ref, op="update", force=False, valid=True):
    old, new = {"create": (ZERO, B), "delete": (A, ZERO), "update": (A, B)}[op]
    return GitCommand(ref, old, new, op, force, valid)


def decide(pol, action):
    result = compile_policies([pol])
    assert result.ok, result.errors
    return evaluate(result.policies, action, WHO, "git")


ALLOW_ALL = {"name": "all", "match": {"git": {"services": ["push", "fetch"]}}, "allow": {}}
MAIN = {"name": "main", "match": {"git": {"refs": ["refs/heads/main"]}}, "block": {"message": "no"}}


def test_block_main_one_ref_refuses_the_whole_push():
    pol = policy(ALLOW_ALL, MAIN)
    assert decide(pol, push(cmd("refs/heads/feature"))).effect == "allow"
    d = decide(pol, push(cmd("refs/heads/feature"), cmd("refs/heads/main")))
    assert d.effect == "block" and d.rule.rule == "main"
    # the advertisement and fetches carry no updates: the ref rule does not apply
    assert decide(pol, push(phase="advertisement")).effect == "allow"
    assert decide(pol, push(service="fetch")).effect == "allow"


def test_refs_operations_and_force_hold_on_the_same_update():
    rule = {"name": "no-main-delete", "match": {"git": {"refs": ["refs/heads/main"], "operations": ["delete"]}},
            "block": {}}
    pol = policy(ALLOW_ALL, rule)
    assert decide(pol, push(cmd("refs/heads/feature", "delete"), cmd("refs/heads/main"))).effect == "allow"
    assert decide(pol, push(cmd("refs/heads/main", "delete"))).effect == "block"


def test_force_push_rules_fail_closed_on_unknown():
    rule = {"name": "no-force", "match": {"git": {"refs": ["refs/heads/*"], "forcePush": True}}, "block": {}}
    pol = policy(ALLOW_ALL, rule)
    assert decide(pol, push(cmd("refs/heads/main", force=False))).effect == "allow"  # proven fast-forward
    assert decide(pol, push(cmd("refs/heads/main", force=None))).effect == "block"  # unknown
    assert decide(pol, push(cmd("refs/heads/main", "create"))).effect == "allow"
    assert decide(pol, push(cmd("refs/heads/main", "delete"))).effect == "allow"  # a delete is no force push
    # allow rules need proof: only a proven fast-forward is allowed by forcePush: false
    ff_only = policy({"name": "ff", "match": {"git": {"forcePush": False}}, "allow": {}})
    assert decide(ff_only, push(cmd("refs/heads/x", force=False))).effect == "allow"
    assert decide(ff_only, push(cmd("refs/heads/x", force=None))).effect == "block"


def test_unknown_updates_match_restricting_rules_and_no_allow():
    unknown = Action("http", "POST", "https", "h", 443, "/org/app/git-receive-pack", name="git:push",
                     git=GitAction("push", "org/app", "rpc", None))
    d = decide(policy(ALLOW_ALL, MAIN), unknown)
    assert d.effect == "block" and d.rule.rule == "main"
    only_features = policy({"name": "f", "match": {"git": {"refs": ["refs/heads/feature/*"]}}, "allow": {}})
    assert decide(only_features, unknown).effect == "block"
    # services/repositories rules judge it exactly
    assert decide(policy(ALLOW_ALL), unknown).effect == "allow"


def test_invalid_ref_names_match_restricting_patterns_only():
    pol = policy(ALLOW_ALL, MAIN)
    assert decide(pol, push(cmd("refs/heads//main", valid=False))).effect == "block"
    allow = policy({"name": "f", "match": {"git": {"refs": ["refs/heads/*"]}}, "allow": {}})
    assert decide(allow, push(cmd("refs/heads//main", valid=False))).effect == "block"
    assert decide(allow, push(cmd("refs/heads/x"))).effect == "allow"
    assert decide(allow, push()).effect == "allow"  # git's 0000 probe: no updates


def test_repositories_and_services():
    pol = policy({"name": "org", "match": {"git": {"repositories": ["org/*"], "services": ["fetch"]}}, "allow": {}})
    assert decide(pol, push(service="fetch", repo="org/app")).effect == "allow"
    assert decide(pol, push(service="fetch", repo="other/app")).effect == "block"
    assert decide(pol, push(cmd("refs/heads/x"), repo="org/app")).effect == "block"
    # git rules never match a request that is not git
    plain = Action("http", "GET", "https", "h", 443, "/org/app")
    assert decide(pol, plain).effect == "block"


def test_explanations_name_the_updates():
    result = compile_policies([policy(ALLOW_ALL, MAIN)])
    d = evaluate(result.policies, push(cmd("refs/heads/main")), WHO, "git", explain=True)
    assert any("match.git.refs/operations/forcePush" in line and "refs/heads/main" in line
               for line in d.explanation), d.explanation


@pytest.mark.parametrize("git,message", [
    ({"refs": ["main"]}, 'did you mean "refs/heads/main"?'),
    ({"refs": ["refs/heads/ma in"]}, "whitespace"),
    ({"operations": ["merge"]}, "supported values"),
    ({"services": ["clone"]}, "supported values"),
    ({"forcePush": "yes"}, "boolean"),
])
def test_the_compiler_refuses_what_can_never_match(git, message):
    with pytest.raises(PolicyErrors) as err:
        compile_policy(policy({"name": "r", "match": {"git": git}, "block": {}}))
    assert message in str(err.value)


def test_git_and_another_type_cannot_hold_together():
    with pytest.raises(PolicyErrors) as err:
        compile_policy(policy({"name": "r", "match": {"git": {"services": ["push"]},
                                                      "aws": {"actions": ["s3:GetObject"]}}, "block": {}}))
    assert "can never hold together" in str(err.value)


def test_an_approval_rule_holds_the_push_not_its_advertisement():
    rule = {"name": "held", "match": {"git": {"repositories": ["org/*"], "services": ["push"]}},
            "requireApproval": {"approvers": {"users": ["alice"]}}}
    pol = policy(ALLOW_ALL, rule)
    assert decide(pol, push(phase="advertisement")).effect == "allow"
    assert decide(pol, push(cmd("refs/heads/x"))).effect == "require_approval"
    assert decide(pol, push()).effect == "allow"  # git's 0000 probe changes nothing
    block = {"name": "no-push", "match": {"git": {"services": ["push"]}}, "block": {}}
    assert decide(policy(ALLOW_ALL, block), push(phase="advertisement")).effect == "block"


def test_a_streamed_push_pending_its_updates_is_judged_by_services_and_repositories():
    pending = Action("http", "POST", "https", "h", 443, "/org/app/git-receive-pack", name="git:push",
                     git=GitAction("push", "org/app", "rpc", (), pending=True))
    assert decide(policy(ALLOW_ALL, MAIN), pending).effect == "allow"  # the gate judges the refs
    features = policy({"name": "f", "match": {"git": {"refs": ["refs/heads/feature/*"]}}, "allow": {}})
    assert decide(features, pending).effect == "allow"
