"""`make demo`: Chaperone's resources on a real control plane, start to finish, in a minute.

What it shows today (the foundation): the three CRDs installed from crds/, the examples applied,
the printer columns an on-call engineer reads, `kubectl explain` teaching the spec, and how an
invalid policy or a tampered approval is refused with field and reason. Everything runs against
the test bed's real kube-apiserver; nothing is simulated. The sidecar's standalone story replaces
the middle of this once it lands.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from .controlplane import ControlPlane

REPO = Path(__file__).resolve().parents[2]


def _step(title: str) -> None:
    print(f"\n\033[1m== {title}\033[0m", flush=True)


def _show(cp: ControlPlane, *args: str, user: str = "admin", stdin: str | None = None) -> None:
    print(f"$ kubectl {' '.join(args)}" + (f"   # as {user}" if user != "admin" else ""))
    res = cp.kubectl(*args, user=user, input=stdin, check=False)
    print((res.stdout + res.stderr).rstrip())


def run(build_script: Path | None = None) -> int:
    with ControlPlane(build_script=build_script or REPO / "hack" / "build-control-plane.sh") as cp:
        _step(f"control plane up: {cp.url} (kube-apiserver + etcd built from Go modules)")
        _show(cp, "version")
        _step("install the CRDs (crds/ is the single source)")
        _show(cp, "apply", "-f", str(REPO / "crds"))
        cp.kubectl("wait", "--for=condition=Established", "--timeout=60s", "crd", "--all")
        _step("apply the examples")
        cp.create_namespace("agents")
        _show(cp, "apply", "-f", str(REPO / "examples"))
        _show(cp, "get", "claudeconnections,accesspolicies", "-n", "agents")
        _show(cp, "get", "ar", "-n", "agents", "-o", "wide")
        _step("kubectl explain teaches the product")
        _show(cp, "explain", "accesspolicy.spec.rules.requireApproval")
        _step("an invalid policy is refused with field and reason")
        bad = {"apiVersion": "chaperone.dev/v1alpha1", "kind": "AccessPolicy",
               "metadata": {"name": "bad", "namespace": "agents"},
               "spec": {"defaultEffect": "allow",
                        "rules": [{"name": "two-effects", "allow": {}, "block": {}}]}}
        _show(cp, "apply", "-f", "-", stdin=json.dumps(bad))
        _step("a plain developer cannot touch approvals (RBAC on a real apiserver)")
        _show(cp, "patch", "ar", "iam-createrole-7f3a", "-n", "agents", "--type=merge",
              "-p", '{"spec":{"decision":"Approved"}}', user="developer")
        _step("tampering with the action of a pending approval is refused (CEL)")
        _show(cp, "patch", "ar", "iam-createrole-7f3a", "-n", "agents", "--type=merge",
              "-p", '{"spec":{"action":{"summary":"harmless","name":"s3:ListBuckets"}}}')
        _step("done; the control plane is torn down")
    return 0


if __name__ == "__main__":
    sys.exit(run())
