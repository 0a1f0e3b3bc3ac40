"""The ClaudeConnections and AccessPolicies that apply to this pod, kept as one atomic Snapshot.

Every flow reads ``sources.current`` once and uses that :class:`Snapshot` throughout: connections,
host routes and compiled policies always belong to the same generation, and a change is one
reference swap (no locks on the hot path; the event loop is single-threaded anyway).

Where the objects come from:

* :class:`KubeSources` (the injected sidecar): the connections named in
  ``CHAPERONE_CONNECTIONS`` (fixed at admission: their credentials are mounted) as they are now
  in the Kubernetes API with the sidecar's own
  ServiceAccount token (re-read from the projected file on every request, as it rotates), over
  aiohttp. Per kind: **list** (paginated), then **watch** from the list's ``resourceVersion``
  with bookmarks; a watch that ends or drops is resumed from the last seen resourceVersion, a
  ``410 Gone`` (too old) re-lists. Connections are filtered by ``spec.podSelector`` against the
  pod's labels, read from the downward-API file ``<podinfo>/labels`` (re-read when it changes:
  labels are mutable); policies are all AccessPolicies of the namespace (their own
  ``connections``/``subjects`` decide applicability at evaluation).
* :class:`FileSources` (standalone ``chaperone proxy``): YAML files with the same schema as the
  CRDs, in ``<config>/connections/``, ``<config>/policies/`` and ``<config>/*.yaml``, reloaded when
  any of them changes (polled; no inotify dependency).

**Invalid policies fail closed.** A policy that does not compile is left out and reported
(``Snapshot.policy_errors``, logged once per change), and in its place the snapshot carries a
synthetic policy with the same name and a single block rule ``invalid-policy`` on the
connections the broken policy names (all connections when even that part is unusable). So the
traffic the broken policy would have governed is refused with a 403 whose message names the
policy and its errors (``AccessPolicy team-a/p is invalid ...: spec.rules[0].match.pathRegex:
...``) - never silently allowed because a stricter rule vanished. A policy file that is not
even YAML does the same for all connections. Other problems (a connection host that is not a
valid glob, two connections claiming one host) are listed in ``Snapshot.problems``.
"""

from __future__ import annotations

import ast
import asyncio
import json
import logging
import ssl
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, AsyncIterator, Callable, Iterable, Mapping

from .config import ConnectionMount, SidecarConfig, standalone_layout
from .policy.compiler import PolicyErrors, compile_policy
from .policy.globs import glob_error
from .policy.matching import CompiledPolicySet
from .routing import Connection, RouteTable, effective_hosts
from .selectors import selector_matches

__all__ = ["Snapshot", "Sources", "KubeSources", "FileSources", "KubeClient", "KubeError",
           "build_snapshot", "read_labels", "parse_downward_api", "selector_matches",
           "INVALID_POLICY_RULE", "GROUP", "VERSION"]

log = logging.getLogger("chaperone.sources")

GROUP = "chaperone.dev"
VERSION = "v1alpha1"
INVALID_POLICY_RULE = "invalid-policy"
_MAX_MESSAGE = 1024
_MAX_LINE = 32 * 1024 * 1024  # one watch event; CRD objects are far smaller


# ============================================================================ snapshot

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
    return compile_policy({"apiVersion": f"{GROUP}/{VERSION}", "kind": "AccessPolicy",
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
            name = meta.get("name") if isinstance(meta.get("name"), str) and meta.get("name") else f"unnamed-{i}"
            spec = obj.get("spec") if isinstance(obj, dict) and isinstance(obj.get("spec"), dict) else {}
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


# ============================================================================ sources

Listener = Callable[[Snapshot], Any]


class Sources:
    """Holds the current Snapshot; subclasses feed it. Use from the event loop only."""

    def __init__(self, namespace: str):
        self.namespace = namespace
        self._snapshot = empty_snapshot()
        self._listeners: list[Listener] = []
        self._ready = asyncio.Event()
        self._generation = 0
        self._reported: tuple = ()
        self._tasks: list[asyncio.Task] = []

    @property
    def current(self) -> Snapshot:
        return self._snapshot

    def __call__(self) -> Snapshot:
        return self._snapshot

    @property
    def ready(self) -> bool:
        return self._ready.is_set()

    def subscribe(self, listener: Listener) -> None:
        """Call ``listener(snapshot)`` after every swap (on the event loop)."""
        self._listeners.append(listener)

    async def wait_ready(self, timeout: float | None = None) -> bool:
        try:
            await asyncio.wait_for(self._ready.wait(), timeout)
        except asyncio.TimeoutError:
            return False
        return True

    async def start(self) -> None:
        raise NotImplementedError

    async def aclose(self) -> None:
        tasks, self._tasks = self._tasks, []
        for task in tasks:
            task.cancel()
        for task in tasks:
            try:
                await task
            except (asyncio.CancelledError, Exception):
                pass

    def publish(self, snapshot_args: dict[str, Any]) -> Snapshot:
        """Build the next generation from ``build_snapshot`` arguments and swap it in."""
        self._generation += 1
        snap = build_snapshot(generation=self._generation, namespace=self.namespace, **snapshot_args)
        self._snapshot = snap
        self._report(snap)
        self._ready.set()
        for listener in list(self._listeners):
            try:
                listener(snap)
            except Exception:
                log.exception("snapshot listener failed")
        return snap

    def _report(self, snap: Snapshot) -> None:
        summary = (tuple(sorted(snap.connections)), tuple(sorted(snap.policy_errors.items())), snap.problems)
        log.info("configuration generation %d: %d connections, %d policies", snap.generation,
                 len(snap.connections), len(snap.policies),
                 extra={"fields": {"generation": snap.generation, "connections": sorted(snap.connections)}})
        if summary == self._reported:
            return
        self._reported = summary
        for key, errs in sorted(snap.policy_errors.items()):
            log.error("AccessPolicy %s is invalid; its traffic is blocked: %s", key, "; ".join(errs),
                      extra={"fields": {"policy": key, "errors": list(errs)}})
        for problem in snap.problems:
            log.warning("%s", problem)


# ---------------------------------------------------------------------------- Kubernetes API

class KubeError(Exception):
    def __init__(self, status: int, message: str, body: Any = None):
        super().__init__(f"HTTP {status}: {message}")
        self.status = status
        self.body = body


class _Gone(Exception):
    """The watch's resourceVersion is too old (410): re-list."""


class KubeClient:
    """A minimal async Kubernetes API client on aiohttp, authenticated with a token file."""

    def __init__(self, server: str, token_file: Path | None, ca_file: Path | None, *,
                 request_timeout: float = 30.0):
        self.server = server.rstrip("/")
        self.token_file = token_file
        self.ca_file = ca_file
        self.request_timeout = request_timeout
        self._session: Any = None

    def _headers(self) -> dict[str, str]:
        headers = {"Accept": "application/json", "User-Agent": "chaperone-sidecar"}
        if self.token_file is not None:
            try:
                token = self.token_file.read_text().strip()
            except OSError as exc:
                raise KubeError(0, f"cannot read the service-account token {self.token_file}: {exc}") from None
            headers["Authorization"] = f"Bearer {token}"
        return headers

    def _get_session(self) -> Any:
        import aiohttp

        if self._session is None:
            context = ssl.create_default_context(cafile=str(self.ca_file) if self.ca_file else None)
            self._session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=context))
        return self._session

    async def request(self, method: str, path: str, *, params: Mapping[str, str] | None = None,
                      body: Any = None, content_type: str = "application/json") -> Any:
        """One request; returns the decoded JSON body, raises KubeError for non-2xx."""
        import aiohttp

        headers = self._headers()
        data = None
        if body is not None:
            headers["Content-Type"] = content_type
            data = json.dumps(body).encode()
        async with self._get_session().request(
                method, self.server + path, params=params, data=data, headers=headers,
                timeout=aiohttp.ClientTimeout(total=self.request_timeout)) as resp:
            raw = await resp.read()
        try:
            decoded = json.loads(raw) if raw else None
        except ValueError:
            decoded = raw.decode(errors="replace")
        if resp.status >= 300:
            message = decoded.get("message") if isinstance(decoded, dict) else str(decoded)[:300]
            raise KubeError(resp.status, message or resp.reason or "", decoded)
        return decoded

    async def watch(self, path: str, params: Mapping[str, str], *,
                    read_timeout: float) -> AsyncIterator[dict[str, Any]]:
        """Watch events as dicts ({"type", "object"}); ends when the server closes the watch."""
        import aiohttp

        async with self._get_session().get(
                self.server + path, params={**params, "watch": "1"}, headers=self._headers(),
                timeout=aiohttp.ClientTimeout(total=None, sock_connect=self.request_timeout,
                                              sock_read=read_timeout)) as resp:
            if resp.status == 410:
                raise _Gone()
            if resp.status >= 300:
                raw = await resp.read()
                raise KubeError(resp.status, raw.decode(errors="replace")[:300])
            buffer = bytearray()
            async for chunk in resp.content.iter_any():
                buffer += chunk
                while (end := buffer.find(b"\n")) >= 0:
                    line = bytes(buffer[:end]).strip()
                    del buffer[:end + 1]
                    if line:
                        yield json.loads(line)
                if len(buffer) > _MAX_LINE:
                    raise KubeError(0, "watch event larger than 32 MiB")
            if buffer.strip():
                yield json.loads(bytes(buffer))

    async def aclose(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None


class _Reflector:
    """list + watch of one resource collection into ``items`` (name -> object)."""

    def __init__(self, client: KubeClient, path: str, on_change: Callable[[], None], what: str, *,
                 watch_timeout: int = 290, backoff_max: float = 30.0):
        self.client = client
        self.path = path
        self.on_change = on_change
        self.what = what
        self.items: dict[str, dict[str, Any]] = {}
        self.synced = asyncio.Event()
        self.resource_version: str | None = None
        self.watch_timeout = watch_timeout
        self.backoff_max = backoff_max
        self.lists = 0  # how many times we listed (tests: 410 Gone re-lists)
        self.last_error = ""

    async def run(self) -> None:
        backoff = 0.2
        while True:
            try:
                if self.resource_version is None:
                    await self._list()
                await self._watch()
                backoff = 0.2
            except _Gone:
                log.info("watch of %s expired (410 Gone); listing again", self.what)
                self.resource_version = None
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                self.last_error = f"{type(exc).__name__}: {exc}"
                log.warning("list/watch of %s failed (%s); retrying in %.1fs", self.what,
                            self.last_error, backoff)
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, self.backoff_max)

    async def _list(self) -> None:
        items: dict[str, dict[str, Any]] = {}
        params: dict[str, str] = {"limit": "500"}
        while True:
            page = await self.client.request("GET", self.path, params=params)
            for obj in page.get("items") or []:
                name = (obj.get("metadata") or {}).get("name")
                if name:
                    items[name] = obj
            meta = page.get("metadata") or {}
            if not meta.get("continue"):
                break
            params = {"limit": "500", "continue": meta["continue"]}
        self.items = items
        self.resource_version = str(meta.get("resourceVersion") or "")
        self.lists += 1
        self.synced.set()
        self.on_change()

    async def _watch(self) -> None:
        params = {"resourceVersion": self.resource_version or "", "allowWatchBookmarks": "true",
                  "timeoutSeconds": str(self.watch_timeout)}
        async for event in self.client.watch(self.path, params, read_timeout=self.watch_timeout + 30):
            kind, obj = event.get("type"), event.get("object") or {}
            if kind == "ERROR":
                if obj.get("code") == 410:
                    raise _Gone()
                raise KubeError(int(obj.get("code") or 0), str(obj.get("message") or obj))
            meta = obj.get("metadata") or {}
            if meta.get("resourceVersion"):
                self.resource_version = str(meta["resourceVersion"])
            if kind == "BOOKMARK":
                continue
            name = meta.get("name")
            if not name:
                continue
            if kind in ("ADDED", "MODIFIED"):
                self.items[name] = obj
            elif kind == "DELETED":
                self.items.pop(name, None)
            else:
                continue
            self.on_change()


class KubeSources(Sources):
    """Connections and policies of the pod's namespace from the API, followed by watch."""

    def __init__(self, config: SidecarConfig, client: KubeClient | None = None, *,
                 debounce: float = 0.05, labels_interval: float = 5.0, watch_timeout: int = 290):
        super().__init__(config.pod_namespace)
        self.config = config
        self.client = client or KubeClient(config.api_server, config.token_file, config.api_ca_file)
        base = f"/apis/{GROUP}/{VERSION}/namespaces/{config.pod_namespace}"
        self.connections = _Reflector(self.client, f"{base}/claudeconnections", self._changed,
                                      "claudeconnections", watch_timeout=watch_timeout)
        self.policies = _Reflector(self.client, f"{base}/accesspolicies", self._changed,
                                   "accesspolicies", watch_timeout=watch_timeout)
        self.debounce = debounce
        self.labels_interval = labels_interval
        self._dirty = asyncio.Event()
        self._labels = read_labels(config.podinfo_dir)

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        self._tasks = [loop.create_task(self.connections.run(), name="chaperone-watch-connections"),
                       loop.create_task(self.policies.run(), name="chaperone-watch-policies"),
                       loop.create_task(self._rebuild_loop(), name="chaperone-snapshot"),
                       loop.create_task(self._labels_loop(), name="chaperone-labels")]

    async def aclose(self) -> None:
        await super().aclose()
        await self.client.aclose()

    def _changed(self) -> None:
        self._dirty.set()

    async def _rebuild_loop(self) -> None:
        while True:
            await self._dirty.wait()
            await asyncio.sleep(self.debounce)  # coalesce a burst of events into one rebuild
            self._dirty.clear()
            if not (self.connections.synced.is_set() and self.policies.synced.is_set()):
                continue  # the first snapshot needs both lists
            self.publish({"connection_objs": list(self.connections.items.values()),
                          "policy_objs": list(self.policies.items.values()),
                          "labels": self._labels, "mounts": self.config.connection_mounts,
                          "only_mounted": True})

    async def _labels_loop(self) -> None:
        while True:
            await asyncio.sleep(self.labels_interval)
            labels = read_labels(self.config.podinfo_dir)
            if labels != self._labels:
                log.info("pod labels changed; re-selecting connections")
                self._labels = labels
                self._dirty.set()


# ---------------------------------------------------------------------------- local files

class FileSources(Sources):
    """Standalone mode: connections and policies from YAML files, reloaded on change."""

    def __init__(self, config: SidecarConfig, *, interval: float = 1.0):
        super().__init__(config.pod_namespace)
        if config.config_dir is None:
            raise ValueError("FileSources needs a standalone config (config_dir)")
        self.config = config
        self.layout = standalone_layout(config.config_dir)
        self.interval = interval
        self._signature: tuple = ()
        self.reverse_ports: dict[str, int] = {}  # stable across reloads

    def files(self) -> list[Path]:
        out: list[Path] = []
        for directory in (self.layout["root"], self.layout["connections"], self.layout["policies"]):
            if directory.is_dir():
                out += sorted(p for p in directory.iterdir()
                              if p.suffix in (".yaml", ".yml") and p.is_file() and p != self.layout["settings"])
        return out

    def _current_signature(self) -> tuple:
        sig = []
        for path in self.files():
            try:
                st = path.stat()
                sig.append((str(path), st.st_mtime_ns, st.st_size))
            except OSError:
                continue
        for key in ("credentials", "upstream_ca"):
            d = self.layout[key]
            sig.append((key, tuple(sorted(p.name for p in d.iterdir())) if d.is_dir() else ()))
        return tuple(sig)

    def load(self) -> Snapshot:
        import yaml

        conns: list[dict[str, Any]] = []
        policies: list[Any] = []
        load_errors: dict[str, str] = {}
        for path in self.files():
            rel = str(path.relative_to(self.layout["root"]))
            try:
                docs = [d for d in yaml.safe_load_all(path.read_text()) if d is not None]
            except (OSError, yaml.YAMLError) as exc:
                if path.parent != self.layout["connections"]:
                    load_errors[rel] = f"cannot read: {exc}"
                else:
                    log.error("cannot read %s: %s", rel, exc)
                continue
            for doc in _expand_lists(docs):
                kind = doc.get("kind") if isinstance(doc, dict) else None
                if kind == "ClaudeConnection":
                    conns.append(doc)
                elif kind == "AccessPolicy" or path.parent == self.layout["policies"]:
                    policies.append(doc)  # the compiler reports a wrong kind as an error
                else:
                    log.warning("%s: ignoring a document of kind %r", rel, kind)
        return self.publish({"connection_objs": conns, "policy_objs": policies,
                             "local_dirs": (self.layout["credentials"], self.layout["upstream_ca"]),
                             "mounts": self._reverse_mounts(conns), "load_errors": load_errors})

    def _reverse_mounts(self, conns: list[dict[str, Any]]) -> list[ConnectionMount]:
        """Reverse ports for connections with a baseURL: from ``reverse_port_base`` in name order,
        like the webhook, but a connection keeps its port across reloads (a running agent's base
        URL must not start pointing at another connection)."""
        wanted = sorted({(c.get("metadata") or {}).get("name") for c in conns
                         if isinstance(c, dict) and (c.get("spec") or {}).get("baseURL")} - {None})
        self.reverse_ports = {n: p for n, p in self.reverse_ports.items() if n in wanted}
        port = self.config.reverse_port_base
        for name in wanted:
            if name in self.reverse_ports:
                continue
            while port in self.reverse_ports.values():
                port += 1
            self.reverse_ports[name] = port
            log.info("connection %s: reverse-mode base URL http://127.0.0.1:%d", name, port)
        return [ConnectionMount(name, "", reverse_port=p) for name, p in sorted(self.reverse_ports.items())]

    async def start(self) -> None:
        self._signature = self._current_signature()
        self.load()
        self._tasks = [asyncio.get_running_loop().create_task(self._poll(), name="chaperone-files")]

    async def _poll(self) -> None:
        while True:
            await asyncio.sleep(self.interval)
            sig = self._current_signature()
            if sig != self._signature:
                self._signature = sig
                log.info("configuration files changed; reloading")
                self.load()


def _expand_lists(docs: list[Any]) -> list[Any]:
    out: list[Any] = []
    for doc in docs:
        if isinstance(doc, dict) and str(doc.get("kind", "")).endswith("List") and isinstance(doc.get("items"), list):
            out += doc["items"]
        else:
            out.append(doc)
    return out

