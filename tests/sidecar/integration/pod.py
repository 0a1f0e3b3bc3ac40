"""A pod as the injection webhook makes it, run as plain processes: the integration tests' base.

:class:`InjectedPod` calls the operator's own ``inject()`` on a labelled pod and then runs what
the kubelet would: every ``chaperone-*`` volume is materialised in a directory (the CA Secret
from the operator's CA code, a real ServiceAccount token from the TokenRequest API, downward-API
files, Secrets and ConfigMaps given by the test), every path in the containers' env is remapped
to those directories (the contract: paths come from env, so only paths change), and the
``chaperone-sidecar`` container's args become ``python -m chaperone_sidecar.sidecar_cli ARGS``.
The agent container's env (proxy variables, CA bundle variables, AWS placeholders...) is
available for real clients through :meth:`InjectedPod.agent_env`.

Also here: :class:`HTTPSUpstream` (a recording HTTPS server with a private CA) and the
namespace setup (ServiceAccount + the sidecar's RBAC).
"""

from __future__ import annotations

import base64
import contextlib
import datetime as dt
import json
import os
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import threading
import time
import urllib.request
import uuid
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from chaperone_operator import ca as operator_ca
from chaperone_operator.injection.inject import inject
from chaperone_operator.injection.settings import InjectionSettings
from chaperone_sidecar import contract as c
from chaperone_sidecar.api import LABEL_INJECT
from chaperone_testbed.pki import CertAuthority

REPO = Path(__file__).resolve().parents[3]
API = "chaperone.dev/v1alpha1"
PYTHONPATH = os.pathsep.join(str(REPO / p) for p in ("sidecar", "operator", "testbed"))
PROXY_VARS = ("http_proxy", "https_proxy", "all_proxy", "no_proxy")
# Variables a test process may carry that must not leak into a client or sidecar environment.
_LEAKY = ("AWS_", "BOTO_", "REQUESTS_CA_BUNDLE", "SSL_CERT_FILE", "CURL_CA_BUNDLE",
          "NODE_EXTRA_CA_CERTS", "CHAPERONE_", "KUBECONFIG", "OTEL_")


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


def base_env() -> dict[str, str]:
    """The test's environment minus proxies, CA bundles, AWS and Chaperone settings."""
    return {k: v for k, v in os.environ.items()
            if k.lower() not in PROXY_VARS and not k.startswith(_LEAKY)}


def wait_for(predicate: Callable[[], Any], timeout: float = 30.0, what: str = "condition",
             interval: float = 0.1) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(interval)


@dataclass(frozen=True)
class StandaloneProxy:
    port: int
    health: int
    proc: subprocess.Popen
    log: Path


@contextlib.contextmanager
def standalone_proxy(conf: Path, log: Path, env: Mapping[str, str] | None = None) -> Iterator[StandaloneProxy]:
    """``chaperone proxy`` (standalone mode, config directory ``conf``) on free ports, ready
    (``/ready`` answers 200); stopped with SIGTERM at the end, and a clean exit asserted when
    the block did not raise. ``env``: variables added to its environment (``CHAPERONE_OCSF_FILE``)."""
    port, health = free_port(), free_port()
    env = {**base_env(), **(env or {})}
    env["PYTHONPATH"] = PYTHONPATH
    proc = subprocess.Popen([sys.executable, "-m", "chaperone_sidecar.sidecar_cli", "proxy", "--config-dir",
                             str(conf), "--port", str(port), "--health-port", str(health)],
                            env=env, stdout=subprocess.DEVNULL, stderr=log.open("wb"))

    def ready() -> bool:
        assert proc.poll() is None, log.read_text()
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{health}/ready", timeout=1) as resp:
                return resp.status == 200
        except OSError:
            return False

    try:
        wait_for(ready, 60, "the standalone proxy")
        yield StandaloneProxy(port, health, proc, log)
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
        code = proc.wait(60)
    assert code == 0, log.read_text()[-4000:]



# ============================================================================ upstream

class _QuietServer(ThreadingHTTPServer):
    daemon_threads = True

    def handle_error(self, request: Any, client_address: Any) -> None:
        # A client (the sidecar) that went away mid-answer - e.g. killed on purpose - is not
        # an error of the upstream.
        if isinstance(sys.exc_info()[1], (ConnectionError, ssl.SSLError, TimeoutError)):
            return
        super().handle_error(request, client_address)


class HTTPSUpstream:
    """HTTPS JSON server with a certificate from its own CA; records every request.

    ``routes`` maps ``(METHOD, path)`` to ``(status, body[, delay seconds])``; anything else
    answers 200 with
    ``{"ok": true, "method", "path"}``. Bound to ``host`` - or to a listening socket the caller
    made (``sock``; e.g. inside another network namespace).
    """

    def __init__(self, directory: Path, *, host: str = "127.0.0.1", names: Sequence[str] = ("localhost",),
                 ips: Sequence[str] = ("127.0.0.1",), sock: socket.socket | None = None,
                 routes: Mapping[tuple[str, str], tuple[int, Any]] | None = None,
                 require_header: tuple[str, str] | None = None):
        directory.mkdir(parents=True, exist_ok=True)
        self.ca = CertAuthority(f"chaperone-it-upstream-{uuid.uuid4().hex[:6]}")
        self.ca_file = self.ca.write_cert(directory / "upstream-ca.crt")
        pair = self.ca.write_server_cert(directory, "upstream", dns_names=tuple(names),
                                         ip_addresses=tuple(ips))
        self.seen: list[dict[str, Any]] = []
        self.routes = dict(routes or {})
        self.require_header = require_header
        upstream = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def _answer(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else b""
                upstream.seen.append({"method": self.command, "path": self.path,
                                      "headers": {k.lower(): v for k, v in self.headers.items()},
                                      "body": body.decode(errors="replace"),
                                      "peer": self.client_address[0]})
                status, payload = 200, {"ok": True, "method": self.command, "path": self.path}
                if upstream.require_header is not None:
                    name, value = upstream.require_header
                    if self.headers.get(name) != value:
                        status, payload = 401, {"error": "unauthorized"}
                if status == 200 and (self.command, self.path.split("?")[0]) in upstream.routes:
                    status, payload, *delay = upstream.routes[(self.command, self.path.split("?")[0])]
                    if delay:
                        time.sleep(delay[0])
                data = json.dumps(payload).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            do_GET = do_POST = do_PUT = do_DELETE = do_PATCH = _answer

            def log_message(self, *args: Any) -> None:
                pass

        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(pair.cert_path, pair.key_path)
        if sock is None:
            self.server = _QuietServer((host, 0), Handler)
        else:
            self.server = _QuietServer(sock.getsockname()[:2], Handler, bind_and_activate=False)
            self.server.socket.close()
            self.server.socket = sock
        self.server.daemon_threads = True
        self.server.socket = context.wrap_socket(self.server.socket, server_side=True)
        self.port = self.server.socket.getsockname()[1]
        self._thread = threading.Thread(target=self.server.serve_forever,
                                        kwargs={"poll_interval": 0.05}, daemon=True)
        self._thread.start()

    def requests(self, method: str | None = None, path_prefix: str = "") -> list[dict[str, Any]]:
        return [s for s in self.seen if (method is None or s["method"] == method)
                and s["path"].startswith(path_prefix)]

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


# ============================================================================ namespace

SIDECAR_ROLE_RULES = [
    {"apiGroups": ["chaperone.dev"], "resources": ["approvalrequests"],
     "verbs": ["create", "get", "list", "watch"]},
    {"apiGroups": ["chaperone.dev"], "resources": ["claudeconnections", "accesspolicies"],
     "verbs": ["get", "list", "watch"]},
]


def setup_namespace(control_plane: Any, namespace: str, objects: Sequence[Mapping[str, Any]],
                    service_account: str = "agent") -> None:
    """Namespace, ServiceAccount, the sidecar's Role/RoleBinding and ``objects`` (connections,
    policies), applied with the real kubectl."""
    control_plane.create_namespace(namespace)
    control_plane.kubectl("create", "serviceaccount", service_account, "-n", namespace)
    items = [
        {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "Role",
         "metadata": {"name": "chaperone-sidecar", "namespace": namespace}, "rules": SIDECAR_ROLE_RULES},
        {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "RoleBinding",
         "metadata": {"name": "chaperone-sidecar", "namespace": namespace},
         "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": "chaperone-sidecar"},
         "subjects": [{"kind": "ServiceAccount", "name": service_account, "namespace": namespace}]},
    ]
    for obj in objects:
        obj = json.loads(json.dumps(obj))
        obj.setdefault("metadata", {})["namespace"] = namespace
        items.append(obj)
    control_plane.kubectl("apply", "-f", "-", input=json.dumps({"apiVersion": "v1", "kind": "List",
                                                                 "items": items}))


def connection(name: str, spec: Mapping[str, Any]) -> dict[str, Any]:
    return {"apiVersion": API, "kind": "ClaudeConnection", "metadata": {"name": name}, "spec": dict(spec)}


def policy(name: str, spec: Mapping[str, Any]) -> dict[str, Any]:
    return {"apiVersion": API, "kind": "AccessPolicy", "metadata": {"name": name}, "spec": dict(spec)}


# ============================================================================ the pod

def _downward(values: Mapping[str, str]) -> str:
    return "".join(f"{k}={json.dumps(v)}\n" for k, v in sorted(values.items()))


class InjectedPod:
    """``inject()`` applied to a labelled pod; the sidecar container run as a process.

    ``secrets`` / ``configmaps``: name -> {key: str|bytes}, what the namespace holds (the CA
    Secret and trust-bundle ConfigMap are made here from the operator's CA code). ``wrap``: argv
    prefix for the sidecar (``ip netns exec NS setpriv ...``); ``owner``: (uid, gid) that must
    own the writable volumes.
    """

    def __init__(self, control_plane: Any, namespace: str, root: Path, *,
                 connections: Sequence[Mapping[str, Any]], settings: InjectionSettings,
                 mode: str = "explicit", approval_mode: str = "hold",
                 secrets: Mapping[str, Mapping[str, Any]] | None = None,
                 configmaps: Mapping[str, Mapping[str, Any]] | None = None,
                 user_info: Mapping[str, Any] | None = None, service_account: str = "agent",
                 labels: Mapping[str, str] | None = None, pod_name: str = "agent-0"):
        self.control_plane = control_plane
        self.namespace = namespace
        self.root = root
        self.settings = settings
        self.service_account = service_account
        self.pod_name = pod_name
        self.pod_uid = str(uuid.uuid4())
        pod = {"apiVersion": "v1", "kind": "Pod",
               "metadata": {"name": pod_name, "namespace": namespace,
                            "labels": {LABEL_INJECT: "true", "app": "claude", **(labels or {})},
                            "annotations": {c.MODE_ANNOTATION: mode,
                                            c.APPROVAL_MODE_ANNOTATION: approval_mode}},
               "spec": {"serviceAccountName": service_account,
                        "containers": [{"name": "agent", "image": "example.com/agent:1"}]}}
        result = inject(pod, settings, [{**conn, "metadata": {**conn["metadata"], "namespace": namespace}}
                                        for conn in connections],
                        user_info or {"username": "alice", "groups": ["system:authenticated"]})
        assert result.allowed, result.refused
        self.pod = result.pod
        spec = self.pod["spec"]
        inits = {ct["name"]: ct for ct in spec["initContainers"]}
        self.sidecar = inits[c.SIDECAR_NAME]
        self.init = inits.get(c.INIT_NAME)
        self.agent = spec["containers"][0]
        self.volumes = {v["name"]: v for v in spec["volumes"]}
        now = dt.datetime.now(dt.UTC)
        cert_pem, key_pem = operator_ca.new_ca(f"Chaperone interception CA {namespace}", now)
        self.interception_ca_pem = cert_pem
        ca_secret = operator_ca.ca_secret(namespace, settings.ca_secret_name, cert_pem, key_pem)
        self.secrets = {settings.ca_secret_name: {k: base64.b64decode(v) for k, v in ca_secret["data"].items()},
                        **{k: dict(v) for k, v in (secrets or {}).items()}}
        self.configmaps = {settings.trust_bundle_name: {c.TRUST_KEY: cert_pem},
                           **{k: dict(v) for k, v in (configmaps or {}).items()}}
        self.proc: subprocess.Popen | None = None
        self.log = root / "sidecar.log"
        self._materialise()

    # ------------------------------------------------------------------ volumes
    def volume_dir(self, name: str) -> Path:
        return self.root / "volumes" / name

    @property
    def trust_file(self) -> Path:
        """What SSL_CERT_FILE & co. point at in the agent (the interception CA bundle)."""
        return self.volume_dir(c.VOL_TRUST) / c.TRUST_KEY

    @property
    def spool_dir(self) -> Path:
        return self.volume_dir(c.VOL_SPOOL)

    def recorded_flows(self, url_part: str) -> list[dict[str, Any]]:
        """The decided flows in the spool whose URL contains ``url_part``: method, url, headers,
        action, and the decision's effect, refusal and refusal message (the decision is a field
        of the request event since issue 16; a ``decision`` event of an older recording counts too)."""
        flows: dict[str, dict[str, Any]] = {}
        for path in sorted(self.spool_dir.rglob("*")):
            if not path.is_file():
                continue
            for line in path.read_bytes().splitlines():
                try:
                    event = json.loads(line)
                except ValueError:
                    continue
                if not isinstance(event, dict) or not event.get("flow"):
                    continue
                row = flows.setdefault(event["flow"], {})
                data = event.get("data") or {}
                decided = data.get("decision") if event.get("type") == "request" else None
                if event.get("type") == "request":
                    row.update(method=data.get("method"), url=data.get("url", ""),
                               headers={k.lower(): v for k, v in data.get("headers") or []},
                               action=(data.get("action") or {}).get("name"))
                elif event.get("type") == "decision":
                    decided = data
                if isinstance(decided, dict):
                    row.update(effect=decided.get("effect"), refused=decided.get("refused"),
                               message=decided.get("refusalMessage"))
        return [f for f in flows.values() if url_part in f.get("url", "") and "effect" in f]

    def _write_items(self, directory: Path, data: Mapping[str, Any], items: Sequence[Mapping[str, str]] | None) -> None:
        pairs = [(i["key"], i["path"]) for i in items] if items else [(k, k) for k in data]
        for key, rel in pairs:
            if key not in data:
                continue  # optional volumes / keys: the kubelet leaves them out
            target = directory / rel
            target.parent.mkdir(parents=True, exist_ok=True)
            value = data[key]
            target.write_bytes(value if isinstance(value, bytes) else str(value).encode())

    def _materialise(self) -> None:
        meta = self.pod["metadata"]
        for name, vol in self.volumes.items():
            if not name.startswith(c.RESERVED_PREFIX):
                continue
            d = self.volume_dir(name)
            d.mkdir(parents=True, exist_ok=True)
            if "secret" in vol:
                self._write_items(d, self.secrets.get(vol["secret"]["secretName"], {}), vol["secret"].get("items"))
            elif "configMap" in vol:
                self._write_items(d, self.configmaps.get(vol["configMap"]["name"], {}), vol["configMap"].get("items"))
            elif "downwardAPI" in vol:
                for item in vol["downwardAPI"]["items"]:
                    field = item["fieldRef"]["fieldPath"]
                    values = meta.get(field.split(".", 1)[1]) or {}
                    (d / item["path"]).write_text(_downward(values))
            elif "projected" in vol:
                for source in vol["projected"]["sources"]:
                    if "serviceAccountToken" in source:
                        tok = source["serviceAccountToken"]
                        args = ["create", "token", self.service_account, "-n", self.namespace]
                        if tok.get("audience"):
                            args += ["--audience", tok["audience"]]
                        token = self.control_plane.kubectl(*args).stdout.strip()
                        (d / tok["path"]).parent.mkdir(parents=True, exist_ok=True)
                        (d / tok["path"]).write_text(token)
                    elif "configMap" in source:  # kube-root-ca.crt
                        for item in source["configMap"]["items"]:
                            (d / item["path"]).write_bytes(self.control_plane.ca_path.read_bytes())
                    elif "downwardAPI" in source:  # the namespace
                        for item in source["downwardAPI"]["items"]:
                            (d / item["path"]).write_text(self.namespace)
            elif "emptyDir" in vol:
                pass
            else:
                raise AssertionError(f"volume kind not materialised: {vol}")

    def chown(self, uid: int, gid: int) -> None:
        """Make every volume readable, the writable ones owned by (uid, gid) - like fsGroup."""
        for path in [self.root, self.root / "volumes", *self.root.joinpath("volumes").rglob("*")]:
            os.chown(path, uid, gid)
            os.chmod(path, 0o755 if path.is_dir() else 0o644)

    # ------------------------------------------------------------------ env
    def _mount_map(self, container: Mapping[str, Any]) -> dict[str, Path]:
        return {m["mountPath"]: self.volume_dir(m["name"]) for m in container.get("volumeMounts") or []}

    def _remap(self, value: str, mounts: Mapping[str, Path]) -> str:
        for mount in sorted(mounts, key=len, reverse=True):
            if value == mount or value.startswith(mount + "/"):
                return str(mounts[mount]) + value[len(mount):]
        return value

    def _field(self, path: str) -> str:
        return {"metadata.name": self.pod_name, "metadata.namespace": self.namespace,
                "metadata.uid": self.pod_uid, "spec.serviceAccountName": self.service_account,
                "spec.nodeName": "node-1"}[path]

    def _container_env(self, container: Mapping[str, Any]) -> dict[str, str]:
        mounts = self._mount_map(container)
        env: dict[str, str] = {}
        for item in container.get("env") or []:
            source = item.get("valueFrom")
            if source is not None and "secretKeyRef" in source:
                # As the kubelet: the key of a Secret the namespace holds (missing: no start).
                ref = source["secretKeyRef"]
                raw = self.secrets[ref["name"]][ref["key"]]
                value = raw.decode() if isinstance(raw, bytes) else str(raw)
            elif source is not None:
                value = self._field(source["fieldRef"]["fieldPath"])
            else:
                value = item.get("value", "")
            if item["name"] == c.ENV_CONNECTIONS and value:
                entries = json.loads(value)
                for entry in entries:
                    for key in ("credentialsDir", "upstreamCAFile", "webIdentityTokenFile"):
                        if key in entry:
                            entry[key] = self._remap(entry[key], mounts)
                value = json.dumps(entries)
            env[item["name"]] = self._remap(value, mounts)
        return env

    def sidecar_env(self) -> dict[str, str]:
        env = {k: v for k, v in base_env().items() if k in ("PATH", "LANG", "LC_ALL", "TZ")}
        env.update(self._container_env(self.sidecar))
        host, port = self.control_plane.url.removeprefix("https://").rsplit(":", 1)
        env.update({"KUBERNETES_SERVICE_HOST": host, "KUBERNETES_SERVICE_PORT": port,
                    "PYTHONPATH": PYTHONPATH, "PYTHONDONTWRITEBYTECODE": "1"})
        return env

    def agent_env(self, extra: Mapping[str, str] | None = None) -> dict[str, str]:
        """The agent container's env (remapped) over the test's base env."""
        env = base_env()
        env.update(self._container_env(self.agent))
        env.update(extra or {})
        return env

    @property
    def proxy_url(self) -> str:
        return f"http://127.0.0.1:{self.settings.proxy_port}"

    # ------------------------------------------------------------------ the process
    def start(self, wrap: Sequence[str] = (), extra_env: Mapping[str, str] | None = None) -> None:
        args = list(self.sidecar["args"])
        assert self.sidecar["command"] == c.SIDECAR_COMMAND and args[0] == c.SIDECAR_SUBCOMMAND
        env = self.sidecar_env()
        env.update(extra_env or {})
        with self.log.open("ab") as log:
            log.write(f"\n=== start {time.strftime('%H:%M:%S')}\n".encode())
        self.proc = subprocess.Popen([*wrap, sys.executable, "-m", "chaperone_sidecar.sidecar_cli", *args],
                                     env=env, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                     stderr=self.log.open("ab"))

    def wait_ready(self, probe: Callable[[], bool] | None = None, timeout: float = 90.0) -> None:
        def default_probe() -> bool:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{self.settings.health_port}/ready",
                                            timeout=1) as resp:
                    return resp.status == 200
            except OSError:
                return False

        probe = probe or default_probe
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.proc is not None
            if self.proc.poll() is not None:
                raise AssertionError(f"sidecar exited with {self.proc.returncode}:\n{self.logs()}")
            if probe():
                return
            time.sleep(0.1)
        raise AssertionError(f"sidecar not ready after {timeout}s:\n{self.logs()}")

    def logs(self, limit: int = 8000) -> str:
        try:
            return self.log.read_text(errors="replace")[-limit:]
        except OSError:
            return ""

    def log_records(self) -> list[dict[str, Any]]:
        out = []
        for line in self.log.read_text(errors="replace").splitlines():
            if line.startswith("{"):
                try:
                    out.append(json.loads(line))
                except ValueError:
                    pass
        return out

    def kill(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(30)

    def stop(self, timeout: float = 60.0) -> int | None:
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode


def sessions_cli(*args: str, env: Mapping[str, str] | None = None, timeout: float = 60) -> subprocess.CompletedProcess:
    """``chaperone sessions ARGS`` as a process."""
    full = base_env()
    full["PYTHONPATH"] = PYTHONPATH
    full.update(env or {})
    return subprocess.run([sys.executable, "-m", "chaperone_sidecar.recording.sessions_cli", "sessions", *args],
                          env=full, capture_output=True, text=True, timeout=timeout)


def rmtree(path: Path) -> None:
    shutil.rmtree(path, ignore_errors=True)
