"""The node is a real Kubernetes node: registered, Ready, pods run by the kubelet in runc.

These pin down what the node story relies on, so a broken node shows up here, named.
"""

from __future__ import annotations

import json
import uuid

from nodebed import pod_status, wait_for


def test_the_node_registers_its_interface_address_and_is_ready(node, node_cp):
    status, obj = node_cp.api("GET", f"/api/v1/nodes/{node.name}")
    assert status == 200, obj
    addresses = {a["type"]: a["address"] for a in obj["status"]["addresses"]}
    assert addresses["InternalIP"] == node.address
    assert not node.address.startswith("127.")
    conditions = {c["type"]: c["status"] for c in obj["status"]["conditions"]}
    assert conditions["Ready"] == "True", conditions
    info = obj["status"]["nodeInfo"]
    assert info["kubeletVersion"] == "v1.33.13"
    assert info["containerRuntimeVersion"].startswith("containerd://")
    # The `kubernetes` Service's endpoint is the apiserver at the node address (lease
    # reconciler), which is where pods' in-cluster clients land.
    status, eps = node_cp.api("GET", "/api/v1/namespaces/default/endpoints/kubernetes")
    assert status == 200, eps
    assert eps["subsets"][0]["addresses"][0]["ip"] == node.address


def test_a_pod_is_started_by_the_kubelet_in_runc_containers(node, node_cp):
    ns = f"runs-{uuid.uuid4().hex[:6]}"
    node_cp.create_namespace(ns)
    node_cp.kubectl("apply", "-n", ns, "-f", "-", input=json.dumps({
        "apiVersion": "v1", "kind": "Pod", "metadata": {"name": "p"},
        "spec": {"containers": [{"name": "c", "image": node.pause_image,
                                 "imagePullPolicy": "Never"}]}}))
    status = wait_for(lambda: (s := pod_status(node_cp, ns, "p")).get("phase") == "Running" and s,
                      60, "the pod Running", detail=node.logs)
    assert status["podIP"].startswith("10.244.0.")
    cid = status["containerStatuses"][0]["containerID"].removeprefix("containerd://")
    tasks = node.ctr("tasks", "ls").stdout
    assert any(ln.split()[0] == cid and "RUNNING" in ln for ln in tasks.splitlines()[1:]), tasks
    info = json.loads(node.ctr("containers", "info", cid).stdout)
    assert info["Runtime"]["Name"] == "io.containerd.runc.v2"


def test_a_killed_container_is_restarted_by_the_kubelet(node, node_cp):
    ns = f"restart-{uuid.uuid4().hex[:6]}"
    node_cp.create_namespace(ns)
    node_cp.kubectl("apply", "-n", ns, "-f", "-", input=json.dumps({
        "apiVersion": "v1", "kind": "Pod", "metadata": {"name": "p"},
        "spec": {"containers": [{"name": "c", "image": node.pause_image,
                                 "imagePullPolicy": "Never"}]}}))
    first = wait_for(lambda: (s := pod_status(node_cp, ns, "p")).get("phase") == "Running" and s,
                     60, "the pod Running", detail=node.logs)
    cid = first["containerStatuses"][0]["containerID"].removeprefix("containerd://")
    node.ctr("tasks", "kill", "--signal", "SIGKILL", cid)

    def restarted():
        s = pod_status(node_cp, ns, "p")["containerStatuses"][0]
        return s["restartCount"] >= 1 and "running" in s["state"] and s
    again = wait_for(restarted, 60, "the container restarted", detail=node.logs)
    assert again["containerID"] != first["containerStatuses"][0]["containerID"]
    assert again["lastState"]["terminated"]["exitCode"] == 137
