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
  credentials, absent from the recording).
"""

from __future__ import annotations

import ctypes
import json
import os
import shlex
import shutil
import socket
import ssl
import subprocess
import sys
import textwrap
import threading
import uuid
from pathlib import Path

import boto3
import pytest

from chaperone_operator.injection.iptables import iptables_rules
from chaperone_operator.injection.settings import InjectionSettings

from .pod import (HTTPSUpstream, InjectedPod, base_env, connection, policy, rmtree, sessions_cli,
                  setup_namespace, wait_for)

SIDECAR_UID = 1337  # the injection default (InjectionSettings.sidecar_uid)
AGENT_UID = 4242
POD_IP, UP_IP = "10.203.0.1", "10.203.0.2"
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
        for ns, dev, ip in ((pod_ns, veth_pod, POD_IP), (up_ns, veth_up, UP_IP)):
            sh("ip", "-n", ns, "addr", "add", f"{ip}/30", "dev", dev)
            sh("ip", "-n", ns, "link", "set", "lo", "up")
            sh("ip", "-n", ns, "link", "set", dev, "up")
        etc.mkdir(parents=True, exist_ok=True)
        (etc / "hosts").write_text(f"127.0.0.1 localhost\n::1 localhost\n{UP_IP} {UPSTREAM_NAME}\n")
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


def test_transparent_mode_captures_other_uids_and_lets_the_sidecar_uid_out(
        pod_network, control_plane, crds_installed, s3_server):
    pod_ns, up_ns = pod_network
    root = Path(os.environ.get("TMPDIR", "/tmp")) / f"chaperone-transparent-{uuid.uuid4().hex[:8]}"
    root.mkdir(mode=0o755)
    forwarders: list[Forwarder] = []
    upstream = sidecar = None
    try:
        # ---- "the internet": an HTTPS upstream on 443 in the other namespace
        listener = in_netns(up_ns, lambda: socket.create_server((UP_IP, 443)))
        upstream = HTTPSUpstream(root / "upstream", sock=listener, names=(UPSTREAM_NAME,), ips=(UP_IP,))
        assert upstream.port == 443

        # ---- the cluster: connection, policy, recording bucket
        s3 = boto3.client("s3", **s3_server.client_kwargs())
        bucket = f"transparent-{uuid.uuid4().hex[:8]}"
        s3.create_bucket(Bucket=bucket)
        ns = f"transp-{uuid.uuid4().hex[:8]}"
        conns = [connection("tickets", {"type": "http", "hosts": [UPSTREAM_NAME],
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
                          configmaps={"up-ca": {"ca.crt": upstream.ca_file.read_bytes()}})
        pod.chown(settings.sidecar_uid, settings.sidecar_gid)  # fsGroup, in effect
        upstream.ca_file.chmod(0o644)
        for path in (root, root / "upstream"):
            path.chmod(0o755)

        # ---- the init container: exactly its command, in the pod's namespace
        assert pod.init is not None and pod.init["command"] == ["/bin/sh", "-c"]
        script = pod.init["args"][0]
        assert script.splitlines()[1:] == [shlex.join(r) for r in iptables_rules(settings)]
        sh("ip", "netns", "exec", pod_ns, "/bin/sh", "-c", script)
        rules = sh("ip", "netns", "exec", pod_ns, "iptables", "-t", "nat", "-S", "OUTPUT").stdout
        assert f"--uid-owner {SIDECAR_UID}" in rules and "--dport 443" in rules and "--to-ports 15001" in rules

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
        key = root / "manifest.key"
        key.write_text(MANIFEST_KEY)
        out = sessions_cli("verify", session, *source, "--key", str(key), env=s3_env)
        assert out.returncode == 0 and "signature valid" in out.stdout, out.stdout + out.stderr
    finally:
        if sidecar is not None:
            sidecar.stop()
        for fwd in forwarders:
            fwd.close()
        if upstream is not None:
            upstream.close()
        rmtree(root)
