"""A newcomer's first ten minutes: README "On a cluster" runs VERBATIM against the test bed.

The fenced block under "## On a cluster" is read from README.md and each line is run, unchanged,
by bash with the real `helm` and `kubectl` on PATH and the test bed's admin kubeconfig - the same
commands a reader pastes. The examples it applies are the files in examples/.

The test bed has an apiserver but no kubelet, controllers or kube-proxy, so after the `helm
install` line the test stands in for them, for the one Deployment the chart installs, and for
nothing else:

- kubelet: runs the operator as a local process configured exactly as the installed Deployment's
  container (its env, valueFrom references resolved from the cluster as the kubelet would; only
  the listen address/port and the certificate paths are remapped), serving the chart-generated
  certificate from the chart's Secret;
- kube-proxy: one iptables DNAT rule sending the operator Service's ClusterIP:443 to that
  process, so the apiserver calls the webhooks through the Service exactly as the chart
  registered them (caBundle and server name included);
- deployment controller: once the process serves, the Deployment's status says so, which is what
  the README's `kubectl rollout status` waits for.

Then the README's objects must exist as it promises: the connection Ready and the policy Valid,
the agent pod created with the sidecar, which (alone) gets the chart's Redis password from the
Secret the operator copied into the namespace. `examples/approvalrequest.yaml` must behave as its comment says.
The chart's CRDs (templates, kept on uninstall) take over the test bed's kubectl-applied ones.
Plain `helm template` and `helm lint` (helm's default Kubernetes version) must pass.
"""

from __future__ import annotations

import base64
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from chaperone_testbed.services import ManagedProcess, free_port

pytestmark = pytest.mark.controlplane

NS, RELEASE, AGENTS = "chaperone-system", "chaperone", "agents"
DNAT_COMMENT = "chaperone-readme-quickstart"


@pytest.fixture(scope="module")
def helm(repo_root) -> str:
    if os.environ.get("HELM_BIN") and os.access(os.environ["HELM_BIN"], os.X_OK):
        return os.environ["HELM_BIN"]
    res = subprocess.run([str(repo_root / "hack" / "build-helm.sh")], capture_output=True, text=True)
    if res.returncode != 0:
        pytest.fail(f"helm could not be built: {res.stderr[-2000:]}", pytrace=False)
    return res.stdout.strip().splitlines()[-1]


def readme_cluster_commands(readme: str) -> list[str]:
    """The lines of the first ```sh block under '## On a cluster'."""
    section = readme.split("## On a cluster", 1)[1].split("\n## ", 1)[0]
    block = re.search(r"```sh\n(.*?)```", section, re.S)
    assert block, "no ```sh block under '## On a cluster'"
    return [line for line in block.group(1).splitlines() if line.strip()]


def test_readme_block_is_what_this_test_expects(repo_root):
    """Guards the hooks below: they act after the helm install line."""
    lines = readme_cluster_commands((repo_root / "README.md").read_text())
    assert lines[0].startswith("helm install chaperone charts/chaperone -n chaperone-system")


def test_plain_helm_template_and_lint_pass(helm, repo_root, tmp_path):
    env = _helm_env(tmp_path)
    for argv in (["template", "charts/chaperone"], ["lint", "charts/chaperone"],
                 ["lint", "--strict", "charts/chaperone"]):
        res = subprocess.run([helm, *argv], capture_output=True, text=True, cwd=repo_root, env=env)
        assert res.returncode == 0, (argv, res.stdout[-2000:], res.stderr[-2000:])


def _helm_env(tmp_path: Path) -> dict[str, str]:
    # helm's own state (repositories, cache) goes to the test's directory, not $HOME.
    return {**os.environ, "HELM_CACHE_HOME": str(tmp_path / "helm-cache"),
            "HELM_CONFIG_HOME": str(tmp_path / "helm-config"),
            "HELM_DATA_HOME": str(tmp_path / "helm-data")}


class Stand_ins:
    """The kubelet, kube-proxy and deployment controller for the operator Deployment only."""

    def __init__(self, cp, repo_root: Path, workdir: Path):
        self.cp, self.repo_root, self.workdir = cp, repo_root, workdir
        self.process: ManagedProcess | None = None
        self.dnat: list[str] = []

    def _json(self, *args: str) -> dict:
        return json.loads(self.cp.kubectl(*args, "-o", "json").stdout)

    def _env(self, container: dict, port: int, cert_dir: Path) -> dict[str, str]:
        env = {}
        for item in container.get("env", []):
            ref = item.get("valueFrom")
            if ref is None:  # the API drops empty values
                env[item["name"]] = item.get("value", "")
                continue
            if "fieldRef" in ref:
                env[item["name"]] = {"metadata.name": "chaperone-operator-0",
                                     "metadata.namespace": NS}[ref["fieldRef"]["fieldPath"]]
            elif "secretKeyRef" in ref:
                key = ref["secretKeyRef"]
                secret = self._json("get", "secret", key["name"], "-n", NS)
                env[item["name"]] = base64.b64decode(secret["data"][key["key"]]).decode()
            else:
                raise AssertionError(f"unsupported env source {item}")
        env.update({"CHAPERONE_WEBHOOK_LISTEN": "127.0.0.1", "CHAPERONE_WEBHOOK_PORT": str(port),
                    "CHAPERONE_WEBHOOK_CERT_FILE": str(cert_dir / "tls.crt"),
                    "CHAPERONE_WEBHOOK_KEY_FILE": str(cert_dir / "tls.key")})
        return env

    def start(self) -> None:
        if os.geteuid() != 0:  # CI runs as root (.ci/run); a missing privilege fails, never skips
            pytest.fail("the README test needs root for its kube-proxy stand-in (iptables)", pytrace=False)
        deployment = self._json("get", "deployment", "chaperone-operator", "-n", NS)
        container = deployment["spec"]["template"]["spec"]["containers"][0]
        assert container["args"][0] == "operator"
        # kubelet: the webhook-tls volume, then the container's process.
        cert_dir = self.workdir / "webhook-tls"
        cert_dir.mkdir()
        secret = self._json("get", "secret", "chaperone-webhook-tls", "-n", NS)
        for key in ("tls.crt", "tls.key"):
            (cert_dir / key).write_bytes(base64.b64decode(secret["data"][key]))
        port = free_port()
        identity = self.cp.serviceaccount_kubeconfig(
            NS, deployment["spec"]["template"]["spec"]["serviceAccountName"], duration="1h")
        env = {**os.environ, **self._env(container, port, cert_dir),
               "KUBECONFIG": str(identity.path),
               "PYTHONPATH": os.pathsep.join(str(self.repo_root / p)
                                             for p in ("operator", "sidecar", "testbed"))}
        self.process = ManagedProcess(
            "chaperone-operator",
            [sys.executable, "-m", "chaperone_operator.cli", *container["args"]],
            self.workdir / "operator.log", env=env, cwd=self.repo_root)
        self.process.start()
        # kube-proxy: the Service's ClusterIP:443 -> the process.
        service = self._json("get", "service", "chaperone-operator", "-n", NS)
        self.dnat = ["-d", f"{service['spec']['clusterIP']}/32", "-p", "tcp", "--dport", "443",
                     "-m", "comment", "--comment", DNAT_COMMENT,
                     "-j", "DNAT", "--to-destination", f"127.0.0.1:{port}"]
        subprocess.run(["iptables", "-t", "nat", "-A", "OUTPUT", *self.dnat], check=True)
        self.process.wait_ready(self._serving, 90, "serving webhooks through the Service")
        # deployment controller: the Deployment is rolled out.
        generation = deployment["metadata"]["generation"]
        replicas = deployment["spec"]["replicas"]
        now = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        status = {"status": {
            "observedGeneration": generation, "replicas": replicas, "updatedReplicas": replicas,
            "readyReplicas": replicas, "availableReplicas": replicas,
            "conditions": [{"type": "Available", "status": "True", "reason": "MinimumReplicasAvailable",
                            "lastUpdateTime": now, "lastTransitionTime": now},
                           {"type": "Progressing", "status": "True", "reason": "NewReplicaSetAvailable",
                            "lastUpdateTime": now, "lastTransitionTime": now}]}}
        self.cp.kubectl("patch", "deployment", "chaperone-operator", "-n", NS, "--subresource=status",
                        "--type=merge", "-p", json.dumps(status))

    def _serving(self) -> bool:
        probe = {"apiVersion": "chaperone.dev/v1alpha1", "kind": "AccessPolicy",
                 "metadata": {"name": "probe", "namespace": "default"},
                 "spec": {"rules": [{"name": "r", "block": {}, "match": {"pathRegex": "("}}]}}
        res = self.cp.kubectl("create", "--dry-run=server", "-f", "-", input=json.dumps(probe),
                              check=False)
        return "AccessPolicy default/probe is invalid" in res.stderr

    def stop(self) -> None:
        if self.dnat:
            subprocess.run(["iptables", "-t", "nat", "-D", "OUTPUT", *self.dnat], check=False)
        if self.process is not None:
            self.process.stop(timeout=20)


def test_readme_on_a_cluster_runs_verbatim(control_plane, helm, repo_root, tmp_path):
    cp = control_plane
    lines = readme_cluster_commands((repo_root / "README.md").read_text())
    path = os.pathsep.join([str(Path(helm).parent), str(Path(cp.kubectl_binary).parent),
                            os.environ.get("PATH", "")])
    env = {**_helm_env(tmp_path), "PATH": path, "KUBECONFIG": str(cp.kubeconfig_path)}
    stand_ins = Stand_ins(cp, repo_root, tmp_path)
    # A fresh cluster, as the README assumes: no namespace "agents" left by other tests.
    cp.kubectl("delete", "namespace", AGENTS, "--ignore-not-found", "--wait=true", "--timeout=60s")
    # Nor CRDs: the test bed's were applied with kubectl (crds_installed) and belong to no
    # release, so `helm install` would refuse them. Deleting them would delete other tests'
    # objects; they are handed to the release instead, with the ownership metadata helm checks
    # (what `--take-ownership` does for an install upgrading from kubectl-applied CRDs).
    _hand_crds_to_release(cp, repo_root)
    try:
        for i, line in enumerate(lines):
            res = subprocess.run(["bash", "-o", "pipefail", "-c", line], cwd=repo_root, env=env,
                                 capture_output=True, text=True, timeout=360)
            assert res.returncode == 0, f"README line failed: {line}\n{res.stdout}\n{res.stderr}"
            if i == 0:
                stand_ins.start()

        # What the README promised: the connection is Ready and the policy Valid...
        for kind, name, ready in (("claudeconnection", "aws-prod", "Ready"),
                                  ("accesspolicy", "aws-guardrails", "Valid")):
            conditions = _wait(lambda: (json.loads(cp.kubectl("get", kind, name, "-n", AGENTS, "-o", "json")
                                                   .stdout).get("status") or {}).get("conditions"))
            assert (ready, "True") in [(c["type"], c["status"]) for c in conditions], conditions
        # ...and the agent pod was created with the sidecar.
        pod = json.loads(cp.kubectl("get", "pod", "claude-coder-0", "-n", AGENTS, "-o", "json").stdout)
        assert [c["name"] for c in pod["spec"]["initContainers"]] == ["chaperone-sidecar"]
        assert "chaperone.dev/status" in pod["metadata"]["annotations"]
        # The chart's Redis has a password; the operator copied it into the agents' namespace
        # and the sidecar - only the sidecar - reads it from there.
        def password(ns: str) -> str:
            secret = json.loads(cp.kubectl("get", "secret", "chaperone-redis", "-n", ns, "-o", "json").stdout)
            return base64.b64decode(secret["data"]["password"]).decode()
        chart_password = password(NS)
        assert len(chart_password) == 40
        assert _wait(lambda: cp.kubectl("get", "secret", "chaperone-redis", "-n", AGENTS,
                                        check=False).returncode == 0)
        assert password(AGENTS) == chart_password
        sidecar_env = {e["name"]: e for e in pod["spec"]["initContainers"][0]["env"]}
        assert sidecar_env["CHAPERONE_REDIS_URL"]["value"] == "redis://chaperone-redis.chaperone-system.svc:6379/0"
        assert sidecar_env["CHAPERONE_REDIS_PASSWORD"]["valueFrom"]["secretKeyRef"] == {
            "name": "chaperone-redis", "key": "password"}
        assert "chaperone-redis" not in json.dumps(pod["spec"]["containers"])

        # examples/approvalrequest.yaml: schema-valid, and refused when a person applies it.
        ar = "examples/approvalrequest.yaml"
        dry = subprocess.run(["kubectl", "apply", "--dry-run=client", "-f", ar], cwd=repo_root,
                             env=env, capture_output=True, text=True)
        assert dry.returncode == 0, dry.stderr
        refused = subprocess.run(["kubectl", "apply", "-f", ar], cwd=repo_root, env=env,
                                 capture_output=True, text=True)
        assert refused.returncode != 0 and "denied the request" in refused.stderr, refused.stderr
        assert cp.kubectl("get", "ar", "-n", AGENTS, "-o", "name").stdout.strip() == ""
    finally:
        cp.kubectl("delete", "namespace", AGENTS, "--ignore-not-found", "--wait=false", check=False)
        _wait(lambda: cp.kubectl("get", "namespace", AGENTS, check=False).returncode != 0,
              timeout=60, fail=False)
        subprocess.run([helm, "uninstall", RELEASE, "-n", NS], env=env, capture_output=True)
        stand_ins.stop()
        shutil.rmtree(tmp_path / "webhook-tls", ignore_errors=True)


def _hand_crds_to_release(cp, repo_root: Path) -> None:
    for path in sorted((repo_root / "crds").glob("*.yaml")):
        name = f"crd/{path.name.removesuffix('.yaml')}"
        if cp.kubectl("get", name, check=False).returncode != 0:
            continue
        cp.kubectl("label", name, "--overwrite", "app.kubernetes.io/managed-by=Helm")
        cp.kubectl("annotate", name, "--overwrite", f"meta.helm.sh/release-name={RELEASE}",
                   f"meta.helm.sh/release-namespace={NS}")


def _wait(check, timeout: float = 60, fail: bool = True):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        time.sleep(0.3)
    if fail:
        raise AssertionError("timed out")
    return None
