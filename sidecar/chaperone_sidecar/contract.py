"""The sidecar's side of the injection contract: names, mount paths and the JSON values.

The injection webhook writes a fixed set of args, variables and mounts into the
``chaperone-sidecar`` container (docs/injection.md). The names are the ``ENV_*`` constants of
``chaperone_operator/injection/contract.py``, repeated here because the sidecar never imports
the operator (a test pins the two sets together). This module holds that contract and the
parsers of its structured values (``CHAPERONE_CREATOR``, ``CHAPERONE_CONNECTIONS``, the API
server address); :mod:`.config` turns them into a :class:`~.config.SidecarConfig` and
re-exports every name here, so callers keep importing from ``chaperone_sidecar.config``.

Written by the webhook only when the operator is configured with an issuer:
``CHAPERONE_OIDC_ISSUER``, ``CHAPERONE_OIDC_AUDIENCE``, ``CHAPERONE_OIDC_USERNAME_CLAIM``
(default ``sub``), ``CHAPERONE_OIDC_GROUPS_CLAIM`` (default ``groups``) and, when set,
``CHAPERONE_OIDC_CA_FILE``: the issuer that on-behalf-of tokens (``X-Chaperone-On-Behalf-Of``)
are verified against. Without an issuer such a token is refused (401) - never silently ignored.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

# --- the webhook/sidecar contract (docs/injection.md) -------------------------------------------
ENV_POD_NAME = "CHAPERONE_POD_NAME"
ENV_POD_NAMESPACE = "CHAPERONE_POD_NAMESPACE"
ENV_POD_UID = "CHAPERONE_POD_UID"
ENV_SERVICE_ACCOUNT = "CHAPERONE_SERVICE_ACCOUNT"
ENV_NODE_NAME = "CHAPERONE_NODE_NAME"
ENV_CREATOR = "CHAPERONE_CREATOR"
ENV_CONNECTIONS = "CHAPERONE_CONNECTIONS"
ENV_CA_DIR = "CHAPERONE_CA_DIR"
ENV_TOKEN_DIR = "CHAPERONE_TOKEN_DIR"
ENV_PODINFO_DIR = "CHAPERONE_PODINFO_DIR"
ENV_SPOOL_DIR = "CHAPERONE_SPOOL_DIR"
ENV_SPOOL_LIMIT = "CHAPERONE_SPOOL_LIMIT_BYTES"
ENV_APPROVAL_MODE = "CHAPERONE_APPROVAL_MODE"
ENV_APPROVAL_TIMEOUT = "CHAPERONE_APPROVAL_TIMEOUT_SECONDS"
ENV_OPERATOR_NAMESPACE = "CHAPERONE_OPERATOR_NAMESPACE"
ENV_LOG_LEVEL = "CHAPERONE_LOG_LEVEL"
ENV_S3_BUCKET = "CHAPERONE_S3_BUCKET"
ENV_S3_ENDPOINT = "CHAPERONE_S3_ENDPOINT"
ENV_S3_REGION = "CHAPERONE_S3_REGION"
ENV_S3_PREFIX = "CHAPERONE_S3_PREFIX"
ENV_REDIS_URL = "CHAPERONE_REDIS_URL"
ENV_REDIS_PASSWORD = "CHAPERONE_REDIS_PASSWORD"  # from a Secret, this container only
ENV_REDIS_CA_CERT = "CHAPERONE_REDIS_CA_CERT"    # PEM: the rediss:// server's CA
ENV_SIDECAR_SECRET_DIR = "CHAPERONE_SIDECAR_SECRET_DIR"
ENV_OTEL_ENDPOINT = "OTEL_EXPORTER_OTLP_ENDPOINT"
ENV_OTEL_SERVICE = "OTEL_SERVICE_NAME"
ENV_HOME = "HOME"
# Set by the kubelet in every container: where the API server is.
ENV_KUBE_HOST = "KUBERNETES_SERVICE_HOST"
ENV_KUBE_PORT = "KUBERNETES_SERVICE_PORT"
# Optional: written only when the operator has an OIDC issuer (see module doc).
ENV_OIDC_ISSUER = "CHAPERONE_OIDC_ISSUER"
ENV_OIDC_AUDIENCE = "CHAPERONE_OIDC_AUDIENCE"
ENV_OIDC_USERNAME_CLAIM = "CHAPERONE_OIDC_USERNAME_CLAIM"
ENV_OIDC_GROUPS_CLAIM = "CHAPERONE_OIDC_GROUPS_CLAIM"
ENV_OIDC_CA_FILE = "CHAPERONE_OIDC_CA_FILE"

# Paths the webhook mounts (used as defaults when a *_DIR variable is absent).
CA_DIR = "/etc/chaperone/ca"
TOKEN_DIR = "/var/run/secrets/kubernetes.io/serviceaccount"
PODINFO_DIR = "/etc/chaperone/podinfo"
SPOOL_DIR = "/var/lib/chaperone/spool"
TMP_DIR = "/tmp"

# The args the webhook passes (``--mode --port --health-port``) and the values they may take.
MODES = ("explicit", "transparent")
APPROVAL_MODES = ("hold", "defer")
DEFAULT_PROXY_PORT = 15001
DEFAULT_HEALTH_PORT = 15021


# Defined here, not in .config, because the parsers below raise it.
class ConfigError(ValueError):
    """The sidecar's configuration is unusable; the message names the variable or argument."""


@dataclass(frozen=True)
class ConnectionMount:
    """One entry of ``CHAPERONE_CONNECTIONS``: what the webhook mounted for a connection.

    The set is fixed when the pod is admitted; the connection's spec itself is read from the
    API (it may change while the pod runs).
    """

    name: str
    type: str
    credentials_dir: str | None = None
    web_identity_token_file: str | None = None
    upstream_ca_file: str | None = None
    reverse_port: int | None = None


# ---------------------------------------------------------------------------- parsers

def _api_server(env: Mapping[str, str]) -> str:
    host = (env.get(ENV_KUBE_HOST) or "").strip()
    port = (env.get(ENV_KUBE_PORT) or "443").strip()
    if not host:
        return ""
    if ":" in host and not host.startswith("["):
        host = f"[{host}]"
    if not port.isdigit():
        raise ConfigError(f"{ENV_KUBE_PORT} must be a port number, not {port!r}")
    return f"https://{host}:{port}"


def _int(env: Mapping[str, str], name: str, default: int | None) -> int | None:
    raw = (env.get(name) or "").strip()
    if not raw:
        return default
    try:
        return int(raw)
    except ValueError:
        raise ConfigError(f"{name} must be an integer, not {raw!r}") from None


def _read(directory: Path | None, name: str) -> str:
    if directory is None:
        return ""
    try:
        return (directory / name).read_text().strip()
    except OSError:
        return ""


def _parse_creator(raw: str) -> tuple[dict[str, Any], str, tuple[str, ...]]:
    """CHAPERONE_CREATOR: the admission userInfo JSON (``username``, ``uid``, ``groups``...)."""
    if not raw:
        return {}, "", ()
    try:
        obj = json.loads(raw)
    except ValueError as exc:
        raise ConfigError(f"{ENV_CREATOR} is not JSON: {exc}") from None
    if not isinstance(obj, dict):
        raise ConfigError(f"{ENV_CREATOR} must be a JSON object")
    groups = obj.get("groups") or []
    if not isinstance(groups, list):
        raise ConfigError(f"{ENV_CREATOR}.groups must be a list")
    return obj, str(obj.get("username") or ""), tuple(str(g) for g in groups)


def parse_creator_annotation(value: str) -> tuple[str, tuple[str, ...]]:
    """The creator annotation (same JSON as CHAPERONE_CREATOR) -> (username, groups); lenient."""
    try:
        _, name, groups = _parse_creator(value)
    except ConfigError:
        return "", ()
    return name, groups


def _parse_connections(raw: str) -> tuple[ConnectionMount, ...]:
    """CHAPERONE_CONNECTIONS: JSON list of {name, type, credentialsDir?, webIdentityTokenFile?,
    upstreamCAFile?, reversePort?}."""
    if not raw:
        return ()
    try:
        items = json.loads(raw)
    except ValueError as exc:
        raise ConfigError(f"{ENV_CONNECTIONS} is not JSON: {exc}") from None
    if not isinstance(items, list):
        raise ConfigError(f"{ENV_CONNECTIONS} must be a JSON list")
    mounts, names = [], set()
    for i, item in enumerate(items):
        where = f"{ENV_CONNECTIONS}[{i}]"
        if not isinstance(item, dict) or not isinstance(item.get("name"), str) or not item["name"]:
            raise ConfigError(f"{where} must be an object with a name")
        if item["name"] in names:
            raise ConfigError(f"{where}: duplicate connection {item['name']!r}")
        names.add(item["name"])
        port = item.get("reversePort")
        if port is not None and (not isinstance(port, int) or isinstance(port, bool)):
            raise ConfigError(f"{where}.reversePort must be an integer")
        mounts.append(ConnectionMount(
            name=item["name"], type=str(item.get("type") or ""),
            credentials_dir=item.get("credentialsDir") or None,
            web_identity_token_file=item.get("webIdentityTokenFile") or None,
            upstream_ca_file=item.get("upstreamCAFile") or None,
            reverse_port=port))
    return tuple(mounts)
