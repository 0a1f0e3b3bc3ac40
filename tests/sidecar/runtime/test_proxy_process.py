"""The sidecar as a real process, configured exactly as the webhook configures the container.

The env and args come from the operator's own ``sidecar_container()`` (only the paths are
remapped into a temp dir); connections and policies live in the real apiserver and are read
with a real ServiceAccount token; the interception CA is the operator's. A local HTTPS upstream
(certificate from a private CA that the connection trusts through ``upstreamCA``) sees what the
proxy forwards. Clients are the real ``curl`` and Python ``requests`` going through
``HTTPS_PROXY`` and trusting only the interception CA.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import signal
import socket
import ssl
import subprocess
import sys
import threading
import time
import urllib.request
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import requests

from chaperone_operator import ca as operator_ca
from chaperone_operator.injection.connections import plan_connections
from chaperone_operator.injection.settings import InjectionSettings
from chaperone_operator.injection.sidecar import sidecar_container
from chaperone_testbed.pki import CertAuthority

REPO = Path(__file__).resolve().parents[3]
API = "chaperone.dev/v1alpha1"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class Upstream:
    """HTTPS on 127.0.0.1 with a certificate for localhost from a private CA; records requests."""

    def __init__(self, directory: Path):
        self.ca = CertAuthority("chaperone-test-upstream-ca")
        self.ca_file = self.ca.write_cert(directory / "upstream-ca.crt")
        pair = self.ca.write_server_cert(directory, "upstream", dns_names=("localhost",),
                                         ip_addresses=("127.0.0.1",))
        self.seen: list[dict] = []
        upstream = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def _answer(self):
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else b""
                upstream.seen.append({"method": self.command, "path": self.path,
                                      "headers": [(k.lower(), v) for k, v in self.headers.items()],
                                      "body": body.decode(errors="replace")})
                data = json.dumps({"ok": True, "path": self.path}).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.send_header("Alt-Svc", 'h3=":443"')
                self.end_headers()
                self.wfile.write(data)

            do_GET = do_POST = do_DELETE = _answer

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(pair.cert_path, pair.key_path)
        self.server.socket = context.wrap_socket(self.server.socket, server_side=True)
        self.port = self.server.server_address[1]
        threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()

    def close(self):
        self.server.shutdown()
        self.server.server_close()


class Sidecar:
    """The `chaperone sidecar` process with the webhook's container configuration."""

    def __init__(self, control_plane, namespace: str, root: Path, upstream: Upstream):
        self.root = root
        self.port, self.health_port = free_port(), free_port()
        # What the webhook would inject for a pod in `namespace` with our one connection.
        conn = {"metadata": {"name": "local"}, "spec": {
            "type": "http", "hosts": ["localhost"],
            "upstreamCA": {"kind": "ConfigMap", "name": "local-ca", "key": "ca.crt"}}}
        settings = InjectionSettings(proxy_port=self.port, health_port=self.health_port)
        creator = json.dumps({"username": "alice", "groups": ["system:authenticated"]})
        container = sidecar_container(settings, "explicit", "defer", plan_connections([conn], 15100), creator)
        fields = {"metadata.name": "agent-0", "metadata.namespace": namespace, "metadata.uid": str(uuid.uuid4()),
                  "spec.serviceAccountName": "agent", "spec.nodeName": "node-1"}
        env = {}
        for item in container["env"]:
            env[item["name"]] = item.get("value", fields.get(
                item.get("valueFrom", {}).get("fieldRef", {}).get("fieldPath", ""), ""))
        # Remap every path the container mounts into the temp dir (the contract's rule).
        remap = {m["mountPath"]: root / m["name"] for m in container["volumeMounts"]}

        def local_path(value: str) -> str:
            for mount in sorted(remap, key=len, reverse=True):
                if value == mount or value.startswith(mount + "/"):
                    return str(remap[mount]) + value[len(mount):]
            return value

        for name, value in list(env.items()):
            if name == "CHAPERONE_CONNECTIONS":
                entries = json.loads(value)
                for entry in entries:
                    for key in ("credentialsDir", "upstreamCAFile", "webIdentityTokenFile"):
                        if key in entry:
                            entry[key] = local_path(entry[key])
                env[name] = json.dumps(entries)
            else:
                env[name] = local_path(value)
        for local in remap.values():
            local.mkdir(parents=True, exist_ok=True)
        mounts = {m["name"]: root / m["name"] for m in container["volumeMounts"]}
        # chaperone-ca: the operator's CA Secret, as the kubelet would project it.
        cert_pem, key_pem = operator_ca.new_ca(f"Chaperone interception CA {namespace}",
                                               dt.datetime.now(dt.timezone.utc))
        import base64

        for key, value in operator_ca.ca_secret(namespace, "chaperone-ca", cert_pem, key_pem)["data"].items():
            (mounts["chaperone-ca"] / key).write_bytes(base64.b64decode(value))
        self.interception_ca = root / "trust-ca.crt"  # what agents get in chaperone-trust
        self.interception_ca.write_bytes(cert_pem)
        # chaperone-token: a real token for the pod's ServiceAccount.
        token = control_plane.kubectl("create", "token", "agent", "-n", namespace).stdout.strip()
        (mounts["chaperone-token"] / "token").write_text(token)
        (mounts["chaperone-token"] / "ca.crt").write_bytes(control_plane.ca_path.read_bytes())
        (mounts["chaperone-token"] / "namespace").write_text(namespace)
        (mounts["chaperone-podinfo"] / "labels").write_text('app="claude"\nchaperone.dev/inject="true"\n')
        (mounts["chaperone-podinfo"] / "annotations").write_text("")
        upca = next(m for m in container["volumeMounts"] if m["name"].startswith("chaperone-upca-"))
        (mounts[upca["name"]] / "ca.crt").write_bytes(upstream.ca_file.read_bytes())
        host, port = control_plane.url.removeprefix("https://").rsplit(":", 1)
        env.update({"KUBERNETES_SERVICE_HOST": host, "KUBERNETES_SERVICE_PORT": port,
                    "PYTHONPATH": os.pathsep.join(str(REPO / p) for p in ("sidecar", "operator", "testbed")),
                    "PATH": os.environ.get("PATH", ""), "CHAPERONE_LOG_LEVEL": "info"})
        self.env = env
        self.args = container["args"]
        assert self.args[:2] == ["sidecar", "--mode"]
        self.log = root / "sidecar.log"
        self.proc = subprocess.Popen([sys.executable, "-m", "chaperone_sidecar.sidecar_cli", *self.args],
                                     env=env, stdout=subprocess.DEVNULL, stderr=self.log.open("wb"))

    @property
    def proxy(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def wait_ready(self, timeout: float = 90.0) -> None:
        deadline = time.monotonic() + timeout
        url = f"http://127.0.0.1:{self.health_port}/ready"
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"sidecar exited with {self.proc.returncode}:\n{self.logs()}")
            try:
                with urllib.request.urlopen(url, timeout=1) as resp:
                    if resp.status == 200:
                        return
            except OSError:
                pass
            time.sleep(0.1)
        raise AssertionError(f"sidecar not ready after {timeout}s:\n{self.logs()}")

    def logs(self) -> str:
        return self.log.read_text(errors="replace")[-8000:]

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode


@pytest.fixture(scope="module")
def pod(control_plane, crds_installed, tmp_path_factory):
    """Namespace, ServiceAccount + sidecar RBAC, the connection and a GET-only policy; the
    sidecar process; the upstream."""
    ns = f"proc-{uuid.uuid4().hex[:8]}"
    control_plane.create_namespace(ns)
    control_plane.kubectl("create", "serviceaccount", "agent", "-n", ns)
    control_plane.kubectl("apply", "-f", "-", input=json.dumps({"apiVersion": "v1", "kind": "List", "items": [
        {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "Role",
         "metadata": {"name": "chaperone-sidecar", "namespace": ns},
         "rules": [{"apiGroups": ["chaperone.dev"], "resources": ["approvalrequests"],
                    "verbs": ["create", "get", "list", "watch"]},
                   {"apiGroups": ["chaperone.dev"], "resources": ["claudeconnections", "accesspolicies"],
                    "verbs": ["get", "list", "watch"]}]},
        {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "RoleBinding",
         "metadata": {"name": "chaperone-sidecar", "namespace": ns},
         "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": "chaperone-sidecar"},
         "subjects": [{"kind": "ServiceAccount", "name": "agent", "namespace": ns}]},
        {"apiVersion": API, "kind": "ClaudeConnection", "metadata": {"name": "local", "namespace": ns},
         "spec": {"type": "http", "hosts": ["localhost"],
                  "upstreamCA": {"kind": "ConfigMap", "name": "local-ca", "key": "ca.crt"}}},
        {"apiVersion": API, "kind": "AccessPolicy", "metadata": {"name": "read-only", "namespace": ns},
         "spec": {"connections": ["local"],
                  "rules": [{"name": "reads", "match": {"methods": ["GET"]}, "allow": {}},
                            {"name": "no-writes", "match": {"methods": ["POST", "PUT", "DELETE"]},
                             "block": {"message": "writes are not allowed here"}}]}},
    ]}))
    root = tmp_path_factory.mktemp("sidecar")
    upstream = Upstream(root)
    sidecar = Sidecar(control_plane, ns, root, upstream)
    try:
        sidecar.wait_ready()
        yield sidecar, upstream
    finally:
        code = sidecar.stop()
        upstream.close()
    assert code == 0, f"sidecar exit code {code} after SIGTERM:\n{sidecar.logs()}"
    errors = [line for line in sidecar.logs().splitlines() if '"level":"error"' in line]
    assert not errors, errors


def client_env(sidecar) -> dict:
    env = {k: v for k, v in os.environ.items() if k.lower() not in ("no_proxy", "http_proxy", "https_proxy", "all_proxy")}
    env.update({"HTTPS_PROXY": sidecar.proxy, "HTTP_PROXY": sidecar.proxy})
    return env


def curl(sidecar, url, *extra):
    out = subprocess.run(["curl", "-sS", "--cacert", str(sidecar.interception_ca), "-w", "\n%{http_code}",
                          *extra, url], env=client_env(sidecar), capture_output=True, text=True, timeout=30)
    assert out.returncode == 0, out.stderr
    body, _, status = out.stdout.rpartition("\n")
    return int(status), body


def test_curl_allowed_get_passes_and_spoofed_headers_never_arrive(pod):
    sidecar, upstream = pod
    before = len(upstream.seen)
    status, body = curl(sidecar, f"https://localhost:{upstream.port}/hello?x=1",
                        "-H", "X-Chaperone-Approved-By: mallory", "-H", "x-chaperone-grant: exact",
                        "-H", "X-Chaperone-Identity: root", "-H", "X-Keep: yes", "-D", "-")
    assert status == 200, body
    blocks = body.split("\n\n")  # the CONNECT answer, the response's headers, its body
    assert json.loads(blocks[-1]) == {"ok": True, "path": "/hello?x=1"}
    headers = blocks[-2].lower()
    assert headers.startswith("http/") and " 200" in headers.splitlines()[0]
    assert "alt-svc" not in headers  # no QUIC route around the proxy
    seen = upstream.seen[before:]
    assert len(seen) == 1 and seen[0]["path"] == "/hello?x=1"
    names = [k for k, _ in seen[0]["headers"]]
    assert "x-keep" in names
    assert not [k for k in names if k.startswith("x-chaperone")], seen[0]["headers"]


def test_requests_allowed_get_passes(pod):
    sidecar, upstream = pod
    proxies = {"https": sidecar.proxy, "http": sidecar.proxy}
    resp = requests.get(f"https://localhost:{upstream.port}/py", proxies=proxies,
                        verify=str(sidecar.interception_ca), headers={"X-Chaperone-Decision": "allow"},
                        timeout=30)
    assert resp.status_code == 200 and resp.json()["path"] == "/py"
    assert not [k for k, _ in upstream.seen[-1]["headers"] if k.startswith("x-chaperone")]


def test_a_host_without_connection_gets_the_403_json(pod):
    sidecar, upstream = pod
    before = len(upstream.seen)
    status, body = curl(sidecar, "https://nothing-covers-this.example.test/steal")
    assert status == 403
    data = json.loads(body)
    assert data["error"] == "chaperone_no_connection"
    assert "nothing-covers-this.example.test" in data["message"] and "local (localhost)" in data["message"]
    assert data["connections"] == [{"name": "local", "type": "http", "hosts": ["localhost"]}]
    resp = requests.get("https://nothing-covers-this.example.test/", verify=str(sidecar.interception_ca),
                        proxies={"https": sidecar.proxy}, timeout=30)
    assert resp.status_code == 403 and resp.headers["X-Chaperone-Refused"] == "no_connection"
    assert resp.json()["host"] == "nothing-covers-this.example.test"
    # Plain HTTP too.
    resp = requests.get("http://also-not-covered.example.test/", proxies={"http": sidecar.proxy}, timeout=30)
    assert resp.status_code == 403 and resp.json()["error"] == "chaperone_no_connection"
    assert len(upstream.seen) == before


def test_policy_blocks_and_bad_tokens_are_refused_before_the_upstream(pod):
    sidecar, upstream = pod
    before = len(upstream.seen)
    status, body = curl(sidecar, f"https://localhost:{upstream.port}/x", "-X", "DELETE")
    assert status == 403 and json.loads(body)["message"] == "writes are not allowed here"
    status, body = curl(sidecar, f"https://localhost:{upstream.port}/x",
                        "-H", "X-Chaperone-On-Behalf-Of: eyJhbGciOiJub25lIn0.e30.")
    assert status == 401 and json.loads(body)["error"] == "chaperone_unauthenticated"
    assert len(upstream.seen) == before


def test_the_sidecar_logs_json(pod):
    sidecar, _ = pod
    lines = [line for line in sidecar.logs().splitlines() if line.strip()]
    assert lines
    records = [json.loads(line) for line in lines]
    assert any(r["msg"].startswith("ready: listening on") for r in records)
    assert all({"time", "level", "msg"} <= set(r) for r in records)
    refused = [r for r in records if r["msg"].startswith("refused: no ClaudeConnection")]
    assert refused and refused[0]["flow"]


# ---------------------------------------------------------------------------- standalone

def free_port_run(n: int) -> int:
    """The first of ``n`` consecutive free loopback ports (each bound once to prove it)."""
    for _ in range(200):
        base = free_port()
        socks = []
        try:
            for port in range(base, base + n):
                sock = socket.socket()
                socks.append(sock)
                sock.bind(("127.0.0.1", port))
            return base
        except OSError:
            continue
        finally:
            for sock in socks:
                sock.close()
    raise RuntimeError(f"no run of {n} free ports")


def wait_for(predicate, timeout=20.0, what="condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


def test_standalone_proxy_process(tmp_path):
    """`chaperone proxy`: local YAML, a CA generated on first run, reverse mode, live reload,
    recordings in a local directory after SIGTERM."""
    upstream = Upstream(tmp_path)
    conf = tmp_path / "conf"
    (conf / "connections").mkdir(parents=True)
    (conf / "policies").mkdir()
    (conf / "upstream-ca" / "local").mkdir(parents=True)
    (conf / "upstream-ca" / "local" / "ca.crt").write_bytes(upstream.ca_file.read_bytes())
    (conf / "upstream-ca" / "rev").mkdir(parents=True)
    (conf / "upstream-ca" / "rev" / "ca.crt").write_bytes(upstream.ca_file.read_bytes())
    # Reverse listeners take consecutive ports from the base: all of them must be free (a
    # port next to a free one may be some other socket's, which once made zeta's never listen).
    reverse_port = free_port_run(4)
    (conf / "chaperone.yaml").write_text(f"namespace: laptop\nuser: dana\nreversePortBase: {reverse_port}\n")
    (conf / "connections" / "local.yaml").write_text(json.dumps(
        {"apiVersion": API, "kind": "ClaudeConnection", "metadata": {"name": "local"},
         "spec": {"type": "http", "hosts": ["localhost"]}}))
    (conf / "connections" / "rev.yaml").write_text(json.dumps(
        {"apiVersion": API, "kind": "ClaudeConnection", "metadata": {"name": "rev"},
         "spec": {"type": "http", "hosts": ["127.0.0.1"], "baseURL": f"https://127.0.0.1:{upstream.port}/api"}}))
    (conf / "policies" / "reads.yaml").write_text(json.dumps(
        {"apiVersion": API, "kind": "AccessPolicy", "metadata": {"name": "reads"},
         "spec": {"rules": [{"name": "reads", "match": {"methods": ["GET"]}, "allow": {}}]}}))
    port, health = free_port(), free_port()
    env = {k: v for k, v in os.environ.items() if k.lower() not in ("no_proxy", "http_proxy", "https_proxy")}
    env["PYTHONPATH"] = os.pathsep.join(str(REPO / p) for p in ("sidecar", "operator", "testbed"))
    log = tmp_path / "proxy.log"
    proc = subprocess.Popen([sys.executable, "-m", "chaperone_sidecar.sidecar_cli", "proxy",
                             "--config-dir", str(conf), "--port", str(port), "--health-port", str(health)],
                            env=env, stdout=subprocess.DEVNULL, stderr=log.open("wb"))

    def ready():
        assert proc.poll() is None, log.read_text()
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{health}/ready", timeout=1) as resp:
                return resp.status == 200
        except OSError:
            return False

    try:
        wait_for(ready, 60, "the standalone proxy")
        ca_cert = conf / "ca" / "mitmproxy-ca-cert.pem"
        assert ca_cert.is_file() and (conf / "ca" / "mitmproxy-ca.pem").is_file()
        proxies = {"https": f"http://127.0.0.1:{port}", "http": f"http://127.0.0.1:{port}"}
        resp = requests.get(f"https://localhost:{upstream.port}/hello", proxies=proxies, verify=str(ca_cert), timeout=30)
        assert resp.status_code == 200 and resp.json()["path"] == "/hello"
        resp = requests.post(f"https://localhost:{upstream.port}/hello", proxies=proxies, verify=str(ca_cert), timeout=30)
        assert resp.status_code == 403 and resp.json()["error"] == "chaperone_blocked"

        # Reverse mode: plain HTTP to the loopback port, HTTPS upstream with the base path.
        resp = requests.get(f"http://127.0.0.1:{reverse_port}/v1/models", timeout=30)
        assert resp.status_code == 200 and resp.json()["path"] == "/api/v1/models"
        assert dict(upstream.seen[-1]["headers"])["host"] == f"127.0.0.1:{upstream.port}"

        # Live reload: a new policy blocks a path; a new connection with a baseURL gets a listener.
        (conf / "policies" / "secret.yaml").write_text(json.dumps(
            {"apiVersion": API, "kind": "AccessPolicy", "metadata": {"name": "secret"},
             "spec": {"rules": [{"name": "no-secrets", "match": {"paths": ["/secret/**"]},
                                 "block": {"message": "not the secrets"}}]}}))
        (conf / "connections" / "zeta.yaml").write_text(json.dumps(
            {"apiVersion": API, "kind": "ClaudeConnection", "metadata": {"name": "zeta"},
             "spec": {"type": "http", "hosts": ["zeta.example.test"],
                      "baseURL": f"https://localhost:{upstream.port}"}}))

        def blocked():
            r = requests.get(f"https://localhost:{upstream.port}/secret/x", proxies=proxies,
                             verify=str(ca_cert), timeout=30)
            return r.status_code == 403 and r.json()["message"] == "not the secrets"

        wait_for(blocked, 20, "the new policy")
        records = [json.loads(line) for line in log.read_text().splitlines() if line.strip()]
        zeta_port = next(int(r["msg"].rsplit(":", 1)[1]) for r in records
                         if r["msg"].startswith("connection zeta: reverse-mode base URL"))
        assert zeta_port != reverse_port  # rev keeps its port

        def zeta_listens():
            try:
                return requests.get(f"http://127.0.0.1:{zeta_port}/z", timeout=5).status_code == 200
            except requests.ConnectionError:
                return False

        try:
            wait_for(zeta_listens, 20, "the new reverse listener")
        except AssertionError:
            raise AssertionError(f"zeta's reverse listener on {zeta_port} never answered; proxy log:\n"
                                 + log.read_text()[-4000:]) from None
        assert requests.get(f"http://127.0.0.1:{reverse_port}/again", timeout=30).json()["path"] == "/api/again"
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
        code = proc.wait(60)
        upstream.close()
    assert code == 0, log.read_text()[-5000:]
    records = [json.loads(line) for line in log.read_text().splitlines() if line.strip()]
    assert not [r for r in records if r["level"] in ("error", "critical")], log.read_text()[-5000:]
    recorded = [p for p in (conf / "recordings").rglob("*") if p.is_file()]
    assert recorded, f"nothing in {conf / 'recordings'}:\n{log.read_text()[-3000:]}"


def test_a_sidecar_without_its_ca_fails_fast_with_a_json_log(tmp_path):
    env = {"PATH": os.environ.get("PATH", ""), "HOME": str(tmp_path),
           "PYTHONPATH": os.pathsep.join(str(REPO / p) for p in ("sidecar", "operator", "testbed")),
           "KUBERNETES_SERVICE_HOST": "127.0.0.1", "KUBERNETES_SERVICE_PORT": "1",
           "CHAPERONE_CA_DIR": str(tmp_path / "no-ca"), "CHAPERONE_TOKEN_DIR": str(tmp_path)}
    out = subprocess.run([sys.executable, "-m", "chaperone_sidecar.sidecar_cli", "sidecar", "--mode", "explicit",
                          "--port", str(free_port()), "--health-port", str(free_port())],
                         env=env, capture_output=True, text=True, timeout=60)
    assert out.returncode == 1
    last = json.loads(out.stderr.strip().splitlines()[-1])
    assert last["level"] == "critical" and "mitmproxy-ca.pem is missing" in last["msg"]
    bad = subprocess.run([sys.executable, "-m", "chaperone_sidecar.sidecar_cli", "sidecar", "--mode", "explicit"],
                         env={**env, "CHAPERONE_CONNECTIONS": "{"}, capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2 and "CHAPERONE_CONNECTIONS is not JSON" in bad.stderr
