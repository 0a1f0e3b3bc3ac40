"""Helpers for the end-to-end story: turn a pod the webhook mutated into local processes.

There is no kubelet on the test bed, so this module does the kubelet's part for one container,
from the pod object read back from the apiserver and nothing else:

* **volumes** (:func:`materialize_mounts`): every ``volumeMount`` of the container becomes a
  directory under a temp root that mirrors the mount path (``/etc/chaperone/ca`` ->
  ``ROOT/etc/chaperone/ca``), filled from the volume's source as the kubelet would: Secret and
  ConfigMap keys (``items`` honoured, ``optional`` honoured), projected volumes (a TokenRequest
  token bound to the pod, ConfigMap/Secret items, downward-API files), downward-API files
  (``labels``/``annotations`` in the kubelet's ``key="value"`` format) and emptyDirs. A
  non-optional source that does not exist raises :class:`NotReady` (the pod would stay in
  ``ContainerCreating``).
* **environment** (:func:`container_env`): the container's ``env`` in order, ``valueFrom``
  resolved from the pod object (``fieldRef``) or the API (``secretKeyRef``,
  ``configMapKeyRef``); then every value that is a path under a mount - or, for JSON values
  such as ``CHAPERONE_CONNECTIONS``, every string inside it that is - is remapped into the temp
  root (:func:`remap`). Nothing else is changed: that is the contract's rule (docs/injection.md:
  "every path the sidecar reads comes from an environment variable or argument").
* **command**: the container's ``command``/``args`` (:func:`chaperone_argv` maps the image's
  ``chaperone`` entry point onto this interpreter).

What the kubelet adds to every container is added by the callers (``KUBERNETES_SERVICE_HOST``
and ``_PORT``), as is process plumbing (``PATH``, ``PYTHONPATH``).
"""

from __future__ import annotations

import base64
import json
import os
import re
import shlex
import subprocess
import sys
import time
from dataclasses import dataclass, field
from importlib.metadata import entry_points
from pathlib import Path
from typing import Any, Callable, Mapping

REPO_ROOT = Path(__file__).resolve().parent.parent

__all__ = ["REPO_ROOT", "NotReady", "Container", "materialize", "materialize_mounts", "container_env",
           "find_container", "local_path", "remap", "field_value", "downward_api_text",
           "chaperone_argv", "aws_argv", "run", "describe", "clean_env", "wait_for", "refusal_in",
           "wait_for_pod_plumbing", "pod_token_for", "materialize_pod", "sidecar_env", "health_ready"]


class NotReady(RuntimeError):
    """A volume source the pod needs does not exist (yet): the kubelet would wait."""


# An API reader: GET path -> (status, decoded JSON). ControlPlane.api fits.
ApiGet = Callable[[str], tuple[int, Any]]
# A token for the pod's service account: (audience or None, expirationSeconds) -> JWT.
TokenFor = Callable[[str | None, int], str]


# ============================================================================ pod fields

def field_value(pod: Mapping[str, Any], path: str) -> str:
    """A downward-API ``fieldPath`` of ``pod`` as the kubelet renders it."""
    meta, spec, status = pod.get("metadata") or {}, pod.get("spec") or {}, pod.get("status") or {}
    for prefix, mapping in (("metadata.labels", meta.get("labels")),
                            ("metadata.annotations", meta.get("annotations"))):
        if path == prefix:
            return downward_api_text(mapping or {})
        if path.startswith(prefix + "['") and path.endswith("']"):
            return (mapping or {}).get(path[len(prefix) + 2:-2], "")
    simple = {
        "metadata.name": meta.get("name"), "metadata.namespace": meta.get("namespace"),
        "metadata.uid": meta.get("uid"), "spec.serviceAccountName": spec.get("serviceAccountName"),
        "spec.nodeName": spec.get("nodeName"), "status.podIP": status.get("podIP"),
        "status.hostIP": status.get("hostIP"),
    }
    if path not in simple:
        raise NotImplementedError(f"downward API fieldPath {path!r} is not supported here")
    return simple[path] or ""


def downward_api_text(mapping: Mapping[str, str]) -> str:
    """The kubelet's labels/annotations file: ``key="value"`` lines, sorted, Go-quoted values."""
    return "\n".join(f"{key}={json.dumps(value, ensure_ascii=False)}"
                     for key, value in sorted(mapping.items()))


def _decoded(obj: Mapping[str, Any], kind: str) -> dict[str, bytes]:
    if kind == "Secret":
        return {k: base64.b64decode(v) for k, v in (obj.get("data") or {}).items()}
    out = {k: v.encode() for k, v in (obj.get("data") or {}).items()}
    out.update({k: base64.b64decode(v) for k, v in (obj.get("binaryData") or {}).items()})
    return out


def _read_keys(api_get: ApiGet, namespace: str, kind: str, name: str, optional: bool,
               what: str) -> dict[str, bytes] | None:
    plural = "secrets" if kind == "Secret" else "configmaps"
    status, obj = api_get(f"/api/v1/namespaces/{namespace}/{plural}/{name}")
    if status == 404:
        if optional:
            return None
        raise NotReady(f"{what}: {kind} {namespace}/{name} does not exist (not optional)")
    if status != 200:
        raise RuntimeError(f"{what}: reading {kind} {namespace}/{name}: HTTP {status}: {obj}")
    return _decoded(obj, kind)


def _project_keys(data: dict[str, bytes] | None, items: list | None, optional: bool,
                  what: str) -> dict[str, bytes]:
    """Secret/ConfigMap keys -> {relative path: bytes}, ``items`` honoured."""
    if data is None:
        return {}
    if not items:
        return dict(data)
    files = {}
    for item in items:
        if item["key"] not in data:
            if optional:
                continue
            raise NotReady(f"{what}: key {item['key']!r} is missing")
        files[item["path"]] = data[item["key"]]
    return files


# ============================================================================ volumes

def _volume_files(volume: Mapping[str, Any], pod: Mapping[str, Any], api_get: ApiGet,
                  token_for: TokenFor) -> dict[str, bytes] | None:
    """The files a volume holds ({relative path: content}); None for an emptyDir."""
    namespace = pod["metadata"]["namespace"]
    what = f"volume {volume['name']}"
    if "emptyDir" in volume:
        return None
    if "secret" in volume:
        src = volume["secret"]
        optional = bool(src.get("optional"))
        data = _read_keys(api_get, namespace, "Secret", src["secretName"], optional, what)
        return _project_keys(data, src.get("items"), optional, what)
    if "configMap" in volume:
        src = volume["configMap"]
        optional = bool(src.get("optional"))
        data = _read_keys(api_get, namespace, "ConfigMap", src["name"], optional, what)
        return _project_keys(data, src.get("items"), optional, what)
    if "downwardAPI" in volume:
        return {item["path"]: field_value(pod, item["fieldRef"]["fieldPath"]).encode()
                for item in volume["downwardAPI"].get("items") or []}
    if "projected" in volume:
        files: dict[str, bytes] = {}
        for source in volume["projected"].get("sources") or []:
            if "serviceAccountToken" in source:
                tok = source["serviceAccountToken"]
                files[tok["path"]] = token_for(tok.get("audience"),
                                               int(tok.get("expirationSeconds") or 3600)).encode()
            elif "configMap" in source or "secret" in source:
                kind = "ConfigMap" if "configMap" in source else "Secret"
                src = source["configMap" if kind == "ConfigMap" else "secret"]
                optional = bool(src.get("optional"))
                data = _read_keys(api_get, namespace, kind, src["name"], optional, what)
                files.update(_project_keys(data, src.get("items"), optional, what))
            elif "downwardAPI" in source:
                for item in source["downwardAPI"].get("items") or []:
                    files[item["path"]] = field_value(pod, item["fieldRef"]["fieldPath"]).encode()
            else:
                raise NotImplementedError(f"{what}: projected source {sorted(source)} not supported")
        return files
    raise NotImplementedError(f"{what}: volume type {sorted(set(volume) - {'name'})} not supported")


def local_path(root: Path, mount_path: str) -> Path:
    """Where a pod path lives under ``root`` (the mirror of the container's filesystem)."""
    return root / mount_path.lstrip("/")


def materialize_mounts(pod: Mapping[str, Any], container: Mapping[str, Any], root: Path,
                       api_get: ApiGet, token_for: TokenFor) -> dict[str, Path]:
    """Fill ``root`` with the container's volumes; returns {mountPath: local directory}."""
    volumes = {v["name"]: v for v in (pod.get("spec") or {}).get("volumes") or []}
    mounts: dict[str, Path] = {}
    for mount in container.get("volumeMounts") or []:
        if mount.get("subPath") or mount.get("subPathExpr"):
            raise NotImplementedError(f"subPath mount {mount['name']} is not supported here")
        volume = volumes.get(mount["name"])
        if volume is None:
            raise AssertionError(f"container {container['name']} mounts {mount['name']!r}, "
                                 "which the pod does not define")
        target = local_path(root, mount["mountPath"])
        target.mkdir(parents=True, exist_ok=True)
        for rel, content in (_volume_files(volume, pod, api_get, token_for) or {}).items():
            path = target / rel
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(content)
            path.chmod(0o400 if mount.get("readOnly") else 0o600)
        mounts[mount["mountPath"]] = target
    return mounts


# ============================================================================ environment

def remap(value: str, mounts: Mapping[str, Path]) -> str:
    """A pod path under one of ``mounts`` -> the local path (longest mount wins); else as is."""
    for mount in sorted(mounts, key=len, reverse=True):
        if value == mount or value.startswith(mount.rstrip("/") + "/"):
            return str(mounts[mount]) + value[len(mount):]
    return value


def _remap_json(value: Any, mounts: Mapping[str, Path]) -> Any:
    if isinstance(value, str):
        return remap(value, mounts)
    if isinstance(value, list):
        return [_remap_json(v, mounts) for v in value]
    if isinstance(value, dict):
        return {k: _remap_json(v, mounts) for k, v in value.items()}
    return value


def _remap_value(value: str, mounts: Mapping[str, Path]) -> str:
    stripped = value.strip()
    if stripped[:1] in ("[", "{"):
        try:
            parsed = json.loads(stripped)
        except ValueError:
            return remap(value, mounts)
        remapped = _remap_json(parsed, mounts)
        # Unchanged JSON keeps its exact original text (e.g. CHAPERONE_CREATOR).
        return value if remapped == parsed else json.dumps(remapped, sort_keys=True,
                                                           separators=(",", ":"))
    return remap(value, mounts)


def container_env(pod: Mapping[str, Any], container: Mapping[str, Any], api_get: ApiGet,
                  mounts: Mapping[str, Path]) -> dict[str, str]:
    """The container's ``env`` as the process sees it (valueFrom resolved, paths remapped).

    ``envFrom`` is not used by the injected containers and is refused here rather than ignored.
    """
    if container.get("envFrom"):
        raise NotImplementedError("envFrom is not supported here")
    namespace = pod["metadata"]["namespace"]
    env: dict[str, str] = {}
    for entry in container.get("env") or []:
        name = entry["name"]
        if "valueFrom" not in entry:
            value = entry.get("value", "")
        else:
            ref = entry["valueFrom"]
            if "fieldRef" in ref:
                value = field_value(pod, ref["fieldRef"]["fieldPath"])
            elif "secretKeyRef" in ref or "configMapKeyRef" in ref:
                kind = "Secret" if "secretKeyRef" in ref else "ConfigMap"
                src = ref["secretKeyRef" if kind == "Secret" else "configMapKeyRef"]
                data = _read_keys(api_get, namespace, kind, src["name"], bool(src.get("optional")),
                                  f"env {name}") or {}
                if src["key"] not in data:
                    if src.get("optional"):
                        continue
                    raise NotReady(f"env {name}: key {src['key']!r} of {kind} {src['name']} is missing")
                value = data[src["key"]].decode()
            else:
                raise NotImplementedError(f"env {name}: valueFrom {sorted(ref)} is not supported")
        env[name] = _remap_value(value, mounts)
    return env


# ============================================================================ a container

@dataclass
class Container:
    """One container of the pod, materialised: its mounts, env and command line."""

    name: str
    spec: dict[str, Any]
    root: Path
    mounts: dict[str, Path]
    env: dict[str, str]
    argv: list[str] = field(default_factory=list)  # command + args, as in the pod spec

    def path(self, pod_path: str) -> Path:
        """The local file behind a path inside the container."""
        return Path(remap(pod_path, self.mounts))


def find_container(pod: Mapping[str, Any], name: str) -> dict[str, Any]:
    spec = pod.get("spec") or {}
    for container in (spec.get("initContainers") or []) + (spec.get("containers") or []):
        if container["name"] == name:
            return container
    raise AssertionError(f"pod has no container {name!r}")


def materialize(pod: Mapping[str, Any], name: str, root: Path, api_get: ApiGet,
                token_for: TokenFor) -> Container:
    """Volumes, env and command line of container ``name`` of ``pod``, under ``root``."""
    spec = find_container(pod, name)
    root.mkdir(parents=True, exist_ok=True)
    mounts = materialize_mounts(pod, spec, root, api_get, token_for)
    env = container_env(pod, spec, api_get, mounts)
    return Container(name, spec, root, mounts, env,
                     list(spec.get("command") or []) + list(spec.get("args") or []))


# ============================================================================ commands

def _installed_commands() -> set[str]:
    return {e.name for e in entry_points(group="chaperone.commands")}


def chaperone_argv(*args: str) -> list[str]:
    """``chaperone ARGS`` on this interpreter.

    With the package installed (``make test``: ``pip install -e``) this is the product's CLI
    (``chaperone_sidecar.cli``, the console script's target, subcommands from entry points).
    From a bare source tree (no entry points) the subcommand's own module runs it.
    """
    if not args:
        raise ValueError("a subcommand is required")
    if args[0] in _installed_commands():
        return [sys.executable, "-m", "chaperone_sidecar.cli", *args]
    module = {"sidecar": "chaperone_sidecar.sidecar_cli",
              "sessions": "chaperone_sidecar.recording.sessions_cli",
              "operator": "chaperone_operator.cli"}.get(args[0])
    if module is None:
        raise RuntimeError(f"`chaperone {args[0]}` is not available: install the package")
    return [sys.executable, "-m", module, *args]


def aws_argv(*args: str) -> list[str]:
    """The AWS CLI v1 on this interpreter (``python -m awscli``), or a clear failure."""
    import importlib.util

    if importlib.util.find_spec("awscli") is None:
        raise RuntimeError("the AWS CLI (awscli, v1) is not installed in this Python: "
                           "pip install -c constraints.txt -e '.[test]'")
    return [sys.executable, "-m", "awscli", *args]


def run(argv: list[str], env: Mapping[str, str], timeout: float = 90,
        input: str | None = None) -> subprocess.CompletedProcess:
    """Run a command with exactly ``env``; the result carries the command for messages."""
    res = subprocess.run(argv, env=dict(env), capture_output=True, text=True, timeout=timeout,
                         input=input)
    res.shown = " ".join(shlex.quote(a) for a in argv)  # type: ignore[attr-defined]
    return res


def describe(res: subprocess.CompletedProcess) -> str:
    return (f"$ {getattr(res, 'shown', res.args)}\nexit {res.returncode}\n"
            f"--- stdout\n{res.stdout[-4000:]}\n--- stderr\n{res.stderr[-6000:]}")


def wait_for(probe: Callable[[], Any], timeout: float, what: str, interval: float = 0.2,
             detail: Callable[[], str] | None = None) -> Any:
    """Poll ``probe`` until truthy; AssertionError naming ``what`` otherwise."""
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        last = probe()
        if last:
            return last
        time.sleep(interval)
    extra = f"\n{detail()}" if detail else ""
    raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what} (last: {last!r}){extra}")


_BYTES_LITERAL = re.compile(r"b'(?:[^'\\\n]|\\.)*'" + r'|b"(?:[^"\\\n]|\\.)*"')


def refusal_in(text: str) -> dict[str, Any] | None:
    """The first Chaperone refusal JSON object (``{"error": "chaperone_..."}``) in ``text``.

    Clients show the body in different ways: kubectl inside its error message, the AWS CLI's
    ``--debug`` log as a Python bytes literal (``b'{\\n  "error": ...'``), which is decoded
    first. Every ``{"error":`` position is tried; the first that parses as a refusal wins.
    """
    import ast

    candidates = [text]
    for literal in _BYTES_LITERAL.findall(text):
        try:
            candidates.append(ast.literal_eval(literal).decode("utf-8", errors="replace"))
        except (ValueError, SyntaxError):
            continue
    decoder = json.JSONDecoder()
    for blob in candidates:
        for match in re.finditer(r'\{\s*"error"\s*:', blob):
            try:
                obj, _ = decoder.raw_decode(blob, match.start())
            except ValueError:
                continue
            if isinstance(obj, dict) and str(obj.get("error", "")).startswith("chaperone_"):
                return obj
    return None


def clean_env(extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """A minimal process environment (PATH, locale) plus ``extra``; nothing inherited that
    could change a client's behaviour (proxies, AWS profiles, KUBECONFIG...)."""
    env = {k: os.environ[k] for k in ("PATH", "LANG", "LC_ALL", "TZ") if k in os.environ}
    env.update(extra or {})
    return env


# ============================================================================ an injected pod

def wait_for_pod_plumbing(cp: Any, ns: str, agent_sa: str, detail: Callable[[], str] | None = None) -> None:
    """Wait until the operator has followed an injected pod into ``ns``: the interception CA
    Secret, the trust-bundle ConfigMap and the sidecar RoleBinding naming the pod's service
    account (what the kubelet would wait for before starting the containers)."""
    def plumbing() -> bool:
        ok = all(cp.api("GET", path)[0] == 200 for path in (
            f"/api/v1/namespaces/{ns}/secrets/chaperone-ca", f"/api/v1/namespaces/{ns}/configmaps/chaperone-ca-bundle"))
        status, rb = cp.api("GET", f"/apis/rbac.authorization.k8s.io/v1/namespaces/{ns}/rolebindings/chaperone-sidecar")
        return ok and status == 200 and any(s.get("name") == agent_sa for s in rb.get("subjects") or [])
    wait_for(plumbing, 60, "the operator's CA, trust bundle and sidecar RoleBinding", detail=detail)


def pod_token_for(cp: Any, pod: Mapping[str, Any]) -> TokenFor:
    """What the kubelet projects: a TokenRequest token of the pod's service account, bound to
    the pod, for an audience (None: the apiserver's) and a lifetime in seconds."""
    meta, sa = pod["metadata"], pod["spec"]["serviceAccountName"]

    def token(audience: str | None, seconds: int) -> str:
        args = ["create", "token", sa, "-n", meta["namespace"], "--bound-object-kind", "Pod",
                "--bound-object-name", meta["name"], "--bound-object-uid", meta["uid"], "--duration", f"{seconds}s"]
        return cp.kubectl(*(args + (["--audience", audience] if audience else []))).stdout.strip()
    return token


def materialize_pod(cp: Any, pod: Mapping[str, Any], root: Path, sidecar: str, agent: str) -> tuple[Container, Container]:
    """The injected pod's sidecar and agent containers, materialised under ``root``."""
    def api_get(path: str) -> tuple[int, Any]:
        return cp.api("GET", path)
    token = pod_token_for(cp, pod)
    return (materialize(pod, sidecar, root / "sidecar", api_get, token),
            materialize(pod, agent, root / agent, api_get, token))


def sidecar_env(cp: Any, sidecar: Container) -> dict[str, str]:
    """The sidecar container's environment as the kubelet starts it on the test bed: its own env,
    the apiserver's address (set in every container) and the image's code (the sidecar package
    only: it never imports the operator)."""
    host, port = cp.url.removeprefix("https://").rsplit(":", 1)
    return clean_env({**sidecar.env, "KUBERNETES_SERVICE_HOST": host, "KUBERNETES_SERVICE_PORT": port,
                      "PYTHONPATH": str(REPO_ROOT / "sidecar")})


def health_ready(port: int) -> bool:
    """True once a sidecar's health endpoint on ``port`` answers ``/ready`` with 200."""
    import urllib.request

    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/ready", timeout=1) as resp:
            return resp.status == 200
    except OSError:
        return False
