"""The Snapshot model: one consistent view of the connections and policies that apply to a pod.

A :class:`Snapshot` is built from raw ClaudeConnection and AccessPolicy objects by the pure
:func:`build_snapshot`, whichever source they came from (the Kubernetes API or local YAML files,
see :mod:`.sources`). Keeping the model apart from the feeders means the whole selection and
compilation logic is testable without an apiserver, and both feeders share it exactly.

**Invalid policies fail closed.** A policy that does not compile is left out and reported
(``Snapshot.policy_errors``, logged once per change), and in its place the snapshot carries a
synthetic policy with the same name and a single block rule ``invalid-policy`` on the
connections the broken policy names (all connections when even that part is unusable). So the
traffic the broken policy would have governed is refused with a 403 whose message names the
policy and its errors (``AccessPolicy team-a/p is invalid ...: spec.rules[0].match.pathRegex:
...``) - never silently allowed because a stricter rule vanished. A policy file that is not
even YAML does the same for all connections. Other problems (a connection host that is not a
valid glob, two connections claiming one host) are listed in ``Snapshot.problems``.

Pod labels (which connections a ``spec.podSelector`` selects) come from the downward-API file
``<podinfo>/labels``: :func:`read_labels` / :func:`parse_downward_api`.
"""

from __future__ import annotations

import ast
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .api import API_VERSION, KIND_ACCESS_POLICY
from .config import ConnectionMount
from .policy.compiler import PolicyErrors, compile_policy
from .policy.globs import glob_error
from .policy.matching import CompiledPolicySet
from .routing import Connection, RouteTable, effective_hosts
from .selectors import selector_matches

__all__ = ["Snapshot", "empty_snapshot", "build_snapshot", "read_labels", "parse_downward_api",
           "INVALID_POLICY_RULE"]

INVALID_POLICY_RULE = "invalid-policy"
_MAX_MESSAGE = 1024


@dataclass(frozen=True)
class Snapshot:
    """One consistent view: connections, their host routes and the compiled policies."""

    connections: Mapping[str, Connection]
    routes: RouteTable
    policies: CompiledPolicySet
    generation: int = 0
    policy_errors: Mapping[str, tuple[str, ...]] = field(default_factory=dict)  # key -> errors
    problems: tuple[str, ...] = ()
    labels: Mapping[str, str] = field(default_factory=dict)

    def connection(self, name: str) -> Connection | None:
        return self.connections.get(name)


def empty_snapshot() -> Snapshot:
    return Snapshot({}, RouteTable(()), CompiledPolicySet(()), 0)


def parse_downward_api(text: str) -> dict[str, str]:
    """A downward-API labels/annotations file: one ``key="value"`` per line, Go-quoted values."""
    out: dict[str, str] = {}
    for line in text.splitlines():
        key, sep, raw = line.partition("=")
        if not sep or not key.strip():
            continue
        raw = raw.strip()
        value = raw
        if len(raw) >= 2 and raw[0] == raw[-1] == '"':
            try:
                parsed = ast.literal_eval(raw)  # Go's %q escapes are a subset of Python's
            except (ValueError, SyntaxError):
                parsed = raw[1:-1]
            value = parsed if isinstance(parsed, str) else raw[1:-1]
        out[key.strip()] = value
    return out


def read_labels(podinfo_dir: Path | None) -> dict[str, str]:
    if podinfo_dir is None:
        return {}
    try:
        return parse_downward_api((podinfo_dir / "labels").read_text())
    except OSError:
        return {}


def _connection(obj: Mapping[str, Any], namespace: str, mount: ConnectionMount | None,
                local: tuple[Path, Path] | None, reverse_port: int | None) -> Connection:
    meta, spec = obj.get("metadata") or {}, obj.get("spec") or {}
    name = meta["name"]
    credentials_dir = mount.credentials_dir if mount else None
    upstream_ca = mount.upstream_ca_file if mount else None
    if local is not None:
        cred_root, ca_root = local
        if (cred_root / name).is_dir():
            credentials_dir = str(cred_root / name)
        if (ca_root / name / "ca.crt").is_file():
            upstream_ca = str(ca_root / name / "ca.crt")
    return Connection(
        name=name, type=str(spec.get("type") or ""), namespace=meta.get("namespace") or namespace,
        hosts=effective_hosts(spec), spec=spec, base_url=spec.get("baseURL") or None,
        reverse_port=reverse_port, credentials_dir=credentials_dir,
        web_identity_token_file=mount.web_identity_token_file if mount else None,
        upstream_ca_file=upstream_ca, resource_version=str(meta.get("resourceVersion") or ""))


def _blocking_stand_in(name: str, namespace: str, connections: Any, errors: Iterable[str]) -> Any:
    """The synthetic policy that replaces an invalid one: block everything it could govern."""
    text = "; ".join(errors) or "unknown error"
    message = (f"AccessPolicy {namespace}/{name} is invalid, so the traffic it governs is blocked "
               f"until it is fixed: {text}")
    if len(message) > _MAX_MESSAGE:
        message = message[:_MAX_MESSAGE - 3] + "..."
    spec: dict[str, Any] = {"rules": [{"name": INVALID_POLICY_RULE, "block": {"message": message}}]}
    if isinstance(connections, list) and connections and len(connections) <= 64 and all(
            isinstance(c, str) and c and len(c) <= 253 and glob_error(c, "name") is None
            for c in connections):
        spec["connections"] = list(connections)
    return compile_policy({"apiVersion": API_VERSION, "kind": KIND_ACCESS_POLICY,
                           "metadata": {"name": name, "namespace": namespace}, "spec": spec},
                          namespace)


def build_snapshot(connection_objs: Iterable[Mapping[str, Any]], policy_objs: Iterable[Any], *,
                   namespace: str, labels: Mapping[str, str] | None = None,
                   mounts: Iterable[ConnectionMount] = (), generation: int = 0,
                   local_dirs: tuple[Path, Path] | None = None,
                   load_errors: Mapping[str, str] | None = None,
                   only_mounted: bool = False) -> Snapshot:
    """A Snapshot from raw objects (pure; the sources call this on every change).

    ``mounts``: CHAPERONE_CONNECTIONS (injected mode: credential paths and reverse ports).
    ``only_mounted``: use only connections named in ``mounts`` (injected mode: the set is fixed
    at admission, docs/injection.md 2.3; a connection created later needs a pod restart).
    ``local_dirs``: (credentials root, upstream-ca root) in standalone mode.
    ``load_errors``: policy files that could not be read (name -> error): each blocks everything.
    """
    labels = dict(labels or {})
    mount_by_name = {m.name: m for m in mounts}
    problems: list[str] = []

    selected: dict[str, Mapping[str, Any]] = {}
    for obj in connection_objs:
        meta = obj.get("metadata") or {}
        name = meta.get("name")
        if not isinstance(name, str) or not name or meta.get("deletionTimestamp") or name in selected:
            continue
        if (meta.get("namespace") or namespace) != namespace:
            continue
        if only_mounted and name not in mount_by_name:
            continue
        spec = obj.get("spec") or {}
        if not isinstance(spec, dict) or not spec.get("type"):
            problems.append(f"ClaudeConnection {name}: spec.type is missing; connection ignored")
            continue
        if selector_matches(spec.get("podSelector"), labels):
            selected[name] = obj
    connections: dict[str, Connection] = {}
    for name in sorted(selected):
        obj, mount = selected[name], mount_by_name.get(name)
        port = mount.reverse_port if mount else None
        connections[name] = _connection(obj, namespace, mount, local_dirs, port)
    routes = RouteTable(connections.values())
    problems += routes.problems + routes.overlaps

    compiled, errors, keys = [], {}, set()
    broken: list[tuple[str, Any, list[str]]] = []
    for i, obj in enumerate(policy_objs):
        meta = obj.get("metadata") if isinstance(obj, dict) else None
        meta = meta if isinstance(meta, dict) else {}
        if meta.get("deletionTimestamp"):
            continue
        ns = meta.get("namespace") if isinstance(meta.get("namespace"), str) else namespace
        if ns != namespace:
            continue
        try:
            policy = compile_policy(obj, namespace)
        except PolicyErrors as exc:
            raw_name = meta.get("name")
            name = raw_name if isinstance(raw_name, str) and raw_name else f"unnamed-{i}"
            raw_spec = obj.get("spec") if isinstance(obj, dict) else None
            spec = raw_spec if isinstance(raw_spec, dict) else {}
            broken.append((name, spec.get("connections"), [str(e) for e in exc.errors]))
            continue
        if policy.key in keys:
            broken.append((policy.key.split("/", 1)[1], None, [f"duplicate AccessPolicy {policy.key}"]))
            continue
        keys.add(policy.key)
        compiled.append(policy)
    for source, error in sorted((load_errors or {}).items()):
        broken.append((f"file-{_dns_label(source)}", None, [f"{source}: {error}"]))
    for name, conns, errs in broken:
        key = f"{namespace}/{name}"
        while key in keys:  # a duplicate or file name clash: keep every stand-in
            name += "-x"
            key = f"{namespace}/{name}"
        keys.add(key)
        errors[key] = tuple(errs)
        compiled.append(_blocking_stand_in(name, namespace, conns, errs))
    return Snapshot(connections=connections, routes=routes, policies=CompiledPolicySet(compiled),
                    generation=generation, policy_errors=errors, problems=tuple(problems),
                    labels=labels)


def _dns_label(text: str) -> str:
    out = "".join(ch if ch.isalnum() else "-" for ch in text.lower()).strip("-")
    return (out or "x")[:50].strip("-") or "x"
