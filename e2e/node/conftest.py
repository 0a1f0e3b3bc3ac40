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

import base64
import json
import os
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import yaml

from chaperone_testbed.controlplane import ControlPlane
from chaperone_testbed.services import ManagedProcess, TestbedError, free_port
from chaperone_testbed.image import AGENT_IMAGE, IMAGE_NAME, ImageBuilder
from chaperone_testbed.node import Node, node_address
from nodebed import (  # e2e/node/nodebed.py: names and helpers shared with the test files
    AGENT_CONTAINER, AGENT_SA, API, KUBERNETES_SERVICE, POD, RECORDING_BUCKET, RECORDING_PREFIX,
    REGION, RELEASE, RELEASE_NS, REPO_ROOT, SIDECAR, SIDECAR_SECRET, claude_pod, start_or_fail,
    wait_for,
)

HERE = Path(__file__).resolve().parent
# The cleanup tests start and stop nodes of their own: they must run before the session's node
# exists (one node per machine: one bridge, one node name).
ORDER = ("test_node_cleanup.py", "test_node_runs.py", "test_node_story.py")


def pytest_collection_modifyitems(session, config, items):
    ours = [i for i in items if Path(str(i.fspath)).parent == HERE]
    if not ours:
        return
    rank = {name: n for n, name in enumerate(ORDER)}
    ours.sort(key=lambda i: rank.get(Path(str(i.fspath)).name, len(rank)))
    others = [i for i in items if Path(str(i.fspath)).parent != HERE]
    items[:] = others + ours


TIMINGS: dict[str, float] = {}  # seconds, reported at the end of the run (docs/e2e.md figures)


def pytest_terminal_summary(terminalreporter):
    if TIMINGS:
        terminalreporter.write_line("node story timings: " + ", ".join(
            f"{k} {v:.1f}s" for k, v in TIMINGS.items()))


@pytest.fixture(scope="session")
def node_cp():
    cp = ControlPlane(build_script=REPO_ROOT / "hack" / "build-control-plane.sh",
                      node_address=node_address())
    yield start_or_fail(cp, "control plane serving a node")
    cp.stop()


@pytest.fixture(scope="session")
def node(node_cp):
    n = Node(node_cp)
    n.timings = TIMINGS  # the node's own figures (ready) and the story's land in one place
    yield start_or_fail(n, "node (containerd + kubelet)")
    n.stop()


# ============================================================================ the node story

@pytest.fixture(scope="session")
def images(node):
    """The chaperone image (the Dockerfile, built here) and the agent image, in containerd."""
    builder = ImageBuilder(REPO_ROOT)
    t0 = time.monotonic()
    try:
        archives = {"chaperone": builder.chaperone(), "agent": builder.agent()}
    except TestbedError as exc:
        pytest.fail(f"test bed: images could not be built:\n{exc}", pytrace=False)
    node.timings["images-built"] = time.monotonic() - t0
    t0 = time.monotonic()
    for archive in archives.values():
        node.import_image(archive)
    node.timings["images-imported"] = time.monotonic() - t0
    return {"chaperone": IMAGE_NAME, "agent": AGENT_IMAGE}


@pytest.fixture(scope="session")
def node_s3(node, tmp_path_factory):
    """moto's S3 server on the node address: the sidecars in pods ship recordings there (the
    session's S3Server listens on loopback, which pods cannot reach)."""
    workdir = tmp_path_factory.mktemp("node-s3")
    port = free_port()
    proc = ManagedProcess("moto-node", [sys.executable, "-m", "moto.server", "-H", node.address,
                                        "-p", str(port)], workdir / "moto.log")
    proc.start()
    url = f"http://{node.address}:{port}"

    def serving() -> bool:
        try:
            with urllib.request.urlopen(url + "/", timeout=2) as resp:
                return resp.status < 500
        except urllib.error.HTTPError as exc:
            return exc.code < 500
    try:
        proc.wait_ready(serving, 60, "serving")
    except TestbedError as exc:
        pytest.fail(f"test bed: moto on the node address could not start:\n{exc}", pytrace=False)
    import boto3

    s3 = boto3.client("s3", endpoint_url=url, region_name=REGION, aws_access_key_id="testing",
                      aws_secret_access_key="testing")
    s3.create_bucket(Bucket=RECORDING_BUCKET)
    yield url
    proc.stop()


@dataclass
class NodeAWS:
    """moto with IAM signature checks on the node address: the AWS the agent's CLI reaches
    through the sidecar. `key` is a real access key of its IAM (only the sidecar gets it)."""

    url: str
    key: dict
    bucket: str

    def client(self, service: str):
        import boto3

        return boto3.client(service, endpoint_url=self.url, region_name=REGION,
                            aws_access_key_id=self.key["AccessKeyId"],
                            aws_secret_access_key=self.key["SecretAccessKey"])


@pytest.fixture(scope="session")
def node_aws(node, tmp_path_factory):
    import boto3

    workdir = tmp_path_factory.mktemp("node-aws")
    port = free_port()
    url = f"http://{node.address}:{port}"
    env = {k: v for k, v in os.environ.items()
           if k not in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN")}
    env["INITIAL_NO_AUTH_ACTION_COUNT"] = "3"  # CreateUser, PutUserPolicy, CreateAccessKey
    proc = ManagedProcess("moto-aws", [sys.executable, "-m", "moto.server", "-H", node.address,
                                       "-p", str(port)], workdir / "moto.log", env=env)
    proc.start()

    def serving() -> bool:
        with urllib.request.urlopen(url + "/moto-api/", timeout=2) as resp:
            return resp.status == 200
    try:
        proc.wait_ready(serving, 60, "serving")
    except TestbedError as exc:
        pytest.fail(f"test bed: moto with IAM auth could not start:\n{exc}", pytrace=False)
    boot = dict(endpoint_url=url, region_name=REGION, aws_access_key_id="bootstrap",
                aws_secret_access_key="bootstrap")
    iam = boto3.client("iam", **boot)
    iam.create_user(UserName="story-agent")
    iam.put_user_policy(UserName="story-agent", PolicyName="all", PolicyDocument=json.dumps(
        {"Version": "2012-10-17",
         "Statement": [{"Effect": "Allow", "Action": "*", "Resource": "*"}]}))
    aws = NodeAWS(url, iam.create_access_key(UserName="story-agent")["AccessKey"],
                  f"node-story-{uuid.uuid4().hex[:6]}")
    aws.client("s3").create_bucket(Bucket=aws.bucket)
    yield aws
    proc.stop()


@dataclass
class Release:
    cp: ControlPlane
    node: Node
    helm: str
    s3_url: str
    install_seconds: float = 0.0

    def helm_run(self, *args: str, check: bool = True) -> subprocess.CompletedProcess:
        env = {**os.environ, "KUBECONFIG": str(self.cp.kubeconfig_path),
               "HELM_CACHE_HOME": str(self.cp.workdir / "helm-cache"),
               "HELM_CONFIG_HOME": str(self.cp.workdir / "helm-config"),
               "HELM_DATA_HOME": str(self.cp.workdir / "helm-data")}
        res = subprocess.run([self.helm, *args], capture_output=True, text=True, env=env,
                             timeout=600)
        if check and res.returncode != 0:
            raise AssertionError(f"helm {' '.join(args)} failed: {res.stderr}\n{res.stdout}")
        return res

    def operator_log(self) -> str:
        res = self.cp.kubectl("logs", "-n", RELEASE_NS, "deployment/chaperone-operator",
                              "--tail", "60", check=False)
        return res.stdout + res.stderr


def _admission_reaches_operator(cp: ControlPlane) -> bool:
    """An invalid AccessPolicy (server-side dry run) is refused BY THE WEBHOOK, not for want
    of it."""
    bad = {"apiVersion": API, "kind": "AccessPolicy",
           "metadata": {"name": "probe", "namespace": "default"},
           "spec": {"rules": [{"name": "r", "block": {}, "match": {"pathRegex": "("}}]}}
    res = cp.kubectl("create", "--dry-run=server", "-f", "-", input=json.dumps(bad), check=False)
    return "AccessPolicy default/probe is invalid" in res.stderr


@pytest.fixture(scope="session")
def release(node_cp, node, images, helm_bin, node_s3):
    """`helm install` of the chart as README says, with the recording bucket on node_s3.

    redis.enabled=false: the chart's Redis is the official redis image, which cannot be pulled
    here; sidecars then keep grants in memory (a supported configuration, docs/redis.md).
    """
    rel = Release(node_cp, node, helm_bin, node_s3)
    t0 = time.monotonic()
    rel.helm_run("install", RELEASE, str(REPO_ROOT / "charts" / "chaperone"),
                 "-n", RELEASE_NS, "--create-namespace",
                 "--set", "redis.enabled=false",
                 "--set-string", f"recording.s3.bucket={RECORDING_BUCKET}",
                 "--set-string", f"recording.s3.endpoint={node_s3}",
                 "--set-string", f"recording.s3.region={REGION}",
                 "--set-string", f"recording.s3.prefix={RECORDING_PREFIX}",
                 "--set-string", f"sidecar.secretName={SIDECAR_SECRET}",
                 "--set", "sidecar.approvalTimeoutSeconds=120")
    try:
        res = node_cp.kubectl("-n", RELEASE_NS, "rollout", "status",
                              "deployment/chaperone-operator", "--timeout=180s", check=False,
                              timeout=200)
        assert res.returncode == 0, (f"operator rollout: {res.stderr}\n{rel.operator_log()}\n"
                                     f"{node_cp.kubectl('get', 'pods', '-A', '-o', 'wide').stdout}"
                                     f"\n{node.logs(20)}")
        # Ready is not yet reachable: the Service's endpoints reach kube-proxy's rules a sync
        # later (meanwhile its REJECT rule answers "connection refused"), which is what a user
        # running README's next command right after `rollout status` can meet too.
        wait_for(lambda: _admission_reaches_operator(node_cp), 60,
                 "admission reaching the operator through the Service",
                 detail=rel.operator_log)
        rel.install_seconds = time.monotonic() - t0
        node.timings["helm-install-to-rollout"] = rel.install_seconds
        yield rel
    finally:
        rel.helm_run("uninstall", RELEASE, "-n", RELEASE_NS, "--wait", "--timeout", "120s",
                     check=False)


@dataclass
class NodeStory:
    """The story namespace on the node, the Claude pod dave created, and how to act in it."""

    cp: ControlPlane
    node: Node
    release: Release
    ns: str
    victim_ns: str
    manifest_public_key: Path
    workdir: Path
    aws: NodeAWS
    steps: dict = field(default_factory=dict)

    def pod(self, name: str = POD) -> dict:
        return json.loads(self.cp.kubectl("get", "pod", name, "-n", self.ns, "-o", "json").stdout)

    def exec(self, *argv: str, timeout: float = 120, check: bool = False, pod: str = POD
             ) -> subprocess.CompletedProcess:
        """Run a command in the agent container through the real kubelet (`kubectl exec`)."""
        return self.cp.kubectl("exec", "-n", self.ns, pod, "-c", AGENT_CONTAINER, "--", *argv,
                               check=check, timeout=timeout)

    def exec_background(self, *argv: str) -> subprocess.Popen:
        ref = self.cp.user_kubeconfig("admin")
        return subprocess.Popen(
            [self.cp.kubectl_binary, *ref.kubectl_args(), "exec", "-n", self.ns, POD, "-c",
             AGENT_CONTAINER, "--", *argv],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

    def agent_kubectl(self, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
        """The agent's kubectl: the in-cluster API address, a placeholder token, no CA of its
        own (it trusts the injected SSL_CERT_FILE: the interception CA). HTTPS_PROXY is the
        injected one; 10.0.0.1 is not loopback, so Go sends it through the sidecar."""
        return self.exec("kubectl", "--server", f"https://{KUBERNETES_SERVICE}:443",
                         "--token", "placeholder", "-n", self.ns, *args, timeout=timeout)

    def sidecar_log(self, tail: int = 60) -> str:
        res = self.cp.kubectl("logs", "-n", self.ns, POD, "-c", SIDECAR, "--tail", str(tail),
                              check=False)
        return res.stdout + res.stderr

    def sidecar_status(self) -> dict:
        return next(s for s in self.pod()["status"].get("initContainerStatuses", [])
                    if s["name"] == SIDECAR)

    def approval_requests(self) -> list[dict]:
        return json.loads(self.cp.kubectl("get", "approvalrequests", "-n", self.ns, "-o",
                                          "json").stdout)["items"]

    def sessions(self, *args: str) -> subprocess.CompletedProcess:
        """`chaperone sessions ...` on this machine, reading the chart's bucket on node_s3."""
        env = {**os.environ, "AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
               "AWS_DEFAULT_REGION": REGION}
        argv = [sys.executable, "-m", "chaperone_sidecar.cli", "sessions", *args[:1],
                "--s3-bucket", RECORDING_BUCKET, "--s3-endpoint", self.release.s3_url,
                "--s3-prefix", RECORDING_PREFIX, *args[1:]]
        return subprocess.run(argv, capture_output=True, text=True, env=env, timeout=120)


def _b64(value: str | bytes) -> str:
    return base64.b64encode(value.encode() if isinstance(value, str) else value).decode()


def _ed25519_keys(directory: Path) -> tuple[bytes, Path]:
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    key = Ed25519PrivateKey.generate()
    private = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                serialization.NoEncryption())
    public = directory / "manifest-key.pub"
    public.write_bytes(key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo))
    return private, public


def _platform_objects(ns: str, victim: str, token: str, manifest_key: bytes,
                      aws: NodeAWS) -> list[dict]:
    """What the platform team applies (as admin): dave's RBAC, the sidecar Secret, the
    connections to AWS (moto) and to this cluster's API (the in-cluster address), their
    policies."""
    rbac = "rbac.authorization.k8s.io/v1"
    return [
        {"apiVersion": "v1", "kind": "ServiceAccount", "metadata": {"name": AGENT_SA, "namespace": ns}},
        {"apiVersion": rbac, "kind": "Role", "metadata": {"name": "developer", "namespace": ns},
         "rules": [{"apiGroups": [""], "resources": ["pods"],
                    "verbs": ["create", "get", "list", "watch", "delete"]},
                   {"apiGroups": ["chaperone.dev"], "resources": ["approvalrequests"],
                    "verbs": ["get", "list", "watch", "patch"]}]},
        {"apiVersion": rbac, "kind": "RoleBinding", "metadata": {"name": "developer-dave", "namespace": ns},
         "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": "developer"},
         "subjects": [{"apiGroup": "rbac.authorization.k8s.io", "kind": "User", "name": "dave"}]},
        {"apiVersion": "v1", "kind": "Secret", "metadata": {"name": SIDECAR_SECRET, "namespace": ns},
         "type": "Opaque", "data": {"AWS_ACCESS_KEY_ID": _b64("testing"),
                                    "AWS_SECRET_ACCESS_KEY": _b64("testing"),
                                    "MANIFEST_KEY": _b64(manifest_key)}},
        {"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "aws-credentials", "namespace": ns},
         "type": "Opaque", "data": {"AWS_ACCESS_KEY_ID": _b64(aws.key["AccessKeyId"]),
                                    "AWS_SECRET_ACCESS_KEY": _b64(aws.key["SecretAccessKey"])}},
        {"apiVersion": API, "kind": "ClaudeConnection", "metadata": {"name": "aws-moto", "namespace": ns},
         "spec": {"type": "aws", "aws": {"region": REGION, "endpointURL": aws.url},
                  "credentials": {"source": "secret", "secretRef": {"name": "aws-credentials"}},
                  "recording": {"bodies": "full"}}},
        {"apiVersion": API, "kind": "AccessPolicy", "metadata": {"name": "aws-guardrails", "namespace": ns},
         "spec": {"connections": ["aws-moto"], "defaultEffect": "allow",
                  "rules": [{"name": "no-bucket-deletion",
                             "match": {"aws": {"actions": ["s3:DeleteBucket"]}},
                             "block": {"message": "Bucket deletion is not allowed for agents."}}]}},
        {"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "agent-kube-token", "namespace": ns},
         "type": "Opaque", "data": {"token": _b64(token)}},
        {"apiVersion": API, "kind": "ClaudeConnection", "metadata": {"name": "cluster-api", "namespace": ns},
         "spec": {"type": "kubernetes", "hosts": [f"{KUBERNETES_SERVICE}:443"],
                  "credentials": {"source": "secret", "secretRef": {"name": "agent-kube-token"}},
                  "upstreamCA": {"kind": "ConfigMap", "name": "kube-root-ca.crt", "key": "ca.crt"},
                  "recording": {"bodies": "full"}}},
        {"apiVersion": API, "kind": "AccessPolicy", "metadata": {"name": "cluster-guardrails", "namespace": ns},
         "spec": {"connections": ["cluster-api"], "defaultEffect": "block",
                  "approvers": {"groups": ["platform-approvers"]},
                  "rules": [
                      {"name": "reads", "match": {"kubernetes": {"verbs": ["get", "list", "watch"]}},
                       "allow": {}},
                      {"name": "never-delete-namespaces",
                       "match": {"kubernetes": {"verbs": ["delete", "deletecollection"],
                                                "resources": ["namespaces"]}},
                       "block": {"message": "Agents may not delete namespaces."}},
                      {"name": "configmaps-need-approval",
                       "match": {"kubernetes": {"verbs": ["create"], "resources": ["configmaps"]}},
                       "requireApproval": {"minApprovals": 1, "timeoutSeconds": 600,
                                           "mode": "hold", "holdSeconds": 120}}]}},
    ]


def _reader_rbac(ns: str, victim: str, reader: str) -> list[dict]:
    """The connection's identity: read pods and create configmaps here, and RBAC that WOULD let
    it delete the victim namespace (so "still exists" proves the policy, not RBAC)."""
    rbac = "rbac.authorization.k8s.io/v1"
    cluster_name = f"node-e2e-{ns}-reader"
    return [
        {"apiVersion": "v1", "kind": "ServiceAccount", "metadata": {"name": reader, "namespace": ns}},
        {"apiVersion": rbac, "kind": "Role", "metadata": {"name": "reader", "namespace": ns},
         "rules": [{"apiGroups": [""], "resources": ["pods"], "verbs": ["get", "list", "watch"]},
                   {"apiGroups": [""], "resources": ["configmaps"], "verbs": ["get", "create"]}]},
        {"apiVersion": rbac, "kind": "RoleBinding", "metadata": {"name": "reader", "namespace": ns},
         "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": "reader"},
         "subjects": [{"kind": "ServiceAccount", "name": reader, "namespace": ns}]},
        {"apiVersion": rbac, "kind": "ClusterRole", "metadata": {"name": cluster_name},
         "rules": [{"apiGroups": [""], "resources": ["namespaces"], "verbs": ["get", "delete"],
                    "resourceNames": [victim]}]},
        {"apiVersion": rbac, "kind": "ClusterRoleBinding", "metadata": {"name": cluster_name},
         "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": cluster_name},
         "subjects": [{"kind": "ServiceAccount", "name": reader, "namespace": ns}]},
    ]


@pytest.fixture(scope="session")
def node_story(release, node_cp, node, images, node_aws, tmp_path_factory):
    cp = node_cp
    workdir = tmp_path_factory.mktemp("node-story")
    tag = uuid.uuid4().hex[:6]
    ns, victim = f"story-{tag}", f"victim-{tag}"
    for name in (ns, victim):
        cp.create_namespace(name)
    manifest_key, public = _ed25519_keys(workdir)
    reader = "agent-reader"
    cluster_objects = _reader_rbac(ns, victim, reader)
    s = NodeStory(cp, node, release, ns, victim, public, workdir, node_aws)
    try:
        cp.kubectl("apply", "-f", "-", input=yaml.safe_dump_all(cluster_objects))
        token = cp.kubectl("create", "token", reader, "-n", ns, "--duration", "2h").stdout.strip()
        cp.kubectl("apply", "-f", "-", input=yaml.safe_dump_all(
            _platform_objects(ns, victim, token, manifest_key, node_aws)))
        t0 = time.monotonic()
        created = cp.kubectl("create", "-f", "-", "-o", "json", user="developer",
                             input=json.dumps(claude_pod(ns, images["agent"])))
        s.steps["created-as-dave"] = json.loads(created.stdout)

        def started():
            status = s.pod()["status"]
            conds = {c["type"]: c["status"] for c in status.get("conditions", [])}
            return conds.get("Ready") == "True"
        wait_for(started, 180, "the Claude pod Ready (sidecar and agent started)",
                 detail=lambda: json.dumps(s.pod()["status"], indent=1)[-3000:]
                 + "\n" + s.sidecar_log() + "\n" + release.operator_log())
        node.timings["claude-pod-ready"] = time.monotonic() - t0
        yield s
    finally:
        cp.kubectl("delete", "pod", POD, "-n", ns, "--ignore-not-found", "--wait=false",
                   check=False)
        cp.kubectl("delete", "-f", "-", "--ignore-not-found", "--wait=false", check=False,
                   input=yaml.safe_dump_all([o for o in cluster_objects
                                             if o["kind"].startswith("Cluster")]))
