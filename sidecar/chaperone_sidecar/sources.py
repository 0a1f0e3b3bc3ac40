"""The ClaudeConnections and AccessPolicies that apply to this pod, kept as one atomic Snapshot.

Every flow reads ``sources.current`` once and uses that :class:`Snapshot` throughout: connections,
host routes and compiled policies always belong to the same generation, and a change is one
reference swap (no locks on the hot path; the event loop is single-threaded anyway).

Where the objects come from:

* :class:`KubeSources` (the injected sidecar): the connections named in
  ``CHAPERONE_CONNECTIONS`` (fixed at admission: their credentials are mounted) as they are now
  in the Kubernetes API, followed by list+watch (:class:`Reflector` over
  :class:`~.kubeclient.ListWatch`). Connections are filtered
  by ``spec.podSelector`` against the pod's labels, read from the downward-API file
  ``<podinfo>/labels`` (re-read when it changes: labels are mutable); policies are all
  AccessPolicies of the namespace (their own ``connections``/``subjects`` decide applicability
  at evaluation).
* :class:`FileSources` (standalone ``chaperone proxy``): YAML files with the same schema as the
  CRDs, in ``<config>/connections/``, ``<config>/policies/`` and ``<config>/*.yaml``, reloaded when
  any of them changes (polled; no inotify dependency).

This module holds the feeders; the model and its pure builder (including how invalid policies
fail closed) are in :mod:`.snapshot`, the API client and its list+watch loop in
:mod:`.kubeclient`, the API's names in :mod:`.api`. The snapshot names are re-exported here,
where most callers have always imported them from.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .api import ACCESS_POLICIES, CLAUDE_CONNECTIONS, collection_path
from .config import ConnectionMount, SidecarConfig, standalone_layout
from .kubeclient import KubeClient, KubeError, ListWatch, WatchEvent
from .snapshot import Snapshot, build_snapshot, empty_snapshot, read_labels

__all__ = ["Sources", "KubeSources", "FileSources", "Reflector"]

log = logging.getLogger("chaperone.sources")

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
        except TimeoutError:
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

class Reflector:
    """One collection kept in memory (``items``: name -> object) from a :class:`ListWatch`.

    A permanent failure (403 without RBAC, 404 before the CRD exists) is logged and retried
    with exponential backoff: RBAC or the CRD may arrive later, and the sidecar keeps serving
    its last snapshot meanwhile.
    """

    def __init__(self, client: KubeClient, path: str, on_change: Callable[[], None], what: str, *,
                 watch_timeout: int = 290, backoff_max: float = 30.0):
        self.stream = ListWatch(client, path, watch_timeout=watch_timeout, backoff_max=backoff_max,
                                what=what)
        self.on_change = on_change
        self.what = what
        self.backoff_max = backoff_max
        self.items: dict[str, dict[str, Any]] = {}
        self.synced = asyncio.Event()

    @property
    def lists(self) -> int:
        """How many times the collection was listed (a 410 Gone re-lists)."""
        return self.stream.lists

    @property
    def last_error(self) -> str:
        return self.stream.last_error

    async def run(self) -> None:
        backoff = 0.2
        while True:
            try:
                async for event in self.stream:
                    backoff = 0.2
                    self._apply(event)
            except KubeError as exc:
                log.warning("list/watch of %s failed (%s); retrying in %.1fs", self.what, exc, backoff)
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, self.backoff_max)

    def _apply(self, event: WatchEvent) -> None:
        if event.type == "LISTED":
            self.items = {name: obj for obj in event.items
                          if (name := (obj.get("metadata") or {}).get("name"))}
            self.synced.set()
        else:
            name = (event.object.get("metadata") or {}).get("name")
            if not name:
                return
            if event.type == "DELETED":
                self.items.pop(name, None)
            else:
                self.items[name] = event.object
        self.on_change()


class KubeSources(Sources):
    """Connections and policies of the pod's namespace from the API, followed by watch."""

    def __init__(self, config: SidecarConfig, client: KubeClient | None = None, *,
                 debounce: float = 0.05, labels_interval: float = 5.0, watch_timeout: int = 290):
        super().__init__(config.pod_namespace)
        self.config = config
        self.client = client or KubeClient(config.api_server, config.token_file, config.api_ca_file)
        namespace = config.pod_namespace
        self.connections = Reflector(self.client, collection_path(CLAUDE_CONNECTIONS, namespace),
                                     self._changed, CLAUDE_CONNECTIONS, watch_timeout=watch_timeout)
        self.policies = Reflector(self.client, collection_path(ACCESS_POLICIES, namespace),
                                  self._changed, ACCESS_POLICIES, watch_timeout=watch_timeout)
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
        sig: list[tuple[object, ...]] = []
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
        wanted: list[str] = sorted({name for c in conns
                                    if isinstance(c, dict) and (c.get("spec") or {}).get("baseURL")
                                    and isinstance(name := (c.get("metadata") or {}).get("name"), str)})
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

