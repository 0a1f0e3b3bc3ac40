"""Stand-ins for the kube-controller-manager behaviours the test bed cannot do without.

Why: only kube-apiserver and etcd are built, so nothing runs the controller manager. Two of its
jobs matter immediately to tests:

* serviceaccount + root-ca-cert-publisher controllers: every namespace gets a `default`
  ServiceAccount and the `kube-root-ca.crt` ConfigMap. Without the SA, the ServiceAccount
  admission plugin rejects every pod ("serviceaccount default not found"); emulating the
  controller lets that plugin stay enabled, so pods are mutated exactly as in a real cluster.
* namespace controller: a deleted namespace is emptied and its `kubernetes` finalizer removed;
  otherwise `kubectl delete namespace` (a typical test teardown) waits forever.

A polling thread over the admin REST API is enough at test-bed scale and needs no client
library. Garbage collection (ownerReferences), workload controllers and scheduling are not
emulated: tests must not rely on them.
"""

from __future__ import annotations

import threading
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .controlplane import ControlPlane

__all__ = ["NamespaceController", "ensure_namespace_defaults"]


def ensure_namespace_defaults(cp: ControlPlane, ns: str) -> bool:
    """What kube-controller-manager's serviceaccount and root-ca-cert-publisher controllers add."""
    ok = True
    for path, body in (
        (f"/api/v1/namespaces/{ns}/serviceaccounts",
         {"apiVersion": "v1", "kind": "ServiceAccount", "metadata": {"name": "default"}}),
        (f"/api/v1/namespaces/{ns}/configmaps",
         {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "kube-root-ca.crt"},
          "data": {"ca.crt": cp.ca_path.read_text()}}),
    ):
        status, _ = cp.api("POST", path, body)
        ok = ok and status in (201, 409)
    return ok


class NamespaceController(threading.Thread):
    """Polls namespaces: gives new ones their defaults, empties and finalizes deleted ones."""

    def __init__(self, cp: ControlPlane, interval: float = 0.3) -> None:
        super().__init__(name="chaperone-testbed-namespaces", daemon=True)
        self.cp, self.interval = cp, interval
        self._stop_event = threading.Event()
        self._done: set[str] = set()  # uids of namespaces already given their defaults

    def stop(self) -> None:
        self._stop_event.set()
        self.join(timeout=10)

    def run(self) -> None:
        while not self._stop_event.wait(self.interval):
            try:
                self._sync()
            except Exception:  # noqa: BLE001 - apiserver going away at shutdown; retry next tick
                pass

    def _sync(self) -> None:
        status, nsl = self.cp.api("GET", "/api/v1/namespaces")
        if status != 200:
            return
        for ns in nsl.get("items", []):
            meta = ns["metadata"]
            if meta.get("deletionTimestamp"):
                if "kubernetes" in ns.get("spec", {}).get("finalizers", []):
                    self._finalize(ns)
            elif meta["uid"] not in self._done and ensure_namespace_defaults(self.cp, meta["name"]):
                self._done.add(meta["uid"])

    def _namespaced_resources(self) -> list[str]:
        """API paths ('/api/v1', '/apis/g/v') joined with namespaced, collection-deletable kinds."""
        group_versions = ["/api/v1"]
        status, groups = self.cp.api("GET", "/apis")
        if status == 200:
            # The preferred version suffices: every version serves the same stored objects.
            group_versions += [f"/apis/{g['preferredVersion']['groupVersion']}"
                               for g in groups.get("groups", [])]
        out = []
        for gv in group_versions:
            status, rl = self.cp.api("GET", gv)
            if status != 200:
                continue
            for r in rl.get("resources", []):
                verbs = set(r.get("verbs", []))
                # "/" in the name marks a subresource (pods/log), never a collection to purge.
                if (r.get("namespaced") and "/" not in r["name"]
                        and {"list", "deletecollection"} <= verbs):
                    out.append(f"{gv}/namespaces/{{ns}}/{r['name']}")
        return out

    def _finalize(self, ns: dict) -> None:
        name = ns["metadata"]["name"]
        remaining = 0
        for tmpl in self._namespaced_resources():
            path = tmpl.format(ns=name)
            self.cp.api("DELETE", path)
            status, lst = self.cp.api("GET", path)
            if status == 200:
                remaining += len(lst.get("items", []))
        # Objects held by finalizers (e.g. an operator's) keep the namespace Terminating, as in
        # a real cluster; the next tick checks again.
        if remaining:
            return
        ns["spec"]["finalizers"] = [f for f in ns["spec"]["finalizers"] if f != "kubernetes"]
        self.cp.api("PUT", f"/api/v1/namespaces/{name}/finalize", ns)
