"""The ``chaperone proxy`` config directories of the two benchmarked Chaperone profiles.

* **minimal** - "policy only": one ClaudeConnection for the upstream with ``recording.enabled:
  false`` and one AccessPolicy with a single allow-all rule, no masking.
* **full** - the same connection recorded (the defaults: truncated bodies, strict mode) and a
  50-rule policy of the usual shapes (path/host/method blocks, approvals, AWS actions, body
  regexes, field masks) with ``masking.detectors: [all]`` - so every response is scanned by
  every detector, which is what a team that turns masking on pays.

The policies are compiled with the sidecar's own compiler before they are written: a policy
that did not compile would be replaced by a synthetic block-all policy (fail closed) and the
benchmark would measure 403s.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from chaperone_sidecar.policy.compiler import compile_policy

__all__ = ["write_config", "policy", "CONNECTION", "FEATURES"]

FEATURES = ("recording", "masking", "telemetry")  # what the full profile adds to the minimal one

API = "chaperone.dev/v1alpha1"
CONNECTION = "bench-upstream"
# Services with Delete* operations: the compiler refuses patterns no AWS call can match.
SERVICES = ["s3", "ec2", "iam", "lambda", "dynamodb", "sqs", "sns", "kms", "rds", "logs"]


def _rules_full() -> list[dict]:
    """49 rules that the benchmark's GETs on 127.0.0.1 do not hit, then allow-the-rest."""
    rules: list[dict] = []
    for i in range(49):
        shape = i % 7
        if shape == 0:
            rules.append({"name": f"no-admin-{i}", "match": {"paths": [f"/admin/v{i}/**"]},
                          "block": {"message": "admin APIs are off limits"}})
        elif shape == 1:
            rules.append({"name": f"deletes-{i}", "match": {"methods": ["DELETE"], "hosts": [f"*.svc{i}.example.com"]},
                          "requireApproval": {"approvers": {"groups": ["platform-approvers"]}}})
        elif shape == 2:
            svc = SERVICES[i % len(SERVICES)]
            rules.append({"name": f"aws-{i}", "match": {"aws": {"actions": [f"{svc}:Delete*"]}}, "block": {}})
        elif shape == 3:
            rules.append({"name": f"reads-{i}", "match": {"methods": ["GET", "HEAD"], "hosts": [f"api{i}.example.com"]},
                          "allow": {}})
        elif shape == 4:
            rules.append({"name": f"tokens-in-query-{i}", "match": {"hosts": [f"*.int{i}.example.com"],
                                                                   "pathRegex": "(token|secret)="},
                          "block": {}})
        elif shape == 5:
            rules.append({"name": f"mask-fields-{i}", "match": {"paths": [f"/secrets{i}/**"]},
                          "mask": {"fields": ["$.data.*", "$.items[*].value"]}})
        else:
            rules.append({"name": f"writes-{i}", "match": {"methods": ["POST", "PUT", "PATCH"],
                                                          "paths": [f"/v{i}/deploy/**"]},
                          "requireApproval": {"approvers": {"users": ["alice"]}, "mode": "defer"}})
    rules.append({"name": "allow-the-rest", "allow": {}})
    return rules


def policy(profile: str, without: tuple[str, ...] = ()) -> dict:
    """The AccessPolicy of ``profile`` (compiled here to prove it is valid); ``without``
    ``masking`` drops the policy-wide detectors (the 50 rules stay)."""
    if profile == "minimal":
        spec: dict = {"connections": [CONNECTION], "rules": [{"name": "allow-all", "allow": {}}]}
    else:
        spec = {"connections": [CONNECTION], "rules": _rules_full()}
        if "masking" not in without:
            spec["masking"] = {"detectors": ["all"]}
    obj = {"apiVersion": API, "kind": "AccessPolicy", "metadata": {"name": f"bench-{profile}"}, "spec": spec}
    compile_policy(obj, "bench")  # raises PolicyErrors naming every problem
    return obj


def write_config(root: Path, profile: str, *, upstream_ca: Path, interception_ca_dir: Path,
                 without: tuple[str, ...] = ()) -> Path:
    """Create the config directory for ``profile`` under ``root`` (replacing an old one).

    ``without`` (full only; the ablation that attributes its cost): ``recording`` turns the
    connection's recording off, ``masking`` drops the policy's detectors. (``telemetry`` is
    the launcher's business: bench/chaperone_proc.py ``--without telemetry``.)
    """
    if root.exists():
        shutil.rmtree(root)
    (root / "connections").mkdir(parents=True)
    (root / "policies").mkdir()
    (root / "upstream-ca" / CONNECTION).mkdir(parents=True)
    shutil.copy(upstream_ca, root / "upstream-ca" / CONNECTION / "ca.crt")
    shutil.copytree(interception_ca_dir, root / "ca")
    (root / "chaperone.yaml").write_text("namespace: bench\nuser: bench\nlogLevel: info\n")
    recording = {"enabled": profile == "full" and "recording" not in without}
    conn = {"apiVersion": API, "kind": "ClaudeConnection", "metadata": {"name": CONNECTION},
            "spec": {"type": "http", "hosts": ["127.0.0.1", "localhost"], "recording": recording}}
    (root / "connections" / f"{CONNECTION}.yaml").write_text(json.dumps(conn, indent=1))
    (root / "policies" / f"bench-{profile}.yaml").write_text(json.dumps(policy(profile, without), indent=1))
    return root
