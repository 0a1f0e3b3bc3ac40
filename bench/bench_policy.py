"""Benchmark the policy engine's per-flow path: classify + evaluate against a 100-rule policy.

A plain script (not a test): ``PYTHONPATH=sidecar python bench/bench_policy.py``. Uses the real
classifier and ``timeit``; prints microseconds per call (best of several repeats, which is the
least noisy estimate of the cost itself) for classification, evaluation and both together.
The target from the design: evaluation of a 100-rule policy well under 50 µs.
"""

from __future__ import annotations

import sys
import timeit
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "sidecar"))

from chaperone_sidecar.policy.aws_catalog import action_error, operations  # noqa: E402
from chaperone_sidecar.policy.classify import classify  # noqa: E402
from chaperone_sidecar.policy.compiler import compile_policies  # noqa: E402
from chaperone_sidecar.policy.evaluator import evaluate  # noqa: E402
from chaperone_sidecar.policy.model import HTTPRequest, Identity  # noqa: E402

NUMBER, REPEAT = 2000, 7
SERVICES = ["s3", "ec2", "iam", "lambda", "dynamodb", "sqs", "sns", "kms", "rds", "sts"]


def real_operation(service: str, prefix: str, i: int) -> str:
    """The i-th real operation of ``service`` starting with ``prefix``: the compiler refuses
    action names no AWS call has (policy.aws_catalog), so synthetic rules use real ones."""
    ops = sorted(o for o in operations(service) if o.startswith(prefix)) or sorted(operations(service))
    return ops[i % len(ops)]


def read_patterns(service: str) -> list[str]:
    """``service:Get*`` and ``service:List*``, where the service has such operations."""
    return [p for p in (f"{service}:Get*", f"{service}:List*") if action_error(p) is None]


def hundred_rule_policy() -> dict:
    """100 rules of the usual shapes: literal and wildcard AWS actions, methods, hosts, paths."""
    rules = []
    for i in range(99):
        service = SERVICES[i % len(SERVICES)]
        shape = i % 4
        if shape == 0:
            rules.append({"name": f"block-{i}", "match": {"aws": {"actions": [f"{service}:{real_operation(service, 'Delete', i // 10)}"]}}, "block": {}})
        elif shape == 1:
            rules.append({"name": f"ask-{i}", "match": {"aws": {"actions": [f"{service}:{real_operation(service, 'Create', i // 10)}*"]}},
                          "requireApproval": {"approvers": {"groups": ["ops"]}}})
        elif shape == 2:
            rules.append({"name": f"read-{i}", "match": {"methods": ["GET"], "aws": {
                "actions": read_patterns(service), "resources": [f"res-{i}-*"]}}, "allow": {}})
        else:
            rules.append({"name": f"path-{i}", "match": {"hosts": [f"*.svc{i}.example.com"],
                                                          "paths": [f"/v{i}/**"], "pathRegex": "token="}, "block": {}})
    rules[0] = {"name": "no-bucket-deletion", "match": {"aws": {"actions": ["s3:DeleteBucket"]}}, "block": {}}
    rules[1] = {"name": "mask-secrets", "match": {"aws": {"actions": ["secretsmanager:GetSecretValue"]}},
                "mask": {"fields": ["$.SecretString"]}}
    rules[2] = {"name": "roles", "match": {"aws": {"actions": ["iam:CreateRole"]}},
                "requireApproval": {"approvers": {"groups": ["platform-approvers"]}}}
    rules.append({"name": "allow-the-rest", "allow": {}})
    return {"apiVersion": "chaperone.dev/v1alpha1", "kind": "AccessPolicy",
            "metadata": {"name": "bench", "namespace": "team-a"},
            "spec": {"connections": ["aws-*"], "subjects": [{"serviceAccount": "claude"}],
                     "masking": {"detectors": ["all"]}, "rules": rules}}


def signed(method: str, host: str, path: str, service: str, query: str = "", body: bytes = b"",
           extra: tuple = ()) -> HTTPRequest:
    auth = (f"AWS4-HMAC-SHA256 Credential=AKIDEXAMPLE/20250101/us-east-1/{service}/aws4_request, "
            "SignedHeaders=host;x-amz-date, Signature=0")
    return HTTPRequest(method, "https", host, 443, path, query,
                       (("Host", host), ("Authorization", auth), ("X-Amz-Date", "20250101T000000Z")) + extra, body)


REQUESTS = {
    "s3 GetObject (allowed)": signed("GET", "reports.s3.us-east-1.amazonaws.com", "/2024/q1.csv", "s3"),
    "s3 DeleteBucket (blocked)": signed("DELETE", "reports.s3.us-east-1.amazonaws.com", "/", "s3"),
    "iam CreateRole (approval)": signed(
        "POST", "iam.amazonaws.com", "/", "iam",
        body=b"Action=CreateRole&Version=2010-05-08&RoleName=r&AssumeRolePolicyDocument=%7B%7D",
        extra=(("Content-Type", "application/x-www-form-urlencoded"),)),
    "secretsmanager GetSecretValue (masked)": signed(
        "POST", "secretsmanager.us-east-1.amazonaws.com", "/", "secretsmanager", body=b'{"SecretId":"prod/db"}',
        extra=(("X-Amz-Target", "secretsmanager.GetSecretValue"), ("Content-Type", "application/x-amz-json-1.1"))),
}


def per_call(fn) -> float:
    return min(timeit.repeat(fn, number=NUMBER, repeat=REPEAT)) / NUMBER * 1e6


def main() -> int:
    result = compile_policies([hundred_rule_policy()])
    assert result.ok, result.errors
    policies = result.policies
    identity = Identity(service_account="team-a/claude", pod_namespace="team-a", creator="alice")
    print(f"policy: {len(policies.policies[0].rules)} rules; {NUMBER} calls x {REPEAT} repeats, best repeat")
    print(f"{'request':42} {'decision':18} {'classify':>10} {'evaluate':>10} {'both':>10}")
    worst = 0.0
    for label, request in REQUESTS.items():
        action = classify(request, "aws")
        decision = evaluate(policies, action, identity, "aws-prod", request.body)  # warms the buckets
        t_classify = per_call(lambda: classify(request, "aws"))
        t_evaluate = per_call(lambda: evaluate(policies, action, identity, "aws-prod", request.body))
        t_both = per_call(lambda: evaluate(policies, classify(request, "aws"), identity, "aws-prod", request.body))
        worst = max(worst, t_evaluate)
        print(f"{label:42} {decision.effect:18} {t_classify:8.1f}µs {t_evaluate:8.1f}µs {t_both:8.1f}µs")
    t_explain = per_call(lambda: evaluate(policies, action, identity, "aws-prod", request.body, explain=True))
    print(f"evaluate with explain=True (last request): {t_explain:.1f}µs (debugging path, not per flow)")
    print(f"worst evaluate: {worst:.1f}µs (target: well under 50µs)")
    return 0 if worst < 50 else 1


if __name__ == "__main__":
    sys.exit(main())
