"""What a Kubernetes client costs the sidecar: import RSS/time, and a list/patch/watch round trip.

The numbers behind the choice written in ``chaperone_sidecar/kubeclient.py`` (our module on the
aiohttp the sidecar already loads, rather than lightkube or kubernetes_asyncio). Run::

    python -m bench.kubeclient_cost [--with DIR]

``--with DIR``: a ``pip install --target DIR lightkube kubernetes_asyncio`` (they are not
dependencies of the project; the bench measures them only when given). The round trip runs
against the test bed's real kube-apiserver (``KUBEBUILDER_ASSETS``), as a ServiceAccount:
``list`` of a collection, and ``patch`` of one object until the watch delivers the change.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

from chaperone_sidecar.api import (
    API_VERSION,
    CLAUDE_CONNECTIONS,
    GROUP,
    KIND_CLAUDE_CONNECTION,
    collection_path,
)
from chaperone_sidecar.kubeclient import KubeClient, ListWatch

REPO = Path(__file__).resolve().parent.parent

CANDIDATES = {
    "chaperone kubeclient (aiohttp)": ["chaperone_sidecar.kubeclient"],
    "lightkube": ["lightkube", "lightkube.generic_resource", "lightkube.config.kubeconfig"],
    "kubernetes_asyncio": ["kubernetes_asyncio.client", "kubernetes_asyncio.watch",
                           "kubernetes_asyncio.config"],
    "kubernetes (sync)": ["kubernetes.client", "kubernetes.watch"],
}

# What the sidecar process has loaded anyway before any Kubernetes client.
_CHILD = """
import importlib, json, sys, time
def rss():
    for line in open('/proc/self/status'):
        if line.startswith('VmRSS'):
            return int(line.split()[1]) * 1024
import asyncio, ssl, aiohttp, aiohttp.web, yaml
r0, t0 = rss(), time.perf_counter()
for mod in sys.argv[1:]:
    importlib.import_module(mod)
print(json.dumps([rss() - r0, time.perf_counter() - t0]))
"""


def import_cost(modules: list[str], extra: str | None, runs: int = 3) -> tuple[float, float] | None:
    """(MB, ms) the modules add to a process that has the sidecar's base imports; median of runs."""
    path = os.pathsep.join(p for p in (extra, str(REPO / "sidecar"), os.environ.get("PYTHONPATH")) if p)
    out = []
    for _ in range(runs):
        res = subprocess.run([sys.executable, "-c", _CHILD, *modules], capture_output=True, text=True,
                             env={**os.environ, "PYTHONPATH": path}, timeout=120)
        if res.returncode != 0:
            return None  # not installed
        out.append(json.loads(res.stdout))
    return (statistics.median(o[0] for o in out) / 2**20, statistics.median(o[1] for o in out) * 1000)


def _conn(name: str, value: str = "0") -> dict[str, Any]:
    return {"apiVersion": API_VERSION, "kind": KIND_CLAUDE_CONNECTION,
            "metadata": {"name": name, "labels": {"bench": value}},
            "spec": {"type": "http", "hosts": [f"{name}.example.com"]}}


async def _ours(url: str, token: Path, ca: Path, ns: str, n: int) -> dict[str, float]:
    client = KubeClient(url, token, ca)
    path = collection_path(CLAUDE_CONNECTIONS, ns)
    lists, trips = [], []
    seen: asyncio.Queue = asyncio.Queue()

    async def follow() -> None:
        async for event in ListWatch(client, path):
            if event.type == "MODIFIED":
                seen.put_nowait(event.object["metadata"]["labels"]["bench"])

    task = asyncio.create_task(follow())
    try:
        for i in range(-1, n):  # -1: warm-up (session, TLS)
            t0 = time.perf_counter()
            await client.request("GET", path)
            t1 = time.perf_counter()
            await client.request("PATCH", f"{path}/c0", body={"metadata": {"labels": {"bench": f"o{i}"}}},
                                 content_type="application/merge-patch+json")
            while await seen.get() != f"o{i}":
                pass
            if i >= 0:
                lists.append(t1 - t0)
                trips.append(time.perf_counter() - t1)
    finally:
        task.cancel()
        await client.aclose()
    return {"list_ms": statistics.median(lists) * 1000, "patch_to_event_ms": statistics.median(trips) * 1000}


async def _lightkube(kubeconfig: Path, ns: str, n: int) -> dict[str, float]:
    from lightkube import AsyncClient, KubeConfig
    from lightkube.generic_resource import create_namespaced_resource
    from lightkube.types import PatchType

    res = create_namespaced_resource(GROUP, API_VERSION.split("/")[1], KIND_CLAUDE_CONNECTION,
                                     CLAUDE_CONNECTIONS)
    client = AsyncClient(KubeConfig.from_file(kubeconfig), namespace=ns)
    lists, trips = [], []
    seen: asyncio.Queue = asyncio.Queue()

    async def follow() -> None:
        async for kind, obj in client.watch(res, namespace=ns):
            if kind == "MODIFIED":
                seen.put_nowait(obj.metadata.labels["bench"])

    task = asyncio.create_task(follow())
    try:
        await asyncio.sleep(0.5)  # lightkube's watch lists first; let it start
        for i in range(-1, n):
            t0 = time.perf_counter()
            [x async for x in client.list(res, namespace=ns)]
            t1 = time.perf_counter()
            await client.patch(res, "c0", {"metadata": {"labels": {"bench": f"l{i}"}}}, namespace=ns,
                               patch_type=PatchType.MERGE)
            while await seen.get() != f"l{i}":
                pass
            if i >= 0:
                lists.append(t1 - t0)
                trips.append(time.perf_counter() - t1)
    finally:
        task.cancel()
        await client.close()
    return {"list_ms": statistics.median(lists) * 1000, "patch_to_event_ms": statistics.median(trips) * 1000}


def round_trips(extra: str | None, n: int, workdir: Path) -> dict[str, dict[str, float]]:
    from chaperone_testbed.controlplane import ControlPlane

    cp = ControlPlane(build_script=REPO / "hack" / "build-control-plane.sh").start()
    try:
        cp.kubectl("apply", "-f", str(REPO / "crds"))
        cp.kubectl("wait", "--for=condition=Established", f"crd/{CLAUDE_CONNECTIONS}.{GROUP}", "--timeout=60s")
        ns = f"bench-kc-{uuid.uuid4().hex[:6]}"
        ref = cp.serviceaccount_kubeconfig(ns, "agent")
        token = workdir / "token"
        token.write_text(json.loads(ref.path.read_text())["users"][0]["user"]["token"])
        rbac = [{"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "Role", "metadata": {"name": "b", "namespace": ns},
                 "rules": [{"apiGroups": [GROUP], "resources": [CLAUDE_CONNECTIONS],
                            "verbs": ["get", "list", "watch", "patch"]}]},
                {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "RoleBinding", "metadata": {"name": "b", "namespace": ns},
                 "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": "b"},
                 "subjects": [{"kind": "ServiceAccount", "name": "agent", "namespace": ns}]}]
        cp.kubectl("apply", "-f", "-", input=json.dumps({"apiVersion": "v1", "kind": "List", "items": rbac}))
        for i in range(20):
            cp.kubectl("apply", "-n", ns, "-f", "-", input=json.dumps(_conn(f"c{i}")))
        time.sleep(1.0)  # RBAC cache
        out = {"chaperone kubeclient (aiohttp)": asyncio.run(_ours(cp.url, token, cp.ca_path, ns, n))}
        if extra:
            sys.path.insert(0, extra)
            out["lightkube"] = asyncio.run(_lightkube(ref.path, ns, n))
        return out
    finally:
        cp.stop()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--with", dest="extra", help="a pip --target directory holding the libraries")
    parser.add_argument("-n", type=int, default=30, help="round trips per client")
    args = parser.parse_args(argv)
    for label, modules in CANDIDATES.items():
        cost = import_cost(modules, args.extra)
        print(f"{label:34} " + ("not installed" if cost is None else f"+{cost[0]:5.1f} MB  {cost[1]:6.0f} ms import"))
    with tempfile.TemporaryDirectory() as tmp:
        for label, numbers in round_trips(args.extra, args.n, Path(tmp)).items():
            print(f"{label:34} list {numbers['list_ms']:.1f} ms, patch->watch event "
                  f"{numbers['patch_to_event_ms']:.1f} ms (median of {args.n})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
