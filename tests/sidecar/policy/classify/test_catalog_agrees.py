"""Rules and classification use the same AWS names: what the classifier makes of a real
botocore-signed request is accepted by the policy catalog, and a rule naming it matches it.

This is what keeps the admission check (policy/aws_catalog.py) from refusing names that
requests really carry, or admitting names they never carry."""

from __future__ import annotations

import pytest

from chaperone_sidecar.policy.aws_catalog import action_error
from chaperone_sidecar.policy.classify import classify
from chaperone_sidecar.policy.compiler import compile_policy
from chaperone_sidecar.policy.evaluator import evaluate
from chaperone_sidecar.policy.matching import CompiledPolicySet
from chaperone_sidecar.policy.model import Identity

CALLS = [
    ("s3", "delete_bucket", {"Bucket": "b"}),
    ("s3", "list_objects_v2", {"Bucket": "b"}),
    ("iam", "create_role", {"RoleName": "r", "AssumeRolePolicyDocument": "{}"}),
    ("cloudwatch", "put_metric_data", {"Namespace": "n", "MetricData": [{"MetricName": "m", "Value": 1.0}]}),
    ("stepfunctions", "start_execution", {"stateMachineArn": "arn:aws:states:us-east-1:1:stateMachine:s"}),
    ("sqs", "send_message", {"QueueUrl": "https://sqs.us-east-1.amazonaws.com/1/q", "MessageBody": "x"}),
    ("lambda", "invoke", {"FunctionName": "f"}),
    ("dynamodb", "put_item", {"TableName": "t", "Item": {"k": {"S": "v"}}}),
    ("sts", "get_caller_identity", {}),
    ("secretsmanager", "get_secret_value", {"SecretId": "s"}),
]


@pytest.mark.parametrize("service, operation, params", CALLS, ids=[f"{s}.{o}" for s, o, _ in CALLS])
def test_the_classified_name_is_a_valid_rule_that_blocks_the_call(aws_request, service, operation, params):
    action = classify(aws_request(service, operation, **params), "aws")
    assert action.aws is not None and action.aws.operation, action.errors
    assert action_error(action.name) is None, action.name
    rule_policy = compile_policy({
        "apiVersion": "chaperone.dev/v1alpha1", "kind": "AccessPolicy",
        "metadata": {"name": "p", "namespace": "agents"},
        "spec": {"defaultEffect": "allow",
                 "rules": [{"name": "no", "block": {}, "match": {"aws": {"actions": [action.name]}}}]}})
    decision = evaluate(CompiledPolicySet([rule_policy]), action,
                        Identity(service_account="agents/claude"), "aws")
    assert (decision.effect, decision.rule.rule) == ("block", "no")
