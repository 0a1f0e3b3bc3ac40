"""The real ``kubectl exec`` and ``kubectl port-forward`` through the sidecar process (issue 11/6).

Since kubectl 1.30 ``exec``/``attach``/``cp`` open their stream with a WebSocket handshake - a
``GET`` - and ``port-forward`` with a WebSocket tunnel since 1.31; when the upgrade fails they
fall back to SPDY (a ``POST``). RequestInfo calls the ``GET`` ``get``, so a read-only policy
(``verbs: [get, list, watch]``) used to let a shell through, and a rule about
``pods/portforward`` opened one ApprovalRequest for the WebSocket attempt and a second for the
SPDY fallback. Kubernetes authorizes the handshake as ``create`` too
(``AuthorizePodWebsocketUpgradeCreatePermission``); so does the sidecar now.

The apiserver is the test bed's; there is no kubelet, so the pod ``web`` is only an object
(``spec.nodeName`` set, ``status.phase: Running`` written through the status subresource, which
is all kubectl checks before it dials). What is tested is the sidecar's decision before
anything is forwarded - read back from its recording: every exec/port-forward attempt kubectl
made, WebSocket and SPDY alike, was judged ``create`` and refused, and one ``kubectl
port-forward`` opened exactly one ApprovalRequest.
"""

from __future__ import annotations

import json
import subprocess
import time
import uuid
from pathlib import Path

import pytest

from chaperone_operator.injection.settings import InjectionSettings

from .pod import InjectedPod, connection, free_port, policy, setup_namespace, wait_for


@pytest.fixture(scope="module")
def pod(control_plane, crds_installed, tmp_path_factory):
    root = tmp_path_factory.mktemp("kubectl-connect")
    ns = f"connect-{uuid.uuid4().hex[:8]}"
    api_host = control_plane.url.removeprefix("https://")
    conns = [connection("cluster", {
        "type": "kubernetes", "hosts": [api_host],
        "credentials": {"source": "secret", "secretRef": {"name": "kube-token"}},
        "upstreamCA": {"kind": "ConfigMap", "name": "kube-ca", "key": "ca.crt"}})]
    policies = [policy("cluster", {"connections": ["cluster"], "defaultEffect": "block",
                                   "approvers": {"users": ["alice"]}, "rules": [
        # A "read-only" agent: before the fix this let the WebSocket exec through.
        {"name": "reads", "match": {"kubernetes": {"verbs": ["get", "list", "watch"]}}, "allow": {}},
        {"name": "no-shells", "match": {"kubernetes": {"verbs": ["create"],
                                                       "resources": ["pods/exec", "pods/attach"]}},
         "block": {"message": "agents get no shells"}},
        # Any verb: before the fix the WebSocket GET and the SPDY POST were two requests.
        {"name": "tunnels-need-alice", "match": {"kubernetes": {"resources": ["pods/portforward"]}},
         "requireApproval": {"mode": "hold", "holdSeconds": 1}}]})]
    setup_namespace(control_plane, ns, conns + policies)
    rbac = "rbac.authorization.k8s.io/v1"
    control_plane.kubectl("apply", "-f", "-", input=json.dumps({"apiVersion": "v1", "kind": "List", "items": [
        {"apiVersion": "v1", "kind": "ServiceAccount", "metadata": {"name": "operator", "namespace": ns}},
        {"apiVersion": "v1", "kind": "ServiceAccount", "metadata": {"name": "web", "namespace": ns}},
        # The connection's identity may do all of it: what stops the agent is the policy.
        {"apiVersion": rbac, "kind": "Role", "metadata": {"name": "pods", "namespace": ns},
         "rules": [{"apiGroups": [""], "resources": ["pods"], "verbs": ["get", "list", "watch"]},
                   {"apiGroups": [""], "resources": ["pods/exec", "pods/attach", "pods/portforward"],
                    "verbs": ["get", "create"]}]},
        {"apiVersion": rbac, "kind": "RoleBinding", "metadata": {"name": "pods", "namespace": ns},
         "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": "pods"},
         "subjects": [{"kind": "ServiceAccount", "name": "operator", "namespace": ns}]},
        {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "web", "namespace": ns},
         "spec": {"nodeName": "node-1", "serviceAccountName": "web",
                  "automountServiceAccountToken": False,
                  "containers": [{"name": "c", "image": "example.com/web:1",
                                  "ports": [{"containerPort": 8080}]}]}},
    ]}))
    control_plane.kubectl("patch", "pod", "web", "-n", ns, "--subresource=status", "--type=merge",
                          "-p", json.dumps({"status": {"phase": "Running"}}))
    token = control_plane.kubectl("create", "token", "operator", "-n", ns, "--duration", "1h").stdout.strip()
    settings = InjectionSettings(proxy_port=free_port(), health_port=free_port())
    sidecar = InjectedPod(
        control_plane, ns, root, connections=conns, settings=settings, mode="explicit",
        approval_mode="defer", secrets={"kube-token": {"token": token}},
        configmaps={"kube-ca": {"ca.crt": Path(control_plane.ca_path).read_bytes()}})
    sidecar.start()
    try:
        sidecar.wait_ready()
        yield sidecar, ns
    finally:
        code = sidecar.stop()
    assert code == 0, sidecar.logs()


def kubectl(sidecar: InjectedPod, control_plane, ns: str, *args: str, timeout: float = 60):
    config = sidecar.root / "agent-kubeconfig"
    config.write_text(json.dumps({
        "apiVersion": "v1", "kind": "Config",
        "clusters": [{"name": "c", "cluster": {"server": control_plane.url, "proxy-url": sidecar.proxy_url}}],
        "users": [{"name": "u", "user": {"token": "chaperone-placeholder"}}],
        "contexts": [{"name": "x", "context": {"cluster": "c", "user": "u", "namespace": ns}}],
        "current-context": "x"}))
    argv = [control_plane.kubectl_binary, "--kubeconfig", str(config),
            "--cache-dir", str(sidecar.root / "kube-cache"), *args]
    return subprocess.run(argv, env=sidecar.agent_env(), capture_output=True, text=True, timeout=timeout)


def _wait_flows(sidecar: InjectedPod, path_part: str, n: int) -> list[dict]:
    wait_for(lambda: len(sidecar.recorded_flows(path_part)) >= n, 15,
             f"{n} recorded flow(s) to {path_part}")
    time.sleep(0.5)  # a late event of the same command would still be counted
    return sidecar.recorded_flows(path_part)


def test_kubectl_exec_over_websocket_is_judged_create_and_never_forwarded(pod, control_plane):
    sidecar, ns = pod
    res = kubectl(sidecar, control_plane, ns, "exec", "web", "-c", "c", "--", "id")
    assert res.returncode != 0, res
    assert "agents get no shells" in res.stderr, res.stderr
    flows = _wait_flows(sidecar, "/pods/web/exec", 1)
    # kubectl tries the WebSocket (GET) first, and falls back to SPDY (POST) when it is refused.
    assert sorted(f["method"] for f in flows) == ["GET", "POST"], flows
    websocket = [f for f in flows if f["method"] == "GET"]
    assert websocket[0]["headers"].get("upgrade", "").lower() == "websocket", websocket[0]
    for flow in flows:  # the WebSocket GET and any SPDY POST fallback alike
        assert flow["action"] == "kubernetes:create/pods/exec", flow
        assert flow["effect"] == "block" and flow["refused"] == "chaperone_blocked", flow


def test_one_kubectl_port_forward_opens_one_approval_request(pod, control_plane):
    sidecar, ns = pod
    res = kubectl(sidecar, control_plane, ns, "port-forward", "pod/web", f"{free_port()}:8080",
                  "--address", "127.0.0.1")
    assert res.returncode != 0, res
    assert "approval" in res.stderr.lower(), res.stderr
    flows = _wait_flows(sidecar, "/pods/web/portforward", 1)
    # The WebSocket tunnel (GET), then the SPDY fallback (POST): two requests, one action.
    assert sorted(f["method"] for f in flows) == ["GET", "POST"], flows
    for flow in flows:
        assert flow["action"] == "kubernetes:create/pods/portforward", flow
        assert flow["effect"] == "require_approval" and flow["refused"] == "chaperone_approval_pending", flow
    items = json.loads(control_plane.kubectl("get", "approvalrequests", "-n", ns, "-o", "json").stdout)["items"]
    tunnels = [i for i in items if "portforward" in json.dumps(i["spec"].get("action", {}))]
    assert len(tunnels) == 1, [json.dumps(i["spec"]) for i in tunnels]
    assert tunnels[0]["spec"]["action"]["name"] == "kubernetes:create/pods/portforward"
