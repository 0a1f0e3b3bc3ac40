"""The operator as a real process against the test bed's apiserver, with its webhooks registered.

`running_operator` (module scope: a test module's tests share one operator, and everything it
registered is gone before the next module runs, since fail-closed webhooks would refuse other
tests' objects):

1. renders the Helm chart with `webhook.url` pointing at 127.0.0.1 and a CA generated here, and
   applies what it renders except the Deployment/Service (no kubelet) — so the webhook
   configurations, the operator's ClusterRole and the sidecar ClusterRole are exactly the chart's;
2. starts `python -m chaperone_operator.cli operator` as the chart's operator ServiceAccount (a
   TokenRequest token), serving HTTPS with a certificate from that CA;
3. waits until an admission round trip through the apiserver reaches it.

Teardown deletes the test namespaces while the operator still runs (kopf's finalizers on
requests and connections are removed by it), then the webhook configurations (they fail closed
and would break later tests), stops the process and deletes the chart objects it applied.
"""

from __future__ import annotations

import base64
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import yaml

from chaperone_testbed.controlplane import CLUSTER_NAME, KubeconfigRef
from chaperone_testbed.pki import CertAuthority
from chaperone_testbed.services import ManagedProcess, free_port, keep_artifacts

OPERATOR_NS = "chaperone-system"
OPERATOR_SA = "chaperone-operator"
# CRDs too: the test bed's come from crds/ (crds_installed, session-wide); applying the chart's
# and deleting them at teardown would delete every chaperone object of every other test.
NOT_APPLIED = {"Deployment", "Service", "Secret", "CustomResourceDefinition"}


@pytest.fixture(scope="session")
def helm_bin(repo_root) -> str:
    if os.environ.get("HELM_BIN") and os.access(os.environ["HELM_BIN"], os.X_OK):
        return os.environ["HELM_BIN"]
    res = subprocess.run([str(repo_root / "hack" / "build-helm.sh")], capture_output=True, text=True)
    if res.returncode != 0:
        pytest.fail(f"helm could not be built: {res.stderr[-2000:]}", pytrace=False)
    return res.stdout.strip().splitlines()[-1]


def render_chart(helm_bin: str, repo_root: Path, *args: str) -> list[dict]:
    res = subprocess.run([helm_bin, "template", "chaperone", str(repo_root / "charts" / "chaperone"),
                          "--namespace", OPERATOR_NS, "--kube-version", "1.33.0", *args],
                         capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    return [d for d in yaml.safe_load_all(res.stdout) if d]


def unique(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:6]}"


def write_token_kubeconfig(cp, path: Path, token: str, namespace: str) -> KubeconfigRef:
    """A kubeconfig authenticating with a bearer token (as the test bed writes them)."""
    ctx = path.stem
    path.write_text(json.dumps({
        "apiVersion": "v1", "kind": "Config", "preferences": {},
        "clusters": [{"name": CLUSTER_NAME, "cluster": {"server": cp.url,
                                                        "certificate-authority": str(cp.ca_path)}}],
        "users": [{"name": ctx, "user": {"token": token}}],
        "contexts": [{"name": ctx, "context": {"cluster": CLUSTER_NAME, "user": ctx,
                                               "namespace": namespace}}],
        "current-context": ctx,
    }))
    path.chmod(0o600)
    return KubeconfigRef(path, ctx)


@dataclass
class RunningOperator:
    """Handle on the operator process and the test bed it runs against."""

    cp: object
    process: ManagedProcess
    workdir: Path
    url: str = ""  # the operator's webhook base URL
    ca_file: Path | None = None  # the CA that signed its serving certificate
    namespaces: list[str] = field(default_factory=list)

    def namespace(self, prefix: str) -> str:
        """A fresh namespace, deleted at teardown."""
        name = unique(prefix)
        self.cp.create_namespace(name)
        self.namespaces.append(name)
        return name

    def log(self) -> str:
        return self.process.log_tail(80)

    def wait_for(self, probe, timeout: float = 30.0, interval: float = 0.3, what: str = "condition"):
        """Poll `probe` until it returns something truthy; fail naming `what` (and the log)."""
        deadline = time.monotonic() + timeout
        last = None
        while time.monotonic() < deadline:
            last = probe()
            if last:
                return last
            time.sleep(interval)
        pytest.fail(f"timed out after {timeout:.0f}s waiting for {what} (last: {last!r})\n"
                    f"{self.log()}")

    def get(self, *args: str, user="admin") -> dict:
        """`kubectl get ... -o json` as a persona, decoded."""
        return json.loads(self.cp.kubectl("get", *args, "-o", "json", user=user).stdout)

    def apply(self, obj: dict, user="admin", check: bool = True) -> subprocess.CompletedProcess:
        return self.cp.kubectl("apply", "-f", "-", input=json.dumps(obj), user=user, check=check)

    def create(self, obj: dict, user="admin", check: bool = True) -> subprocess.CompletedProcess:
        return self.cp.kubectl("create", "-f", "-", input=json.dumps(obj), user=user, check=check)

    def pod_token_kubeconfig(self, namespace: str, service_account: str, pod: str,
                             uid: str) -> KubeconfigRef:
        """The identity a sidecar has: a token of the pod's SA bound to the pod (TokenRequest)."""
        token = self.cp.kubectl("create", "token", service_account, "-n", namespace,
                                "--bound-object-kind", "Pod", "--bound-object-name", pod,
                                "--bound-object-uid", uid, "--duration", "1h").stdout.strip()
        return write_token_kubeconfig(self.cp, self.workdir / f"pod-{namespace}-{pod}.kubeconfig",
                                      token, namespace)


def _port_open(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(0.5)
        return s.connect_ex(("127.0.0.1", port)) == 0


def _admission_reaches_operator(cp) -> bool:
    bad = {"apiVersion": "chaperone.dev/v1alpha1", "kind": "AccessPolicy",
           "metadata": {"name": "probe", "namespace": "default"},
           "spec": {"rules": [{"name": "r", "block": {}, "match": {"pathRegex": "("}}]}}
    res = cp.kubectl("create", "--dry-run=server", "-f", "-", input=json.dumps(bad), check=False)
    return "AccessPolicy default/probe is invalid" in res.stderr


@pytest.fixture(scope="module")
def running_operator(control_plane, crds_installed, helm_bin, repo_root):
    cp = control_plane
    workdir = Path(tempfile.mkdtemp(prefix="chaperone-operator-test-"))
    ca = CertAuthority("chaperone-webhook-test-ca")
    serving = ca.write_server_cert(workdir, "webhook", dns_names=("localhost",),
                                   ip_addresses=("127.0.0.1",))
    port = free_port()
    docs = render_chart(helm_bin, repo_root, "--set", f"webhook.url=https://127.0.0.1:{port}",
                        "--set", f"webhook.caBundle={base64.b64encode(ca.cert_pem).decode()}")
    webhooks = [d for d in docs if d["kind"].endswith("WebhookConfiguration")]
    rest = [d for d in docs if d["kind"] not in NOT_APPLIED and d not in webhooks]
    cp.create_namespace(OPERATOR_NS)
    cp.kubectl("apply", "-f", "-", input=yaml.safe_dump_all(rest))
    identity = cp.serviceaccount_kubeconfig(OPERATOR_NS, OPERATOR_SA, duration="2h")

    env = {**os.environ,
           "KUBECONFIG": str(identity.path),
           "PYTHONPATH": os.pathsep.join(str(repo_root / p) for p in ("operator", "sidecar", "testbed")),
           "CHAPERONE_OPERATOR_NAMESPACE": OPERATOR_NS,
           "CHAPERONE_WEBHOOK_LISTEN": "127.0.0.1",
           "CHAPERONE_WEBHOOK_PORT": str(port),
           "CHAPERONE_WEBHOOK_CERT_FILE": str(serving.cert_path),
           "CHAPERONE_WEBHOOK_KEY_FILE": str(serving.key_path),
           "CHAPERONE_SIDECAR_IMAGE": "chaperone:test"}
    process = ManagedProcess("chaperone-operator",
                             [sys.executable, "-m", "chaperone_operator.cli", "operator", "--verbose"],
                             workdir / "operator.log", env=env, cwd=repo_root)
    process.start()
    handle = RunningOperator(cp, process, workdir, f"https://127.0.0.1:{port}",
                             ca.write_cert(workdir / "webhook-ca.crt"))
    try:
        process.wait_ready(lambda: _port_open(port), 90, "serving webhooks")
        cp.kubectl("apply", "-f", "-", input=yaml.safe_dump_all(webhooks))
        process.wait_ready(lambda: _admission_reaches_operator(cp), 60, "reachable through admission")
        yield handle
    finally:
        for ns in handle.namespaces:
            cp.kubectl("delete", "namespace", ns, "--wait=false", check=False)
        deadline = time.monotonic() + 60
        while handle.namespaces and time.monotonic() < deadline and process.running:
            left = [ns for ns in handle.namespaces
                    if cp.kubectl("get", "namespace", ns, check=False).returncode == 0]
            if not left:
                break
            time.sleep(0.5)
        for doc in webhooks:
            cp.kubectl("delete", doc["kind"].lower(), doc["metadata"]["name"], "--ignore-not-found",
                       check=False)
        process.stop(timeout=20)
        cp.kubectl("delete", "-f", "-", "--ignore-not-found", "--wait=false", check=False,
                   input=yaml.safe_dump_all(rest))
        if not keep_artifacts():
            shutil.rmtree(workdir, ignore_errors=True)
