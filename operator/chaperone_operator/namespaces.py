"""Per-namespace plumbing the sidecars need: the interception CA, the sidecar RoleBinding and
the Redis password Secret.

Why the operator manages the RoleBinding: a sidecar authenticates with its pod's service
account, and needs exactly the ``chaperone-sidecar`` ClusterRole (create/get/list/watch
ApprovalRequests, read ClaudeConnections and AccessPolicies) in its own namespace — nothing more,
and nothing for other service accounts. The chart cannot know which namespaces and service
accounts run agents; the operator does (injected pods carry the ``chaperone.dev/inject`` label),
so it keeps one RoleBinding per namespace whose subjects are exactly the service accounts of the
live injected pods there. Agent containers get no token at all, so the binding never reaches
them. The CA is ensured here too (``ca.ensure_namespace_ca``, idempotent, rotates near expiry)
because a namespace with connections or injected pods is where sidecars terminate TLS.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence

from kubernetes.client.exceptions import ApiException

from chaperone_sidecar.contract import STATUS_ANNOTATION

from . import kube

__all__ = ["ROLE_BINDING", "sidecar_service_accounts", "upstream_ca_found", "ensure",
           "redis_secret_data"]

ROLE_BINDING = "chaperone-sidecar"
MANAGED_LABELS = {"app.kubernetes.io/managed-by": "chaperone-operator",
                  "app.kubernetes.io/name": "chaperone"}


def sidecar_service_accounts(pods: Iterable[Mapping], annotation: str = STATUS_ANNOTATION) -> set[str]:
    """Service accounts of live pods that were actually injected (annotation present)."""
    out = set()
    for pod in pods:
        meta = pod.get("metadata") or {}
        if meta.get("deletionTimestamp") or annotation not in (meta.get("annotations") or {}):
            continue
        if (pod.get("status") or {}).get("phase") in ("Succeeded", "Failed"):
            continue
        out.add((pod.get("spec") or {}).get("serviceAccountName") or "default")
    return out


def upstream_ca_found(api, namespace: str, ref: Mapping | None) -> bool:
    """True when no upstream CA is configured, or its ConfigMap/Secret holds the key."""
    if not ref:
        return True
    read = kube.read_secret if ref.get("kind") == "Secret" else kube.read_configmap
    obj = read(api, namespace, ref.get("name", ""))
    return obj is not None and ref.get("key") in (obj.get("data") or {})


def ensure(runtime, namespace: str, pods: Sequence[Mapping], logger) -> None:
    """Ensure the namespace's CA and sidecar RoleBinding (both idempotent).

    A namespace being deleted refuses new objects (403 NamespaceTerminating); that is the end
    of the namespace, not an error.
    """
    try:
        _ensure(runtime, namespace, pods, logger)
    except ApiException as exc:
        if exc.status == 403 and "NamespaceTerminating" in str(exc.body or ""):
            logger.debug(f"namespace {namespace} is terminating; nothing to ensure")
            return
        raise


def redis_secret_data(settings, injection) -> dict[str, str] | None:
    """What the per-namespace Redis Secret holds (password, and ca.crt for rediss://); None
    when the sidecars get no password."""
    if not (settings.redis_password and injection.redis_secret):
        return None
    data = {"password": settings.redis_password}
    if injection.redis_tls_ca and settings.redis_ca_cert:
        data["ca.crt"] = settings.redis_ca_cert
    return data


def _ensure(runtime, namespace: str, pods: Sequence[Mapping], logger) -> None:
    if runtime.ensure_ca is not None:
        runtime.ensure_ca(runtime.api, namespace, runtime.now())
    # The Redis password, where the sidecars' secretKeyRef finds it (docs/redis.md): readable by
    # whoever may read Secrets here, never by agent containers (the webhook refuses that).
    redis = redis_secret_data(runtime.settings, runtime.injection)
    if redis is not None:
        done = kube.ensure_secret(runtime.api, namespace, runtime.injection.redis_secret, redis,
                                  MANAGED_LABELS)
        if done == "foreign":
            logger.warning(f"Secret {namespace}/{runtime.injection.redis_secret} exists and is "
                           "not the operator's: sidecars here read their Redis password from it")
        elif done != "unchanged":
            logger.info(f"Secret {namespace}/{runtime.injection.redis_secret} {done}")
    if runtime.settings.manage_sidecar_rbac:
        done = kube.ensure_role_binding(runtime.api, namespace, ROLE_BINDING,
                                        runtime.settings.sidecar_cluster_role,
                                        sidecar_service_accounts(pods), MANAGED_LABELS)
        if done != "unchanged":
            logger.info(f"RoleBinding {namespace}/{ROLE_BINDING} {done}")
