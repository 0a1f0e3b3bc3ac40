"""SidecarConfig: everything the sidecar is told at startup, read once into a frozen value.

Two constructors, one per way the sidecar runs:

* :meth:`SidecarConfig.from_env` - the injected pod. Reads exactly what the injection webhook
  writes into the ``chaperone-sidecar`` container (docs/injection.md; the names and the parsers
  of the JSON values live in :mod:`.contract`, re-exported here): the args ``--mode --port
  --health-port``, the ``CHAPERONE_*`` variables, and the standard
  ``KUBERNETES_SERVICE_HOST``/``_PORT`` the kubelet sets in every container. Paths come from
  variables, so the test bed runs the sidecar as a plain process with the same configuration and
  only the paths remapped.
* :meth:`SidecarConfig.from_files` - standalone ``chaperone proxy``: a config directory holding
  ClaudeConnection/AccessPolicy YAML (same schema as the CRDs), credentials, the local CA and
  the recordings (layout in :func:`standalone_layout`).

No module keeps configuration in globals: the value is built once in the CLI and handed to
every component (``SidecarServices.config``). Invalid input raises :class:`ConfigError` naming
the variable or argument, so a misconfigured sidecar fails at start instead of at the first
request. On-behalf-of tokens are verified against the optional issuer of :class:`OIDCConfig`
(``CHAPERONE_OIDC_*``, see :mod:`.contract`).
"""

from __future__ import annotations

import argparse
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

# The contract is imported name by name: everything here stays importable from this module,
# which the rest of the sidecar and the tests use.
from .contract import (  # noqa: F401 - re-exported
    ENV_POD_NAME, ENV_POD_NAMESPACE, ENV_POD_UID, ENV_SERVICE_ACCOUNT, ENV_NODE_NAME, ENV_CREATOR,
    ENV_CONNECTIONS, ENV_CA_DIR, ENV_TOKEN_DIR, ENV_PODINFO_DIR, ENV_SPOOL_DIR, ENV_SPOOL_LIMIT,
    ENV_APPROVAL_MODE, ENV_APPROVAL_TIMEOUT, ENV_OPERATOR_NAMESPACE, ENV_LOG_LEVEL, ENV_S3_BUCKET,
    ENV_S3_ENDPOINT, ENV_S3_REGION, ENV_S3_PREFIX, ENV_REDIS_URL, ENV_REDIS_PASSWORD,
    ENV_REDIS_CA_CERT, ENV_SIDECAR_SECRET_DIR,
    ENV_OTEL_ENDPOINT, ENV_OTEL_SERVICE, ENV_HOME, ENV_KUBE_HOST, ENV_KUBE_PORT, ENV_OIDC_ISSUER,
    ENV_OIDC_AUDIENCE, ENV_OIDC_USERNAME_CLAIM, ENV_OIDC_GROUPS_CLAIM, ENV_OIDC_CA_FILE, CA_DIR,
    TOKEN_DIR, PODINFO_DIR, SPOOL_DIR, TMP_DIR, MODES, APPROVAL_MODES, DEFAULT_PROXY_PORT,
    DEFAULT_HEALTH_PORT, ConfigError, ConnectionMount, _api_server, _int, _read, _parse_creator,
    parse_creator_annotation, _parse_connections,
)

__all__ = ["ConfigError", "ConnectionMount", "OIDCConfig", "SidecarConfig", "add_sidecar_arguments",
           "add_proxy_arguments", "standalone_layout", "MODES", "APPROVAL_MODES"]

# Not part of the contract: the webhook passes its own reverse ports, standalone picks these.
DEFAULT_REVERSE_PORT_BASE = 15100
DEFAULT_STANDALONE_PORT = 8080
DEFAULT_STANDALONE_HEALTH_PORT = 8081
SERVICE_NAME = "chaperone-sidecar"
# Not part of the injection contract (the webhook never sets it): a knob on the sidecar itself.
ENV_EVENT_LOOP = "CHAPERONE_EVENT_LOOP"
EVENT_LOOPS = ("auto", "uvloop", "asyncio")


@dataclass(frozen=True)
class OIDCConfig:
    """Issuer that on-behalf-of tokens are verified against (see :mod:`.oidc`)."""

    issuer: str
    audience: str
    username_claim: str = "sub"
    groups_claim: str = "groups"
    ca_file: str | None = None  # extra CA for the issuer's HTTPS endpoints (system CAs always)
    leeway_seconds: int = 60
    jwks_ttl_seconds: int = 600


@dataclass(frozen=True)
class SidecarConfig:
    """The whole startup configuration. Build with ``from_env`` or ``from_files``."""

    mode: str = "explicit"  # explicit | transparent
    proxy_port: int = DEFAULT_PROXY_PORT
    health_port: int = DEFAULT_HEALTH_PORT
    listen_host: str = "127.0.0.1"  # agents reach the proxy on loopback only
    health_host: str = ""  # "": every address, IPv4 and IPv6 (the kubelet probes the pod IP)
    standalone: bool = False

    # who this sidecar speaks for
    pod_name: str = ""
    pod_namespace: str = "default"
    pod_uid: str = ""
    service_account: str = ""  # the ServiceAccount name (not namespace/name)
    node_name: str = ""
    creator: str = ""  # username from admission userInfo
    creator_groups: tuple[str, ...] = ()
    creator_raw: Mapping[str, Any] = field(default_factory=dict)

    connection_mounts: tuple[ConnectionMount, ...] = ()

    # files and directories
    ca_dir: Path = Path(CA_DIR)
    token_dir: Path | None = Path(TOKEN_DIR)
    podinfo_dir: Path | None = Path(PODINFO_DIR)
    spool_dir: Path = Path(SPOOL_DIR)
    spool_limit_bytes: int | None = None
    work_dir: Path = Path(TMP_DIR)  # writable scratch (upstream trust bundle)
    sidecar_secret_dir: Path | None = None

    # Kubernetes API (injected mode)
    api_server: str = ""  # https://host:port, "" in standalone mode

    # approvals
    approval_mode: str = "hold"
    approval_timeout_seconds: int = 300
    operator_namespace: str = "chaperone-system"

    # recording and backends
    s3_bucket: str = ""
    s3_endpoint: str = ""
    s3_region: str = ""
    s3_prefix: str = ""
    redis_url: str = ""
    # AUTH password and rediss:// CA (PEM) of that Redis; kept out of repr (config is logged).
    redis_password: str = field(default="", repr=False)
    redis_ca_cert: str = field(default="", repr=False)
    otel_endpoint: str = ""
    otel_service_name: str = SERVICE_NAME
    log_level: str = "info"

    oidc: OIDCConfig | None = None

    # proxy tuning
    stream_large_bodies: str = "1m"  # bodies above this stream (masking works on the stream)
    # auto | uvloop | asyncio (ENV_EVENT_LOOP); auto = uvloop when installed (the image has it)
    event_loop: str = "auto"
    reverse_port_base: int = DEFAULT_REVERSE_PORT_BASE

    # standalone only
    config_dir: Path | None = None
    recordings_dir: Path | None = None
    approvals_dir: Path | None = None

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ConfigError(f"--mode must be one of {', '.join(MODES)}, not {self.mode!r}")
        if self.event_loop not in EVENT_LOOPS:
            raise ConfigError(f"{ENV_EVENT_LOOP} must be one of {', '.join(EVENT_LOOPS)}, "
                              f"not {self.event_loop!r}")
        if self.approval_mode not in APPROVAL_MODES:
            raise ConfigError(f"{ENV_APPROVAL_MODE} must be one of {', '.join(APPROVAL_MODES)}, "
                              f"not {self.approval_mode!r}")
        ports = [("--port", self.proxy_port), ("--health-port", self.health_port)]
        ports += [(f"{ENV_CONNECTIONS}[{m.name}].reversePort", m.reverse_port)
                  for m in self.connection_mounts if m.reverse_port is not None]
        seen: dict[int, str] = {}
        for name, port in ports:
            if not 0 < port < 65536:
                raise ConfigError(f"{name} must be a TCP port (1-65535), not {port}")
            if port in seen:
                raise ConfigError(f"{name} and {seen[port]} are the same port {port}")
            seen[port] = name
        if self.approval_timeout_seconds <= 0:
            raise ConfigError(f"{ENV_APPROVAL_TIMEOUT} must be positive")
        if not self.standalone and not self.api_server:
            raise ConfigError(f"{ENV_KUBE_HOST}/{ENV_KUBE_PORT} are not set: the sidecar needs "
                              "the Kubernetes API to read its connections and policies")

    # ------------------------------------------------------------------ derived values
    @property
    def service_account_ref(self) -> str:
        """``namespace/name`` of the pod's ServiceAccount, as policies name it."""
        if not self.service_account:
            return ""
        return f"{self.pod_namespace}/{self.service_account}"

    @property
    def token_file(self) -> Path | None:
        return self.token_dir / "token" if self.token_dir else None

    @property
    def api_ca_file(self) -> Path | None:
        return self.token_dir / "ca.crt" if self.token_dir else None

    def mount(self, connection: str) -> ConnectionMount | None:
        for entry in self.connection_mounts:
            if entry.name == connection:
                return entry
        return None

    # ------------------------------------------------------------------ constructors
    @classmethod
    def from_env(cls, env: Mapping[str, str], argv: Sequence[str] | argparse.Namespace = ()) -> "SidecarConfig":
        """The injected sidecar: webhook env + ``--mode --port --health-port`` args."""
        if isinstance(argv, argparse.Namespace):
            args = argv
        else:
            parser = argparse.ArgumentParser(prog="chaperone sidecar", add_help=False)
            add_sidecar_arguments(parser)
            try:
                args = parser.parse_args(list(argv))
            except SystemExit as exc:  # argparse exits; a library must not
                raise ConfigError(f"invalid sidecar arguments: {' '.join(argv)}") from exc

        def get(name: str, default: str = "") -> str:
            return (env.get(name) or default).strip()

        def path(name: str, default: str | None) -> Path | None:
            value = get(name, default or "")
            return Path(value) if value else None

        creator_raw, creator, groups = _parse_creator(get(ENV_CREATOR))
        oidc = None
        if get(ENV_OIDC_ISSUER):
            if not get(ENV_OIDC_AUDIENCE):
                raise ConfigError(f"{ENV_OIDC_AUDIENCE} is required with {ENV_OIDC_ISSUER}")
            oidc = OIDCConfig(issuer=get(ENV_OIDC_ISSUER), audience=get(ENV_OIDC_AUDIENCE),
                              username_claim=get(ENV_OIDC_USERNAME_CLAIM, "sub"),
                              groups_claim=get(ENV_OIDC_GROUPS_CLAIM, "groups"),
                              ca_file=get(ENV_OIDC_CA_FILE) or None)
        return cls(
            mode=args.mode,
            proxy_port=args.port,
            health_port=args.health_port,
            listen_host=args.listen_host,
            standalone=False,
            pod_name=get(ENV_POD_NAME),
            pod_namespace=get(ENV_POD_NAMESPACE) or _read(path(ENV_TOKEN_DIR, TOKEN_DIR), "namespace")
            or "default",
            pod_uid=get(ENV_POD_UID),
            service_account=get(ENV_SERVICE_ACCOUNT),
            node_name=get(ENV_NODE_NAME),
            creator=creator,
            creator_groups=groups,
            creator_raw=creator_raw,
            connection_mounts=_parse_connections(get(ENV_CONNECTIONS)),
            ca_dir=path(ENV_CA_DIR, CA_DIR) or Path(CA_DIR),
            token_dir=path(ENV_TOKEN_DIR, TOKEN_DIR),
            podinfo_dir=path(ENV_PODINFO_DIR, PODINFO_DIR),
            spool_dir=path(ENV_SPOOL_DIR, SPOOL_DIR) or Path(SPOOL_DIR),
            spool_limit_bytes=_int(env, ENV_SPOOL_LIMIT, None),
            work_dir=path(ENV_HOME, TMP_DIR) or Path(TMP_DIR),
            sidecar_secret_dir=path(ENV_SIDECAR_SECRET_DIR, None),
            api_server=_api_server(env),
            approval_mode=get(ENV_APPROVAL_MODE, "hold"),
            approval_timeout_seconds=_int(env, ENV_APPROVAL_TIMEOUT, 300) or 300,
            operator_namespace=get(ENV_OPERATOR_NAMESPACE, "chaperone-system"),
            s3_bucket=get(ENV_S3_BUCKET),
            s3_endpoint=get(ENV_S3_ENDPOINT),
            s3_region=get(ENV_S3_REGION),
            s3_prefix=get(ENV_S3_PREFIX),
            redis_url=get(ENV_REDIS_URL),
            redis_password=env.get(ENV_REDIS_PASSWORD) or "",  # verbatim: spaces may be part of it
            redis_ca_cert=get(ENV_REDIS_CA_CERT),
            otel_endpoint=get(ENV_OTEL_ENDPOINT),
            otel_service_name=get(ENV_OTEL_SERVICE, SERVICE_NAME),
            log_level=get(ENV_LOG_LEVEL, "info"),
            event_loop=get(ENV_EVENT_LOOP, "auto").lower(),
            oidc=oidc,
        )

    @classmethod
    def from_files(cls, config_dir: Path | str, *, port: int = DEFAULT_STANDALONE_PORT,
                   health_port: int = DEFAULT_STANDALONE_HEALTH_PORT, listen_host: str = "127.0.0.1",
                   namespace: str | None = None, user: str | None = None,
                   env: Mapping[str, str] | None = None) -> "SidecarConfig":
        """Standalone mode from a config directory (created if missing).

        ``chaperone.yaml`` in the directory may set ``namespace``, ``user``, ``groups``,
        ``serviceAccount``, ``approvalMode``, ``approvalTimeoutSeconds``, ``logLevel``,
        ``reversePortBase``, ``redisURL`` and ``oidc`` (``issuer``, ``audience``,
        ``usernameClaim``, ``groupsClaim``, ``caFile``); arguments override the file.
        """
        env = os.environ if env is None else env
        layout = standalone_layout(Path(config_dir).expanduser().resolve())
        layout["root"].mkdir(parents=True, exist_ok=True)
        settings = _read_settings(layout["settings"])
        oidc = None
        if isinstance(settings.get("oidc"), dict) and settings["oidc"].get("issuer"):
            o = settings["oidc"]
            if not o.get("audience"):
                raise ConfigError(f"{layout['settings']}: oidc.audience is required with oidc.issuer")
            oidc = OIDCConfig(issuer=str(o["issuer"]), audience=str(o["audience"]),
                              username_claim=str(o.get("usernameClaim") or "sub"),
                              groups_claim=str(o.get("groupsClaim") or "groups"),
                              ca_file=str(o["caFile"]) if o.get("caFile") else None)
        username = user or settings.get("user") or env.get("USER") or env.get("LOGNAME") or "local"
        groups = settings.get("groups") or []
        if not isinstance(groups, list) or not all(isinstance(g, str) for g in groups):
            raise ConfigError(f"{layout['settings']}: groups must be a list of strings")
        try:
            timeout = int(settings.get("approvalTimeoutSeconds", 300))
            base = int(settings.get("reversePortBase", DEFAULT_REVERSE_PORT_BASE))
        except (TypeError, ValueError) as exc:
            raise ConfigError(f"{layout['settings']}: {exc}") from None
        return cls(
            mode="explicit",
            proxy_port=port,
            health_port=health_port,
            listen_host=listen_host,
            health_host="127.0.0.1",
            standalone=True,
            pod_name="local",
            pod_namespace=namespace or str(settings.get("namespace") or "default"),
            service_account=str(settings.get("serviceAccount") or ""),
            creator=str(username),
            creator_groups=tuple(sorted(groups)),
            creator_raw={"username": str(username), "groups": sorted(groups)},
            ca_dir=layout["ca"],
            token_dir=None,
            podinfo_dir=None,
            spool_dir=layout["spool"],
            work_dir=layout["work"],
            api_server="",
            approval_mode=str(settings.get("approvalMode") or "hold"),
            approval_timeout_seconds=timeout,
            redis_url=str(settings.get("redisURL") or ""),
            log_level=str(settings.get("logLevel") or env.get(ENV_LOG_LEVEL) or "info"),
            event_loop=str(settings.get("eventLoop") or env.get(ENV_EVENT_LOOP) or "auto").lower(),
            oidc=oidc,
            reverse_port_base=base,
            config_dir=layout["root"],
            recordings_dir=layout["recordings"],
            approvals_dir=layout["approvals"],
        )


# ---------------------------------------------------------------------------- arguments

def add_sidecar_arguments(parser: argparse.ArgumentParser) -> None:
    """The args the webhook passes: ``--mode MODE --port PROXY_PORT --health-port HEALTH_PORT``."""
    parser.add_argument("--mode", choices=MODES, default="explicit",
                        help="explicit: agents use HTTP(S)_PROXY; transparent: iptables REDIRECT")
    parser.add_argument("--port", type=int, default=DEFAULT_PROXY_PORT, help="proxy listen port")
    parser.add_argument("--health-port", type=int, default=DEFAULT_HEALTH_PORT,
                        help="port of /ready and /metrics")
    parser.add_argument("--listen-host", default="127.0.0.1",
                        help="proxy listen address (default loopback: only this pod's containers)")


def add_proxy_arguments(parser: argparse.ArgumentParser) -> None:
    """``chaperone proxy`` (standalone) arguments."""
    parser.add_argument("--config-dir", default=os.environ.get("CHAPERONE_CONFIG_DIR", "~/.chaperone"),
                        help="connections/, policies/, credentials/, CA, recordings (default ~/.chaperone)")
    parser.add_argument("--port", type=int, default=DEFAULT_STANDALONE_PORT, help="proxy port (8080)")
    parser.add_argument("--health-port", type=int, default=DEFAULT_STANDALONE_HEALTH_PORT,
                        help="port of /ready and /metrics (8081)")
    parser.add_argument("--listen-host", default="127.0.0.1", help="listen address (loopback)")
    parser.add_argument("--namespace", default=None, help="namespace of the local objects")
    parser.add_argument("--user", default=None, help="the identity requests are made as ($USER)")


def standalone_layout(root: Path) -> dict[str, Path]:
    """Where standalone mode keeps things under the config directory."""
    return {
        "root": root,
        "settings": root / "chaperone.yaml",
        "connections": root / "connections",   # ClaudeConnection YAML
        "policies": root / "policies",         # AccessPolicy YAML
        "credentials": root / "credentials",   # credentials/<connection>/<key> (like a Secret)
        "upstream_ca": root / "upstream-ca",   # upstream-ca/<connection>/ca.crt
        "ca": root / "ca",                     # mitmproxy-ca.pem (+ -cert.pem for clients)
        "spool": root / "spool",
        "recordings": root / "recordings",
        "approvals": root / "approvals",
        "work": root / "run",
    }


# ---------------------------------------------------------------------------- helpers

def _read_settings(path: Path) -> dict[str, Any]:
    if not path.exists():
        return {}
    import yaml

    try:
        data = yaml.safe_load(path.read_text()) or {}
    except (OSError, yaml.YAMLError) as exc:
        raise ConfigError(f"{path}: {exc}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: must be a mapping")
    return data
