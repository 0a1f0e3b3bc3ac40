"""Fixtures of the end-to-end story (docs/e2e.md): one installation, one agent pod, one sidecar.

The whole ``e2e/`` directory is ONE story told in order (``STORY_ORDER``): the AWS steps, the
kubectl steps, then the recording those steps left behind. So the fixtures are session-scoped
and shared by the three files:

``installation``  the Helm chart rendered with e2e values (webhook URL on loopback, recording
                  bucket on the test bed's S3 server, a sidecar Secret, free proxy ports) and
                  applied; the operator started as a process with the env and args of the
                  chart's Deployment (its ``webhook-tls`` mount materialised from a Secret we
                  create, as with ``webhook.certSecret``), reached through the real webhooks.
``story``         a namespace with everything a platform team sets up (AWS credentials made in
                  the signature-checking moto server's IAM, the ClaudeConnections and
                  AccessPolicies, RBAC for dave), the Claude pod created *as dave*, read back
                  mutated, and its ``chaperone-sidecar`` container run as a process with exactly
                  the injected env/args/mounts (``story.materialize``); the agent container
                  materialised too, for its env.

The test bed's own fixtures are reused from ``tests/`` (same functions, loaded by path, so the
rule "a component that cannot start fails, never skips" is the same): ``control_plane``,
``crds_installed``, ``s3_server`` (recordings), ``moto_auth`` (AWS: moto with signature checks)
and ``helm_bin``; helpers from ``tests/operator/conftest.py`` render the chart.
"""

from __future__ import annotations

import base64
import importlib.util
import json
import os
import shlex
import sys
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import yaml

HERE = Path(__file__).resolve().parent
REPO_ROOT = HERE.parent  # also story.REPO_ROOT
for _src in ("testbed", "operator", "sidecar"):  # a bare source tree works like an install
    if str(REPO_ROOT / _src) not in sys.path:
        sys.path.insert(0, str(REPO_ROOT / _src))

import story as st  # noqa: E402  (e2e/story.py; e2e/ is on sys.path as the conftest's dir)

from chaperone_testbed.pki import CertAuthority  # noqa: E402
from chaperone_testbed.services import ManagedProcess, free_port  # noqa: E402


def _load(name: str, path: Path):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


_tests = _load("chaperone_e2e_tests_conftest", REPO_ROOT / "tests" / "conftest.py")
_operator = _load("chaperone_e2e_operator_conftest", REPO_ROOT / "tests" / "operator" / "conftest.py")
_sidecar = _load("chaperone_e2e_sidecar_conftest", REPO_ROOT / "tests" / "sidecar" / "conftest.py")

# Re-exported fixtures (pytest finds fixtures by module attribute).
repo_root = _tests.repo_root
control_plane = _tests.control_plane
crds_installed = _tests.crds_installed
s3_server = _tests.s3_server
redis_server = _tests.redis_server
postgres_server = _tests.postgres_server
helm_bin = _operator.helm_bin
moto_auth = _sidecar.moto_auth

OPERATOR_NS = _operator.OPERATOR_NS
OPERATOR_SA = _operator.OPERATOR_SA
API = "chaperone.dev/v1alpha1"
REGION = "us-east-1"
RECORDING_BUCKET = "chaperone-recordings"
RECORDING_PREFIX = "e2e"
SIDECAR_SECRET = "chaperone-sidecar"
WEBHOOK_SECRET = "chaperone-e2e-webhook-tls"
REDIS_SECRET = "chaperone-e2e-redis"  # redis.auth.existingSecret: the test bed Redis's password
POD, AGENT_SA, AGENT_CONTAINER = "claude-1", "claude-agent", "claude"
SIDECAR = "chaperone-sidecar"
OCSF_FILE = "/var/lib/chaperone/spool/ocsf.jsonl"  # chart value ocsf.file, inside the sidecar
STORY_ORDER = ("test_story_aws.py", "test_story_kubernetes.py", "test_recording.py")
RAN: set[str] = set()  # story files whose tests have run (passed or not)


def pytest_collection_modifyitems(session, config, items):
    """The story's files run in story order (AWS, kubectl, then the recording), and after
    every other test of the session: its fail-closed webhooks stay registered until the
    session ends, which would change what tests of other directories see."""
    ours = [item for item in items if Path(str(item.fspath)).parent == HERE]
    rank = {name: n for n, name in enumerate(STORY_ORDER)}
    ours.sort(key=lambda item: rank.get(Path(str(item.fspath)).name, len(rank)))
    others = [item for item in items if Path(str(item.fspath)).parent != HERE]
    items[:] = others + ours


def pytest_runtest_call(item):
    if Path(str(item.fspath)).parent == HERE:
        RAN.add(Path(str(item.fspath)).name)


# ============================================================================ installation

@dataclass
class Installation:
    """The chart's objects on the apiserver and the operator process serving its webhooks."""

    cp: Any
    process: ManagedProcess
    workdir: Path
    values: dict[str, str]
    proxy_port: int
    health_port: int
    s3: Any
    namespaces: list[str] = field(default_factory=list)

    def namespace(self, prefix: str) -> str:
        name = _operator.unique(prefix)
        self.cp.create_namespace(name)
        self.namespaces.append(name)
        return name

    def log(self, lines: int = 60) -> str:
        return self.process.log_tail(lines)


def _chart_sets(values: dict[str, str]) -> list[str]:
    out = []
    for key, value in values.items():
        out += ["--set" if value.isdigit() or value in ("true", "false") else "--set-string",
                f"{key}={value}"]
    return out


@pytest.fixture(scope="session")
def installation(control_plane, crds_installed, helm_bin, repo_root, s3_server, redis_server,
                 tmp_path_factory):
    cp = control_plane
    workdir = tmp_path_factory.mktemp("installation")
    import boto3

    boto3.client("s3", **s3_server.client_kwargs()).create_bucket(Bucket=RECORDING_BUCKET)

    ca = CertAuthority("chaperone-e2e-webhook-ca")
    serving = ca.write_server_cert(workdir, "webhook", dns_names=("localhost",),
                                   ip_addresses=("127.0.0.1",))
    port, proxy_port, health_port, liveness = free_port(), free_port(), free_port(), free_port()
    values = {
        "webhook.url": f"https://127.0.0.1:{port}",
        "webhook.port": str(port),
        "webhook.caBundle": base64.b64encode(ca.cert_pem).decode(),
        "webhook.certSecret": WEBHOOK_SECRET,
        # Free ports instead of 15001/15021: the sidecar runs on this host's loopback, next to
        # whatever else runs here; the webhook injects whatever the chart says.
        "sidecar.proxyPort": str(proxy_port),
        "sidecar.healthPort": str(health_port),
        "sidecar.secretName": SIDECAR_SECRET,
        "sidecar.approvalTimeoutSeconds": "120",
        "recording.s3.bucket": RECORDING_BUCKET,
        "recording.s3.endpoint": s3_server.endpoint_url,
        "recording.s3.region": REGION,
        "recording.s3.prefix": RECORDING_PREFIX,
        # OCSF export of every recorded flow to a file on the spool volume (test_recording.py)
        "ocsf.file": OCSF_FILE,
        # The test bed's real redis-server (AUTH on) as "your own Redis": the URL without the
        # password, the password in a Secret the operator copies to agent namespaces.
        "redis.enabled": "false",
        "redis.url": redis_server.address_url,
        "redis.auth.existingSecret": REDIS_SECRET,
    }
    docs = _operator.render_chart(helm_bin, repo_root, *_chart_sets(values))
    webhooks = [d for d in docs if d["kind"].endswith("WebhookConfiguration")]
    rest = [d for d in docs if d["kind"] not in _operator.NOT_APPLIED and d not in webhooks]
    deployment = next(d for d in docs if d["kind"] == "Deployment")
    cp.create_namespace(OPERATOR_NS)
    cp.kubectl("apply", "-f", "-", input=yaml.safe_dump_all(rest))
    cp.kubectl("apply", "-f", "-", input=json.dumps({
        "apiVersion": "v1", "kind": "Secret",
        "metadata": {"name": REDIS_SECRET, "namespace": OPERATOR_NS},
        "stringData": {"password": redis_server.password}}))
    # The serving certificate an admin provides with webhook.certSecret + webhook.caBundle.
    cp.kubectl("apply", "-f", "-", input=json.dumps({
        "apiVersion": "v1", "kind": "Secret", "type": "kubernetes.io/tls",
        "metadata": {"name": WEBHOOK_SECRET, "namespace": OPERATOR_NS},
        "data": {"tls.crt": base64.b64encode(serving.cert_path.read_bytes()).decode(),
                 "tls.key": base64.b64encode(serving.key_path.read_bytes()).decode()}}))

    # The operator pod as the kubelet would run it, from the Deployment's pod template.
    pod = {"metadata": {"name": "chaperone-operator-e2e", "namespace": OPERATOR_NS,
                        "uid": str(uuid.uuid4())},
           "spec": deployment["spec"]["template"]["spec"]}
    identity = cp.serviceaccount_kubeconfig(OPERATOR_NS, OPERATOR_SA, duration="2h")
    operator = st.materialize(pod, "operator", workdir / "operator-pod",
                              lambda path: cp.api("GET", path),
                              lambda audience, seconds: "")  # no projected tokens: in-cluster
    assert operator.argv[0] == "chaperone", operator.argv
    args = [a if not a.startswith("--liveness=") else f"--liveness=http://127.0.0.1:{liveness}/healthz"
            for a in operator.argv[1:]]
    env = st.clean_env({
        **operator.env,
        # What differs from the cluster, and only that: listen on loopback only (the chart's
        # webhook.url points there; the pod would listen on its own IP), the in-cluster API
        # config replaced by a kubeconfig of the same ServiceAccount, the source tree on the
        # import path.
        "CHAPERONE_WEBHOOK_LISTEN": "127.0.0.1",
        "KUBECONFIG": str(identity.path),
        "PYTHONPATH": os.pathsep.join(str(repo_root / p) for p in ("operator", "sidecar")),
    })
    process = ManagedProcess("chaperone-operator", st.chaperone_argv(*args), workdir / "operator.log",
                             env=env, cwd=repo_root)
    handle = Installation(cp, process, workdir, values, proxy_port, health_port, s3_server)
    process.start()
    try:
        process.wait_ready(lambda: _operator._port_open(port), 90, "serving webhooks")
        cp.kubectl("apply", "-f", "-", input=yaml.safe_dump_all(webhooks))
        process.wait_ready(lambda: _operator._admission_reaches_operator(cp), 60,
                           "reachable through admission")
        yield handle
    finally:
        for ns in handle.namespaces:
            cp.kubectl("delete", "namespace", ns, "--wait=false", check=False)
        deadline = time.monotonic() + 60
        while handle.namespaces and time.monotonic() < deadline and process.running:
            if not [ns for ns in handle.namespaces
                    if cp.kubectl("get", "namespace", ns, check=False).returncode == 0]:
                break
            time.sleep(0.5)
        for doc in webhooks:
            cp.kubectl("delete", doc["kind"].lower(), doc["metadata"]["name"], "--ignore-not-found",
                       check=False)
        process.stop(timeout=20)
        cp.kubectl("delete", "-f", "-", "--ignore-not-found", "--wait=false", check=False,
                   input=yaml.safe_dump_all(rest))
        # workdir (operator.log, the story's sidecar.log ...) is pytest's tmp_path: kept for
        # the last three runs.


# ============================================================================ the story

ALLOW_ALL = json.dumps({"Version": "2012-10-17",
                        "Statement": [{"Effect": "Allow", "Action": "*", "Resource": "*"}]})


@dataclass
class Story:
    """Everything the story's tests share: names, the pod, the sidecar and agent containers."""

    cp: Any
    installation: Installation
    moto: Any
    workdir: Path
    ns: str
    victim_ns: str
    bucket: str
    secret_id: str
    secret_value: str
    aws_access_key: str
    aws_secret_key: str
    manifest_public_key: Path
    pod: dict = field(default_factory=dict)
    sidecar: st.Container | None = None
    agent: st.Container | None = None
    sidecar_process: ManagedProcess | None = None
    sidecar_exit: int | None = None
    plugin_dir: Path | None = None
    steps: dict[str, Any] = field(default_factory=dict)  # what each story step did (for later steps)
    ran: set[str] = field(default_factory=lambda: RAN)  # story files that have run

    # ------------------------------------------------------------------ the agent
    @property
    def home(self) -> Path:
        return self.workdir / "agent-home"

    def agent_env(self, **extra: str) -> dict[str, str]:
        """The agent container's injected env (proxy, CA bundle, dummy credentials) as a
        process sees it, with an empty HOME (no ~/.aws, no ~/.kube of this machine)."""
        assert self.agent is not None
        return st.clean_env({**self.agent.env, "HOME": str(self.home), **extra})

    def aws(self, *args: str, debug: bool = False, timeout: float = 120):
        """A real AWS CLI command as the agent (``--debug`` shows response bodies)."""
        argv = st.aws_argv(*(["--debug"] if debug else []), "--output", "json", *args)
        return st.run(argv, self.agent_env(), timeout=timeout)

    def aws_background(self, *args: str):
        import subprocess

        argv = st.aws_argv("--output", "json", "--cli-read-timeout", "150", *args)
        return subprocess.Popen(argv, env=self.agent_env(), stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True)

    def moto_client(self, service: str):
        """A boto3 client with the REAL credentials, straight to moto (the platform's view)."""
        import boto3

        return boto3.client(service, endpoint_url=self.moto.endpoint_url, region_name=REGION,
                            aws_access_key_id=self.aws_access_key,
                            aws_secret_access_key=self.aws_secret_key)

    # ------------------------------------------------------------------ approvals
    def approval_requests(self) -> list[dict]:
        res = self.cp.kubectl("get", "approvalrequests", "-n", self.ns, "-o", "json")
        return json.loads(res.stdout)["items"]

    def wait_for_request(self, role: str, timeout: float = 60) -> dict:
        """The ApprovalRequest the sidecar opened for ``iam:CreateRole`` of ``role``."""
        def find():
            for ar in self.approval_requests():
                action = ar["spec"].get("action") or {}
                if action.get("name") == "iam:CreateRole" and role in json.dumps(action):
                    return ar
            return None
        return st.wait_for(find, timeout, f"an ApprovalRequest for iam:CreateRole {role}",
                           detail=lambda: self.sidecar_log(40))

    def kubectl_chaperone(self, *args: str, user: str):
        ref = self.cp.user_kubeconfig(user)
        assert self.plugin_dir is not None
        env = st.clean_env({"PATH": f"{self.plugin_dir}{os.pathsep}{os.environ.get('PATH', '')}",
                            "HOME": str(self.workdir / f"home-{user}")})
        argv = [self.cp.kubectl_binary, "chaperone", *args, "--kubeconfig", str(ref.path),
                "--context", ref.context]
        return st.run(argv, env)

    def token_kubeconfig(self, token: str, name: str):
        """A kubeconfig authenticating with a bearer token (tests/operator/conftest.py's)."""
        return _operator.write_token_kubeconfig(self.cp, self.workdir / f"{name}.kubeconfig",
                                                token, self.ns)

    # ------------------------------------------------------------------ the sidecar
    def sidecar_log(self, lines: int = 80) -> str:
        return self.sidecar_process.log_tail(lines) if self.sidecar_process else "(no sidecar)"

    def stop_sidecar(self) -> int:
        """SIGTERM, as the kubelet does when the pod ends: the session is closed and shipped."""
        if self.sidecar_exit is None and self.sidecar_process is not None:
            proc = self.sidecar_process.proc
            self.sidecar_process.stop(timeout=60)
            self.sidecar_exit = proc.returncode if proc is not None else -1
        return self.sidecar_exit if self.sidecar_exit is not None else -1


def _make_plugin_shim(directory: Path) -> Path:
    """`kubectl-chaperone` on PATH running this checkout (as tests/operator/test_kubectl_plugin)."""
    directory.mkdir(parents=True, exist_ok=True)
    pythonpath = os.pathsep.join(str(REPO_ROOT / p) for p in ("operator", "sidecar"))
    shim = directory / "kubectl-chaperone"
    shim.write_text("#!/bin/sh\n"
                    f"PYTHONPATH={shlex.quote(pythonpath)}${{PYTHONPATH:+:$PYTHONPATH}} "
                    f"exec {shlex.quote(sys.executable)} -m chaperone_operator.kubectl_plugin \"$@\"\n")
    shim.chmod(0o755)
    return directory


def _ed25519_keys(directory: Path) -> tuple[bytes, Path]:
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    key = Ed25519PrivateKey.generate()
    private = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                serialization.NoEncryption())
    public = directory / "manifest-key.pub"
    public.write_bytes(key.public_key().public_bytes(serialization.Encoding.PEM,
                                                     serialization.PublicFormat.SubjectPublicKeyInfo))
    return private, public


def _b64(value: str | bytes) -> str:
    return base64.b64encode(value.encode() if isinstance(value, str) else value).decode()


def _platform_objects(s: Story, aws_key: dict, kube_token: str, manifest_key: bytes,
                      api_host: str) -> list[dict]:
    """What the platform team applies in the story namespace (as admin)."""
    ns, rbac = s.ns, "rbac.authorization.k8s.io/v1"
    return [
        {"apiVersion": "v1", "kind": "ServiceAccount", "metadata": {"name": AGENT_SA, "namespace": ns}},
        # dave, a developer: creates agent pods here and may look at (and patch, as far as RBAC
        # goes) the approval requests of this namespace - admission still refuses his own.
        {"apiVersion": rbac, "kind": "Role", "metadata": {"name": "developer", "namespace": ns},
         "rules": [{"apiGroups": [""], "resources": ["pods"],
                    "verbs": ["create", "get", "list", "watch", "delete"]},
                   {"apiGroups": ["chaperone.dev"], "resources": ["approvalrequests"],
                    "verbs": ["get", "list", "watch", "patch"]}]},
        {"apiVersion": rbac, "kind": "RoleBinding", "metadata": {"name": "developer-dave", "namespace": ns},
         "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": "developer"},
         "subjects": [{"apiGroup": "rbac.authorization.k8s.io", "kind": "User", "name": "dave"}]},
        # AWS: a real access key of moto's IAM; only the sidecar will ever see it.
        {"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "aws-credentials", "namespace": ns},
         "type": "Opaque", "data": {"AWS_ACCESS_KEY_ID": _b64(aws_key["AccessKeyId"]),
                                    "AWS_SECRET_ACCESS_KEY": _b64(aws_key["SecretAccessKey"])}},
        # The sidecar Secret (chart value sidecar.secretName): S3 credentials for recordings and
        # the manifest signing key.
        {"apiVersion": "v1", "kind": "Secret", "metadata": {"name": SIDECAR_SECRET, "namespace": ns},
         "type": "Opaque", "data": {"AWS_ACCESS_KEY_ID": _b64(s.installation.s3.access_key),
                                    "AWS_SECRET_ACCESS_KEY": _b64(s.installation.s3.secret_key),
                                    "MANIFEST_KEY": _b64(manifest_key)}},
        {"apiVersion": API, "kind": "ClaudeConnection", "metadata": {"name": "aws-moto", "namespace": ns},
         "spec": {"type": "aws", "aws": {"region": REGION, "endpointURL": s.moto.endpoint_url},
                  "credentials": {"source": "secret", "secretRef": {"name": "aws-credentials"}},
                  "recording": {"bodies": "full"}}},
        {"apiVersion": API, "kind": "AccessPolicy", "metadata": {"name": "aws-guardrails", "namespace": ns},
         "spec": {"connections": ["aws-moto"], "defaultEffect": "allow",
                  "approvers": {"groups": ["platform-approvers"]},
                  "masking": {"detectors": ["aws-access-key-id", "aws-secret-key", "private-key", "jwt"]},
                  "rules": [
                      {"name": "no-bucket-deletion",
                       "description": "Deleting buckets is never done by agents.",
                       "match": {"aws": {"actions": ["s3:DeleteBucket"]}},
                       "block": {"message": "Bucket deletion is not allowed for agents; open a "
                                            "ticket with the platform team."}},
                      {"name": "mask-secret-values",
                       "match": {"aws": {"actions": ["secretsmanager:GetSecretValue"]}},
                       "mask": {"fields": ["$.SecretString", "$.SecretBinary"]}},
                      {"name": "new-roles-need-approval",
                       "match": {"aws": {"actions": ["iam:CreateRole"]}},
                       "requireApproval": {"minApprovals": 1, "timeoutSeconds": 600, "mode": "hold",
                                           "holdSeconds": 120,
                                           "grant": {"scope": "exact", "ttlSeconds": 900}}}]}},
        # Kubernetes: the test apiserver itself, with a narrowly scoped token in a Secret.
        {"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "agent-kube-token", "namespace": ns},
         "type": "Opaque", "data": {"token": _b64(kube_token)}},
        {"apiVersion": API, "kind": "ClaudeConnection", "metadata": {"name": "cluster-api", "namespace": ns},
         "spec": {"type": "kubernetes", "hosts": [api_host],
                  "credentials": {"source": "secret", "secretRef": {"name": "agent-kube-token"}},
                  "upstreamCA": {"kind": "ConfigMap", "name": "kube-root-ca.crt", "key": "ca.crt"},
                  "recording": {"bodies": "full"}}},
        {"apiVersion": API, "kind": "AccessPolicy", "metadata": {"name": "cluster-readonly", "namespace": ns},
         "spec": {"connections": ["cluster-api"], "defaultEffect": "block",
                  "rules": [
                      {"name": "reads", "match": {"kubernetes": {"verbs": ["get", "list", "watch"]}},
                       "allow": {}},
                      {"name": "never-delete-namespaces",
                       "match": {"kubernetes": {"verbs": ["delete", "deletecollection"],
                                                "resources": ["namespaces"]}},
                       "block": {"message": "Agents may not delete namespaces."}}]}},
    ]


def _reader_rbac(s: Story, reader: str) -> list[dict]:
    """The kube connection's identity: read pods here, and - so that "the namespace still
    exists" means something - RBAC that WOULD let it delete the victim namespace."""
    rbac = "rbac.authorization.k8s.io/v1"
    cluster_name = f"e2e-{s.ns}-reader"
    return [
        {"apiVersion": "v1", "kind": "ServiceAccount", "metadata": {"name": reader, "namespace": s.ns}},
        {"apiVersion": rbac, "kind": "Role", "metadata": {"name": "pod-reader", "namespace": s.ns},
         "rules": [{"apiGroups": [""], "resources": ["pods"], "verbs": ["get", "list", "watch"]}]},
        {"apiVersion": rbac, "kind": "RoleBinding", "metadata": {"name": "pod-reader", "namespace": s.ns},
         "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": "pod-reader"},
         "subjects": [{"kind": "ServiceAccount", "name": reader, "namespace": s.ns}]},
        {"apiVersion": rbac, "kind": "ClusterRole", "metadata": {"name": cluster_name},
         "rules": [{"apiGroups": [""], "resources": ["namespaces"], "verbs": ["get", "delete"],
                    "resourceNames": [s.victim_ns]}]},
        {"apiVersion": rbac, "kind": "ClusterRoleBinding", "metadata": {"name": cluster_name},
         "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": cluster_name},
         "subjects": [{"kind": "ServiceAccount", "name": reader, "namespace": s.ns}]},
    ]


def _claude_pod(ns: str) -> dict:
    return {"apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": POD, "namespace": ns,
                         "labels": {"app": "claude", "chaperone.dev/inject": "true"}},
            "spec": {"serviceAccountName": AGENT_SA,
                     "containers": [{"name": AGENT_CONTAINER, "image": "claude-code:e2e",
                                     "command": ["sleep", "infinity"]}]}}


@pytest.fixture(scope="session")
def story(installation, moto_auth, tmp_path_factory):
    cp = installation.cp
    workdir = tmp_path_factory.mktemp("story")
    tag = uuid.uuid4().hex[:6]
    s = Story(cp=cp, installation=installation, moto=moto_auth, workdir=workdir,
              ns=installation.namespace("story"), victim_ns=installation.namespace("victim"),
              bucket=f"story-bucket-{tag}", secret_id=f"story/db-password-{tag}",
              secret_value=f"hunter2-{uuid.uuid4().hex}", aws_access_key="", aws_secret_key="",
              manifest_public_key=Path())
    s.home.mkdir()

    # AWS, as the platform team sets it up: an IAM user of its own with an access key, a
    # bucket and a secret (made with the real key: the server checks every signature).
    iam = moto_auth.client("iam")
    user = f"story-agent-{tag}"
    iam.create_user(UserName=user)
    iam.put_user_policy(UserName=user, PolicyName="all", PolicyDocument=ALLOW_ALL)
    aws_key = iam.create_access_key(UserName=user)["AccessKey"]
    s.aws_access_key, s.aws_secret_key = aws_key["AccessKeyId"], aws_key["SecretAccessKey"]
    s.moto_client("s3").create_bucket(Bucket=s.bucket)
    s.moto_client("secretsmanager").create_secret(Name=s.secret_id, SecretString=s.secret_value)

    manifest_key, s.manifest_public_key = _ed25519_keys(workdir)
    reader = "agent-reader"
    cluster_objects = _reader_rbac(s, reader)
    try:
        cp.kubectl("apply", "-f", "-", input=yaml.safe_dump_all(cluster_objects))
        kube_token = cp.kubectl("create", "token", reader, "-n", s.ns, "--duration", "2h").stdout.strip()
        api_host = cp.url.removeprefix("https://")
        cp.kubectl("apply", "-f", "-", input=yaml.safe_dump_all(
            _platform_objects(s, aws_key, kube_token, manifest_key, api_host)))

        # dave creates the pod; the webhook injects it (and records dave as its creator).
        created = cp.kubectl("create", "-f", "-", "-o", "json", input=json.dumps(_claude_pod(s.ns)),
                             user="developer")
        s.steps["created-as-dave"] = json.loads(created.stdout)
        s.pod = json.loads(cp.kubectl("get", "pod", POD, "-n", s.ns, "-o", "json").stdout)

        # The operator follows injected pods: interception CA, trust bundle, sidecar RoleBinding.
        st.wait_for_pod_plumbing(cp, s.ns, AGENT_SA, detail=installation.log)
        s.sidecar, s.agent = st.materialize_pod(cp, s.pod, workdir, SIDECAR, AGENT_CONTAINER)
        env = st.sidecar_env(cp, s.sidecar)
        assert s.sidecar.argv[0] == "chaperone" and s.sidecar.argv[1] == "sidecar", s.sidecar.argv
        s.sidecar_process = ManagedProcess(SIDECAR, st.chaperone_argv(*s.sidecar.argv[1:]),
                                           workdir / "sidecar.log", env=env,
                                           cwd=s.sidecar.path("/tmp"))
        s.sidecar_process.start()
        s.sidecar_process.wait_ready(lambda: st.health_ready(installation.health_port), 90, "ready (/ready 200)")
        s.plugin_dir = _make_plugin_shim(workdir / "plugin-bin")
        yield s
    finally:
        s.stop_sidecar()
        cp.kubectl("delete", "-f", "-", "--ignore-not-found", "--wait=false", check=False,
                   input=yaml.safe_dump_all([o for o in cluster_objects
                                             if o["kind"].startswith("Cluster")]))
