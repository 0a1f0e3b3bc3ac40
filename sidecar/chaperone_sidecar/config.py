"""SidecarConfig: everything the sidecar is told at startup, read once into a frozen value.

Two constructors, one per way the sidecar runs:

* :meth:`SidecarConfig.from_env` - the injected pod. Reads exactly what the injection webhook
  writes into the ``chaperone-sidecar`` container (docs/injection.md; the names are those of
  :mod:`.contract`, which the webhook writes from; the parsers of the JSON values
  ``CHAPERONE_CREATOR`` and ``CHAPERONE_CONNECTIONS`` are here): the args ``--mode --port
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
import json
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from . import contract as c

__all__ = ["ConfigError", "ConnectionMount", "OIDCConfig", "SidecarConfig", "add_sidecar_arguments",
           "add_proxy_arguments", "standalone_layout", "parse_creator_annotation"]

# Not part of the contract: the webhook passes its own reverse ports, standalone picks these.
DEFAULT_REVERSE_PORT_BASE = 15100
DEFAULT_STANDALONE_PORT = 8080
DEFAULT_STANDALONE_HEALTH_PORT = 8081
# Not part of the injection contract (the webhook never sets it): a knob on the sidecar itself.
ENV_EVENT_LOOP = "CHAPERONE_EVENT_LOOP"
EVENT_LOOPS = ("auto", "uvloop", "asyncio")


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


@dataclass(frozen=True)
class OIDCConfig:
    """Issuer that on-behalf-of tokens are verified against (see :mod:`.oidc`)."""

    issuer: str
    audience: str
    username_claim: str = c.DEFAULT_OIDC_USERNAME_CLAIM
    groups_claim: str = c.DEFAULT_OIDC_GROUPS_CLAIM
    ca_file: str | None = None  # extra CA for the issuer's HTTPS endpoints (system CAs always)
    leeway_seconds: int = 60
    jwks_ttl_seconds: int = 600


@dataclass(frozen=True)
class SidecarConfig:
    """The whole startup configuration. Build with ``from_env`` or ``from_files``."""

    mode: str = "explicit"  # explicit | transparent
    proxy_port: int = c.DEFAULT_PROXY_PORT
    health_port: int = c.DEFAULT_HEALTH_PORT
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
    ca_dir: Path = Path(c.CA_DIR)
    token_dir: Path | None = Path(c.TOKEN_DIR)
    podinfo_dir: Path | None = Path(c.PODINFO_DIR)
    spool_dir: Path = Path(c.SPOOL_DIR)
    spool_limit_bytes: int | None = None
    work_dir: Path = Path(c.TMP_DIR)  # writable scratch (upstream trust bundle)
    sidecar_secret_dir: Path | None = None

    # Kubernetes API (injected mode)
    api_server: str = ""  # https://host:port, "" in standalone mode

    # approvals
    approval_mode: str = c.DEFAULT_APPROVAL_MODE
    approval_timeout_seconds: int = c.DEFAULT_APPROVAL_TIMEOUT_SECONDS
    operator_namespace: str = c.DEFAULT_OPERATOR_NAMESPACE

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
    otel_service_name: str = c.OTEL_SERVICE_NAME
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
        if self.mode not in c.MODES:
            raise ConfigError(f"--mode must be one of {', '.join(c.MODES)}, not {self.mode!r}")
        if self.event_loop not in EVENT_LOOPS:
            raise ConfigError(f"{ENV_EVENT_LOOP} must be one of {', '.join(EVENT_LOOPS)}, "
                              f"not {self.event_loop!r}")
        if self.approval_mode not in c.APPROVAL_MODES:
            raise ConfigError(f"{c.ENV_APPROVAL_MODE} must be one of {', '.join(c.APPROVAL_MODES)}, "
                              f"not {self.approval_mode!r}")
        ports = [("--port", self.proxy_port), ("--health-port", self.health_port)]
        ports += [(f"{c.ENV_CONNECTIONS}[{m.name}].reversePort", m.reverse_port)
                  for m in self.connection_mounts if m.reverse_port is not None]
        seen: dict[int, str] = {}
        for name, port in ports:
            if not 0 < port < 65536:
                raise ConfigError(f"{name} must be a TCP port (1-65535), not {port}")
            if port in seen:
                raise ConfigError(f"{name} and {seen[port]} are the same port {port}")
            seen[port] = name
        if self.approval_timeout_seconds <= 0:
            raise ConfigError(f"{c.ENV_APPROVAL_TIMEOUT} must be positive")
        if not self.standalone and not self.api_server:
            raise ConfigError(f"{c.ENV_KUBE_HOST}/{c.ENV_KUBE_PORT} are not set: the sidecar needs "
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
    def from_env(cls, env: Mapping[str, str], argv: Sequence[str] | argparse.Namespace = ()) -> SidecarConfig:
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

        creator_raw, creator, groups = _parse_creator(get(c.ENV_CREATOR))
        oidc = None
        if get(c.ENV_OIDC_ISSUER):
            if not get(c.ENV_OIDC_AUDIENCE):
                raise ConfigError(f"{c.ENV_OIDC_AUDIENCE} is required with {c.ENV_OIDC_ISSUER}")
            oidc = OIDCConfig(issuer=get(c.ENV_OIDC_ISSUER), audience=get(c.ENV_OIDC_AUDIENCE),
                              username_claim=get(c.ENV_OIDC_USERNAME_CLAIM, c.DEFAULT_OIDC_USERNAME_CLAIM),
                              groups_claim=get(c.ENV_OIDC_GROUPS_CLAIM, c.DEFAULT_OIDC_GROUPS_CLAIM),
                              ca_file=get(c.ENV_OIDC_CA_FILE) or None)
        return cls(
            mode=args.mode,
            proxy_port=args.port,
            health_port=args.health_port,
            listen_host=args.listen_host,
            standalone=False,
            pod_name=get(c.ENV_POD_NAME),
            pod_namespace=get(c.ENV_POD_NAMESPACE) or _read(path(c.ENV_TOKEN_DIR, c.TOKEN_DIR), "namespace")
            or "default",
            pod_uid=get(c.ENV_POD_UID),
            service_account=get(c.ENV_SERVICE_ACCOUNT),
            node_name=get(c.ENV_NODE_NAME),
            creator=creator,
            creator_groups=groups,
            creator_raw=creator_raw,
            connection_mounts=_parse_connections(get(c.ENV_CONNECTIONS)),
            ca_dir=path(c.ENV_CA_DIR, c.CA_DIR) or Path(c.CA_DIR),
            token_dir=path(c.ENV_TOKEN_DIR, c.TOKEN_DIR),
            podinfo_dir=path(c.ENV_PODINFO_DIR, c.PODINFO_DIR),
            spool_dir=path(c.ENV_SPOOL_DIR, c.SPOOL_DIR) or Path(c.SPOOL_DIR),
            spool_limit_bytes=_int(env, c.ENV_SPOOL_LIMIT, None),
            work_dir=path(c.ENV_HOME, c.TMP_DIR) or Path(c.TMP_DIR),
            sidecar_secret_dir=path(c.ENV_SIDECAR_SECRET_DIR, None),
            api_server=_api_server(env),
            approval_mode=get(c.ENV_APPROVAL_MODE, c.DEFAULT_APPROVAL_MODE),
            approval_timeout_seconds=(_int(env, c.ENV_APPROVAL_TIMEOUT, c.DEFAULT_APPROVAL_TIMEOUT_SECONDS)
                                      or c.DEFAULT_APPROVAL_TIMEOUT_SECONDS),
            operator_namespace=get(c.ENV_OPERATOR_NAMESPACE, c.DEFAULT_OPERATOR_NAMESPACE),
            s3_bucket=get(c.ENV_S3_BUCKET),
            s3_endpoint=get(c.ENV_S3_ENDPOINT),
            s3_region=get(c.ENV_S3_REGION),
            s3_prefix=get(c.ENV_S3_PREFIX),
            redis_url=get(c.ENV_REDIS_URL),
            redis_password=env.get(c.ENV_REDIS_PASSWORD) or "",  # verbatim: spaces may be part of it
            redis_ca_cert=get(c.ENV_REDIS_CA_CERT),
            otel_endpoint=get(c.ENV_OTEL_ENDPOINT),
            otel_service_name=get(c.ENV_OTEL_SERVICE, c.OTEL_SERVICE_NAME),
            log_level=get(c.ENV_LOG_LEVEL, "info"),
            event_loop=get(ENV_EVENT_LOOP, "auto").lower(),
            oidc=oidc,
        )

    @classmethod
    def from_files(cls, config_dir: Path | str, *, port: int = DEFAULT_STANDALONE_PORT,
                   health_port: int = DEFAULT_STANDALONE_HEALTH_PORT, listen_host: str = "127.0.0.1",
                   namespace: str | None = None, user: str | None = None,
                   env: Mapping[str, str] | None = None) -> SidecarConfig:
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
                              username_claim=str(o.get("usernameClaim") or c.DEFAULT_OIDC_USERNAME_CLAIM),
                              groups_claim=str(o.get("groupsClaim") or c.DEFAULT_OIDC_GROUPS_CLAIM),
                              ca_file=str(o["caFile"]) if o.get("caFile") else None)
        username = user or settings.get("user") or env.get("USER") or env.get("LOGNAME") or "local"
        groups = settings.get("groups") or []
        if not isinstance(groups, list) or not all(isinstance(g, str) for g in groups):
            raise ConfigError(f"{layout['settings']}: groups must be a list of strings")
        try:
            timeout = int(settings.get("approvalTimeoutSeconds", c.DEFAULT_APPROVAL_TIMEOUT_SECONDS))
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
            approval_mode=str(settings.get("approvalMode") or c.DEFAULT_APPROVAL_MODE),
            approval_timeout_seconds=timeout,
            redis_url=str(settings.get("redisURL") or ""),
            log_level=str(settings.get("logLevel") or env.get(c.ENV_LOG_LEVEL) or "info"),
            event_loop=str(settings.get("eventLoop") or env.get(ENV_EVENT_LOOP) or "auto").lower(),
            oidc=oidc,
            reverse_port_base=base,
            config_dir=layout["root"],
            recordings_dir=layout["recordings"],
            approvals_dir=layout["approvals"],
        )


# ---------------------------------------------------------------------------- the contract's values

def _api_server(env: Mapping[str, str]) -> str:
    host = (env.get(c.ENV_KUBE_HOST) or "").strip()
    port = (env.get(c.ENV_KUBE_PORT) or "443").strip()
    if not host:
        return ""
    if ":" in host and not host.startswith("["):
        host = f"[{host}]"
    if not port.isdigit():
        raise ConfigError(f"{c.ENV_KUBE_PORT} must be a port number, not {port!r}")
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
        raise ConfigError(f"{c.ENV_CREATOR} is not JSON: {exc}") from None
    if not isinstance(obj, dict):
        raise ConfigError(f"{c.ENV_CREATOR} must be a JSON object")
    groups = obj.get("groups") or []
    if not isinstance(groups, list):
        raise ConfigError(f"{c.ENV_CREATOR}.groups must be a list")
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
        raise ConfigError(f"{c.ENV_CONNECTIONS} is not JSON: {exc}") from None
    if not isinstance(items, list):
        raise ConfigError(f"{c.ENV_CONNECTIONS} must be a JSON list")
    mounts, names = [], set()
    for i, item in enumerate(items):
        where = f"{c.ENV_CONNECTIONS}[{i}]"
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


# ---------------------------------------------------------------------------- arguments

def add_sidecar_arguments(parser: argparse.ArgumentParser) -> None:
    """The args the webhook passes: ``--mode MODE --port PROXY_PORT --health-port HEALTH_PORT``."""
    parser.add_argument("--mode", choices=c.MODES, default="explicit",
                        help="explicit: agents use HTTP(S)_PROXY; transparent: iptables REDIRECT")
    parser.add_argument("--port", type=int, default=c.DEFAULT_PROXY_PORT, help="proxy listen port")
    parser.add_argument("--health-port", type=int, default=c.DEFAULT_HEALTH_PORT,
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
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except (OSError, yaml.YAMLError) as exc:
        raise ConfigError(f"{path}: {exc}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: must be a mapping")
    return data
