"""ClaudeConnection: validating admission and status (Ready, CredentialsFound, injectedPods).

Admission adds what the CRD schema and its CEL rules cannot say, every problem with its field
path: hosts must be usable host globs (the policy engine's glob checker, plus an optional port),
URLs must name a host and embed no credentials, label-selector expressions must be well formed,
and webIdentity needs a role to assume.

Status is level-triggered: on every event of the connection and on a timer (a referenced Secret
can appear later; pods come and go) the operator computes CredentialsFound (the Secret exists
and holds the keys the connection type needs), Ready (credentials and the upstream CA bundle are
in place), observedGeneration and injectedPods (live injected pods whose injection used this
connection), and patches only differences. The same pass ensures the namespace's interception
CA and the sidecar RoleBinding, since a namespace with a connection is where sidecars will run.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import Any
from urllib.parse import urlsplit

import kopf

from chaperone_sidecar.api import CLAUDE_CONNECTIONS, GROUP, LABEL_INJECT, VERSION
from chaperone_sidecar.contract import STATUS_ANNOTATION
from chaperone_sidecar.policy.globs import glob_error

from .. import namespaces
from ..conditions import condition, merge_conditions, status_differs
from ..kube import list_pods, read_secret

__all__ = ["connection_errors", "credentials_condition", "pod_connections", "injected_pod_count",
           "connection_status",
           "on_claudeconnection_validate", "on_claudeconnection_event", "on_claudeconnection_timer"]

AWS_KEYS = (("accessKeyIdKey", "AWS_ACCESS_KEY_ID"), ("secretAccessKeyKey", "AWS_SECRET_ACCESS_KEY"))
TOKEN_KEY = ("tokenKey", "token")


# ---------------------------------------------------------------------------- validation

def _host_error(host: str) -> str | None:
    name, port = host, None
    if host.count(":") == 1 and "/" not in host:
        name, _, port = host.partition(":")
    if port is not None and not (port.isdigit() and 0 < int(port) < 65536):
        return f"invalid port {port!r} in {host!r}: must be 1-65535"
    return glob_error(name, "host")


def _url_error(url: Any) -> str | None:
    parts = urlsplit(url) if isinstance(url, str) else None
    if parts is None or not parts.hostname:
        return f"{url!r} does not name a host"
    if parts.username or parts.password:
        return "must not embed credentials; use spec.credentials"
    return None


def connection_errors(obj: Mapping) -> list[str]:
    """Every semantic problem of one ClaudeConnection as ``field.path: reason``."""
    spec = obj.get("spec") or {}
    errors: list[str] = []
    seen: dict[str, int] = {}
    for i, host in enumerate(spec.get("hosts") or ()):
        if why := _host_error(host):
            errors.append(f"spec.hosts[{i}]: {why}")
        key = str(host).lower()
        if key in seen:
            errors.append(f"spec.hosts[{i}]: duplicate host {host!r} (also spec.hosts[{seen[key]}])")
        seen.setdefault(key, i)
    for path, url in (("spec.baseURL", spec.get("baseURL")),
                      ("spec.aws.endpointURL", (spec.get("aws") or {}).get("endpointURL"))):
        if url is not None and (why := _url_error(url)):
            errors.append(f"{path}: {why}")
    selector = spec.get("podSelector") or {}
    for i, expr in enumerate(selector.get("matchExpressions") or ()):
        op, values = expr.get("operator"), expr.get("values") or []
        if op in ("In", "NotIn") and not values:
            errors.append(f"spec.podSelector.matchExpressions[{i}].values: required for operator {op}")
        if op in ("Exists", "DoesNotExist") and values:
            errors.append(f"spec.podSelector.matchExpressions[{i}].values: must be empty for operator {op}")
    creds = spec.get("credentials") or {}
    if creds.get("source") == "webIdentity" and not (spec.get("aws") or {}).get("roleArn"):
        errors.append("spec.aws.roleArn: required when spec.credentials.source is webIdentity")
    for key, value in (creds.get("secretRef") or {}).items():
        if key != "name" and isinstance(value, str) and not value.strip():
            errors.append(f"spec.credentials.secretRef.{key}: must not be empty")
    return errors


@kopf.on.validate(GROUP, VERSION, CLAUDE_CONNECTIONS, id="claudeconnection-validate",
                  operations=["CREATE", "UPDATE"])
def on_claudeconnection_validate(body, **_):
    """Refuse connections with unusable hosts, URLs, selectors or credentials settings."""
    if errors := connection_errors(body):
        meta = body.get("metadata") or {}
        name = meta.get("name") or meta.get("generateName", "") + "*"
        raise kopf.AdmissionError(f"ClaudeConnection {meta.get('namespace')}/{name} is invalid:\n"
                                  + "\n".join(errors), code=422)


# ---------------------------------------------------------------------------- status

def required_keys(spec: Mapping) -> list[str]:
    ref = (spec.get("credentials") or {}).get("secretRef") or {}
    pairs = AWS_KEYS if spec.get("type") == "aws" else (TOKEN_KEY,)
    return [ref.get(field) or default for field, default in pairs]


def credentials_condition(spec: Mapping, secret: Mapping | None, generation: int | None) -> dict:
    """CredentialsFound from the connection spec and its Secret (None when absent)."""
    creds = spec.get("credentials") or {}
    source = creds.get("source", "none")
    if source == "none":
        return condition("CredentialsFound", True, "NoCredentialsNeeded",
                         "the target needs no credentials", generation)
    if source == "webIdentity":
        return condition("CredentialsFound", True, "WebIdentity",
                         "a projected service-account token is exchanged for "
                         f"{(spec.get('aws') or {}).get('roleArn')}", generation)
    name = (creds.get("secretRef") or {}).get("name")
    if secret is None:
        return condition("CredentialsFound", False, "SecretNotFound",
                         f"Secret {name!r} does not exist in this namespace", generation)
    missing = [k for k in required_keys(spec) if k not in (secret.get("data") or {})]
    if missing:
        return condition("CredentialsFound", False, "KeysMissing",
                         f"Secret {name!r} lacks key(s) {', '.join(missing)}", generation)
    return condition("CredentialsFound", True, "SecretFound",
                     f"Secret {name!r} holds {', '.join(required_keys(spec))}", generation)


def pod_connections(pod: Mapping, annotation: str = STATUS_ANNOTATION) -> set[str]:
    """Names of the connections an injected pod's sidecar got (from the status annotation)."""
    raw = ((pod.get("metadata") or {}).get("annotations") or {}).get(annotation)
    try:
        data = json.loads(raw) if raw else {}
    except ValueError:
        return set()
    items = data.get("connections") if isinstance(data, dict) else None
    return {name for c in items or ()
            if isinstance(name := c.get("name") if isinstance(c, dict) else c, str)}


def _live(pod: Mapping) -> bool:
    return not (pod.get("metadata") or {}).get("deletionTimestamp") and \
        (pod.get("status") or {}).get("phase") not in ("Succeeded", "Failed")


def injected_pod_count(connection: str, pods: Sequence[Mapping]) -> int:
    """Live (not finished, not deleting) injected pods whose sidecar got this connection."""
    return sum(1 for p in pods if _live(p) and connection in pod_connections(p))


def connection_status(obj: Mapping, current: Mapping | None, secret: Mapping | None,
                      pods: Sequence[Mapping], upstream_ca_found: bool, now) -> dict:
    """The status the operator wants for this connection."""
    meta, spec = obj.get("metadata") or {}, obj.get("spec") or {}
    generation = meta.get("generation")
    creds = credentials_condition(spec, secret, generation)
    if creds["status"] != "True":
        ready = condition("Ready", False, "CredentialsMissing", creds["message"], generation)
    elif not upstream_ca_found:
        ca = spec.get("upstreamCA") or {}
        ready = condition("Ready", False, "UpstreamCAMissing",
                          f"{ca.get('kind', 'ConfigMap')} {ca.get('name')!r} with key "
                          f"{ca.get('key')!r} not found", generation)
    else:
        ready = condition("Ready", True, "Ready", "sidecars can use this connection", generation)
    count = injected_pod_count(meta.get("name") or "", pods)
    return {"observedGeneration": generation, "injectedPods": count,
            "conditions": merge_conditions((current or {}).get("conditions"), [ready, creds], now)}


def _refresh(body, status, patch, memo, logger) -> None:
    runtime = memo.runtime
    meta, spec = body.get("metadata") or {}, body.get("spec") or {}
    ns: str = meta.get("namespace") or ""  # a ClaudeConnection is namespaced: always set
    creds = spec.get("credentials") or {}
    secret = None
    if creds.get("source") == "secret" and (creds.get("secretRef") or {}).get("name"):
        secret = read_secret(runtime.api, ns, creds["secretRef"]["name"])
    pods = list_pods(runtime.api, ns, f"{LABEL_INJECT}=true")
    desired = connection_status(body, status, secret, pods,
                                namespaces.upstream_ca_found(runtime.api, ns, spec.get("upstreamCA")),
                                runtime.now())
    if status_differs(status, desired):
        patch.status.update(desired)
    if not meta.get("deletionTimestamp"):
        namespaces.ensure(runtime, ns, pods, logger)


@kopf.on.event(GROUP, VERSION, CLAUDE_CONNECTIONS, id="claudeconnection-status")
def on_claudeconnection_event(type, body, status, patch, memo, logger, **_):
    """Refresh status (and the namespace's CA and sidecar RBAC) whenever the connection changes."""
    if type != "DELETED":
        _refresh(body, status, patch, memo, logger)


@kopf.timer(GROUP, VERSION, CLAUDE_CONNECTIONS, id="claudeconnection-refresh",
            interval=30.0, initial_delay=5.0)
def on_claudeconnection_timer(body, status, patch, memo, logger, **_):
    """Periodic refresh: Secrets appear, pods come and go, the CA nears rotation."""
    _refresh(body, status, patch, memo, logger)
