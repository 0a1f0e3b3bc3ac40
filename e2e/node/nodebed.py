"""Names and helpers of the node story shared by e2e/node's conftest and test files.

A module of its own (not `from conftest import ...`): several conftest.py files are loaded in
one pytest session, and which one `import conftest` finds depends on collection order.
"""

from __future__ import annotations

import subprocess
import time
from pathlib import Path

import pytest

from chaperone_testbed.services import TestbedError

REPO_ROOT = Path(__file__).resolve().parents[2]
RELEASE, RELEASE_NS = "chaperone", "chaperone-system"
API = "chaperone.dev/v1alpha1"
POD, AGENT_SA, AGENT_CONTAINER, SIDECAR = "claude-1", "claude-agent", "claude", "chaperone-sidecar"
SIDECAR_SECRET = "chaperone-sidecar"
RECORDING_BUCKET, RECORDING_PREFIX, REGION = "chaperone-recordings", "node-e2e", "us-east-1"
KUBERNETES_SERVICE = "10.0.0.1"  # the `kubernetes` Service's ClusterIP (first of 10.0.0.0/24)


def start_or_fail(component, what: str):
    try:
        return component.start()
    except TestbedError as exc:
        error = exc
    pytest.fail(f"test bed: {what} could not start:\n{error}", pytrace=False)


def wait_for(predicate, timeout: float, what: str, detail=lambda: ""):
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}\n{detail()}")
        time.sleep(0.5)


def pod_status(cp, ns: str, name: str) -> dict:
    status, pod = cp.api("GET", f"/api/v1/namespaces/{ns}/pods/{name}")
    assert status == 200, pod
    return pod.get("status", {})


def leftovers(node_workdir: Path | None) -> dict[str, list[str]]:
    """What a node leaves on this machine if its cleanup is incomplete (empty lists if none)."""
    chains = []
    for family in ("iptables-save", "ip6tables-save"):
        dump = subprocess.run([family], capture_output=True, text=True).stdout
        chains += [ln for ln in dump.splitlines() if "KUBE-" in ln or "CNI-" in ln]
    mounts = []
    if node_workdir is not None:
        mounts = [ln for ln in Path("/proc/self/mountinfo").read_text().splitlines()
                  if str(node_workdir) in ln]
    bridge = subprocess.run(["ip", "link", "show", "chaperone0"], capture_output=True).returncode
    cgroups = [str(p) for p in Path("/sys/fs/cgroup").glob("*/kubepods")]
    shims = []
    for pid in Path("/proc").iterdir():
        if not pid.name.isdigit():
            continue
        try:
            argv = (pid / "cmdline").read_bytes()
        except OSError:
            continue
        if b"containerd-shim" in argv and node_workdir is not None and str(node_workdir).encode() in argv:
            shims.append(pid.name)
    return {"iptables": chains, "mounts": mounts, "bridge": ["chaperone0"] if bridge == 0 else [],
            "cgroups": cgroups, "shims": shims}


def claude_pod(ns: str, image: str, name: str = POD, mode: str | None = None) -> dict:
    annotations = {"chaperone.dev/mode": mode} if mode else {}
    return {"apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": name, "namespace": ns, "annotations": annotations,
                         "labels": {"app": "claude", "chaperone.dev/inject": "true"}},
            "spec": {"serviceAccountName": AGENT_SA, "terminationGracePeriodSeconds": 30,
                     "containers": [{"name": AGENT_CONTAINER, "image": image,
                                     "imagePullPolicy": "IfNotPresent",
                                     "command": ["sleep", "infinity"]}]}}
