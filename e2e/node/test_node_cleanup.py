"""The node cleans up after itself: nothing it made survives stop(), even out of order.

Each test starts a control plane and a node of its own (before the session's node exists, see
conftest.ORDER), runs a pod so that every kind of trace exists (iptables chains, the bridge, a
network namespace, mounts, cgroups, a shim), checks that they do, stops, and checks that none
is left.
"""

from __future__ import annotations

import uuid

from nodebed import REPO_ROOT, leftovers, pod_status, start_or_fail, wait_for

from chaperone_testbed.controlplane import ControlPlane
from chaperone_testbed.node import Node, node_address


def _running_pod(cp, node) -> None:
    ns = f"cleanup-{uuid.uuid4().hex[:6]}"
    cp.create_namespace(ns)
    status, body = cp.api("POST", f"/api/v1/namespaces/{ns}/pods", {
        "apiVersion": "v1", "kind": "Pod", "metadata": {"name": "p"},
        "spec": {"containers": [{"name": "c", "image": node.pause_image,
                                 "imagePullPolicy": "Never"}]}})
    assert status == 201, body
    wait_for(lambda: pod_status(cp, ns, "p").get("phase") == "Running", 60, "pod Running",
             detail=node.logs)


def _start_pair():
    cp = start_or_fail(ControlPlane(build_script=REPO_ROOT / "hack" / "build-control-plane.sh",
                                    node_address=node_address()), "control plane")
    node = Node(cp)
    try:
        start_or_fail(node, "node")
    except BaseException:
        cp.stop()
        raise
    return cp, node


def test_stop_removes_everything_the_node_made():
    cp, node = _start_pair()
    try:
        _running_pod(cp, node)
        workdir = node.workdir
        before = leftovers(workdir)
        # The check sees the traces of a running node (else "nothing left" would prove nothing).
        assert before["iptables"] and before["mounts"] and before["bridge"] and \
            before["cgroups"] and before["shims"], before
        node.stop()
        assert leftovers(workdir) == {k: [] for k in before}
        assert not workdir.exists()
    finally:
        node.stop()
        cp.stop()


def test_stop_cleans_up_even_after_the_control_plane_is_gone():
    """A failing test may tear the control plane down first: pods cannot be deleted through
    the API any more, so the node kills them through containerd and still cleans everything."""
    cp, node = _start_pair()
    try:
        _running_pod(cp, node)
        workdir = node.workdir
        cp.stop()
        node.stop()
        assert leftovers(workdir) == {k: [] for k in leftovers(None)}
    finally:
        node.stop()
        cp.stop()
