"""The containers and volumes the webhook adds: the native sidecar, the transparent-mode init
container, and every volume they (and the agents' trust bundle) need.

Why a native sidecar (an initContainer with `restartPolicy: Always`, Kubernetes >= 1.29): the
kubelet starts it before the user's init containers and main containers and waits for its
startupProbe, so no agent process ever runs before the proxy listens; and it is stopped only
after the main containers exit, so the last requests and the recording flush are not cut off.
Jobs complete normally, which a regular sidecar container would prevent.

Everything the sidecar reads from disk is also passed as an environment variable holding its
path, so the test bed can run the sidecar as a plain process with exactly this configuration and
only the paths remapped. The contract is documented in docs/injection.md.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

from chaperone_sidecar import contract as c

from .connections import ConnectionPlan
from .iptables import iptables_script
from .settings import InjectionSettings, quantity_bytes


def _field_env(name: str, field_path: str) -> dict[str, Any]:
    return {"name": name, "valueFrom": {"fieldRef": {"apiVersion": "v1", "fieldPath": field_path}}}


def _secret_env(name: str, secret: str, key: str) -> dict[str, Any]:
    return {"name": name, "valueFrom": {"secretKeyRef": {"name": secret, "key": key}}}


def _mount(volume: str, path: str, read_only: bool = True) -> dict[str, Any]:
    mount: dict[str, Any] = {"name": volume, "mountPath": path}
    if read_only:
        mount["readOnly"] = True
    return mount


def sidecar_container(settings: InjectionSettings, mode: str, approval_mode: str,
                      plans: Sequence[ConnectionPlan], creator_json: str) -> dict[str, Any]:
    """The `chaperone-sidecar` native sidecar container."""
    env: list[dict[str, Any]] = [
        _field_env(c.ENV_POD_NAME, "metadata.name"),
        _field_env(c.ENV_POD_NAMESPACE, "metadata.namespace"),
        _field_env(c.ENV_POD_UID, "metadata.uid"),
        _field_env(c.ENV_SERVICE_ACCOUNT, "spec.serviceAccountName"),
        _field_env(c.ENV_NODE_NAME, "spec.nodeName"),
        # A literal, not a downward-API reference to the annotation: container env is immutable
        # once the pod exists, annotations are not, so a later `kubectl annotate` cannot change
        # who the sidecar believes created the pod.
        {"name": c.ENV_CREATOR, "value": creator_json},
        {"name": c.ENV_CONNECTIONS,
         "value": json.dumps([p.sidecar_entry() for p in plans], sort_keys=True,
                             separators=(",", ":"))},
        {"name": c.ENV_CA_DIR, "value": c.CA_DIR},
        {"name": c.ENV_TOKEN_DIR, "value": c.TOKEN_DIR},
        {"name": c.ENV_PODINFO_DIR, "value": c.PODINFO_DIR},
        {"name": c.ENV_SPOOL_DIR, "value": c.SPOOL_DIR},
        {"name": c.ENV_SPOOL_LIMIT, "value": str(quantity_bytes(settings.spool_size_limit))},
        {"name": c.ENV_APPROVAL_MODE, "value": approval_mode},
        {"name": c.ENV_APPROVAL_TIMEOUT, "value": str(settings.approval_timeout_seconds)},
        {"name": c.ENV_OPERATOR_NAMESPACE, "value": settings.operator_namespace},
        {"name": c.ENV_LOG_LEVEL, "value": settings.log_level},
    ]
    # Optional endpoints: absent means "not configured" (the sidecar then keeps recordings in
    # the spool only / caches grants in memory / exports no telemetry).
    for name, value in ((c.ENV_S3_BUCKET, settings.s3_bucket),
                        (c.ENV_S3_ENDPOINT, settings.s3_endpoint),
                        (c.ENV_S3_REGION, settings.s3_region),
                        (c.ENV_S3_PREFIX, settings.s3_prefix),
                        (c.ENV_REDIS_URL, settings.redis_url),
                        (c.ENV_OCSF_FILE, settings.ocsf_file),
                        (c.ENV_OCSF_S3_PREFIX, settings.ocsf_s3_prefix),
                        (c.ENV_OCSF_OTLP_ENDPOINT, settings.ocsf_otlp_endpoint)):
        if value:
            env.append({"name": name, "value": value})
    if settings.redis_url and settings.redis_secret:
        # From the Secret, in this container only: the agent shares the pod's network and can
        # reach the Redis port, so the password is what keeps it out (docs/redis.md). Not
        # optional: a sidecar must not start against Redis without it.
        env.append(_secret_env(c.ENV_REDIS_PASSWORD, settings.redis_secret, c.REDIS_PASSWORD_KEY))
        if settings.redis_tls_ca:
            env.append(_secret_env(c.ENV_REDIS_CA_CERT, settings.redis_secret, c.REDIS_CA_KEY))
    if settings.sidecar_secret:
        env.append({"name": c.ENV_SIDECAR_SECRET_DIR, "value": c.SIDECAR_SECRET_DIR})
    if settings.otel_endpoint:
        env.append({"name": c.ENV_OTEL_ENDPOINT, "value": settings.otel_endpoint})
        env.append({"name": c.ENV_OTEL_SERVICE, "value": c.OTEL_SERVICE_NAME})
        if settings.otel_genai_content:
            env.append({"name": c.ENV_GENAI_CONTENT, "value": "true"})
    if settings.oidc_issuer:  # on-behalf-of tokens; without an issuer the sidecar refuses them
        env += [{"name": c.ENV_OIDC_ISSUER, "value": settings.oidc_issuer},
                {"name": c.ENV_OIDC_AUDIENCE, "value": settings.oidc_audience},
                {"name": c.ENV_OIDC_USERNAME_CLAIM, "value": settings.oidc_username_claim},
                {"name": c.ENV_OIDC_GROUPS_CLAIM, "value": settings.oidc_groups_claim}]
        if settings.oidc_ca_file:
            env.append({"name": c.ENV_OIDC_CA_FILE, "value": settings.oidc_ca_file})
    # Read-only root filesystem: anything that insists on writing under $HOME gets the tmp volume.
    env.append({"name": c.ENV_HOME, "value": c.TMP_DIR})

    mounts = [
        _mount(c.VOL_CA, c.CA_DIR),
        _mount(c.VOL_TOKEN, c.TOKEN_DIR),
        _mount(c.VOL_PODINFO, c.PODINFO_DIR),
        _mount(c.VOL_SPOOL, c.SPOOL_DIR, read_only=False),
        _mount(c.VOL_TMP, c.TMP_DIR, read_only=False),
    ]
    if any(p.web_identity_audience for p in plans):
        mounts.append(_mount(c.VOL_WEBIDENTITY, c.WEBIDENTITY_DIR))
    if settings.sidecar_secret:
        mounts.append(_mount(c.VOL_SIDECAR_SECRET, c.SIDECAR_SECRET_DIR))
    for plan in plans:
        if plan.secret_name:
            mounts.append(_mount(plan.secret_volume, plan.credentials_dir))
        if plan.upstream_ca:
            mounts.append(_mount(plan.upstream_ca_volume, f"{c.UPSTREAM_CA_DIR}/{plan.name}"))

    requests = {"cpu": settings.cpu_request, "memory": settings.memory_request}
    limits = {k: v for k, v in (("cpu", settings.cpu_limit), ("memory", settings.memory_limit))
              if v}
    resources: dict[str, Any] = {"requests": {k: v for k, v in requests.items() if v}}
    if limits:
        resources["limits"] = limits

    def probe(**timing: int) -> dict[str, Any]:
        # A fresh dict each time: shared objects would become YAML aliases in golden files.
        return {"httpGet": {"path": c.READY_PATH, "port": settings.health_port}, **timing}

    return {
        "name": c.SIDECAR_NAME,
        "image": settings.sidecar_image,
        "imagePullPolicy": settings.image_pull_policy,
        "restartPolicy": "Always",
        "command": list(c.SIDECAR_COMMAND),
        "args": [c.SIDECAR_SUBCOMMAND, "--mode", mode, "--port", str(settings.proxy_port),
                 "--health-port", str(settings.health_port)],
        "env": env,
        "resources": resources,
        "securityContext": {
            "runAsUser": settings.sidecar_uid,
            "runAsGroup": settings.sidecar_gid,
            "runAsNonRoot": True,
            "readOnlyRootFilesystem": True,
            "allowPrivilegeEscalation": False,
            "privileged": False,
            "capabilities": {"drop": ["ALL"]},
            "seccompProfile": {"type": "RuntimeDefault"},
        },
        # The kubelet starts the agents only once the startup probe passed: no agent request
        # can race the proxy's start. Up to 2 minutes for a cold start.
        "startupProbe": probe(periodSeconds=1, timeoutSeconds=1, failureThreshold=120),
        "readinessProbe": probe(periodSeconds=5, timeoutSeconds=1, failureThreshold=3),
        "volumeMounts": mounts,
    }


def init_container(settings: InjectionSettings) -> dict[str, Any]:
    """The transparent-mode `chaperone-init` container: installs the netfilter rules and exits."""
    script = iptables_script(settings)
    return {
        "name": c.INIT_NAME,
        "image": settings.sidecar_image,
        "imagePullPolicy": settings.image_pull_policy,
        "command": ["/bin/sh", "-c"],
        "args": [script],
        "resources": {"requests": {"cpu": "10m", "memory": "16Mi"},
                      "limits": {"memory": "64Mi"}},
        "securityContext": {
            # iptables needs root with NET_ADMIN (rules) and NET_RAW (its netlink/raw socket).
            # runAsNonRoot false explicitly: a pod-level runAsNonRoot would otherwise refuse it.
            "runAsUser": 0,
            "runAsGroup": 0,
            "runAsNonRoot": False,
            # iptables-legacy takes a lock file under /run; the container lives for a second.
            "readOnlyRootFilesystem": False,
            "allowPrivilegeEscalation": False,
            "privileged": False,
            "capabilities": {"add": ["NET_ADMIN", "NET_RAW"], "drop": ["ALL"]},
            "seccompProfile": {"type": "RuntimeDefault"},
        },
    }


def trust_volume(settings: InjectionSettings) -> dict[str, Any]:
    # Not optional: an agent must not start without the bundle (it would fail TLS anyway, but
    # waiting for the operator to create it is clearer). Mounted as a directory, not subPath,
    # so CA rotation reaches running pods.
    return {"name": c.VOL_TRUST, "configMap": {
        "name": settings.trust_bundle_name,
        "items": [{"key": c.TRUST_KEY, "path": c.TRUST_KEY}]}}


def trust_mount() -> dict[str, Any]:
    return _mount(c.VOL_TRUST, c.TRUST_DIR)


def pod_volumes(settings: InjectionSettings, plans: Sequence[ConnectionPlan]) -> list[dict]:
    """Every volume the webhook adds, in a fixed order."""
    volumes: list[dict[str, Any]] = [
        {"name": c.VOL_CA, "secret": {"secretName": settings.ca_secret_name}},
        trust_volume(settings),
        {"name": c.VOL_TOKEN, "projected": {"sources": [
            # No audience: the API server's own, so the sidecar can talk to the API. The same
            # three files as the ServiceAccount plugin's kube-api-access volume.
            {"serviceAccountToken": {"path": "token",
                                     "expirationSeconds": settings.token_expiration_seconds}},
            {"configMap": {"name": "kube-root-ca.crt",
                           "items": [{"key": "ca.crt", "path": "ca.crt"}]}},
            {"downwardAPI": {"items": [{"path": "namespace", "fieldRef": {
                "apiVersion": "v1", "fieldPath": "metadata.namespace"}}]}},
        ]}},
        {"name": c.VOL_PODINFO, "downwardAPI": {"items": [
            {"path": "labels", "fieldRef": {"apiVersion": "v1", "fieldPath": "metadata.labels"}},
            {"path": "annotations",
             "fieldRef": {"apiVersion": "v1", "fieldPath": "metadata.annotations"}},
        ]}},
        {"name": c.VOL_SPOOL, "emptyDir": {"sizeLimit": settings.spool_size_limit}},
        {"name": c.VOL_TMP, "emptyDir": {"sizeLimit": "64Mi"}},
    ]
    web = [p for p in plans if p.web_identity_audience]
    if web:
        volumes.append({"name": c.VOL_WEBIDENTITY, "projected": {"sources": [
            {"serviceAccountToken": {"audience": p.web_identity_audience,
                                     "expirationSeconds": settings.token_expiration_seconds,
                                     "path": f"{p.name}/token"}} for p in web]}})
    if settings.sidecar_secret:
        volumes.append({"name": c.VOL_SIDECAR_SECRET,
                        "secret": {"secretName": settings.sidecar_secret, "optional": True}})
    for plan in plans:
        # Optional: a missing Secret must not keep the whole pod from starting; the sidecar
        # refuses that connection's traffic (credentials not found) until it appears.
        if plan.secret_name:
            volumes.append({"name": plan.secret_volume,
                            "secret": {"secretName": plan.secret_name, "optional": True}})
        if plan.upstream_ca:
            ca = plan.upstream_ca
            items = [{"key": ca["key"], "path": "ca.crt"}]
            if ca["kind"] == "Secret":
                source = {"secret": {"secretName": ca["name"], "items": items, "optional": True}}
            else:
                source = {"configMap": {"name": ca["name"], "items": items, "optional": True}}
            volumes.append({"name": plan.upstream_ca_volume, **source})
    return volumes
