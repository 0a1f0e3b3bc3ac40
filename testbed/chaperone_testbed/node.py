"""A real single-node Kubernetes beside the test bed's control plane: containerd, runc, kubelet.

Why: the control plane alone admits pods that never run; the image, the chart's Deployment and
Services, the native sidecar's start order and webhooks reached through a Service only show up
when a kubelet runs the pods (issue 14). This machine class has no Docker and no systemd, so
`Node` runs everything as child processes, the way `ControlPlane` runs etcd and kube-apiserver:

- containerd (Debian package) with its own root, state, socket and config: overlayfs, cgroupfs,
  runc, the CNI bridge + host-local plugins (Debian's containernetworking-plugins) and
  `restrict_oom_score_adj = true` - root here lacks CAP_SYS_RESOURCE, and without it every
  sandbox fails with "can't get final child's PID from pipe";
- kubelet, kube-scheduler, kube-controller-manager and kube-proxy (iptables mode), built from Go
  modules by hack/build-node.sh, with client certificates from the control plane's CA;
- the sandbox image: the pause program from the same script, imported into containerd.

The node registers the machine's interface address (`node_address()`), never loopback: pods
reach the apiserver at that address through the `kubernetes` Service, so the control plane must
be started with `ControlPlane(node_address=...)`. There is no cluster DNS: nothing here or in
the product depends on it (pods use the injected IPs/Service env, webhooks are called by the
apiserver, which resolves Services itself), so CoreDNS is not built.

`stop()` undoes everything `start()` did, in an order that leaves nothing behind even after a
failed test: controllers stopped (so nothing is recreated), pods deleted and waited for, the
kubelet stopped, leftover containers killed through containerd, kube-proxy's rules removed,
containerd and its shims stopped, then the mounts, network namespaces, the bridge, every
KUBE-* iptables chain and the kubepods cgroups are removed.
"""

from __future__ import annotations

import atexit
import json
import os
import re
import shlex
import shutil
import subprocess
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING

from .services import (
    LOOPBACK,
    ComponentUnavailable,
    ManagedProcess,
    StartupError,
    free_port,
    keep_artifacts,
    locate_built,
    require_binary,
)

if TYPE_CHECKING:
    from .controlplane import ControlPlane

__all__ = ["Node", "locate_node_assets", "node_address"]

NODE_NAME = "chaperone-node"
POD_CIDR = "10.244.0.0/24"
BRIDGE = "chaperone0"
CNI_NETWORK = "chaperone-node"
CNI_BIN_DIR = Path("/usr/lib/cni")
CGROUP_V1_ROOT = Path("/sys/fs/cgroup")
NETNS_DIR = Path("/run/netns")
BUILD_SCRIPT = Path("hack") / "build-node.sh"
NODE_BINARIES = ("kubelet", "kube-scheduler", "kube-controller-manager", "kube-proxy", "pause")
PAUSE_ARCHIVE = "pause.oci.tar"


def node_address() -> str:
    """The machine's interface address (the default route's source), never loopback.

    The kubelet refuses to be reached at loopback, and pods cannot reach the host's loopback.
    """
    res = subprocess.run(["ip", "-j", "-4", "route", "show", "default"],
                         capture_output=True, text=True)
    routes = json.loads(res.stdout or "[]") if res.returncode == 0 else []
    for route in routes:
        if route.get("prefsrc"):
            return route["prefsrc"]
        if route.get("dev"):
            addrs = json.loads(subprocess.run(
                ["ip", "-j", "-4", "addr", "show", "dev", route["dev"]],
                capture_output=True, text=True, check=True).stdout)
            for link in addrs:
                for info in link.get("addr_info", []):
                    if info.get("local") and not info["local"].startswith("127."):
                        return info["local"]
    raise ComponentUnavailable(
        "no non-loopback IPv4 address (default route) on this machine: the node needs one")


def _has_assets(d: Path) -> bool:
    return all(os.access(d / b, os.X_OK) for b in NODE_BINARIES) and (d / PAUSE_ARCHIVE).is_file()


def locate_node_assets(build_script: Path | str | None = None) -> Path:
    """The directory of hack/build-node.sh's output, building it if necessary."""
    return locate_built("CHAPERONE_NODE_ASSETS", BUILD_SCRIPT, _has_assets,
                        "kubelet, scheduler, controller manager, kube-proxy and pause", build_script)


def _run(*argv: str | Path, check: bool = False, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run([str(a) for a in argv], capture_output=True, text=True, check=check,
                          timeout=timeout)


class Node:
    """containerd + kubelet + scheduler + controller manager + kube-proxy for one ControlPlane.

    Use as a context manager or start()/stop(). `images` are OCI/Docker archives imported into
    containerd's k8s.io namespace (pods must use imagePullPolicy IfNotPresent or Never).
    """

    def __init__(self, control_plane: ControlPlane, *, assets_dir: Path | str | None = None,
                 startup_timeout: float = 120.0) -> None:
        self.cp = control_plane
        self.assets_dir = Path(assets_dir) if assets_dir else None
        self.startup_timeout = startup_timeout
        self.name = NODE_NAME
        self.address = ""
        self.workdir: Path | None = None
        self._procs: dict[str, ManagedProcess] = {}
        self._netns_before: set[str] = set()
        self._ip_forward: str | None = None
        self.timings: dict[str, float] = {}

    # ------------------------------------------------------------------ paths
    @property
    def socket(self) -> Path:
        assert self.workdir is not None, "node not started"
        return self.workdir / "containerd.sock"

    def log_path(self, component: str) -> Path:
        assert self.workdir is not None, "node not started"
        return self.workdir / f"{component}.log"

    # ------------------------------------------------------------------ lifecycle
    def start(self) -> Node:
        if self._procs:
            return self
        t0 = time.monotonic()
        self._check_prerequisites()
        if self.assets_dir is None or not _has_assets(self.assets_dir):
            self.assets_dir = locate_node_assets()
        self.address = self.cp.node_address or ""
        if not self.address or self.address.startswith("127."):
            raise StartupError("the control plane must be started with "
                               "ControlPlane(node_address=node_address()) to serve a node")
        self.workdir = Path(tempfile.mkdtemp(prefix="chaperone-node-"))
        atexit.register(self.stop)
        self._netns_before = set(os.listdir(NETNS_DIR)) if NETNS_DIR.is_dir() else set()
        self._ip_forward = Path("/proc/sys/net/ipv4/ip_forward").read_text().strip()
        try:
            self._start_containerd()
            self.import_image(self.assets_dir / PAUSE_ARCHIVE)
            self._start_controllers()
            self._start_kube_proxy()
            self._start_kubelet()
            self._wait_node_ready()
        except BaseException:
            self.stop()
            raise
        self.timings["ready"] = time.monotonic() - t0
        return self

    def __enter__(self) -> Node:
        return self.start()

    def __exit__(self, *exc_info) -> None:
        self.stop()

    def _check_prerequisites(self) -> None:
        if os.geteuid() != 0:
            raise ComponentUnavailable("the node runs containerd and a kubelet: it needs root")
        for binary, package in (("containerd", "containerd"), ("ctr", "containerd"),
                                ("runc", "runc"), ("iptables", "iptables"),
                                ("iptables-save", "iptables"), ("ip", "iproute2")):
            require_binary(binary, f"the Debian package `{package}`")
        for plugin in ("bridge", "host-local", "loopback"):
            if not os.access(CNI_BIN_DIR / plugin, os.X_OK):
                raise ComponentUnavailable(
                    f"CNI plugin {CNI_BIN_DIR / plugin} missing: install the Debian package "
                    "`containernetworking-plugins`")
        if not (CGROUP_V1_ROOT / "memory").is_dir() and not (CGROUP_V1_ROOT / "cgroup.controllers").exists():
            raise ComponentUnavailable(f"no cgroup hierarchy under {CGROUP_V1_ROOT}")

    # ------------------------------------------------------------------ containerd
    def _containerd_config(self) -> str:
        wd = self.workdir
        assert wd is not None
        cri = 'plugins."io.containerd.grpc.v1.cri"'
        return f"""version = 2
root = "{wd}/containerd/root"
state = "{wd}/containerd/state"
disabled_plugins = ["io.containerd.snapshotter.v1.btrfs", "io.containerd.snapshotter.v1.zfs",
                    "io.containerd.snapshotter.v1.aufs", "io.containerd.snapshotter.v1.devmapper"]

[grpc]
  address = "{self.socket}"

[ttrpc]
  address = "{self.socket}.ttrpc"

[plugins."io.containerd.internal.v1.opt"]
  path = "{wd}/containerd/opt"

[{cri}]
  sandbox_image = "{self.pause_image}"
  # root here lacks CAP_SYS_RESOURCE: runc may only raise a process's OOM score, never lower it.
  restrict_oom_score_adj = true
  disable_apparmor = true
  stream_server_address = "{LOOPBACK}"
  stream_server_port = "0"
  [{cri}.containerd]
    snapshotter = "overlayfs"
    default_runtime_name = "runc"
    [{cri}.containerd.runtimes.runc]
      runtime_type = "io.containerd.runc.v2"
      [{cri}.containerd.runtimes.runc.options]
        SystemdCgroup = false
  [{cri}.cni]
    bin_dir = "{CNI_BIN_DIR}"
    conf_dir = "{wd}/cni/net.d"
"""

    @property
    def pause_image(self) -> str:
        assert self.assets_dir is not None
        # The name is in the archive's index (hack/build-node.sh); the tag is the directory's.
        tag = self.assets_dir.name.split("-pause-", 1)[-1]
        return f"chaperone.local/pause:{tag}"

    def _write_cni_config(self) -> None:
        wd = self.workdir
        assert wd is not None
        netd = wd / "cni" / "net.d"
        netd.mkdir(parents=True, exist_ok=True)
        # No ipMasq and no portmap: pods talk to this machine (its address, Services) and to each other only.
        (netd / "10-chaperone.conflist").write_text(json.dumps({
            "cniVersion": "0.4.0", "name": CNI_NETWORK,
            "plugins": [{
                "type": "bridge", "bridge": BRIDGE, "isGateway": True, "ipMasq": False,
                "hairpinMode": True,
                "ipam": {"type": "host-local", "ranges": [[{"subnet": POD_CIDR}]],
                         "routes": [{"dst": "0.0.0.0/0"}], "dataDir": str(wd / "cni" / "ipam")},
            }],
        }, indent=2))

    def _start_containerd(self) -> None:
        wd = self.workdir
        assert wd is not None
        self._write_cni_config()
        config = wd / "containerd.toml"
        config.write_text(self._containerd_config())
        proc = self._spawn("containerd", ["containerd", "--config", config, "--log-level", "warn"])
        proc.wait_ready(lambda: self.ctr("version").returncode == 0, self.startup_timeout,
                        "serving")

    def ctr(self, *args: str | Path, timeout: float = 300) -> subprocess.CompletedProcess:
        """`ctr` against this node's containerd, namespace k8s.io (the CRI's)."""
        return _run("ctr", "--address", self.socket, "--namespace", "k8s.io", *args,
                    timeout=timeout)

    def import_image(self, archive: Path | str) -> None:
        """Import an OCI or Docker image archive into containerd for the kubelet."""
        res = self.ctr("images", "import", "--no-unpack=false", archive)
        if res.returncode != 0:
            # older ctr has no --no-unpack=false spelling
            res = self.ctr("images", "import", archive)
        if res.returncode != 0:
            raise StartupError(f"ctr images import {archive} failed: {res.stderr or res.stdout}")

    def images(self) -> list[str]:
        return self.ctr("images", "ls", "-q").stdout.split()

    # ------------------------------------------------------------------ Kubernetes components
    def _spawn(self, name: str, argv: list) -> ManagedProcess:
        assert self.workdir is not None
        proc = ManagedProcess(name, argv, self.log_path(name))
        self._procs[name] = proc
        proc.start()
        return proc

    def _start_controllers(self) -> None:
        assert self.assets_dir is not None
        cp = self.cp
        cm_kubeconfig = cp.component_kubeconfig(
            "kube-controller-manager", "system:kube-controller-manager")
        self._spawn("kube-controller-manager", [
            self.assets_dir / "kube-controller-manager",
            "--kubeconfig", cm_kubeconfig,
            "--authentication-kubeconfig", cm_kubeconfig,
            "--authorization-kubeconfig", cm_kubeconfig,
            # Each controller with its own ServiceAccount, as kubeadm sets it up.
            "--use-service-account-credentials=true",
            "--service-account-private-key-file", cp.pki_dir / "sa.key",
            # Published as the kube-root-ca.crt ConfigMap that every projected token volume needs.
            "--root-ca-file", cp.ca_path,
            "--leader-elect=false", "--allocate-node-cidrs=false",
            "--bind-address", LOOPBACK, "--secure-port", str(free_port()), "--v", "1",
        ])
        sched_kubeconfig = cp.component_kubeconfig("kube-scheduler", "system:kube-scheduler")
        self._spawn("kube-scheduler", [
            self.assets_dir / "kube-scheduler",
            "--kubeconfig", sched_kubeconfig,
            "--authentication-kubeconfig", sched_kubeconfig,
            "--authorization-kubeconfig", sched_kubeconfig,
            "--leader-elect=false",
            "--bind-address", LOOPBACK, "--secure-port", str(free_port()), "--v", "1",
        ])

    def _start_kube_proxy(self) -> None:
        assert self.assets_dir is not None and self.workdir is not None
        kubeconfig = self.cp.component_kubeconfig("kube-proxy", "system:kube-proxy")
        config = self.workdir / "kube-proxy.json"
        config.write_text(json.dumps({
            "apiVersion": "kubeproxy.config.k8s.io/v1alpha1", "kind": "KubeProxyConfiguration",
            "clientConnection": {"kubeconfig": str(kubeconfig)},
            "hostnameOverride": self.name, "mode": "iptables", "clusterCIDR": POD_CIDR,
            "healthzBindAddress": f"{LOOPBACK}:{free_port()}",
            "metricsBindAddress": f"{LOOPBACK}:{free_port()}",
            # Leave the machine's conntrack sysctls alone.
            "conntrack": {"maxPerCore": 0, "min": 0, "tcpEstablishedTimeout": "0s",
                          "tcpCloseWaitTimeout": "0s"},
            "iptables": {"localhostNodePorts": False},
            "nodePortAddresses": [f"{self.address}/32"],
        }))
        self._spawn("kube-proxy", [self.assets_dir / "kube-proxy", "--config", config,
                                   "--v", "1"])

    def _start_kubelet(self) -> None:
        assert self.assets_dir is not None and self.workdir is not None and self.cp.ca
        wd, cp, ca = self.workdir, self.cp, self.cp.ca
        kubeconfig = cp.component_kubeconfig(
            "kubelet", f"system:node:{self.name}", ("system:nodes",))
        serving = ca.write_server_cert(cp.pki_dir, "kubelet-serving",
                                          dns_names=(self.name,), ip_addresses=(self.address,))
        self.kubelet_port = free_port()
        config = wd / "kubelet.json"
        config.write_text(json.dumps({
            "apiVersion": "kubelet.config.k8s.io/v1beta1", "kind": "KubeletConfiguration",
            "address": self.address, "port": self.kubelet_port, "readOnlyPort": 0,
            "healthzBindAddress": LOOPBACK, "healthzPort": free_port(),
            "tlsCertFile": str(serving.cert_path), "tlsPrivateKeyFile": str(serving.key_path),
            "authentication": {"anonymous": {"enabled": False}, "webhook": {"enabled": True},
                               "x509": {"clientCAFile": str(cp.ca_path)}},
            "authorization": {"mode": "Webhook"},
            "cgroupDriver": "cgroupfs",
            "containerRuntimeEndpoint": f"unix://{self.socket}",
            "failSwapOn": False,
            # No cluster DNS (see the module docstring): pods get the host's resolv.conf.
            "clusterDomain": "cluster.local",
            "podLogsDir": str(wd / "pod-logs"),
            # The machine is shared and its disk may be fuller than a node's defaults allow;
            # evicting the story's pods would only make tests flaky.
            "evictionHard": {"memory.available": "100Mi", "nodefs.available": "1%",
                             "imagefs.available": "1%", "nodefs.inodesFree": "1%"},
            "imageGCHighThresholdPercent": 100, "imageGCLowThresholdPercent": 99,
            "serializeImagePulls": False,
            "nodeStatusUpdateFrequency": "4s",
            "syncFrequency": "10s",
            "fileCheckFrequency": "0s",
            "rotateCertificates": False,
        }))
        self._spawn("kubelet", [
            self.assets_dir / "kubelet", "--config", config, "--kubeconfig", kubeconfig,
            "--hostname-override", self.name, "--node-ip", self.address,
            "--root-dir", wd / "kubelet", "--cert-dir", wd / "kubelet-pki", "--v", "1",
        ])

    def _wait_node_ready(self) -> None:
        kubelet = self._procs["kubelet"]

        def ready() -> bool:
            for name, proc in self._procs.items():
                if not proc.running:
                    raise StartupError(f"{name} exited while the node started\n{proc.log_tail()}")
            status, node = self.cp.api("GET", f"/api/v1/nodes/{self.name}")
            if status != 200:
                return False
            conds = {c["type"]: c["status"] for c in node.get("status", {}).get("conditions", [])}
            return conds.get("Ready") == "True"

        deadline = time.monotonic() + self.startup_timeout
        while not ready():
            if time.monotonic() > deadline:
                raise StartupError(f"node {self.name} not Ready after {self.startup_timeout:.0f}s"
                                   f"\n{kubelet.log_tail(60)}")
            time.sleep(0.5)

    # ------------------------------------------------------------------ stop and clean up
    def stop(self) -> None:
        atexit.unregister(self.stop)
        if self.workdir is None:
            return
        errors: list[str] = []

        def step(what: str, fn, *args) -> None:
            try:
                fn(*args)
            except Exception as exc:  # noqa: BLE001 - every later step must still run
                errors.append(f"{what}: {exc}")

        # Controllers first: nothing may recreate the pods we are about to delete.
        for name in ("kube-controller-manager", "kube-scheduler"):
            step(f"stop {name}", self._stop_proc, name)
        step("delete pods", self._delete_pods)
        step("stop kubelet", self._stop_proc, "kubelet")
        step("remove leftover containers", self._remove_containers)
        step("stop kube-proxy", self._stop_proc, "kube-proxy")
        step("kube-proxy --cleanup", self._kube_proxy_cleanup)
        step("stop containerd", self._stop_proc, "containerd")
        step("stop shims", self._kill_shims)
        step("unmount", self._unmount)
        step("network namespaces", self._remove_netns)
        step("bridge", lambda: _run("ip", "link", "delete", BRIDGE))
        step("iptables", self._purge_chains)
        step("cgroups", self._remove_cgroups)
        if self._ip_forward is not None:
            step("ip_forward", Path("/proc/sys/net/ipv4/ip_forward").write_text, self._ip_forward)
        self._procs.clear()
        if not keep_artifacts():
            step("workdir", shutil.rmtree, self.workdir)
        self.workdir = None
        if errors:
            raise StartupError("node cleanup incomplete: " + "; ".join(errors))

    def _stop_proc(self, name: str) -> None:
        proc = self._procs.get(name)
        if proc is not None:
            proc.stop(timeout=20)

    def _delete_pods(self, timeout: float = 60.0) -> None:
        kubelet = self._procs.get("kubelet")
        if kubelet is None or not kubelet.running:
            return
        try:
            status, pods = self.cp.api(
                "GET", f"/api/v1/pods?fieldSelector=spec.nodeName={self.name}")
        except OSError:
            return  # the control plane is gone: _remove_containers kills them through containerd
        if status != 200:
            return
        for pod in pods.get("items", []):
            meta = pod["metadata"]
            self.cp.api("DELETE", f"/api/v1/namespaces/{meta['namespace']}/pods/{meta['name']}",
                        {"kind": "DeleteOptions", "apiVersion": "v1", "gracePeriodSeconds": 2})
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            # The kubelet removes the pod object only when all its containers and its sandbox
            # (CNI teardown included) are gone.
            status, pods = self.cp.api(
                "GET", f"/api/v1/pods?fieldSelector=spec.nodeName={self.name}")
            if status != 200 or not pods.get("items"):
                return
            time.sleep(0.5)

    def _remove_containers(self) -> None:
        if "containerd" not in self._procs or not self._procs["containerd"].running:
            return
        for cid in self.ctr("tasks", "ls", "-q").stdout.split():
            self.ctr("tasks", "kill", "--signal", "SIGKILL", cid)
        deadline = time.monotonic() + 15
        while self.ctr("tasks", "ls", "-q").stdout.split() and time.monotonic() < deadline:
            for cid in self.ctr("tasks", "ls", "-q").stdout.split():
                self.ctr("tasks", "delete", "--force", cid)
            time.sleep(0.3)
        for cid in self.ctr("containers", "ls", "-q").stdout.split():
            self.ctr("containers", "delete", cid)

    def _kube_proxy_cleanup(self) -> None:
        if self.assets_dir is not None:
            _run(self.assets_dir / "kube-proxy", "--cleanup", "--v", "0")

    def _kill_shims(self) -> None:
        """containerd-shim-runc-v2 processes of *this* containerd (its socket in their argv)."""
        sock = str(self.socket)
        for pid in os.listdir("/proc"):
            if not pid.isdigit():
                continue
            try:
                argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
            except OSError:
                continue
            if argv and b"containerd-shim" in argv[0] and sock.encode() in argv:
                try:
                    os.kill(int(pid), 9)
                except ProcessLookupError:
                    pass

    def _unmount(self) -> None:
        assert self.workdir is not None
        root = str(self.workdir)
        mounts = []
        for line in Path("/proc/self/mountinfo").read_text().splitlines():
            point = line.split()[4].replace("\\040", " ")
            if point == root or point.startswith(root + "/"):
                mounts.append(point)
        for point in sorted(set(mounts), key=len, reverse=True):
            _run("umount", "-l", point)

    def _remove_netns(self) -> None:
        if not NETNS_DIR.is_dir():
            return
        for name in set(os.listdir(NETNS_DIR)) - self._netns_before:
            if name.startswith("cni-"):
                _run("ip", "netns", "delete", name)

    @staticmethod
    def _purge_chains(prefixes: tuple[str, ...] = ("KUBE-", "CNI-")) -> None:
        """Remove every chain named with one of `prefixes` and every jump to one, both families.

        Only this node's kubelet, kube-proxy and CNI plugins make such chains on this machine.
        """
        for family in ("iptables", "ip6tables"):
            if shutil.which(f"{family}-save") is None:
                continue
            for table in ("filter", "nat", "mangle"):
                dump = _run(f"{family}-save", "-t", table).stdout
                ours = [ln.split()[0][1:] for ln in dump.splitlines()
                        if ln.startswith(":") and ln[1:].startswith(prefixes)]
                for line in dump.splitlines():
                    m = re.match(r"-A (\S+) (.*)$", line)
                    if m and not m.group(1).startswith(prefixes) and re.search(
                            r"-j (" + "|".join(re.escape(p) for p in prefixes) + r")", line):
                        _run(family, "-t", table, "-D", m.group(1), *shlex.split(m.group(2)))
                for chain in ours:
                    _run(family, "-t", table, "-F", chain)
                for chain in ours:
                    _run(family, "-t", table, "-X", chain)

    @staticmethod
    def _remove_cgroups() -> None:
        """The kubepods hierarchies the kubelet made (cgroupfs driver), deepest first."""
        for top in CGROUP_V1_ROOT.glob("*/kubepods"):
            for d in sorted((p for p in top.rglob("*") if p.is_dir()), key=lambda p: -len(p.parts)):
                _rmdir(d)
            _rmdir(top)
        unified = CGROUP_V1_ROOT / "kubepods"
        if unified.is_dir():
            for d in sorted((p for p in unified.rglob("*") if p.is_dir()),
                            key=lambda p: -len(p.parts)):
                _rmdir(d)
            _rmdir(unified)

    # ------------------------------------------------------------------ diagnostics
    def logs(self, lines: int = 40) -> str:
        return "\n".join(p.log_tail(lines) for p in self._procs.values())


def _rmdir(d: Path) -> None:
    try:
        os.rmdir(d)
    except OSError:
        pass
