"""A real Kubernetes control plane (etcd + kube-apiserver) for tests, without Docker or a cluster.

Why: Chaperone's operator, admission webhooks and RBAC-driven approvals must be tested against
the real API server (real authn/authz, admission chain, TokenRequest), not a fake. This machine
class has no Docker/kind, so `hack/build-control-plane.sh` compiles the two binaries from Go
modules (envtest convention: a KUBEBUILDER_ASSETS directory) and this module runs them on free
loopback ports with a throwaway PKI, plus a kubeconfig with one context per test persona.

There is no kube-controller-manager; `controllers.NamespaceController` stands in for the two
controller behaviours tests trip over at once (default ServiceAccount per namespace, namespace
deletion). Garbage collection, workload controllers and scheduling are *not* emulated.

`ControlPlane(node_address=IP)` serves a real node (`node.Node`, issue 14): the apiserver also
listens on that non-loopback address (pods reach it there through the `kubernetes` Service,
whose Endpoints the lease reconciler keeps pointing at it), its certificate names it, nodes are
authorized by the Node authorizer + NodeRestriction, kubelets are reached at their InternalIP
with a client certificate of their own, and `component_kubeconfig` issues identities for the
node's components. Without it nothing changes: loopback only, no endpoint reconciler.
"""

from __future__ import annotations

import atexit
import json
import os
import shutil
import ssl
import subprocess
import tempfile
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .controllers import NamespaceController, ensure_namespace_defaults
from .pki import CertAuthority, KeyPair
from .services import LOOPBACK, ManagedProcess, StartupError, free_port, keep_artifacts, locate_built, require_binary

__all__ = ["ControlPlane", "KubeconfigRef", "KubectlError", "USERS", "locate_assets"]

# context name -> (user name, groups). The CN/O of each client certificate.
USERS: dict[str, tuple[str, tuple[str, ...]]] = {
    "admin": ("admin", ("system:masters",)),
    "approver": ("alice", ("platform-approvers",)),
    "approver2": ("bob", ("platform-approvers",)),
    "developer": ("dave", ("developers",)),
}
CLUSTER_NAME = "chaperone-testbed"
SA_ISSUER = "https://kubernetes.default.svc.cluster.local"
BUILD_SCRIPT = Path("hack") / "build-control-plane.sh"


def _has_binaries(d: Path) -> bool:
    return all(os.access(d / b, os.X_OK) for b in ("kube-apiserver", "etcd"))


def locate_assets(build_script: Path | str | None = None) -> Path:
    """The directory holding kube-apiserver and etcd, building them if necessary.

    KUBEBUILDER_ASSETS wins if it holds both binaries; otherwise the build script runs (it
    returns at once when its cache is warm) and the directory it prints is used.
    """
    return locate_built("KUBEBUILDER_ASSETS", BUILD_SCRIPT, _has_binaries, "kube-apiserver and etcd",
                        build_script)


@dataclass(frozen=True)
class KubeconfigRef:
    """A kubeconfig file plus the context to use in it."""

    path: Path
    context: str

    def env(self) -> dict[str, str]:
        """Environment for a child process; only valid when `context` is the file's current one."""
        return {"KUBECONFIG": str(self.path)}

    def kubectl_args(self) -> list[str]:
        return ["--kubeconfig", str(self.path), "--context", self.context]


class KubectlError(subprocess.CalledProcessError):
    """kubectl exited non-zero; unlike CalledProcessError, str() includes its stderr."""

    def __str__(self) -> str:
        return f"{super().__str__()}\nstderr: {self.stderr}\nstdout: {self.stdout}"


User = str | KubeconfigRef


class ControlPlane:
    """etcd + kube-apiserver on loopback, with per-persona kubeconfig contexts.

    Use as a context manager or call start()/stop(). Contexts in `kubeconfig_path`: admin,
    approver (alice), approver2 (bob), developer (dave); `admin` is the current context.
    """

    def __init__(
        self,
        *,
        assets_dir: Path | str | None = None,
        build_script: Path | str | None = None,
        kubectl_binary: str | None = None,
        startup_timeout: float = 120.0,
        emulate_controllers: bool = True,
        node_address: str | None = None,
    ) -> None:
        self.assets_dir = Path(assets_dir) if assets_dir else None
        self.build_script = build_script
        self.kubectl_binary = kubectl_binary
        self.startup_timeout = startup_timeout
        self.emulate_controllers = emulate_controllers
        self.node_address = node_address
        self.port = 0
        self.workdir: Path | None = None
        self.url = ""
        self.etcd_url = ""
        self.ca: CertAuthority | None = None
        self._etcd: ManagedProcess | None = None
        self._apiserver: ManagedProcess | None = None
        self._controller: NamespaceController | None = None
        self._ssl: ssl.SSLContext | None = None

    # ------------------------------------------------------------------ lifecycle
    def start(self) -> ControlPlane:
        if self._apiserver is not None:
            return self
        self.kubectl_binary = self.kubectl_binary or require_binary(
            "kubectl", "kubectl (Debian package `kubectl`, or the upstream release binary)"
        )
        if self.assets_dir is None or not _has_binaries(self.assets_dir):
            self.assets_dir = locate_assets(self.build_script)
        self.workdir = Path(tempfile.mkdtemp(prefix="chaperone-cp-"))
        atexit.register(self.stop)  # never leave etcd/apiserver behind if the caller forgets
        try:
            self._write_pki()
            self._start_etcd()
            self._start_apiserver()
            self._write_kubeconfig()
            self.create_namespace("default")
            if self.emulate_controllers:
                self._controller = NamespaceController(self)
                self._controller.start()
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self) -> None:
        atexit.unregister(self.stop)
        if self._controller is not None:
            self._controller.stop()
            self._controller = None
        # apiserver first: stopping etcd under it only produces a burst of retry noise.
        for attr in ("_apiserver", "_etcd"):
            proc = getattr(self, attr)
            if proc is not None:
                proc.stop(timeout=15)
                setattr(self, attr, None)
        if self.workdir is not None and not keep_artifacts():
            shutil.rmtree(self.workdir, ignore_errors=True)
            self.workdir = None

    def __enter__(self) -> ControlPlane:
        return self.start()

    def __exit__(self, *exc_info) -> None:
        self.stop()

    # ------------------------------------------------------------------ paths
    @property
    def pki_dir(self) -> Path:
        assert self.workdir is not None, "control plane not started"
        return self.workdir / "pki"

    @property
    def ca_path(self) -> Path:
        return self.pki_dir / "ca.crt"

    @property
    def kubeconfig_path(self) -> Path:
        assert self.workdir is not None, "control plane not started"
        return self.workdir / "kubeconfig"

    def user_kubeconfig(self, user: str = "admin") -> KubeconfigRef:
        if user not in USERS:
            raise KeyError(f"unknown test persona {user!r}; known: {sorted(USERS)}")
        return KubeconfigRef(self.kubeconfig_path, user)

    # ------------------------------------------------------------------ startup steps
    def _write_pki(self) -> None:
        d = self.pki_dir
        d.mkdir(parents=True)
        self.ca = CertAuthority("chaperone-testbed-ca")
        self.ca.write_cert(self.ca_path)
        self.ca.write_server_cert(
            d, "apiserver",
            dns_names=("localhost", "kubernetes", "kubernetes.default",
                       "kubernetes.default.svc", "kubernetes.default.svc.cluster.local"),
            # 10.0.0.1: the `kubernetes` Service IP
            ip_addresses=(LOOPBACK, "10.0.0.1", *filter(None, [self.node_address])),
        )
        for ctx, (user, groups) in USERS.items():
            self.ca.write_client_cert(d, f"user-{ctx}", user=user, groups=groups)
        KeyPair.write(d, "sa")
        if self.node_address:
            # What kube-apiserver presents to kubelets (exec, logs); kubeadm's name and group.
            self.ca.write_client_cert(d, "apiserver-kubelet-client",
                                      user="kube-apiserver-kubelet-client",
                                      groups=("system:masters",))

    def _start_etcd(self) -> None:
        assert self.workdir and self.assets_dir
        client, peer = free_port(), free_port()
        self.etcd_url = f"http://{LOOPBACK}:{client}"
        peer_url = f"http://{LOOPBACK}:{peer}"
        self._etcd = ManagedProcess("etcd", [
            self.assets_dir / "etcd", "--name", "default",
            "--data-dir", self.workdir / "etcd-data",
            "--listen-client-urls", self.etcd_url, "--advertise-client-urls", self.etcd_url,
            "--listen-peer-urls", peer_url, "--initial-advertise-peer-urls", peer_url,
            "--initial-cluster", f"default={peer_url}",
            # Throwaway data: skipping fsync makes every API write several times faster.
            "--unsafe-no-fsync", "--log-level", "warn",
        ], self.workdir / "etcd.log")
        self._etcd.start()

        def healthy() -> bool:
            with urllib.request.urlopen(self.etcd_url + "/health", timeout=2) as r:
                return json.load(r).get("health") == "true"

        self._etcd.wait_ready(healthy, self.startup_timeout, "healthy")

    def _start_apiserver(self) -> None:
        assert self.workdir and self.assets_dir
        d, port = self.pki_dir, free_port()
        self.port = port
        self.url = f"https://{LOOPBACK}:{port}"
        self._apiserver = ManagedProcess("kube-apiserver", [
            self.assets_dir / "kube-apiserver",
            "--etcd-servers", self.etcd_url,
            *self._address_flags(),
            "--secure-port", str(port), "--cert-dir", self.workdir / "apiserver-certs",
            "--tls-cert-file", d / "apiserver.crt", "--tls-private-key-file", d / "apiserver.key",
            "--client-ca-file", self.ca_path,
            *self._authorization_flags(),
            "--service-account-issuer", SA_ISSUER,
            "--service-account-key-file", d / "sa.pub",
            "--service-account-signing-key-file", d / "sa.key",
            "--service-cluster-ip-range", "10.0.0.0/24",
            "--allow-privileged=true",
            # Already defaults; listed so nobody "simplifies" them away: the operator's
            # webhooks are the point of the test bed. ServiceAccount admission stays enabled.
            "--enable-admission-plugins", "MutatingAdmissionWebhook,ValidatingAdmissionWebhook"
            + (",NodeRestriction" if self.node_address else ""),
            *self._endpoint_flags(),
            "--profiling=false", "--v", "1",
        ], self.workdir / "kube-apiserver.log")
        self._apiserver.start()
        self._ssl = ssl.create_default_context(cafile=str(self.ca_path))
        self._ssl.load_cert_chain(d / "user-admin.crt", d / "user-admin.key")
        # /readyz includes the RBAC bootstrap-roles post-start hook, so default ClusterRoles
        # (e.g. system:basic-user, needed for `kubectl auth whoami`) exist once it is 200.
        self._apiserver.wait_ready(
            lambda: self.api("GET", "/readyz")[0] == 200, self.startup_timeout, "ready"
        )

    def _address_flags(self) -> list[str]:
        if not self.node_address:
            return ["--bind-address", LOOPBACK, "--advertise-address", LOOPBACK]
        # All addresses: loopback for the tests' own clients (self.url), the node address for
        # pods (via the `kubernetes` Service) and the kubelet.
        return ["--bind-address", "0.0.0.0", "--advertise-address", self.node_address]

    def _authorization_flags(self) -> list[str]:
        if not self.node_address:
            return ["--authorization-mode", "RBAC"]
        return ["--authorization-mode", "Node,RBAC"]

    def _endpoint_flags(self) -> list[str]:
        if not self.node_address:
            # No kubelets/nodes exist: the lease reconciler would only keep rewriting the
            # `kubernetes` Endpoints with a loopback address.
            return ["--endpoint-reconciler-type", "none"]
        d = self.pki_dir
        return [
            # The `kubernetes` Service's Endpoints name the node address, so kube-proxy sends
            # pods' in-cluster API calls there.
            "--endpoint-reconciler-type", "lease",
            # The node registers its interface address; the test bed has no node DNS names.
            "--kubelet-preferred-address-types", "InternalIP",
            "--kubelet-client-certificate", str(d / "apiserver-kubelet-client.crt"),
            "--kubelet-client-key", str(d / "apiserver-kubelet-client.key"),
        ]

    def component_kubeconfig(self, name: str, user: str, groups: tuple[str, ...] = ()) -> Path:
        """A kubeconfig for a node component (kubelet, kube-proxy, ...) with its own client cert.

        It names the apiserver at the node address (what a component on another host would
        use); needs `node_address`.
        """
        assert self.workdir is not None and self.ca is not None, "control plane not started"
        if not self.node_address:
            raise ValueError("component kubeconfigs need ControlPlane(node_address=...)")
        pair = self.ca.write_client_cert(self.pki_dir, f"component-{name}", user=user,
                                         groups=groups)
        path = self.workdir / f"{name}.kubeconfig"
        _write_json(path, {
            "apiVersion": "v1", "kind": "Config", "preferences": {},
            "clusters": [{"name": CLUSTER_NAME, "cluster": {
                "server": f"https://{self.node_address}:{self.port}",
                "certificate-authority": str(self.ca_path)}}],
            "users": [{"name": name, "user": {"client-certificate": str(pair.cert_path),
                                              "client-key": str(pair.key_path)}}],
            "contexts": [{"name": name, "context": {"cluster": CLUSTER_NAME, "user": name}}],
            "current-context": name,
        })
        return path

    def _write_kubeconfig(self) -> None:
        d = self.pki_dir
        config = {
            "apiVersion": "v1", "kind": "Config", "preferences": {},
            "clusters": [{"name": CLUSTER_NAME, "cluster": {
                "server": self.url, "certificate-authority": str(self.ca_path)}}],
            "users": [{"name": ctx, "user": {
                "client-certificate": str(d / f"user-{ctx}.crt"),
                "client-key": str(d / f"user-{ctx}.key")}} for ctx in USERS],
            "contexts": [{"name": ctx, "context": {"cluster": CLUSTER_NAME, "user": ctx}}
                         for ctx in USERS],
            "current-context": "admin",
        }
        _write_json(self.kubeconfig_path, config)

    # ------------------------------------------------------------------ clients
    def api(self, method: str, path: str, body: Any = None, *, timeout: float = 10.0
            ) -> tuple[int, Any]:
        """A raw admin request (status, decoded JSON or text); no dependency on `kubernetes`."""
        data = json.dumps(body).encode() if body is not None else None
        req = urllib.request.Request(self.url + path, data=data, method=method)
        if data is not None:
            req.add_header("Content-Type", "application/json")
        try:
            with urllib.request.urlopen(req, context=self._ssl, timeout=timeout) as resp:
                status, raw = resp.status, resp.read()
        except urllib.error.HTTPError as exc:
            status, raw = exc.code, exc.read()
        try:
            return status, json.loads(raw)
        except ValueError:
            return status, raw.decode(errors="replace")

    def kubectl(self, *args: str, user: User = "admin", input: str | None = None,
                check: bool = True, timeout: float = 60.0) -> subprocess.CompletedProcess:
        """Run the real kubectl as a persona (context name) or a KubeconfigRef."""
        ref = user if isinstance(user, KubeconfigRef) else self.user_kubeconfig(user)
        assert self.workdir is not None and self.kubectl_binary, "control plane not started"
        # Discovery cache inside the workdir: keeps ~/.kube clean and never stale across runs.
        argv = [self.kubectl_binary, *ref.kubectl_args(),
                "--cache-dir", str(self.workdir / "kubectl-cache"), *args]
        res = subprocess.run(argv, input=input, capture_output=True, text=True, timeout=timeout)
        if check and res.returncode != 0:
            raise KubectlError(res.returncode, argv, res.stdout, res.stderr)
        return res

    def api_client(self, user: User = "admin"):
        """A kubernetes.client.ApiClient for a persona (imports `kubernetes` lazily)."""
        from kubernetes import config as k8s_config

        ref = user if isinstance(user, KubeconfigRef) else self.user_kubeconfig(user)
        return k8s_config.new_client_from_config(config_file=str(ref.path), context=ref.context)

    def admin_client(self):
        return self.api_client("admin")

    # ------------------------------------------------------------------ helpers
    def create_namespace(self, name: str, labels: dict[str, str] | None = None) -> None:
        """Create a namespace (idempotent) with what the missing controllers would add.

        Synchronous, so a pod created right after does not race the background emulation.
        """
        body = {"apiVersion": "v1", "kind": "Namespace",
                "metadata": {"name": name, "labels": labels or {}}}
        status, resp = self.api("POST", "/api/v1/namespaces", body)
        if status not in (201, 409):
            raise StartupError(f"creating namespace {name}: HTTP {status}: {resp}")
        ensure_namespace_defaults(self, name)

    def serviceaccount_kubeconfig(self, namespace: str, name: str, *,
                                  duration: str = "1h") -> KubeconfigRef:
        """A kubeconfig authenticating as ServiceAccount NS/NAME with a bound token.

        Creates the namespace and ServiceAccount if missing; the token comes from the
        TokenRequest API via `kubectl create token` (the path a real user would take).
        """
        assert self.workdir is not None, "control plane not started"
        self.create_namespace(namespace)
        status, resp = self.api("POST", f"/api/v1/namespaces/{namespace}/serviceaccounts", {
            "apiVersion": "v1", "kind": "ServiceAccount", "metadata": {"name": name}})
        if status not in (201, 409):
            raise StartupError(f"creating serviceaccount {namespace}/{name}: {status}: {resp}")
        token = self.kubectl("create", "token", name, "-n", namespace,
                             "--duration", duration).stdout.strip()
        ctx = f"sa-{namespace}-{name}"
        path = self.workdir / f"{ctx}.kubeconfig"
        _write_json(path, {
            "apiVersion": "v1", "kind": "Config", "preferences": {},
            "clusters": [{"name": CLUSTER_NAME, "cluster": {
                "server": self.url, "certificate-authority": str(self.ca_path)}}],
            "users": [{"name": ctx, "user": {"token": token}}],
            "contexts": [{"name": ctx, "context": {
                "cluster": CLUSTER_NAME, "user": ctx, "namespace": namespace}}],
            "current-context": ctx,
        })
        return KubeconfigRef(path, ctx)


def _write_json(path: Path, obj: Any) -> None:
    # kubeconfig is YAML, and JSON is YAML. Write-then-rename: readers never see half a file;
    # 0600 because it may carry a bearer token.
    tmp = path.with_suffix(".tmp")
    tmp.touch(mode=0o600, exist_ok=True)
    tmp.write_text(json.dumps(obj, indent=2))
    tmp.replace(path)
