"""Policy names that can never match are refused: AWS actions (botocore's models), HTTP methods,
tool names. Unit level: the catalog, the compiler's messages, and ``chaperone policy test`` as a
real subprocess (the same words the admission webhook returns; tests/operator has that side)."""

from __future__ import annotations

import subprocess
import sys
import time

import pytest

from chaperone_sidecar.policy import aws_catalog
from chaperone_sidecar.policy.aws_catalog import IAM_ONLY, action_error, operations, services
from chaperone_sidecar.policy.compiler import validate_policy
from chaperone_sidecar.policy.vocabulary import HTTP_METHODS, unknown_names


def policy(match: dict, effect: str = "block") -> dict:
    return {"apiVersion": "chaperone.dev/v1alpha1", "kind": "AccessPolicy",
            "metadata": {"name": "p", "namespace": "agents"},
            "spec": {"rules": [{"name": "ok", "allow": {}, "match": {"methods": ["GET"]}},
                               {"name": "r", effect: {}, "match": match}]}}


def errors(match: dict) -> list[str]:
    return [str(e) for e in validate_policy(policy(match))[1]]


# ---------------------------------------------------------------------------- AWS actions

def test_the_issue_typos_are_refused_with_the_field_path_and_the_nearest_name():
    assert errors({"aws": {"actions": ["s3:GetObject", "s3:DeleteBuckett"]}}) == [
        'spec.rules[1].match.aws.actions[1]: unknown AWS action "s3:DeleteBuckett": s3 has no '
        'operation "DeleteBuckett"; did you mean s3:DeleteBucket?']
    assert errors({"aws": {"actions": ["s4:GetObject"]}}) == [
        'spec.rules[1].match.aws.actions[0]: unknown AWS action "s4:GetObject": no AWS service is '
        'signed as "s4"; did you mean s3:GetObject?']


@pytest.mark.parametrize("pattern", [
    "s3:DeleteBucket", "s3:deletebucket", "s3:DELETEBUCKET",  # case-insensitive, as IAM
    "s3:Get*", "s3:*", "iam:Create*", "iam:?reateRole", "*:DeleteBucket", "s3*:Get*",
    "monitoring:PutMetricData", "states:StartExecution", "rds:DescribeDBClusters",
    "rds:CreateDBCluster",        # rds, docdb and neptune share the signing name
    "s3:CreateAccessPoint",       # s3control is signed "s3" too
    "s3express:CreateSession", "execute-api:Invoke", "lambda:InvokeFunctionUrl",
    "execute-api:PostToConnection", "bedrock:InvokeModel", "sts:GetCallerIdentity",
])
def test_names_the_classifier_can_produce_are_accepted(pattern):
    assert action_error(pattern) is None


@pytest.mark.parametrize("pattern, fragment", [
    ("s3:Gte*", 'no s3 operation matches "Gte*"'),
    ("*:NoSuchOperation*", "no operation of a matching service matches"),
    ("zz*:Get*", 'no AWS service matches "zz*"'),
    ("ec2:RunInstance", "did you mean ec2:RunInstances?"),
    ("dynamodb:PutItems", "did you mean dynamodb:PutItem?"),
    ("ecs2:RunInstances", "did you mean ec2:RunInstances?"),
    ("cloudwatch:PutMetricData", 'cloudwatch requests are signed as "monitoring"'
                                 " and Chaperone names services that way: write "
                                 "monitoring:PutMetricData"),
    ("s3:ListBucket", "IAM permission name, not an API operation, so this rule would never "
                      "match; Chaperone matches the operations it covers: s3:ListObjects, "
                      "s3:ListObjectsV2"),
    ("lambda:InvokeFunction", "lambda:Invoke, lambda:InvokeAsync"),
    ("iam:PassRole", "IAM permission that no request names"),
    ("iam:passrole", "IAM permission that no request names"),
])
def test_names_that_never_match_are_refused_with_a_hint(pattern, fragment):
    why = action_error(pattern)
    assert why is not None and fragment in why, why


def test_iam_only_names_are_really_not_operations_and_their_replacements_are():
    """The allowlist must stay true as botocore updates: each key is no operation, each
    replacement is one."""
    for iam_name, instead in IAM_ONLY.items():
        service, _, op = iam_name.partition(":")
        assert op not in {o.lower() for o in operations(service)}, iam_name
        for name in instead:
            assert action_error(name) is None, name


def test_every_signing_name_has_operations_and_the_index_is_the_classifiers():
    from chaperone_sidecar.policy.classify import aws_models

    signing = {m.signing_name.lower() for m in aws_models.index().values()}
    assert signing <= set(services())
    assert {"s3", "iam", "sts", "monitoring", "execute-api", "s3express"} <= set(services())
    assert "DeleteBucket" in operations("s3") and "CreateAccessPoint" in operations("s3")
    assert operations("no-such-service") == ()


def test_operation_names_are_read_once_and_cached():
    aws_catalog._operations.pop("sqs", None)
    started = time.perf_counter()
    first = operations("sqs")
    cold = time.perf_counter() - started
    started = time.perf_counter()
    assert operations("sqs") is first  # the cached tuple itself, no second read
    warm = time.perf_counter() - started
    assert "SendMessage" in first and warm < cold


# ---------------------------------------------------------------------------- methods, tools

def test_unknown_http_methods_are_refused_and_known_ones_accepted():
    assert errors({"methods": ["DELET"]}) == [
        'spec.rules[1].match.methods[0]: unknown HTTP method "DELET"; did you mean DELETE?']
    assert errors({"methods": ["GET", "PATCH", "PROPFIND", "QUERY", "CONNECT"]}) == []
    assert {"GET", "HEAD", "POST", "PUT", "DELETE", "OPTIONS", "TRACE", "PATCH"} <= HTTP_METHODS


def test_tool_names_outside_the_tool_alphabet_are_refused():
    assert errors({"anthropic": {"tools": ["Bash", "mcp__github__*", "str_replace_based_edit_tool",
                                           "server.tool-1", "Web?etch"]}}) == []
    got = errors({"anthropic": {"tools": ["Bash(git:*)"]}})
    assert len(got) == 1 and got[0].startswith(
        'spec.rules[1].match.anthropic.tools[0]: "Bash(git:*)" can never match a tool name')
    assert 'match the tool, e.g. "Bash", and its input with bodyRegex' in got[0]
    assert list(unknown_names({"anthropic": {"tools": ["a b"]}}, "m"))[0][0] == "m.anthropic.tools[0]"


def test_every_problem_of_a_rule_is_reported_in_field_order():
    got = errors({"methods": ["GETT"], "aws": {"actions": ["s3:DeleteBuckett", "iam:CreateRole",
                                                           "s4:GetObject"]}})
    assert [e.split(":", 1)[0] for e in got] == [
        "spec.rules[1].match.aws.actions[0]", "spec.rules[1].match.aws.actions[2]",
        "spec.rules[1].match.methods[0]"]


# ---------------------------------------------------------------------------- the CLI

ISSUE_POLICY = """\
apiVersion: chaperone.dev/v1alpha1
kind: AccessPolicy
metadata: {name: typo, namespace: agents}
spec:
  defaultEffect: allow
  rules:
    - name: keep-buckets
      block: {}
      match:
        aws:
          actions: ["s3:DeleteBuckett"]
    - name: s4
      block: {}
      match:
        aws:
          actions: ["s4:GetObject"]
"""


def test_chaperone_policy_test_reports_the_same_errors(tmp_path, repo_root):
    path = tmp_path / "typo.yaml"
    path.write_text(ISSUE_POLICY)
    res = subprocess.run([sys.executable, "-m", "chaperone_sidecar.cli", "policy", "test",
                          "-f", str(path), "--connection", "aws", "--type", "aws",
                          "--url", "https://s3.amazonaws.com/b"],
                         capture_output=True, text=True, cwd=repo_root, timeout=120)
    assert res.returncode == 2, res.stderr
    prefix = f"  {path}: AccessPolicy agents/typo: "
    assert prefix + ('spec.rules[0].match.aws.actions[0]: unknown AWS action "s3:DeleteBuckett": '
                     's3 has no operation "DeleteBuckett"; did you mean s3:DeleteBucket?') \
        in res.stderr.splitlines()
    assert prefix + ('spec.rules[1].match.aws.actions[0]: unknown AWS action "s4:GetObject": '
                     'no AWS service is signed as "s4"; did you mean s3:GetObject?') \
        in res.stderr.splitlines()
