"""Evaluator: applicability, precedence, defaults, fail-closed, conditions, explanations, speed.

Actions are built directly here: the evaluator must not depend on the classifiers.
"""

from __future__ import annotations

import pytest

from chaperone_sidecar.policy.aws_catalog import action_error, operations
from chaperone_sidecar.policy.compiler import compile_policy
from chaperone_sidecar.policy.evaluator import evaluate
from chaperone_sidecar.policy.matching import CompiledPolicySet, normalize_path
from chaperone_sidecar.policy.model import (
    Action,
    AnthropicAction,
    ApprovalRequirement,
    Approvers,
    AWSAction,
    Identity,
    KubernetesAction,
    MaskSpec,
    RateLimit,
    RuleRef,
)

AGENT = Identity(service_account="team-a/claude", pod_namespace="team-a", creator="alice",
                 creator_groups=("devs",))


def policy(rules, name="p", namespace="team-a", **spec):
    return compile_policy({"apiVersion": "chaperone.dev/v1alpha1", "kind": "AccessPolicy",
                           "metadata": {"name": name, "namespace": namespace},
                           "spec": {"rules": rules, **spec}})


def policies(*compiled):
    return CompiledPolicySet(compiled)


def aws(operation="DeleteBucket", service="s3", method="DELETE", host=None, region="us-east-1",
        resources=("reports",), path="/"):
    info = AWSAction(service, region, operation, resources=resources)
    return Action("aws", method, "https", host or f"{service}.amazonaws.com", 443, path, name=info.action, aws=info)


def http(method="GET", host="api.github.com", path="/", query=""):
    return Action("http", method, "https", host, 443, path, query, name=f"http:{method}")


def kube(verb="get", resource="pods", subresource="", namespace="team-a", name="", group="", method="GET"):
    info = KubernetesAction(verb, group, "v1", resource, subresource, namespace, name)
    return Action("kubernetes", method, "https", "kubernetes.default.svc", 443, "/api/v1/x",
                  name=f"kubernetes:{verb}/{resource}", kubernetes=info)


def claude(model="claude-sonnet-4", tools=(), tool_uses=()):
    info = AnthropicAction(model=model, models=(model,) if model else (), tools=tools, tool_uses=tool_uses)
    return Action("anthropic", "POST", "https", "api.anthropic.com", 443, "/v1/messages",
                  name="anthropic:messages", anthropic=info)


def decide(pols, action, identity=AGENT, connection="conn", body=b""):
    return evaluate(pols, action, identity, connection, body)


ALLOW_ALL = {"name": "allow-all", "allow": {}}
BLOCK_DELETE = {"name": "no-delete", "match": {"aws": {"actions": ["s3:Delete*"]}}, "block": {}}
ASK_DELETE = {"name": "ask-delete", "match": {"aws": {"actions": ["s3:DeleteBucket"]}},
              "requireApproval": {"approvers": {"groups": ["ops"]}}}


# ---------------------------------------------------------------------------- precedence

@pytest.mark.parametrize("rules,effect,rule", [
    ([ALLOW_ALL, ASK_DELETE, BLOCK_DELETE], "block", "no-delete"),  # block beats everything, any order
    ([BLOCK_DELETE, ASK_DELETE, ALLOW_ALL], "block", "no-delete"),
    ([ALLOW_ALL, ASK_DELETE], "require_approval", "ask-delete"),  # approval beats allow
    ([ASK_DELETE, ALLOW_ALL], "require_approval", "ask-delete"),
    ([ALLOW_ALL], "allow", "allow-all"),
    ([{"name": "first", "allow": {}}, {"name": "second", "allow": {}}], "allow", "first"),  # tie: rule order
    ([{"name": "b1", "block": {}}, {"name": "b2", "block": {}}], "block", "b1"),
])
def test_precedence_within_a_policy(rules, effect, rule):
    d = decide(policies(policy(rules)), aws())
    assert (d.effect, d.rule) == (effect, RuleRef("team-a/p", rule))


def test_precedence_across_policies_and_tie_break_by_policy_name():
    allow = policy([ALLOW_ALL], name="a-allow")
    ask_b = policy([ASK_DELETE], name="b-ask", approvers={"users": ["x"]})
    ask_c = policy([dict(ASK_DELETE, name="ask-too")], name="c-ask")
    block_z = policy([BLOCK_DELETE], name="z-block")
    block_y = policy([dict(BLOCK_DELETE, name="also-no")], name="y-block")
    assert decide(policies(block_z, allow, ask_b), aws()).rule == RuleRef("team-a/z-block", "no-delete")
    # among equal effects the policy whose namespace/name sorts first decides, whatever the load order
    assert decide(policies(block_z, block_y), aws()).rule == RuleRef("team-a/y-block", "also-no")
    assert decide(policies(block_y, block_z), aws()).rule == RuleRef("team-a/y-block", "also-no")
    assert decide(policies(ask_c, allow, ask_b), aws()).rule == RuleRef("team-a/b-ask", "ask-delete")
    # a rule of another policy that does not match changes nothing
    assert decide(policies(ask_c, allow, ask_b), aws("GetObject", method="GET")).rule == RuleRef("team-a/a-allow", "allow-all")


def test_block_message_and_description():
    pols = policies(policy([
        {"name": "m", "description": "why", "match": {"methods": ["DELETE"]}, "block": {"message": "go away"}},
        {"name": "d", "description": "only the description", "match": {"methods": ["PUT"]}, "block": {}},
        {"name": "n", "match": {"methods": ["POST"]}, "block": {}},
    ]))
    assert decide(pols, http("DELETE")).message == "go away"
    assert decide(pols, http("PUT")).message == "only the description"
    assert decide(pols, http("POST")).message == 'blocked by rule "n" of AccessPolicy team-a/p'


# ---------------------------------------------------------------------------- defaults and fail closed

def test_default_effect_is_block_deny_by_default():
    d = decide(policies(policy([{"name": "gets", "match": {"methods": ["GET"]}, "allow": {}}])), http("POST"))
    assert d.effect == "block" and d.rule is None
    assert "denied by default (team-a/p)" in d.message and "http:POST" in d.message
    assert decide(policies(policy([{"name": "gets", "match": {"methods": ["GET"]}, "allow": {}}])), http()).effect == "allow"


def test_strictest_default_wins():
    lenient = policy([BLOCK_DELETE], name="lenient", defaultEffect="allow")
    also_lenient = policy([BLOCK_DELETE], name="lenient2", defaultEffect="allow")
    strict = policy([BLOCK_DELETE], name="strict")
    assert decide(policies(lenient, also_lenient), http()).effect == "allow"
    d = decide(policies(lenient, strict), http())
    assert d.effect == "block" and d.rule is None and "team-a/strict" in d.message


@pytest.mark.parametrize("pols", [policies(), policies(policy([ALLOW_ALL], connections=["other"]))],
                         ids=["no policies", "none applies"])
def test_no_applicable_policy_blocks(pols):
    d = decide(pols, http(), connection="github")
    assert d.effect == "block" and d.rule is None and d.masks == ()
    assert d.message == ('no AccessPolicy governs connection "github" for serviceAccount team-a/claude, '
                         "creator alice (groups devs); refusing (fail closed)")


# ---------------------------------------------------------------------------- applicability

@pytest.mark.parametrize("subject,identity,applies", [
    ({"serviceAccount": "team-a/claude"}, AGENT, True),
    ({"serviceAccount": "claude"}, AGENT, True),  # bare name: the policy's namespace
    ({"serviceAccount": "claude"}, Identity(service_account="team-b/claude"), False),
    ({"serviceAccount": "*/claude"}, Identity(service_account="team-b/claude"), True),
    ({"serviceAccount": "team-a/*"}, AGENT, True),
    ({"serviceAccount": "team-a/other"}, AGENT, False),
    ({"serviceAccount": "claude"}, Identity(), False),  # no service account never matches
    ({"user": "alice"}, AGENT, True),  # creator
    ({"user": "bob"}, Identity(creator="alice", on_behalf_of="bob"), True),  # on-behalf-of
    ({"user": "*@example.com"}, Identity(on_behalf_of="carol@example.com"), True),
    ({"user": "bob"}, AGENT, False),
    ({"user": "*"}, Identity(service_account="team-a/x"), False),  # nobody to match
    ({"group": "devs"}, AGENT, True),
    ({"group": "ops"}, Identity(on_behalf_of="bob", on_behalf_of_groups=("ops",)), True),
    ({"group": "ops"}, AGENT, False),
    ({"group": "dev*"}, AGENT, False),  # groups are exact names
])
def test_subject_matching(subject, identity, applies):
    pols = policies(policy([ALLOW_ALL], subjects=[subject]))
    assert decide(pols, http(), identity).effect == ("allow" if applies else "block")
    # the same patterns in a rule's match
    rule_pols = policies(policy([{"name": "who", "match": {"subjects": [subject]}, "allow": {}}]))
    assert decide(rule_pols, http(), identity).effect == ("allow" if applies else "block")


def test_any_subject_entry_may_match():
    pols = policies(policy([ALLOW_ALL], subjects=[{"user": "nobody"}, {"group": "devs"}]))
    assert decide(pols, http()).effect == "allow"


@pytest.mark.parametrize("connections,connection,applies", [
    (None, "anything", True), ([], "anything", True), (["github"], "github", True),
    (["aws-*"], "aws-prod", True), (["aws-*"], "github", False), (["a", "b"], "b", True),
])
def test_connection_matching(connections, connection, applies):
    extra = {} if connections is None else {"connections": connections}
    d = decide(policies(policy([ALLOW_ALL], **extra)), http(), connection=connection)
    assert d.effect == ("allow" if applies else "block")


# ---------------------------------------------------------------------------- approval, masks, limits

def test_require_approval_uses_rule_approvers_and_grant_else_the_policys_else_defaults():
    rule_level = policy([{"name": "ask", "requireApproval": {
        "approvers": {"users": ["bob", "carol"]}, "minApprovals": 2, "timeoutSeconds": 600, "mode": "defer",
        "holdSeconds": 30, "grant": {"ttlSeconds": 60, "scope": "action"}}}],
        approvers={"groups": ["ignored"]}, grant={"ttlSeconds": 5})
    d = decide(policies(rule_level), http())
    assert d.effect == "require_approval" and d.rule == RuleRef("team-a/p", "ask")
    assert d.approval == ApprovalRequirement(Approvers(("bob", "carol"), ()), 2, 600, "defer", 30, 60, "action")
    assert d.message == 'approval required by rule "ask" of AccessPolicy team-a/p'

    policy_level = policy([{"name": "ask", "description": "roles are reviewed", "requireApproval": {}}],
                          approvers={"groups": ["platform-approvers"]}, grant={"scope": "action"})
    d = decide(policies(policy_level), http())
    assert d.approval == ApprovalRequirement(Approvers((), ("platform-approvers",)), 1, 300, "hold", 120, 900, "action")
    assert d.message == "roles are reviewed"


def test_grant_defaults_without_any_grant():
    d = decide(policies(policy([{"name": "ask", "requireApproval": {}}], approvers={"users": ["bob"]})), http())
    assert (d.approval.grant_ttl_seconds, d.approval.grant_scope) == (900, "exact")
    assert (d.approval.timeout_seconds, d.approval.hold_seconds, d.approval.mode, d.approval.min_approvals) == (300, 120, "hold", 1)


def test_masks_and_rate_limits_are_collected_on_top_of_the_decision():
    a = policy([
        {"name": "secrets", "match": {"aws": {"actions": ["secretsmanager:GetSecretValue"]}},
         "mask": {"fields": ["$.SecretString"]}},
        {"name": "other", "match": {"hosts": ["nowhere"]}, "mask": {"detectors": ["jwt"]}},
        {"name": "slow", "rateLimit": {"requests": 10, "periodSeconds": 60}},
        ALLOW_ALL,
    ], name="a", masking={"detectors": ["aws-secret-key"]})
    b = policy([{"name": "slower", "rateLimit": {"requests": 1, "periodSeconds": 1, "per": "pod"}}], name="b",
               defaultEffect="allow", masking={"detectors": ["private-key"], "target": "both"})
    d = decide(policies(b, a), aws("GetSecretValue", "secretsmanager", "POST"))
    assert d.effect == "allow" and d.rule == RuleRef("team-a/a", "allow-all")
    assert d.masks == (
        MaskSpec(("aws-secret-key",), (), "response", 67108864, None),  # policy-wide: always
        MaskSpec((), ("$.SecretString",), "response", 67108864, RuleRef("team-a/a", "secrets")),
        MaskSpec(("private-key",), (), "both", 67108864, None),
    )
    assert d.rate_limits == (RateLimit(10, 60, "identity", RuleRef("team-a/a", "slow")),
                             RateLimit(1, 1, "pod", RuleRef("team-a/b", "slower")))
    # collected even when a block decides (the sidecar never forwards; recording still masks)
    blocked = decide(policies(a, policy([BLOCK_DELETE], name="c")), aws())
    assert blocked.effect == "block" and blocked.masks[0].detectors == ("aws-secret-key",)


def test_mask_and_rate_limit_rules_do_not_decide():
    d = decide(policies(policy([{"name": "m", "mask": {"detectors": ["jwt"]}}])), http())
    assert d.effect == "block" and d.rule is None and d.masks[0].source == RuleRef("team-a/p", "m")


# ---------------------------------------------------------------------------- conditions

def _matches(match, action, body=b"", effect="block"):
    d = decide(policies(policy([{"name": "r", "match": match, effect: {}}], defaultEffect="allow")), action, body=body)
    return d.rule is not None


@pytest.mark.parametrize("match,action,expected", [
    ({"methods": ["GET", "HEAD"]}, http("GET"), True),
    ({"methods": ["GET"]}, http("POST"), False),
    ({"methods": ["PROPFIND"]}, http("PROPFIND"), True),  # unusual methods use their own bucket
    ({"hosts": ["*.github.com"]}, http(host="api.github.com"), True),
    ({"hosts": ["*.github.com"]}, http(host="API.GITHUB.COM."), True),  # case and trailing dot
    ({"hosts": ["github.com"]}, http(host="evilgithub.com"), False),
    ({"paths": ["/repos/*/issues"]}, http(path="/repos/x/issues"), True),
    ({"paths": ["/repos/*/issues"]}, http(path="/repos/x/y/issues"), False),
    ({"paths": ["/repos/**"]}, http(path="/repos/x/y/issues"), True),
    ({"paths": ["/admin/**"]}, http(path="/%61dmin/users"), True),  # percent-encoded unreserved
    ({"paths": ["/admin/**"]}, http(path="/public/../admin/users"), True),  # dot segments
    ({"paths": ["/admin/**"]}, http(path="/admin%2Fusers"), False),  # %2F is not a separator
    ({"pathRegex": "^/search"}, http(path="/search"), True),
    ({"pathRegex": "token=[^&]+"}, http(path="/api", query="a=1&token=abc"), True),  # query too
    ({"pathRegex": "token="}, http(path="/api", query="a=1"), False),
    ({"aws": {"actions": ["s3:Delete*"]}}, aws("DeleteObject"), True),
    ({"aws": {"actions": ["s3:deletebucket"]}}, aws("DeleteBucket"), True),  # IAM names: any case
    ({"aws": {"actions": ["s3:Delete*"]}}, aws("GetObject", method="GET"), False),
    ({"aws": {"actions": ["s3:Delete*"]}}, http("DELETE"), False),  # not an AWS call
    ({"aws": {"actions": ["iam:*"]}}, aws("CreateRole", "iam", "POST"), True),
    ({"aws": {"actions": ["s3:DeleteBucket"]}}, aws("", "s3"), True),  # unknown operation "s3:*": a block fails closed
    ({"aws": {"regions": ["eu-*"]}}, aws(region="eu-west-1"), True),
    ({"aws": {"regions": ["eu-*"]}}, aws(region="us-east-1"), False),
    ({"aws": {"resources": ["prod-*"]}}, aws(resources=("dev-a", "prod-b")), True),  # any, for restricting rules
    ({"aws": {"resources": ["prod-*"]}}, aws(resources=()), False),  # nothing derived: no match
    ({"aws": {}}, aws(), True),  # an empty section: any call of that type
    ({"aws": {}}, http(), False),
    ({"kubernetes": {"verbs": ["delete"]}}, kube("delete"), True),
    ({"kubernetes": {"verbs": ["*"]}}, kube("watch"), True),
    ({"kubernetes": {"verbs": ["get"]}}, http(), False),
    ({"kubernetes": {"resources": ["pods"]}}, kube("create", "pods", "exec"), False),  # RBAC-like: pods != pods/exec
    ({"kubernetes": {"resources": ["pods/exec"]}}, kube("create", "pods", "exec"), True),
    ({"kubernetes": {"resources": ["*"]}}, kube("create", "pods", "exec"), True),
    ({"kubernetes": {"apiGroups": [""]}}, kube(), True),  # the core group
    ({"kubernetes": {"apiGroups": [""]}}, kube(group="apps"), False),
    ({"kubernetes": {"apiGroups": ["*.k8s.io"]}}, kube(group="rbac.authorization.k8s.io"), True),
    ({"kubernetes": {"namespaces": ["kube-*"]}}, kube(namespace="kube-system"), True),
    ({"kubernetes": {"namespaces": ["*"]}}, kube(namespace=""), False),  # cluster-scoped calls have none
    ({"kubernetes": {"names": ["prod-*"]}}, kube(name="prod-db"), True),
    ({"kubernetes": {"names": ["*"]}}, kube("list"), False),  # a list has no name
    ({"anthropic": {"models": ["claude-opus-*"]}}, claude("claude-opus-4"), True),
    ({"anthropic": {"models": ["claude-opus-*"]}}, claude("claude-sonnet-4"), False),
    ({"anthropic": {"tools": ["Bash"]}}, claude(tools=("Read", "Bash")), True),
    ({"anthropic": {"tools": ["Bash"]}}, claude(tool_uses=("Bash",)), True),
    ({"anthropic": {"tools": ["Bash"]}}, claude(), False),
    ({"methods": ["DELETE"], "aws": {"actions": ["s3:*"]}}, aws("DeleteBucket"), True),  # all fields must hold
    ({"methods": ["GET"], "aws": {"actions": ["s3:*"]}}, aws("DeleteBucket"), False),
    ({"methods": []}, http("PATCH"), True),  # an empty list is not checked
])
def test_conditions(match, action, expected):
    assert _matches(match, action) is expected


def test_allow_rules_need_every_value_to_match():
    # allowing bucket-a/* must not let a call that also touches bucket-b through
    match = {"aws": {"resources": ["bucket-a/*"]}}
    assert _matches(match, aws("CopyObject", resources=("bucket-a/x", "bucket-a/y")), effect="allow")
    assert not _matches(match, aws("CopyObject", resources=("bucket-a/x", "bucket-b/y")), effect="allow")
    assert _matches(match, aws("CopyObject", resources=("bucket-a/x", "bucket-b/y")), effect="block")
    tools = {"anthropic": {"tools": ["Read", "Grep"]}}
    assert _matches(tools, claude(tools=("Read",), tool_uses=("Grep",)), effect="allow")
    assert not _matches(tools, claude(tools=("Read", "Bash")), effect="allow")


def test_body_regex_searches_the_first_max_body_bytes():
    pols = policies(policy([{"name": "drop", "match": {"bodyRegex": "DROP\\s+TABLE"}, "block": {}}],
                           defaultEffect="allow", masking={"maxBodyBytes": 1024}))
    assert decide(pols, http("POST"), body=b"select 1; DROP  TABLE users").effect == "block"
    assert decide(pols, http("POST"), body=b"select 1").effect == "allow"
    assert decide(pols, http("POST"), body=b"\xff\xfe DROP TABLE").effect == "block"  # undecodable bytes
    assert decide(pols, http("POST"), body=b"x" * 1024 + b"DROP TABLE").effect == "allow"  # past the limit


@pytest.mark.parametrize("raw,normalized", [
    ("/a/b", "/a/b"), ("/a/./b", "/a/b"), ("/a/../b", "/b"), ("/../a", "/a"), ("/a/..", "/"),
    ("/a/.", "/a/"), ("/%7Euser/%41", "/~user/A"), ("//a///b", "/a/b"),
    ("/%2e%2e/admin", "/admin"), ("/v1/file.txt", "/v1/file.txt"),
    # ambiguous: left as sent (the sidecar refuses these before they are judged)
    ("/a%2fb", "/a%2fb"), ("/a%2e%2e/b", "/a%2e%2e/b"),
])
def test_normalize_path(raw, normalized):
    assert normalize_path(raw) == normalized


# ---------------------------------------------------------------------------- explanations

def test_explanation_lists_every_step():
    pols = policies(
        policy([BLOCK_DELETE, ALLOW_ALL], name="base", connections=["aws-*"], subjects=[{"serviceAccount": "claude"}]),
        policy([ALLOW_ALL], name="other", connections=["github"]))
    d = evaluate(pols, aws(), AGENT, "aws-prod", explain=True)
    assert d.explanation == (
        "caller: serviceAccount team-a/claude, creator alice (groups devs)",
        "request: s3:DeleteBucket (DELETE https://s3.amazonaws.com/) on aws connection \"aws-prod\"",
        'policy team-a/base: applies (connection "aws-prod" matches "aws-*"; subject serviceAccount team-a/claude)',
        'policy team-a/other: does not apply (connection "aws-prod" matches none of ["github"])',
        'rule team-a/base#no-delete (block) matches: match.aws.actions: "s3:DeleteBucket" matches ["s3:Delete*"]',
        "rule team-a/base#allow-all (allow) matches: no conditions (matches every request)",
        "decision: block by rule team-a/base#no-delete (block beats require_approval beats allow; ties go to the "
        "first policy, then rule); outranked or tied later: team-a/base#allow-all (allow)",
    )
    default = evaluate(policies(policy([BLOCK_DELETE])), http(), AGENT, "c", explain=True)
    assert default.explanation[-1] == ("decision: block - no allow/block/requireApproval rule matched; defaultEffect "
                                       "of applicable policies: team-a/p=block (block if any says block)")
    none = evaluate(policies(), http(), AGENT, "c", explain=True)
    assert "no AccessPolicies are loaded" in none.explanation
    assert evaluate(pols, aws(), AGENT, "aws-prod").explanation == ()  # only when asked


def test_explain_never_changes_the_decision():
    pols = policies(
        policy([BLOCK_DELETE, ASK_DELETE, {"name": "gets", "match": {"methods": ["GET"]}, "allow": {}},
                {"name": "m", "match": {"paths": ["/x/**"]}, "mask": {"detectors": ["jwt"]}}], name="a"),
        policy([{"name": "k", "match": {"kubernetes": {"verbs": ["delete"]}}, "requireApproval": {}}],
               name="b", approvers={"users": ["u"]}, defaultEffect="allow"),
        policy([ALLOW_ALL], name="c", subjects=[{"user": "bob"}]))
    actions = [aws(), aws("GetObject", method="GET"), aws("PutObject", method="PUT"), http(), http("POST", path="/x/y"),
               kube("delete"), kube(), claude()]
    for identity in (AGENT, Identity(creator="bob"), Identity()):
        for action in actions:
            plain = evaluate(pols, action, identity, "c")
            explained = evaluate(pols, action, identity, "c", explain=True)
            assert explained.explanation and plain.explanation == ()
            assert plain == explained.__class__(**{**explained.__dict__, "explanation": ()})


# ---------------------------------------------------------------------------- speed

def real_operation(service: str, prefix: str, i: int) -> str:
    """The i-th real operation of ``service`` starting with ``prefix``: the compiler refuses
    action names no AWS call has (policy.aws_catalog), so synthetic rules use real ones."""
    ops = sorted(o for o in operations(service) if o.startswith(prefix)) or sorted(operations(service))
    return ops[i % len(ops)]


def read_patterns(service: str) -> list[str]:
    """``service:Get*`` and ``service:List*``, where the service has such operations."""
    return [p for p in (f"{service}:Get*", f"{service}:List*") if action_error(p) is None]


def hundred_rule_policy():
    services = ["s3", "ec2", "iam", "lambda", "dynamodb", "sqs", "sns", "kms", "rds", "sts"]
    rules = []
    for i in range(100):
        service = services[i % len(services)]
        kind = i % 4
        if kind == 0:
            rules.append({"name": f"block-{i}", "match": {"aws": {"actions": [f"{service}:{real_operation(service, 'Delete', i // 10)}"]}}, "block": {}})
        elif kind == 1:
            rules.append({"name": f"ask-{i}", "match": {"aws": {"actions": [f"{service}:{real_operation(service, 'Create', i // 10)}*"]}},
                          "requireApproval": {"approvers": {"groups": ["ops"]}}})
        elif kind == 2:
            rules.append({"name": f"read-{i}", "match": {"methods": ["GET"], "aws": {
                "actions": read_patterns(service), "resources": [f"res-{i}-*"]}}, "allow": {}})
        else:
            rules.append({"name": f"path-{i}", "match": {"hosts": [f"*.svc{i}.example.com"], "paths": [f"/v{i}/**"]},
                          "allow": {}})
    rules.append({"name": "mask-secrets", "match": {"aws": {"actions": ["secretsmanager:GetSecretValue"]}},
                  "mask": {"fields": ["$.SecretString"]}})
    return policy(rules[:99] + rules[100:] + [{"name": "fallback", "allow": {}}], masking={"detectors": ["all"]})


def test_a_100_rule_policy_decides_each_case_by_the_right_rule():
    """Correctness of the pre-indexed form on a large policy (speed is measured in bench/)."""
    pols = policies(hundred_rule_policy())
    assert len(pols.policies[0].rules) == 101
    cases = [(aws("GetObject", method="GET", resources=("res-10-x",)), "allow", "read-10"),
             (aws(real_operation("s3", "Delete", 0)), "block", "block-0"),
             (aws("CreateRole", "iam", "POST"), "allow", "fallback"),
             (http(host="a.svc3.example.com", path="/v3/x/y"), "allow", "path-3")]
    for action, effect, rule in cases:
        for _ in range(2):  # the second call is served from the bucket cache
            decision = evaluate(pols, action, AGENT, "aws")
            assert (decision.effect, decision.rule.rule) == (effect, rule), action.name


def test_an_unclassified_aws_operation_fails_closed():
    """Operation unknown ("s3:*"): restrictive rules naming the service apply; narrow allows don't."""
    pols = policies(policy([
        {"name": "no-delete", "match": {"aws": {"actions": ["s3:DeleteBucket"]}}, "block": {}},
        {"name": "reads", "match": {"aws": {"actions": ["s3:GetObject"]}}, "allow": {}},
        {"name": "iam-ask", "match": {"aws": {"actions": ["iam:Create*"]}},
         "requireApproval": {"approvers": {"groups": ["ops"]}}},
    ], defaultEffect="allow"))
    assert evaluate(pols, aws(operation="", service="s3"), AGENT, "aws").rule.rule == "no-delete"
    assert evaluate(pols, aws(operation="", service="iam"), AGENT, "aws").effect == "require_approval"
    assert evaluate(pols, aws(operation="GetObject", service="s3"), AGENT, "aws").rule.rule == "reads"
    unknown_sqs = evaluate(pols, aws(operation="", service="sqs"), AGENT, "aws")
    assert (unknown_sqs.effect, unknown_sqs.rule) == ("allow", None)  # no rule names sqs: default


def test_a_batch_mixing_models_is_allowed_only_when_every_model_is():
    pols = policies(policy([
        {"name": "sonnet-only", "match": {"anthropic": {"models": ["claude-sonnet-*"]}}, "allow": {}},
    ]))
    mixed = AnthropicAction(models=("claude-sonnet-4-5", "claude-opus-4-1"))
    batch = Action("anthropic", "POST", "https", "api.anthropic.com", 443, "/v1/messages/batches",
                   name="anthropic:messages.batches", anthropic=mixed)
    assert evaluate(pols, batch, AGENT, "anthropic").effect == "block"  # deny-by-default
    sonnet = Action("anthropic", "POST", "https", "api.anthropic.com", 443, "/v1/messages/batches",
                    name="anthropic:messages.batches",
                    anthropic=AnthropicAction(models=("claude-sonnet-4-5", "claude-sonnet-4-6")))
    assert evaluate(pols, sonnet, AGENT, "anthropic").rule.rule == "sonnet-only"
