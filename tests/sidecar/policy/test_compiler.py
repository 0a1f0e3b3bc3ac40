"""AccessPolicy compiler: one error per problem with its field path, defaults, compiled form."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

from chaperone_sidecar.policy.compiler import PolicyErrors, compile_policies, compile_policy, validate_policy
from chaperone_sidecar.policy.errors import PolicyError
from chaperone_sidecar.policy.matching import CompiledPolicySet
from chaperone_sidecar.policy.model import ApprovalRequirement, Approvers, MaskSpec, RateLimit, RuleRef

REPO = Path(__file__).resolve().parents[3]
CRD = REPO / "crds" / "accesspolicies.chaperone.dev.yaml"


def policy(rules=None, name="p", namespace="team-a", **spec):
    return {"apiVersion": "chaperone.dev/v1alpha1", "kind": "AccessPolicy",
            "metadata": {"name": name, "namespace": namespace},
            "spec": {"rules": rules if rules is not None else [{"name": "r", "allow": {}}], **spec}}


def rule(name="r", **fields):
    return {"name": name, **fields}


def errors_of(obj) -> list[str]:
    with pytest.raises(PolicyErrors) as info:
        compile_policy(obj)
    return [str(e) for e in info.value.errors]


_KNOWN_DETECTORS = ("aws-access-key-id, aws-secret-key, private-key, jwt, bearer-token, secret-json-key, "
                    "email, credit-card, us-ssn, all")

# Each invalid policy produces exactly these errors (path: reason), in this order.
INVALID = [
    ("bad pathRegex",
     policy([rule("a", allow={}), rule("b", allow={}), rule("c", match={"pathRegex": "abc[d"}, allow={})]),
     ["spec.rules[2].match.pathRegex: invalid regular expression: unterminated character set at position 3"]),
    ("bad bodyRegex", policy([rule(match={"bodyRegex": "(?P<x"}, block={})]),
     ["spec.rules[0].match.bodyRegex: invalid regular expression: missing >, unterminated name at position 4"]),
    ("relative path glob", policy([rule(match={"paths": ["/ok", "repos/*"]}, allow={})]),
     ['spec.rules[0].match.paths[1]: invalid path glob "repos/*": must start with "/"']),
    ("host with port", policy([rule(match={"hosts": ["api.github.com:443"]}, allow={})]),
     ['spec.rules[0].match.hosts[0]: invalid host glob "api.github.com:443": give the host name only, without a port']),
    ("two effects", policy([rule(allow={}, block={})]),
     ["spec.rules[0]: a rule needs exactly one effect (allow, block, requireApproval, mask or rateLimit), got allow, block"]),
    ("no effect", policy([rule()]),
     ["spec.rules[0]: a rule needs exactly one effect (allow, block, requireApproval, mask or rateLimit), got none"]),
    ("null effect", policy([rule(allow=None)]),
     ['spec.rules[0]: a rule needs exactly one effect (allow, block, requireApproval, mask or rateLimit), got none '
      '("allow:" without a value is null; write "allow: {}")']),
    ("approval without approvers", policy([rule(requireApproval={})]),
     ["spec.rules[0].requireApproval.approvers: required: name users or groups here or in spec.approvers"]),
    ("rule approvers empty", policy([rule(requireApproval={"approvers": {}})], approvers={"groups": ["g"]}),
     ["spec.rules[0].requireApproval.approvers: must name at least one user or group"]),
    ("minApprovals above named users",
     policy([rule(requireApproval={"minApprovals": 3, "approvers": {"users": ["alice", "bob", "bob"]}})]),
     ["spec.rules[0].requireApproval.minApprovals: needs 3 distinct approvals but only 2 users are named "
      "(alice, bob) and no groups"]),
    ("minApprovals above the policy's users",
     policy([rule(requireApproval={"minApprovals": 2})], approvers={"users": ["alice"]}),
     ["spec.rules[0].requireApproval.minApprovals: needs 2 distinct approvals but only 1 user is named "
      "(alice) and no groups"]),
    ("hold longer than the request lives",
     policy([rule(requireApproval={"timeoutSeconds": 60, "holdSeconds": 120})], approvers={"groups": ["g"]}),
     ["spec.rules[0].requireApproval.holdSeconds: must not exceed timeoutSeconds (60): the ApprovalRequest "
      "would expire while the request is held"]),
    ("unknown detector", policy([rule(mask={"detectors": ["jwt", "passwords"]})]),
     [f"spec.rules[0].mask.detectors[1]: unknown detector 'passwords' (known: {_KNOWN_DETECTORS})"]),
    ("bad JSON path", policy([rule(mask={"fields": ["$.SecretString", "$.a["]})]),
     ["spec.rules[0].mask.fields[1]: JSON path '$.a[': unclosed '[' at position 3"]),
    ("mask that masks nothing", policy([rule(mask={"target": "both"})]),
     ["spec.rules[0].mask: masks nothing: set detectors, fields or kubernetesSecrets"]),
    ("empty mask", policy([rule(mask={})]), ["spec.rules[0].mask: must not be empty"]),
    ("rate limit of zero", policy([rule(rateLimit={"requests": 0, "periodSeconds": 60})]),
     ["spec.rules[0].rateLimit.requests: must be greater than or equal to 1, got 0"]),
    ("rate limit that limits nothing", policy([rule(rateLimit={"requests": 10**7, "periodSeconds": 60})]),
     ["spec.rules[0].rateLimit.requests: must be at most 1000000 per window; a larger number limits nothing"]),
    ("rate limit without period", policy([rule(rateLimit={"requests": 5})]),
     ["spec.rules[0].rateLimit.periodSeconds: required field is missing"]),
    ("unknown match field", policy([rule(match={"path": ["/x"]}, allow={})]),
     ["spec.rules[0].match.path: unknown field"]),
    ("unknown spec field", policy(defaultAction="allow"), ["spec.defaultAction: unknown field"]),
    ("duplicate rule names", policy([rule("a", allow={}), rule("b", allow={}), rule("a", block={})]),
     ['spec.rules[2].name: duplicate rule name "a" (also spec.rules[0])']),
    ("wrong kind", {**policy(), "kind": "ClaudeConnection"}, ['kind: must be "AccessPolicy", got "ClaudeConnection"']),
    ("wrong apiVersion", {**policy(), "apiVersion": "chaperone.dev/v1"},
     ['apiVersion: must be "chaperone.dev/v1alpha1", got "chaperone.dev/v1"']),
    ("unsupported defaultEffect", policy(defaultEffect="deny"),
     ['spec.defaultEffect: unsupported value "deny": supported values: "allow", "block"']),
    ("no rules", policy([]), ["spec.rules: must have at least 1 item"]),
    ("bad rule name", policy([rule("Allow_All", allow={})]),
     ['spec.rules[0].name: invalid value "Allow_All": must match the regular expression ^[a-z0-9]([-a-z0-9]*[a-z0-9])?$']),
    ("scalar for a list", policy([rule(match={"methods": "GET"}, allow={})]),
     ["spec.rules[0].match.methods: must be of type array, got string"]),
    ("exec as a verb", policy([rule(match={"kubernetes": {"verbs": ["get", "exec"]}}, block={})]),
     ['spec.rules[0].match.kubernetes.verbs[1]: unknown verb "exec"; exec is a subresource, match it with '
      'resources: ["pods/exec"]']),
    ("two connection types in one rule",
     policy([rule(match={"aws": {"actions": ["s3:*"]}, "kubernetes": {"verbs": ["get"]}}, block={})]),
     ["spec.rules[0].match: conditions for aws and kubernetes can never hold together: a request has one "
      "connection type; split them into separate rules"]),
    ("subject with two fields", policy(subjects=[{"user": "a", "group": "b"}]),
     ["spec.subjects[0]: must set exactly one of serviceAccount, user, group, got user, group"]),
    ("bad service account", policy(subjects=[{"serviceAccount": "a/b/c"}]),
     ['spec.subjects[0].serviceAccount: invalid service account "a/b/c": use "namespace/name" or "name"']),
    ("missing name", {**policy(), "metadata": {"namespace": "x"}}, ["metadata.name: required field is missing"]),
    ("float for an integer", policy([rule(rateLimit={"requests": 1.5, "periodSeconds": 60})]),
     ["spec.rules[0].rateLimit.requests: must be of type integer, got number"]),
    ("grant too long", policy(grant={"ttlSeconds": 100000}),
     ["spec.grant.ttlSeconds: must be less than or equal to 86400, got 100000"]),
    ("not a mapping", ["x"], ["an AccessPolicy must be a mapping, got list"]),
]


@pytest.mark.parametrize("obj,expected", [c[1:] for c in INVALID], ids=[c[0] for c in INVALID])
def test_invalid_policies(obj, expected):
    assert errors_of(obj) == expected


def test_every_problem_is_reported_once_in_path_order():
    obj = policy([
        rule("a", match={"pathRegex": "[", "hosts": ["a:1"]}, allow={}, block={}),
        rule("a", requireApproval={"minApprovals": 11}),
    ] + [rule(f"r{i}", allow={}) for i in range(9)] + [rule("z", match={"paths": ["x"]}, allow={})],
        defaultEffect="maybe", extra=1)
    obj["kind"] = "Policy"
    assert errors_of(obj) == [
        'kind: must be "AccessPolicy", got "Policy"',
        'spec.defaultEffect: unsupported value "maybe": supported values: "allow", "block"',
        "spec.extra: unknown field",
        "spec.rules[0]: a rule needs exactly one effect (allow, block, requireApproval, mask or rateLimit), got allow, block",
        'spec.rules[0].match.hosts[0]: invalid host glob "a:1": give the host name only, without a port',
        "spec.rules[0].match.pathRegex: invalid regular expression: unterminated character set at position 0",
        'spec.rules[1].name: duplicate rule name "a" (also spec.rules[0])',
        "spec.rules[1].requireApproval.approvers: required: name users or groups here or in spec.approvers",
        "spec.rules[1].requireApproval.minApprovals: must be less than or equal to 10, got 11",
        'spec.rules[11].match.paths[0]: invalid path glob "x": must start with "/"',  # after [2], not before
    ]


def test_policy_error_format_and_label():
    with pytest.raises(PolicyErrors) as info:
        compile_policy(policy([rule(match={"pathRegex": "("}, allow={})], name="web", namespace="ns"))
    exc = info.value
    assert exc.policy == "ns/web"
    assert len(exc) == 1 and list(exc) == list(exc.errors)
    assert exc.errors[0] == PolicyError("spec.rules[0].match.pathRegex",
                                        "invalid regular expression: missing ), unterminated subpattern at position 0")
    assert str(exc) == "spec.rules[0].match.pathRegex: invalid regular expression: missing ), unterminated subpattern at position 0"


def test_defaults_are_filled_as_the_crd_declares():
    out, errors = validate_policy(policy(
        [rule("ask", requireApproval={"grant": {}}), rule("m", mask={"fields": ["$.a"]}),
         rule("rl", rateLimit={"requests": 5, "periodSeconds": 60})],
        approvers={"groups": ["ops"]}, masking={"detectors": ["jwt"]}, grant={}))
    assert errors == []
    spec = out["spec"]
    assert spec["defaultEffect"] == "block"
    assert spec["grant"] == {"ttlSeconds": 900, "scope": "exact"}
    assert spec["masking"] == {"detectors": ["jwt"], "target": "response", "maxBodyBytes": 67108864}
    assert spec["rules"][0]["requireApproval"] == {
        "minApprovals": 1, "timeoutSeconds": 300, "mode": "hold", "holdSeconds": 120,
        "rememberOutcomeSeconds": 3600,
        "grant": {"ttlSeconds": 900, "scope": "exact"}}
    assert spec["rules"][1]["mask"] == {"fields": ["$.a"], "target": "response"}
    assert spec["rules"][2]["rateLimit"]["per"] == "identity"
    assert "connections" not in spec and "subjects" not in spec  # no default: absent stays absent


def test_compiled_form():
    compiled = compile_policy(policy([
        rule("no-delete", description="never", match={"aws": {"actions": ["s3:DeleteBucket", "s3:DeleteObject"]}}, block={}),
        rule("reads", match={"methods": ["GET", "HEAD"], "aws": {"actions": ["s3:Get*"]}}, allow={}),
        rule("ask", requireApproval={"mode": "defer", "grant": {"scope": "action"}}),
        rule("mask", match={"hosts": ["*.amazonaws.com"]}, mask={"detectors": ["all"], "target": "both"}),
        rule("slow", rateLimit={"requests": 10, "periodSeconds": 60, "per": "pod"}),
    ], approvers={"users": ["alice"], "groups": ["ops"]}, grant={"ttlSeconds": 60},
        masking={"fields": ["$.SecretString"], "maxBodyBytes": 2048}))
    assert compiled.key == "team-a/p" and compiled.default_effect == "block"
    no_delete, reads, ask, mask, slow = compiled.rules
    assert no_delete.ref == RuleRef("team-a/p", "no-delete") and no_delete.effect == "block"
    assert no_delete.message == "never"  # description stands in for block.message
    assert no_delete.connection_type == "aws" and no_delete.actions.patterns == ("s3:DeleteBucket", "s3:DeleteObject")
    assert no_delete.tests == ()  # type, method, action and host are decided per bucket, not per request
    assert reads.methods == {"GET", "HEAD"} and reads.actions.match("s3:getobject") and reads.tests == ()
    assert mask.hosts.patterns == ("*.amazonaws.com",) and mask.connection_type is None
    # the rule's grant replaces the policy's whole (ttl from the CRD default, not the policy)
    assert ask.approval == ApprovalRequirement(Approvers(("alice",), ("ops",)), mode="defer",
                                               grant_ttl_seconds=900, grant_scope="action")
    assert mask.mask == MaskSpec(("all",), (), "both", 2048, RuleRef("team-a/p", "mask"))
    assert slow.rate_limit == RateLimit(10, 60, "pod", RuleRef("team-a/p", "slow"))
    assert compiled.masking == MaskSpec((), ("$.SecretString",), "response", 2048, None)


def test_namespace_defaults_for_local_files():
    obj = policy()
    del obj["metadata"]["namespace"]
    assert compile_policy(obj).key == "default/p"
    assert compile_policy(obj, default_namespace="dev").key == "dev/p"


def test_compile_policies_keeps_the_valid_and_reports_the_rest():
    good, other = policy(name="a"), policy(name="b")
    bad = policy([rule(match={"pathRegex": "["}, allow={})], name="c")
    nameless = {**policy(), "metadata": {}}
    result = compile_policies([other, bad, good, copy.deepcopy(good), nameless])
    assert not result.ok
    assert isinstance(result.policies, CompiledPolicySet)
    assert [p.key for p in result.policies] == ["team-a/a", "team-a/b"]  # sorted by key
    assert [(e.policy, [str(x) for x in e]) for e in result.errors] == [
        ("team-a/c", ["spec.rules[0].match.pathRegex: invalid regular expression: unterminated character set at position 0"]),
        ("team-a/a", ['metadata.name: duplicate AccessPolicy "team-a/a"']),
        ("objs[4]", ["metadata.name: required field is missing"]),
    ]
    assert compile_policies([good]).ok


def test_kubectl_output_with_status_is_accepted():
    obj = policy()
    obj["metadata"].update(uid="1", resourceVersion="5", managedFields=[{"x": 1}])
    obj["status"] = {"ruleCount": 1, "conditions": [{"type": "Valid", "status": "True"}]}
    assert compile_policy(obj).key == "team-a/p"


def test_example_policy_compiles():
    docs = list(yaml.safe_load_all((REPO / "examples" / "policy-tests" / "policy.yaml").read_text()))
    assert [compile_policy(d).key for d in docs] == ["team-a/aws-basics"]


def test_user_and_group_names_may_contain_spaces():
    assert compile_policy(policy(subjects=[{"group": "Platform Team"}, {"user": "Jane Doe"}]))
    assert errors_of(policy(subjects=[{"group": ""}])) == ["spec.subjects[0].group: must not be empty"]


# ---------------------------------------------------------------------------- the CRD's CEL rule

def test_cel_rule_of_the_crd_is_what_the_compiler_checks():
    crd = yaml.safe_load(CRD.read_text())
    rules_schema = crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"]["properties"]["rules"]
    validations = rules_schema["items"]["x-kubernetes-validations"]
    assert len(validations) == 1 and "exactly one effect" in validations[0]["message"]
    assert all(f"has(self.{e})" in validations[0]["rule"] for e in ("allow", "block", "requireApproval", "mask", "rateLimit"))


# ---------------------------------------------------------------------------- totality

_json = st.recursive(
    st.none() | st.booleans() | st.integers(-5, 10**7) | st.floats(allow_nan=False) | st.text(max_size=8)
    | st.sampled_from(["allow", "block", "GET", "/x", "[", "$.a", "s3:*", "jwt", "hold", "*"]),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(
        st.sampled_from(["name", "match", "allow", "block", "requireApproval", "mask", "rateLimit", "paths",
                         "hosts", "pathRegex", "aws", "actions", "approvers", "users", "groups", "minApprovals",
                         "fields", "detectors", "requests", "periodSeconds", "subjects", "user", "x"]),
        inner, max_size=4),
    max_leaves=12)


@settings(max_examples=300, deadline=None)
@given(rules=st.lists(_json, max_size=3), extra=st.dictionaries(
    st.sampled_from(["connections", "subjects", "defaultEffect", "approvers", "grant", "masking", "junk"]), _json, max_size=3))
def test_any_input_yields_a_policy_or_policy_errors(rules, extra):
    obj = policy(rules, **extra)
    try:
        compile_policy(obj)
    except PolicyErrors as exc:
        assert exc.errors and all(isinstance(e, PolicyError) and e.reason for e in exc.errors)
