"""The operator's own configuration, read once from the environment at startup.

Why a frozen dataclass built by ``from_env``: the chart sets these variables on the Deployment
(and tests set them on the subprocess), kopf's startup handler builds the object exactly once and
keeps it in kopf's ``memo`` — there are no module-level configuration globals, so handlers are
testable with any settings and a bad value stops the operator at startup, with every problem
listed, instead of surfacing on the first admission request. Injection settings (sidecar image,
resources, S3/Redis/OTel values for the sidecar) are read by
``chaperone_operator.injection.InjectionSettings.from_env`` from the same environment.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from typing import Any

from .approvals import SidecarIdentityRule

__all__ = ["OperatorSettings", "SettingsError", "ENV"]

# field name -> environment variable (documented in charts/chaperone/values.yaml via the chart).
ENV = {
    "namespace": "CHAPERONE_OPERATOR_NAMESPACE",
    "webhook_listen": "CHAPERONE_WEBHOOK_LISTEN",
    "webhook_port": "CHAPERONE_WEBHOOK_PORT",
    "webhook_host": "CHAPERONE_WEBHOOK_HOST",
    "webhook_cert_file": "CHAPERONE_WEBHOOK_CERT_FILE",
    "webhook_key_file": "CHAPERONE_WEBHOOK_KEY_FILE",
    "peering_name": "CHAPERONE_PEERING_NAME",
    "peering_priority": "CHAPERONE_PEERING_PRIORITY",
    "standalone": "CHAPERONE_STANDALONE",
    "manage_sidecar_rbac": "CHAPERONE_MANAGE_SIDECAR_RBAC",
    "sidecar_cluster_role": "CHAPERONE_SIDECAR_CLUSTER_ROLE",
    "require_pod_bound_token": "CHAPERONE_APPROVALS_REQUIRE_POD_BOUND_TOKEN",
    "require_injected_pod": "CHAPERONE_APPROVALS_REQUIRE_INJECTED_POD",
    "redis_password": "CHAPERONE_REDIS_PASSWORD",
    "redis_ca_cert": "CHAPERONE_REDIS_CA_CERT",
}
_TRUE, _FALSE = ("1", "true", "yes", "on"), ("0", "false", "no", "off")


class SettingsError(ValueError):
    """One or more environment variables are invalid (the message lists all of them)."""


@dataclass(frozen=True)
class OperatorSettings:
    """Everything the operator process needs besides the injection settings."""

    namespace: str = "chaperone-system"  # the operator's own namespace (excluded from injection)
    webhook_listen: str = "0.0.0.0"  # address the HTTPS webhook server binds
    webhook_port: int = 9443
    webhook_host: str | None = None  # host name in logged URLs; the chart's Service fronts it
    webhook_cert_file: str = "/etc/chaperone/webhook/tls.crt"  # from the webhook cert Secret
    webhook_key_file: str = "/etc/chaperone/webhook/tls.key"
    peering_name: str = "chaperone"  # ClusterKopfPeering shared by the replicas
    peering_priority: int | None = None  # None: random per process (see main.py on replicas)
    standalone: bool = False  # no peering at all (single replica, or no peering CRD)
    manage_sidecar_rbac: bool = True  # bind the sidecar ClusterRole to injected pods' SAs
    sidecar_cluster_role: str = "chaperone-sidecar"
    require_pod_bound_token: bool = True  # see approvals.SidecarIdentityRule
    require_injected_pod: bool = True
    # The sidecars' Redis password (from the chart's Secret) and, for rediss://, its CA (PEM):
    # copied into the Secret CHAPERONE_REDIS_SECRET of each agent namespace (namespaces.ensure).
    redis_password: str = field(default="", repr=False)
    redis_ca_cert: str = field(default="", repr=False)

    @classmethod
    def from_env(cls, env: Mapping[str, str]) -> OperatorSettings:
        """Read every ``CHAPERONE_*`` variable of :data:`ENV`; unset ones keep the defaults."""
        values: dict[str, Any] = {}  # each value parsed for its field's type
        errors: list[str] = []
        types = {f.name: f.type for f in fields(cls)}
        for name, var in ENV.items():
            raw = env.get(var)
            if raw is None or raw == "":
                continue
            kind = types[name]
            try:
                if kind == "bool":
                    low = raw.strip().lower()
                    if low not in _TRUE + _FALSE:
                        raise ValueError("expected true or false")
                    values[name] = low in _TRUE
                elif kind in ("int", "int | None"):
                    values[name] = int(raw)
                else:
                    values[name] = raw
            except ValueError as exc:
                errors.append(f"{var}={raw!r}: {exc}")
        port = values.get("webhook_port", cls.webhook_port)
        if not 0 < port < 65536:
            errors.append(f"{ENV['webhook_port']}={port}: not a TCP port")
        if errors:
            raise SettingsError("invalid operator settings: " + "; ".join(errors))
        return cls(**values)

    def sidecar_rule(self) -> SidecarIdentityRule:
        """How ApprovalRequest admission recognises a sidecar (approvals module docstring)."""
        return SidecarIdentityRule(require_pod_bound_token=self.require_pod_bound_token,
                                   require_injected_pod=self.require_injected_pod)
