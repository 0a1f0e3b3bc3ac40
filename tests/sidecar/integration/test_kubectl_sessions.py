"""The real ``kubectl exec`` through the sidecar process: command rules, the approval summary
and the refused SPDY fallback (issue 15, docs/exec-sessions.md).

The fast sibling of ``e2e/node/test_node_exec_sessions.py``: the test bed's apiserver without a
kubelet (the pod ``web`` is only an object, as in test_kubectl_connect.py), so what is tested
is what the sidecar decides before anything is streamed - read from kubectl's own output, the
ApprovalRequest and the sidecar's recording.
"""

from __future__ import annotations

import json
import subprocess
import uuid
from pathlib import Path

import pytest

from chaperone_operator.injection.settings import InjectionSettings

from .pod import InjectedPod, connection, free_port, policy, setup_namespace, wait_for


@pytest.fixture(scope="module")
def pod(control_plane, crds_installed, tmp_path_factory):
    root = tmp_path_factory.mktemp("kubectl-sessions")
    ns = f"sessions-{uuid.uuid4().hex[:8]}"
    api_host = control_plane.url.removeprefix("https://")
    conns = [connection("cluster", {
        "type": "kubernetes", "hosts": [api_host],
        "credentials": {"source": "secret", "secretRef": {"name": "kube-token"}},
        "upstreamCA": {"kind": "ConfigMap", "name": "kube-ca", "key": "ca.crt"}})]
    policies = [policy("cluster", {"connections": ["cluster"], "defaultEffect": "block",
                                   "approvers": {"users": ["alice"]}, "rules": [
        {"name": "reads", "match": {"kubernetes": {"verbs": ["get", "list", "watch"]}}, "allow": {}},
        {"name": "no-rm", "match": {"kubernetes": {"commands": ["rm", "rm *"]}},
         "block": {"message": "Agents may not delete files in pods."}},
        {"name": "reading-files-needs-alice", "match": {"kubernetes": {"commands": ["cat *"]}},
         "requireApproval": {"mode": "defer"}},
        {"name": "exec-in-c", "match": {"kubernetes": {"resources": ["pods/exec"],
                                                       "containers": ["c"]}}, "allow": {}}]})]
    setup_namespace(control_plane, ns, conns + policies)
    rbac = "rbac.authorization.k8s.io/v1"
    control_plane.kubectl("apply", "-f", "-", input=json.dumps({"apiVersion": "v1", "kind": "List", "items": [
        {"apiVersion": "v1", "kind": "ServiceAccount", "metadata": {"name": "operator", "namespace": ns}},
        {"apiVersion": rbac, "kind": "Role", "metadata": {"name": "pods", "namespace": ns},
         "rules": [{"apiGroups": [""], "resources": ["pods"], "verbs": ["get", "list", "watch"]},
                   {"apiGroups": [""], "resources": ["pods/exec"], "verbs": ["get", "create"]}]},
        {"apiVersion": rbac, "kind": "RoleBinding", "metadata": {"name": "pods", "namespace": ns},
         "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": "pods"},
         "subjects": [{"kind": "ServiceAccount", "name": "operator", "namespace": ns}]},
        {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "web", "namespace": ns},
         "spec": {"nodeName": "node-1", "automountServiceAccountToken": False,
                  "containers": [{"name": "c", "image": "example.com/web:1"}]}},
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


def kubectl(sidecar: InjectedPod, control_plane, ns: str, *args: str, env: dict | None = None):
    config = sidecar.root / "agent-kubeconfig"
    config.write_text(json.dumps({
        "apiVersion": "v1", "kind": "Config",
        "clusters": [{"name": "c", "cluster": {"server": control_plane.url, "proxy-url": sidecar.proxy_url}}],
        "users": [{"name": "u", "user": {"token": "chaperone-placeholder"}}],
        "contexts": [{"name": "x", "context": {"cluster": "c", "user": "u", "namespace": ns}}],
        "current-context": "x"}))
    argv = [control_plane.kubectl_binary, "--kubeconfig", str(config),
            "--cache-dir", str(sidecar.root / "kube-cache"), *args]
    return subprocess.run(argv, env={**sidecar.agent_env(), **(env or {})}, capture_output=True,
                          text=True, timeout=60)


@pytest.mark.parametrize("argv", [["rm", "-rf", "/tmp/x"], ["sh", "-c", "cd /; rm -rf /tmp/x"],
                                  ["/usr/bin/env", "rm", "-rf", "/tmp/x"]])
def test_the_command_rule_refuses_rm_however_it_is_wrapped(pod, control_plane, argv):
    sidecar, ns = pod
    res = kubectl(sidecar, control_plane, ns, "exec", "web", "-c", "c", "--", *argv)
    assert res.returncode != 0
    assert "Agents may not delete files in pods." in res.stderr, res.stderr


def test_the_approval_summary_names_pod_container_and_command(pod, control_plane):
    sidecar, ns = pod
    res = kubectl(sidecar, control_plane, ns, "exec", "web", "-c", "c", "--", "cat", "/etc/hostname")
    assert res.returncode != 0 and "approval" in res.stderr.lower(), res.stderr

    def opened():
        items = json.loads(control_plane.kubectl("get", "approvalrequests", "-n", ns, "-o",
                                                 "json").stdout)["items"]
        return [i for i in items if "exec" in json.dumps(i["spec"].get("action", {}))]
    found = wait_for(opened, 15, "the ApprovalRequest of the exec")
    summary = found[0]["spec"]["action"]["summary"]
    assert summary == f"create pods/web/exec in {ns} (container: c; command: cat /etc/hostname)", summary


def test_an_allowed_exec_goes_upstream_and_the_spdy_fallback_is_refused(pod, control_plane):
    """``ls`` is allowed: the WebSocket handshake is forwarded (the apiserver, with no kubelet
    behind node-1, fails it), kubectl falls back to SPDY - which the sidecar refuses, saying
    why, instead of relaying a stream it could neither record nor mask."""
    sidecar, ns = pod
    res = kubectl(sidecar, control_plane, ns, "exec", "web", "-c", "c", "--", "ls", "/")
    assert res.returncode != 0
    flows = wait_for(lambda: len(sidecar.recorded_flows("command=ls")) >= 2 and sidecar.recorded_flows("command=ls"),
                     15, "the WebSocket and SPDY attempts recorded")
    by_method = {f["method"]: f for f in flows}
    assert by_method["GET"]["effect"] == "allow", flows
    assert "not relayed" in (by_method["POST"].get("message") or ""), flows
    assert "WebSocket" in res.stderr, res.stderr
    # With WebSocket switched off kubectl speaks SPDY at once: refused the same way.
    spdy = kubectl(sidecar, control_plane, ns, "exec", "web", "-c", "c", "--", "ls",
                   env={"KUBECTL_REMOTE_COMMAND_WEBSOCKETS": "false"})
    assert spdy.returncode != 0 and "not relayed" in spdy.stderr, spdy.stderr
