"""InjectionSettings: the operator-wide knobs of sidecar injection, read once at startup.

Why a frozen dataclass built from a plain mapping: `inject()` must be a pure function, so
everything it needs besides the pod, the connections and userInfo arrives in one immutable value.
`from_env` takes the mapping as an argument (not `os.environ` directly) so tests and golden files
build settings exactly as the operator does, from `CHAPERONE_*` variables the Helm chart sets.
Every variable is listed in `ENV_VARS` and documented in docs/injection.md.
"""

from __future__ import annotations

import dataclasses
import ipaddress
from collections.abc import Mapping
from dataclasses import dataclass
from urllib.parse import urlsplit

from chaperone_sidecar import contract as c

DEFAULT_VERSION = "0.1.0"
MAX_REVERSE_PORTS = 64  # a pod uses at most this many reverse-mode (baseURL) connections

# env var -> (field, parser name). Order is the documentation order.
ENV_VARS: dict[str, str] = {
    "CHAPERONE_VERSION": "version",
    "CHAPERONE_SIDECAR_IMAGE": "sidecar_image",
    "CHAPERONE_SIDECAR_IMAGE_PULL_POLICY": "image_pull_policy",
    "CHAPERONE_SIDECAR_UID": "sidecar_uid",
    "CHAPERONE_SIDECAR_GID": "sidecar_gid",
    "CHAPERONE_DEFAULT_MODE": "default_mode",
    "CHAPERONE_PROXY_PORT": "proxy_port",
    "CHAPERONE_HEALTH_PORT": "health_port",
    "CHAPERONE_REVERSE_PORT_BASE": "reverse_port_base",
    "CHAPERONE_REDIRECT_IPV6": "redirect_ipv6",
    "CHAPERONE_SIDECAR_CPU_REQUEST": "cpu_request",
    "CHAPERONE_SIDECAR_MEMORY_REQUEST": "memory_request",
    "CHAPERONE_SIDECAR_CPU_LIMIT": "cpu_limit",
    "CHAPERONE_SIDECAR_MEMORY_LIMIT": "memory_limit",
    "CHAPERONE_SPOOL_SIZE_LIMIT": "spool_size_limit",
    "CHAPERONE_S3_BUCKET": "s3_bucket",
    "CHAPERONE_S3_ENDPOINT": "s3_endpoint",
    "CHAPERONE_S3_REGION": "s3_region",
    "CHAPERONE_S3_PREFIX": "s3_prefix",
    "CHAPERONE_REDIS_URL": "redis_url",
    "CHAPERONE_REDIS_SECRET": "redis_secret",
    "CHAPERONE_REDIS_TLS_CA": "redis_tls_ca",
    "CHAPERONE_OTEL_ENDPOINT": "otel_endpoint",
    "CHAPERONE_OTEL_GENAI_CONTENT": "otel_genai_content",
    "CHAPERONE_OCSF_FILE": "ocsf_file",
    "CHAPERONE_OCSF_S3_PREFIX": "ocsf_s3_prefix",
    "CHAPERONE_OCSF_OTLP_ENDPOINT": "ocsf_otlp_endpoint",
    "CHAPERONE_OIDC_ISSUER": "oidc_issuer",
    "CHAPERONE_OIDC_AUDIENCE": "oidc_audience",
    "CHAPERONE_OIDC_USERNAME_CLAIM": "oidc_username_claim",
    "CHAPERONE_OIDC_GROUPS_CLAIM": "oidc_groups_claim",
    "CHAPERONE_OIDC_CA_FILE": "oidc_ca_file",
    "CHAPERONE_SIDECAR_SECRET": "sidecar_secret",
    "CHAPERONE_CA_SECRET": "ca_secret_name",
    "CHAPERONE_TRUST_BUNDLE": "trust_bundle_name",
    "CHAPERONE_OPERATOR_NAMESPACE": "operator_namespace",
    "CHAPERONE_APPROVAL_MODE": "approval_mode",
    "CHAPERONE_APPROVAL_TIMEOUT_SECONDS": "approval_timeout_seconds",
    "CHAPERONE_SIDECAR_LOG_LEVEL": "log_level",
    "CHAPERONE_TOKEN_EXPIRATION_SECONDS": "token_expiration_seconds",
    "CHAPERONE_API_AUDIENCES": "api_audiences",
}


@dataclass(frozen=True)
class InjectionSettings:
    """Operator-wide injection settings. Defaults are the documented defaults."""

    version: str = DEFAULT_VERSION
    sidecar_image: str = f"ghcr.io/chaperone-dev/chaperone:{DEFAULT_VERSION}"
    image_pull_policy: str = "IfNotPresent"
    sidecar_uid: int = 1337
    sidecar_gid: int = 1337
    default_mode: str = "explicit"
    proxy_port: int = c.DEFAULT_PROXY_PORT
    health_port: int = c.DEFAULT_HEALTH_PORT
    reverse_port_base: int = 15100
    redirect_ipv6: bool = True
    cpu_request: str = "100m"
    memory_request: str = "128Mi"
    cpu_limit: str = ""                 # empty: no CPU limit (throttling a proxy hurts latency)
    memory_limit: str = "512Mi"
    spool_size_limit: str = "1Gi"
    s3_bucket: str = ""
    s3_endpoint: str = ""
    s3_region: str = ""
    s3_prefix: str = ""
    redis_url: str = ""
    # Secret (in each pod namespace, kept by the operator) with the Redis password; empty: none.
    redis_secret: str = ""
    redis_tls_ca: bool = False          # that Secret also holds the rediss:// server's CA (ca.crt)
    otel_endpoint: str = ""
    otel_genai_content: bool = False    # prompts/completions (masked) on GenAI spans: opt-in
    # OCSF export of the sidecars' recorded flows (docs/telemetry.md); empty: off.
    ocsf_file: str = ""                 # a path inside the sidecar (e.g. on the spool volume)
    ocsf_s3_prefix: str = ""            # a key prefix in the recording bucket (s3_bucket)
    ocsf_otlp_endpoint: str = ""        # OTLP/HTTP logs URL, e.g. http://collector:4318/v1/logs
    # On-behalf-of OIDC issuer the sidecars verify X-Chaperone-On-Behalf-Of tokens against;
    # empty: not configured (the sidecars then refuse such tokens).
    oidc_issuer: str = ""
    oidc_audience: str = ""
    oidc_username_claim: str = c.DEFAULT_OIDC_USERNAME_CLAIM
    oidc_groups_claim: str = c.DEFAULT_OIDC_GROUPS_CLAIM
    oidc_ca_file: str = ""              # path inside the sidecar, e.g. in the sidecar Secret
    sidecar_secret: str = ""            # Secret (in each pod namespace) with S3/Redis credentials
    ca_secret_name: str = "chaperone-ca"
    trust_bundle_name: str = "chaperone-ca-bundle"
    operator_namespace: str = c.DEFAULT_OPERATOR_NAMESPACE
    approval_mode: str = c.DEFAULT_APPROVAL_MODE
    approval_timeout_seconds: int = c.DEFAULT_APPROVAL_TIMEOUT_SECONDS
    log_level: str = "info"
    token_expiration_seconds: int = 3607
    # Audiences the API server accepts; a projected token for one of them is an API credential.
    api_audiences: tuple[str, ...] = ("https://kubernetes.default.svc.cluster.local",)

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Raise ValueError naming the offending setting; called on construction."""
        if not self.sidecar_image:
            raise ValueError("CHAPERONE_SIDECAR_IMAGE must not be empty")
        if self.default_mode not in c.MODES:
            raise ValueError(f"CHAPERONE_DEFAULT_MODE must be one of {c.MODES}, "
                             f"not {self.default_mode!r}")
        if self.approval_mode not in c.APPROVAL_MODES:
            raise ValueError(f"CHAPERONE_APPROVAL_MODE must be one of {c.APPROVAL_MODES}, "
                             f"not {self.approval_mode!r}")
        if self.image_pull_policy not in ("Always", "IfNotPresent", "Never"):
            raise ValueError("CHAPERONE_SIDECAR_IMAGE_PULL_POLICY must be Always, IfNotPresent "
                             f"or Never, not {self.image_pull_policy!r}")
        # UID 0 would make the sidecar root; the iptables exclusion would then exempt root.
        for name, uid in (("CHAPERONE_SIDECAR_UID", self.sidecar_uid),
                          ("CHAPERONE_SIDECAR_GID", self.sidecar_gid)):
            if not 0 < uid < 2**31:
                raise ValueError(f"{name} must be a positive id, not {uid}")
        ports = {"CHAPERONE_PROXY_PORT": self.proxy_port,
                 "CHAPERONE_HEALTH_PORT": self.health_port,
                 "CHAPERONE_REVERSE_PORT_BASE": self.reverse_port_base}
        for name, port in ports.items():
            if not 0 < port < 65536:
                raise ValueError(f"{name} must be a TCP port, not {port}")
        if self.proxy_port == self.health_port:
            raise ValueError("CHAPERONE_PROXY_PORT and CHAPERONE_HEALTH_PORT must differ")
        # Reverse-mode connections get base, base+1, ... (at most MAX_REVERSE_PORTS of them).
        if any(self.reverse_port_base <= p < self.reverse_port_base + MAX_REVERSE_PORTS
               for p in (self.proxy_port, self.health_port)):
            raise ValueError(f"CHAPERONE_REVERSE_PORT_BASE..+{MAX_REVERSE_PORTS - 1} must not "
                             "contain the proxy or health port")
        if self.reverse_port_base + MAX_REVERSE_PORTS > 65536:
            raise ValueError("CHAPERONE_REVERSE_PORT_BASE leaves no room for reverse ports")
        if self.approval_timeout_seconds <= 0:
            raise ValueError("CHAPERONE_APPROVAL_TIMEOUT_SECONDS must be positive")
        if self.token_expiration_seconds < 600:  # the API server's minimum
            raise ValueError("CHAPERONE_TOKEN_EXPIRATION_SECONDS must be at least 600")
        quantity_bytes(self.spool_size_limit)  # raises ValueError when malformed
        if not self.ca_secret_name or not self.trust_bundle_name:
            raise ValueError("CHAPERONE_CA_SECRET and CHAPERONE_TRUST_BUNDLE must be set")
        if self.redis_secret and not self.redis_url:
            raise ValueError("CHAPERONE_REDIS_SECRET needs CHAPERONE_REDIS_URL")
        if self.redis_tls_ca and not (self.redis_secret and self.redis_url.startswith("rediss://")):
            raise ValueError("CHAPERONE_REDIS_TLS_CA needs a rediss:// CHAPERONE_REDIS_URL and "
                             "CHAPERONE_REDIS_SECRET")
        self._validate_oidc()

    def _validate_oidc(self) -> None:
        """The sidecar would refuse to start with half an OIDC configuration: refuse it here,
        once, instead of in every injected pod."""
        if not self.oidc_issuer:
            if self.oidc_audience or self.oidc_ca_file:
                raise ValueError("CHAPERONE_OIDC_AUDIENCE/CHAPERONE_OIDC_CA_FILE need "
                                 "CHAPERONE_OIDC_ISSUER")
            return
        parts = urlsplit(self.oidc_issuer)
        loopback = parts.hostname == "localhost" or _is_loopback_ip(parts.hostname or "")
        if not parts.hostname or not (parts.scheme == "https" or
                                      (parts.scheme == "http" and loopback)):
            raise ValueError("CHAPERONE_OIDC_ISSUER must be an https URL, not "
                             f"{self.oidc_issuer!r}")
        if not self.oidc_audience:
            raise ValueError("CHAPERONE_OIDC_AUDIENCE is required with CHAPERONE_OIDC_ISSUER")
        if not self.oidc_username_claim or not self.oidc_groups_claim:
            raise ValueError("CHAPERONE_OIDC_USERNAME_CLAIM and CHAPERONE_OIDC_GROUPS_CLAIM "
                             "must not be empty")
        if self.oidc_ca_file and not self.oidc_ca_file.startswith("/"):
            raise ValueError("CHAPERONE_OIDC_CA_FILE must be an absolute path in the sidecar "
                             f"container, not {self.oidc_ca_file!r}")

    @classmethod
    def from_env(cls, env: Mapping[str, str]) -> InjectionSettings:
        """Build settings from CHAPERONE_* variables; unset or empty variables keep defaults.

        Exception: the optional endpoints (S3, Redis, OTel, OIDC issuer, sidecar Secret, CPU
        limit) default to empty, so an empty value there simply means "not configured".
        """
        fields = {f.name: f for f in dataclasses.fields(cls)}
        kwargs: dict[str, object] = {}
        for var, name in ENV_VARS.items():
            raw = env.get(var)
            if raw is None or raw.strip() == "":
                continue
            kwargs[name] = _parse(var, raw.strip(), fields[name].default)
        return cls(**kwargs)  # type: ignore[arg-type]

    def replace(self, **changes: object) -> InjectionSettings:
        return dataclasses.replace(self, **changes)  # type: ignore[arg-type]


def _parse(var: str, raw: str, default: object) -> object:
    """Parse `raw` to the type of the field's default."""
    if isinstance(default, bool):
        if raw.lower() in ("1", "true", "yes", "on"):
            return True
        if raw.lower() in ("0", "false", "no", "off"):
            return False
        raise ValueError(f"{var} must be true or false, not {raw!r}")
    if isinstance(default, int):
        try:
            return int(raw)
        except ValueError:
            raise ValueError(f"{var} must be an integer, not {raw!r}") from None
    if isinstance(default, tuple):
        items = [item.strip() for item in raw.split(",") if item.strip()]
        if default and isinstance(default[0], int):
            try:
                # Sorted and deduplicated: settings equality must not depend on spelling.
                return tuple(sorted({int(item) for item in items}))
            except ValueError:
                raise ValueError(f"{var} must be a comma-separated list of ports, "
                                 f"not {raw!r}") from None
        return tuple(items)
    return raw


def _is_loopback_ip(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


_BINARY = {"Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40, "Pi": 2**50, "Ei": 2**60}
_DECIMAL = {"k": 10**3, "M": 10**6, "G": 10**9, "T": 10**12, "P": 10**15, "E": 10**18}


def quantity_bytes(quantity: str) -> int:
    """A Kubernetes memory/storage quantity ("1Gi", "500M", "1048576") in bytes.

    The sidecar gets the spool limit in bytes so it needs no quantity parser of its own.
    """
    q = quantity.strip()
    number, factor = q, 1
    for suffix, mult in (*_BINARY.items(), *_DECIMAL.items()):  # two-letter suffixes first
        if q.endswith(suffix):
            number, factor = q[: -len(suffix)], mult
            break
    try:
        value = float(number)
        if not 0 <= value < 2**63:
            raise ValueError
        return int(value * factor)
    except (ValueError, OverflowError):
        raise ValueError(f"CHAPERONE_SPOOL_SIZE_LIMIT must be a quantity such as 1Gi, "
                         f"not {quantity!r}") from None
