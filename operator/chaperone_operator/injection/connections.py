"""Which ClaudeConnections apply to a pod, and what the webhook derives from each.

Why here and pure: the webhook decides at admission which connections a pod may use (their
credentials are mounted into its sidecar, so the set is fixed for the pod's lifetime), which
hosts must never be exempted from the proxy (NO_PROXY), and which extra ports transparent mode
must redirect. All of that is a function of the connection objects and the pod's labels.
"""

from __future__ import annotations

import hashlib
import ipaddress
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

from chaperone_sidecar.contract import (
    CONNECTIONS_DIR,
    POSTGRES_PORT_BASE,
    UPSTREAM_CA_DIR,
    VOL_CONN_PREFIX,
    VOL_UPSTREAM_CA_PREFIX,
    WEBIDENTITY_DIR,
)
from chaperone_sidecar.selectors import selector_matches

# Hosts a connection covers when spec.hosts is absent (CRD documentation).
DEFAULT_HOSTS: dict[str, tuple[str, ...]] = {
    "aws": ("*.amazonaws.com", "amazonaws.com"),
    "anthropic": ("api.anthropic.com",),
}


@dataclass(frozen=True)
class ConnectionPlan:
    """What injection does for one applicable connection."""

    name: str
    type: str
    hosts: tuple[str, ...]             # effective host globs, optionally with ":port"
    secret_name: str | None            # credentials Secret, mounted into the sidecar only
    web_identity_audience: str | None  # aws webIdentity: audience of the projected token
    upstream_ca: Mapping[str, str] | None  # {"kind", "name", "key"}
    base_url: str | None               # reverse mode upstream
    reverse_port: int | None           # loopback port the sidecar serves reverse mode on
    region: str | None                 # aws.region
    postgres_port: int | None = None   # the sidecar's listener for a postgres connection

    @property
    def suffix(self) -> str:
        # Connection names are DNS subdomains up to 253 chars; volume names are DNS labels of at
        # most 63. A short digest of the name is stable, unique in practice and deterministic.
        return hashlib.sha256(self.name.encode()).hexdigest()[:10]

    @property
    def secret_volume(self) -> str:
        return VOL_CONN_PREFIX + self.suffix

    @property
    def upstream_ca_volume(self) -> str:
        return VOL_UPSTREAM_CA_PREFIX + self.suffix

    @property
    def credentials_dir(self) -> str:
        return f"{CONNECTIONS_DIR}/{self.name}"

    @property
    def web_identity_token_file(self) -> str:
        return f"{WEBIDENTITY_DIR}/{self.name}/token"

    @property
    def upstream_ca_file(self) -> str:
        return f"{UPSTREAM_CA_DIR}/{self.name}/ca.crt"

    def sidecar_entry(self) -> dict[str, Any]:
        """This connection's entry in the sidecar's CHAPERONE_CONNECTIONS (docs/injection.md)."""
        entry: dict[str, Any] = {"name": self.name, "type": self.type}
        if self.secret_name:
            entry["credentialsDir"] = self.credentials_dir
        if self.web_identity_audience:
            entry["webIdentityTokenFile"] = self.web_identity_token_file
        if self.upstream_ca:
            entry["upstreamCAFile"] = self.upstream_ca_file
        if self.reverse_port is not None:
            entry["reversePort"] = self.reverse_port
        return entry


def applicable_connections(connections: Iterable[Mapping[str, Any]],
                           labels: Mapping[str, str]) -> list[Mapping[str, Any]]:
    """Connections whose podSelector matches `labels`, sorted by name, deleted ones left out."""
    chosen: dict[str, Mapping[str, Any]] = {}
    for conn in connections:
        meta = conn.get("metadata") or {}
        name = meta.get("name")
        if not name or meta.get("deletionTimestamp") or name in chosen:
            continue
        if selector_matches((conn.get("spec") or {}).get("podSelector"), labels):
            chosen[name] = conn
    return [chosen[name] for name in sorted(chosen)]


def plan_connections(connections: Iterable[Mapping[str, Any]],
                     reverse_port_base: int) -> list[ConnectionPlan]:
    """ConnectionPlans for already-selected connections (sorted by name)."""
    plans = []
    reverse_port = reverse_port_base
    postgres_index = 0
    for conn in sorted(connections, key=lambda c: c["metadata"]["name"]):
        spec = conn.get("spec") or {}
        ctype = spec.get("type", "")
        creds = spec.get("credentials") or {}
        source = creds.get("source", "none")
        secret_name = (creds.get("secretRef") or {}).get("name") if source == "secret" else None
        audience = None
        if source == "webIdentity":
            audience = creds.get("audience") or "sts.amazonaws.com"
        base_url = spec.get("baseURL") or None
        port = None
        if base_url:
            port, reverse_port = reverse_port, reverse_port + 1
        upstream = spec.get("upstreamCA")
        postgres_port = None
        if ctype == "postgres":  # the sidecar's rule (postgres/server.py listen_ports)
            postgres_port = (spec.get("postgres") or {}).get("listenPort") or POSTGRES_PORT_BASE + postgres_index
            postgres_index += 1
        plans.append(ConnectionPlan(
            name=conn["metadata"]["name"],
            type=ctype,
            hosts=effective_hosts(spec),
            secret_name=secret_name or None,
            web_identity_audience=audience,
            upstream_ca=({"kind": upstream.get("kind") or "ConfigMap",
                          "name": upstream["name"], "key": upstream["key"]}
                         if upstream else None),
            base_url=base_url,
            reverse_port=port,
            region=(spec.get("aws") or {}).get("region") or None,
            postgres_port=postgres_port,
        ))
    return plans


def effective_hosts(spec: Mapping[str, Any]) -> tuple[str, ...]:
    """spec.hosts (or the type's defaults) plus the hosts of baseURL and aws.endpointURL."""
    hosts = list(spec.get("hosts") or DEFAULT_HOSTS.get(spec.get("type", ""), ()))
    for url in (spec.get("baseURL"), (spec.get("aws") or {}).get("endpointURL")):
        if url:
            netloc = urlsplit(url).netloc.rsplit("@", 1)[-1]
            if netloc:
                hosts.append(netloc)
    return tuple(dict.fromkeys(h.strip().lower() for h in hosts if h.strip()))


def split_host(host: str) -> tuple[str, int | None]:
    """'h:443' -> ('h', 443); '[::1]:443' -> ('::1', 443); bare IPv6 and names keep port None."""
    host = host.strip().lower()
    if host.startswith("["):
        inner, _, rest = host[1:].partition("]")
        port = rest[1:] if rest.startswith(":") else ""
        return inner, int(port) if port.isdigit() else None
    if host.count(":") == 1:
        name, _, port = host.partition(":")
        return name, int(port) if port.isdigit() else None
    return host, None


def host_ports(plans: Iterable[ConnectionPlan]) -> set[int]:
    """Explicit ports named in connection hosts ("k8s.example.com:6443")."""
    return {port for plan in plans for host in plan.hosts
            if (port := split_host(host)[1]) is not None}


def no_proxy_entry_reaches(entry: str, hosts: Iterable[str]) -> bool:
    """True if NO_PROXY `entry` could exempt traffic to any connection host from the proxy.

    Deliberately conservative (an overlap in either direction counts): dropping an entry only
    sends more traffic through the gateway, keeping one could let a connection bypass it.
    """
    raw = entry.strip().lower()
    if not raw:
        return False
    if raw == "*":
        return True
    name = split_host(raw)[0]
    try:
        net = ipaddress.ip_network(name, strict=False)
    except ValueError:
        net = None
    domain = name.lstrip("*").lstrip(".")
    for host in hosts:
        hname = split_host(host)[0]
        if net is not None:
            try:
                if ipaddress.ip_address(hname) in net:
                    return True
            except ValueError:
                pass
            continue
        if "*" in hname:
            # "*.example.com" / "api-*.example.com": the literal tail after the last wildcard.
            base = hname.rsplit("*", 1)[1].lstrip(".")
            if not base or domain == base or domain.endswith("." + base) \
                    or base.endswith("." + domain):
                return True
        elif hname == domain or hname.endswith("." + domain):
            return True
    return False
