"""Policy typos must not fail open: the REAL apiserver, through the operator's validating
webhook, refuses a misspelled AWS action or service with the field path and the nearest valid
name, as `kubectl apply` shows it, and stores nothing."""

from __future__ import annotations

import pytest

pytestmark = pytest.mark.controlplane

TYPO_POLICY = """\
apiVersion: chaperone.dev/v1alpha1
kind: AccessPolicy
metadata:
  name: no-bucket-deletion
  namespace: {ns}
spec:
  defaultEffect: allow
  rules:
    - name: keep-buckets
      block: {{}}
      match:
        aws:
          actions: ["s3:DeleteBuckett"]
    - name: other-service
      block: {{}}
      match:
        aws:
          actions: ["s4:GetObject", "s3:ListBucket"]
        methods: ["DELET"]
"""


def test_misspelled_actions_are_refused_at_admission(running_operator):
    op, cp = running_operator, running_operator.cp
    ns = op.namespace("typos")
    res = cp.kubectl("apply", "-f", "-", input=TYPO_POLICY.format(ns=ns), check=False)
    assert res.returncode != 0, res.stdout
    assert f"AccessPolicy {ns}/no-bucket-deletion is invalid" in res.stderr, res.stderr
    for line in (
        'spec.rules[0].match.aws.actions[0]: unknown AWS action "s3:DeleteBuckett": s3 has no '
        'operation "DeleteBuckett"; did you mean s3:DeleteBucket?',
        'spec.rules[1].match.aws.actions[0]: unknown AWS action "s4:GetObject": no AWS service '
        'is signed as "s4"; did you mean s3:GetObject?',
        'spec.rules[1].match.aws.actions[1]: "s3:ListBucket" is an IAM permission name',
        'spec.rules[1].match.methods[0]: unknown HTTP method "DELET"; did you mean DELETE?',
    ):
        assert line in res.stderr, res.stderr
    gone = cp.kubectl("get", "accesspolicy", "no-bucket-deletion", "-n", ns, check=False)
    assert gone.returncode != 0 and "NotFound" in gone.stderr

    fixed = TYPO_POLICY.format(ns=ns).replace("DeleteBuckett", "DeleteBucket").replace(
        "s4:GetObject", "s3:GetObject").replace("s3:ListBucket", "s3:ListObjectsV2").replace(
        "DELET", "DELETE")
    cp.kubectl("apply", "-f", "-", input=fixed)
    status = op.wait_for(lambda: op.get("accesspolicy", "no-bucket-deletion", "-n", ns).get("status"),
                         what="AccessPolicy status")
    assert [(c["type"], c["status"]) for c in status["conditions"]] == [("Valid", "True")]
