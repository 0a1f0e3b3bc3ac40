"""Fixtures of the node story (docs/e2e.md, issue 14): a real single-node Kubernetes.

``node_cp``  a control plane of its own, started with ``node_address``: the apiserver also
             listens on the machine's interface address, which pods reach through the
             ``kubernetes`` Service (the session's loopback-only ``control_plane`` cannot serve
             pods, and changing it would change what every other test sees).
``node``     containerd + runc + kubelet + scheduler + controller manager + kube-proxy on it
             (``chaperone_testbed.node.Node``), stopped and cleaned at the end of the session.

As everywhere in the test bed, a component that cannot start FAILS the run; nothing skips.
Root is required (containerd, runc, iptables).
"""

from __future__ import annotations

import subprocess
import time
from pathlib import Path

import pytest

from chaperone_testbed import ControlPlane, TestbedError
from chaperone_testbed.node import Node, node_address

REPO_ROOT = Path(__file__).resolve().parents[2]
HERE = Path(__file__).resolve().parent
# The cleanup tests start and stop nodes of their own: they must run before the session's node
# exists (one node per machine: one bridge, one node name).
ORDER = ("test_node_cleanup.py", "test_node_runs.py")


def pytest_collection_modifyitems(session, config, items):
    ours = [i for i in items if Path(str(i.fspath)).parent == HERE]
    if not ours:
        return
    rank = {name: n for n, name in enumerate(ORDER)}
    ours.sort(key=lambda i: rank.get(Path(str(i.fspath)).name, len(rank)))
    others = [i for i in items if Path(str(i.fspath)).parent != HERE]
    items[:] = others + ours


def start_or_fail(component, what: str):
    try:
        return component.start()
    except TestbedError as exc:
        error = exc
    pytest.fail(f"test bed: {what} could not start:\n{error}", pytrace=False)


@pytest.fixture(scope="session")
def node_cp():
    cp = ControlPlane(build_script=REPO_ROOT / "hack" / "build-control-plane.sh",
                      node_address=node_address())
    yield start_or_fail(cp, "control plane serving a node")
    cp.stop()


@pytest.fixture(scope="session")
def node(node_cp):
    n = Node(node_cp)
    yield start_or_fail(n, "node (containerd + kubelet)")
    n.stop()


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
