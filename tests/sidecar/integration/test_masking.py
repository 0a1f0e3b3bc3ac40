"""Issue 11 masking through the real sidecar process, with real clients and a real apiserver.

One pod (injected by the operator's ``inject()``, explicit mode) with two connections:

* ``leaky`` (http): a local HTTPS server that hands out secrets the ways the masker used to
  miss - a JSON ``\\u0041KIA...`` escape, an ``X-Debug-Key`` response header, a base64 field
  holding an AWS credentials file, and a binary body with a key in it. ``curl`` and Python
  ``requests`` (which decodes the JSON, as an agent would) must never see a secret, and
  neither must the recording (the spool's segments, every body decoded).
* ``cluster`` (kubernetes): the test bed's kube-apiserver, with no masking in any policy.
  The real ``kubectl get secret -o yaml``, a list and a ``--watch`` must show the Secret's
  keys but never its data; a rule with ``mask: {kubernetesSecrets: reveal}`` lets one named
  Secret through, which shows the default is the sidecar's and the opt-out works.

kubectl reaches the loopback apiserver through the proxy with ``proxy-url`` in its kubeconfig
(Go never proxies loopback addresses otherwise; see e2e/test_story_kubernetes.py).
"""

from __future__ import annotations

import base64
import json
import selectors
import ssl
import subprocess
import sys
import textwrap
import threading
import time
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from chaperone_operator.injection.settings import InjectionSettings
from chaperone_testbed.pki import CertAuthority

from .pod import InjectedPod, connection, free_port, policy, setup_namespace

HOST = "127.0.0.2"  # loopback, but not in the injected NO_PROXY
KEY_ID = "AKIAIOSFODNN7EXAMPLE"
SECRET_KEY = "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY"
CREDENTIALS = f"[default]\naws_access_key_id = {KEY_ID}\naws_secret_access_key = {SECRET_KEY}\n"
DB_PASSWORD = "correct-horse-battery-staple-7f3a"
PUBLIC_VALUE = "not-a-secret-banner-text"

ROUTES: dict[str, tuple[str, bytes, dict[str, str]]] = {
    # the issue's example: the agent's JSON parser turns \u0041 into A
    "/escaped": ("application/json",
                 b'{"k": "\\u0041' + KEY_ID[1:].encode() + b'", "note": "caf\\u00e9"}', {}),
    "/header": ("application/json", b'{"ok": true}', {"X-Debug-Key": KEY_ID}),
    "/b64": ("application/json",
             json.dumps({"config": base64.b64encode(CREDENTIALS.encode()).decode(),
                         "plain": base64.b64encode(b"nothing to see").decode()}).encode(), {}),
    "/binary": ("application/octet-stream",
                b"\x00\x01\x02\xff " + KEY_ID.encode() + b" \xfe\xfd\x00" * 30, {}),
}


class LeakyUpstream:
    """An HTTPS server (own CA) answering ROUTES byte for byte, with extra headers."""

    def __init__(self, directory: Path) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        self.ca = CertAuthority(f"chaperone-it-leaky-{uuid.uuid4().hex[:6]}")
        self.ca_file = self.ca.write_cert(directory / "ca.crt")
        pair = self.ca.write_server_cert(directory, "leaky", dns_names=("leaky.internal",),
                                         ip_addresses=(HOST,))

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_GET(self) -> None:  # noqa: N802
                ctype, body, headers = ROUTES.get(self.path, ("text/plain", b"no such route", {}))
                self.send_response(200 if self.path in ROUTES else 404)
                self.send_header("Content-Type", ctype)
                self.send_header("Content-Length", str(len(body)))
                for name, value in headers.items():
                    self.send_header(name, value)
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args) -> None:
                pass

        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(pair.cert_path, pair.key_path)
        self.server = ThreadingHTTPServer((HOST, 0), Handler)
        self.server.daemon_threads = True
        self.server.socket = context.wrap_socket(self.server.socket, server_side=True)
        self.port = self.server.socket.getsockname()[1]
        threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.05},
                         daemon=True).start()

    def url(self, path: str) -> str:
        return f"https://{HOST}:{self.port}{path}"

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture(scope="module")
def pod(control_plane, crds_installed, tmp_path_factory):
    root = tmp_path_factory.mktemp("masking")
    upstream = LeakyUpstream(root / "upstream")
    ns = f"masking-{uuid.uuid4().hex[:8]}"
    api_host = control_plane.url.removeprefix("https://")
    conns = [
        connection("leaky", {"type": "http", "hosts": [HOST], "recording": {"bodies": "full"},
                             "upstreamCA": {"kind": "ConfigMap", "name": "leaky-ca", "key": "ca.crt"}}),
        connection("cluster", {"type": "kubernetes", "hosts": [api_host], "recording": {"bodies": "full"},
                               "credentials": {"source": "secret", "secretRef": {"name": "kube-token"}},
                               "upstreamCA": {"kind": "ConfigMap", "name": "kube-ca", "key": "ca.crt"}}),
    ]
    policies = [
        policy("leaky", {"connections": ["leaky"], "defaultEffect": "allow",
                         "masking": {"detectors": ["all"]},
                         "rules": [{"name": "reads", "match": {"methods": ["GET"]}, "allow": {}}]}),
        # No masking at all on the cluster: Secret data is masked by the sidecar's default.
        policy("cluster", {"connections": ["cluster"], "defaultEffect": "block", "rules": [
            {"name": "reads", "match": {"kubernetes": {"verbs": ["get", "list", "watch"]}}, "allow": {}},
            {"name": "public-banner", "match": {"kubernetes": {"resources": ["secrets"],
                                                               "names": ["banner"]}},
             "mask": {"kubernetesSecrets": "reveal"}}]}),
    ]
    setup_namespace(control_plane, ns, conns + policies)
    # The connection's identity: a ServiceAccount that may read Secrets here.
    rbac = "rbac.authorization.k8s.io/v1"
    control_plane.kubectl("apply", "-f", "-", input=json.dumps({"apiVersion": "v1", "kind": "List", "items": [
        {"apiVersion": "v1", "kind": "ServiceAccount", "metadata": {"name": "reader", "namespace": ns}},
        {"apiVersion": rbac, "kind": "Role", "metadata": {"name": "secret-reader", "namespace": ns},
         "rules": [{"apiGroups": [""], "resources": ["secrets"], "verbs": ["get", "list", "watch"]}]},
        {"apiVersion": rbac, "kind": "RoleBinding", "metadata": {"name": "secret-reader", "namespace": ns},
         "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": "secret-reader"},
         "subjects": [{"kind": "ServiceAccount", "name": "reader", "namespace": ns}]},
        {"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "db", "namespace": ns},
         "stringData": {"password": DB_PASSWORD, "aws": CREDENTIALS}},
        {"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "banner", "namespace": ns},
         "stringData": {"text": PUBLIC_VALUE}},
    ]}))
    token = control_plane.kubectl("create", "token", "reader", "-n", ns, "--duration", "1h").stdout.strip()
    settings = InjectionSettings(proxy_port=free_port(), health_port=free_port())
    sidecar = InjectedPod(
        control_plane, ns, root, connections=conns, settings=settings, mode="explicit",
        secrets={"kube-token": {"token": token}},
        configmaps={"leaky-ca": {"ca.crt": upstream.ca_file.read_bytes()},
                    "kube-ca": {"ca.crt": Path(control_plane.ca_path).read_bytes()}})
    sidecar.start()
    try:
        sidecar.wait_ready()
        yield sidecar, upstream, ns
    finally:
        code = sidecar.stop()
        upstream.close()
    assert code == 0, sidecar.logs()


def run(argv, env, timeout=60) -> subprocess.CompletedProcess:
    return subprocess.run(argv, env=env, capture_output=True, timeout=timeout)


def recorded_text(sidecar: InjectedPod) -> str:
    """Everything the spool holds, with every recorded body decoded (text or base64)."""
    out = []
    for path in sorted(sidecar.spool_dir.rglob("*")):
        if not path.is_file():
            continue
        raw = path.read_bytes()
        out.append(raw.decode("utf-8", "replace"))
        for line in raw.splitlines():
            try:
                event = json.loads(line)
            except ValueError:
                continue
            stack = [event]
            while stack:
                node = stack.pop()
                if isinstance(node, dict):
                    if isinstance(node.get("base64"), str):
                        out.append(base64.b64decode(node["base64"]).decode("latin-1"))
                    stack.extend(node.values())
                elif isinstance(node, list):
                    stack.extend(node)
    return "\n".join(out)


def assert_never_recorded(sidecar: InjectedPod, *secrets: str) -> None:
    deadline = time.monotonic() + 10  # events reach the spool's open segment asynchronously
    while True:
        text = recorded_text(sidecar)
        if all(s not in text for s in secrets) or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    for s in secrets:
        assert s not in text, f"{s!r} reached the recording"


# ---------------------------------------------------------------------------- http: real clients

def test_curl_never_sees_the_header_or_binary_secret(pod):
    sidecar, upstream, _ = pod
    env = sidecar.agent_env()
    res = run(["curl", "-sS", "-i", "--max-time", "30", upstream.url("/header")], env)
    assert res.returncode == 0, res.stderr
    head = res.stdout.decode("latin-1").lower()
    assert "x-debug-key: [masked:aws-access-key-id]" in head and KEY_ID.lower() not in head
    res = run(["curl", "-sS", "--max-time", "30", upstream.url("/binary")], env)
    assert res.returncode == 0 and len(res.stdout) == len(ROUTES["/binary"][1])  # length kept
    assert KEY_ID.encode() not in res.stdout and res.stdout.startswith(b"\x00\x01\x02\xff ")
    assert_never_recorded(sidecar, KEY_ID)


REQUESTS_SCRIPT = textwrap.dedent("""
    import base64, json, sys, requests
    out = {}
    for path in ("/escaped", "/b64", "/header"):
        r = requests.get(sys.argv[1] + path, timeout=30)
        doc = r.json()  # decoded as an agent decodes it
        decoded = {k: v for k, v in doc.items() if isinstance(v, str)}
        for k, v in list(decoded.items()):
            try:
                decoded[k + ".b64"] = base64.b64decode(v, validate=True).decode("latin-1")
            except Exception:
                pass
        out[path] = {"status": r.status_code, "doc": doc, "decoded": decoded, "headers": dict(r.headers)}
    print(json.dumps(out))
""")


def test_requests_never_decodes_an_escaped_or_base64_secret(pod):
    sidecar, upstream, _ = pod
    res = run([sys.executable, "-c", REQUESTS_SCRIPT, f"https://{HOST}:{upstream.port}"], sidecar.agent_env())
    assert res.returncode == 0, res.stderr.decode()
    out = json.loads(res.stdout)
    assert out["/escaped"]["doc"] == {"k": "[MASKED:aws-access-key-id]", "note": "café"}
    assert out["/b64"]["doc"]["config"] == "[MASKED:aws-access-key-id]"
    assert out["/b64"]["decoded"]["plain.b64"] == "nothing to see"  # other base64 untouched
    everything = res.stdout.decode()
    assert KEY_ID not in everything and SECRET_KEY not in everything
    assert all(s["status"] == 200 for s in out.values())
    assert_never_recorded(sidecar, KEY_ID, SECRET_KEY, base64.b64encode(CREDENTIALS.encode()).decode())


# ---------------------------------------------------------------------------- kubernetes: real kubectl

def kubectl(pod, control_plane, *args: str, popen: bool = False):
    sidecar, _, ns = pod
    config = sidecar.root / "agent-kubeconfig"
    config.write_text(json.dumps({
        "apiVersion": "v1", "kind": "Config",
        "clusters": [{"name": "c", "cluster": {"server": control_plane.url, "proxy-url": sidecar.proxy_url}}],
        "users": [{"name": "u", "user": {"token": "chaperone-placeholder"}}],
        "contexts": [{"name": "x", "context": {"cluster": "c", "user": "u", "namespace": ns}}],
        "current-context": "x"}))
    argv = [control_plane.kubectl_binary, "--kubeconfig", str(config),
            "--cache-dir", str(sidecar.root / "kube-cache"), *args]
    if popen:
        return subprocess.Popen(argv, env=sidecar.agent_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    return run(argv, sidecar.agent_env())


def b64(text: str) -> str:
    return base64.b64encode(text.encode()).decode()


def assert_masked_secret(obj: dict) -> None:
    assert sorted(obj["data"]) == ["aws", "password"]  # the keys stay visible
    for value in obj["data"].values():
        assert base64.b64decode(value) == b"[MASKED:kubernetes-secret]"


def test_kubectl_get_secret_yaml_and_list_never_show_the_data(pod, control_plane):
    import yaml

    res = kubectl(pod, control_plane, "get", "secret", "db", "-o", "yaml", "--request-timeout", "30s")
    assert res.returncode == 0, res.stderr.decode() + pod[0].logs()
    text = res.stdout.decode()
    assert DB_PASSWORD not in text and b64(DB_PASSWORD) not in text and KEY_ID not in text
    assert_masked_secret(yaml.safe_load(text))
    res = kubectl(pod, control_plane, "get", "secrets", "-o", "json", "--request-timeout", "30s")
    assert res.returncode == 0, res.stderr.decode()
    items = {i["metadata"]["name"]: i for i in json.loads(res.stdout)["items"]}
    assert_masked_secret(items["db"])
    # The rule with kubernetesSecrets: reveal matches only the Secret named banner... but a
    # list has no name, so the list masks banner too; a get of banner reveals it.
    assert base64.b64decode(items["banner"]["data"]["text"]) == b"[MASKED:kubernetes-secret]"
    res = kubectl(pod, control_plane, "get", "secret", "banner", "-o", "json", "--request-timeout", "30s")
    assert res.returncode == 0 and base64.b64decode(json.loads(res.stdout)["data"]["text"]) == PUBLIC_VALUE.encode()
    assert_never_recorded(pod[0], b64(DB_PASSWORD), DB_PASSWORD, b64(CREDENTIALS))


def test_kubectl_watch_streams_masked_events_as_they_happen(pod, control_plane):
    _, _, ns = pod
    proc = kubectl(pod, control_plane, "get", "secret", "db", "-o", "json", "--watch",
                   "--output-watch-events", popen=True)
    try:
        events = read_json_objects(proc, 1, timeout=30)
        control_plane.kubectl("patch", "secret", "db", "-n", ns, "--type=merge",
                              "-p", json.dumps({"stringData": {"password": DB_PASSWORD + "-v2"}}))
        events += read_json_objects(proc, 1, timeout=30)  # arrives while the watch is open
    finally:
        proc.kill()
        proc.wait()
    assert [e["type"] for e in events] == ["ADDED", "MODIFIED"]
    for event in events:
        assert_masked_secret(event["object"])
    assert_never_recorded(pod[0], b64(DB_PASSWORD), b64(DB_PASSWORD + "-v2"))


def read_json_objects(proc: subprocess.Popen, n: int, timeout: float) -> list[dict]:
    """Read ``n`` pretty-printed JSON objects from a running kubectl's stdout."""
    decoder, buf, out = json.JSONDecoder(), "", []
    sel = selectors.DefaultSelector()
    sel.register(proc.stdout, selectors.EVENT_READ)
    deadline = time.monotonic() + timeout
    pending = getattr(proc, "_pending", "")
    buf = pending
    while len(out) < n:
        buf = buf.lstrip()
        if buf:
            try:
                obj, end = decoder.raw_decode(buf)
                out.append(obj)
                buf = buf[end:]
                continue
            except ValueError:
                pass
        left = deadline - time.monotonic()
        assert left > 0, f"no watch event within {timeout}s: {buf[:500]!r} {proc.stderr.peek() if proc.poll() is not None else ''}"
        if sel.select(left):
            chunk = proc.stdout.read1(65536).decode()
            assert chunk or proc.poll() is None, f"kubectl ended: {proc.stderr.read().decode()}"
            buf += chunk
    proc._pending = buf  # type: ignore[attr-defined]
    return out
