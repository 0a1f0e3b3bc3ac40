"""Pods: the injection webhook, and following injected pods for RBAC and connection counts.

``on_pod_mutate`` is thin on purpose: injection is the pure function
``chaperone_operator.injection.inject(pod, settings, connections, user_info)``; this handler
only reads the namespace's ClaudeConnections fresh from the API (standby replicas serve
webhooks too, so no kopf index) and hands the resulting JSONPatch to kopf. Only pods labelled
``chaperone.dev/inject: "true"`` reach it (the chart's objectSelector), and the same label is a
handler filter so a misconfigured webhook still leaves other pods alone.

``on_pod_event`` follows labelled pods only (a server-side label selector on the watch, set in
``main.configure_kopf``) to keep the namespace's sidecar RoleBinding on exactly the service
accounts of injected pods, and to refresh ``injectedPods`` of the namespace's connections.
"""

from __future__ import annotations

import copy
import functools

import jsonpatch
import kopf

from chaperone_sidecar.api import CLAUDE_CONNECTIONS, LABEL_INJECT

from .. import kube, namespaces
from ..conditions import status_differs
from .claudeconnections import injected_pod_count

__all__ = ["on_pod_mutate", "on_pod_event"]


def _apply(ops: list[dict], body: dict) -> None:
    jsonpatch.apply_patch(body, ops, in_place=True)


@kopf.on.mutate("v1", "pods", id="pod-mutate", operations=["CREATE"], labels={LABEL_INJECT: "true"})
def on_pod_mutate(body, userinfo, patch, memo, **_):
    """Inject the sidecar (the pure ``inject`` decides everything)."""
    from ..injection.inject import inject

    runtime = memo.runtime
    pod = copy.deepcopy(dict(body))
    namespace = (pod.get("metadata") or {}).get("namespace")
    connections = kube.list_objects(runtime.api, CLAUDE_CONNECTIONS, namespace, from_cache=True)
    result = inject(pod, runtime.injection, connections, dict(userinfo or {}))
    if result.refused:
        raise kopf.AdmissionError(f"Chaperone cannot inject this pod: {result.refused}", code=403)
    ops = list(result.patch)
    if ops:
        patch.fns.append(functools.partial(_apply, ops))


@kopf.on.event("v1", "pods", id="pod-follow", labels={LABEL_INJECT: "true"})
def on_pod_event(type, body, memo, logger, **_):
    """Keep the sidecar RoleBinding and the connections' injectedPods in line with the pods.

    Only arrivals, departures and endings matter; ordinary status churn is skipped.
    """
    ending = body.get("metadata", {}).get("deletionTimestamp") or \
        body.get("status", {}).get("phase") in ("Succeeded", "Failed")
    if type == "MODIFIED" and not ending:
        return
    runtime = memo.runtime
    namespace = body["metadata"]["namespace"]
    pods = kube.list_pods(runtime.api, namespace, f"{LABEL_INJECT}=true")
    namespaces.ensure(runtime, namespace, pods, logger)
    for conn in kube.list_objects(runtime.api, CLAUDE_CONNECTIONS, namespace):
        name = conn["metadata"]["name"]
        count = injected_pod_count(name, pods)
        if status_differs(conn.get("status"), {"injectedPods": count}):
            kube.patch_status(runtime.api, CLAUDE_CONNECTIONS, namespace, name, {"injectedPods": count})
