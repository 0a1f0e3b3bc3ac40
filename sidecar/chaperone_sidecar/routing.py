"""Which ClaudeConnection a request belongs to: host[:port] -> connection.

A connection covers the hosts of ``spec.hosts`` (globs, optionally with ``:port``), or when
that is absent the defaults of its type (aws: ``*.amazonaws.com`` and ``amazonaws.com``;
anthropic: ``api.anthropic.com``), plus the host of ``spec.baseURL`` and of
``spec.aws.endpointURL`` - the same rule the injection webhook uses to keep those hosts out of
NO_PROXY. A connection with a ``baseURL`` and a reverse port is also reached by listener
(reverse mode: the agent's base URL points at ``http://127.0.0.1:PORT``).

Matching (a :class:`RouteTable` is compiled once per snapshot, lookups are cached):

* Host names compare case-insensitively without a trailing dot; IPv6 literals without brackets.
* A pattern without a port matches every port; ``host:6443`` only that port.
* ``*`` matches any run of characters (dots included, as everywhere in Chaperone's globs), ``?``
  one character. ``*.example.com`` does not match ``example.com`` itself.
* When several patterns match, the most specific wins: a literal host before any glob, then the
  glob with the most literal characters, then a pattern with a port before one without, then
  the connection name (alphabetical) - so the choice never depends on list order. Two
  connections claiming the same literal host are reported in ``RouteTable.overlaps``.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

from .policy.globs import compile_glob, glob_error, is_literal

__all__ = ["Connection", "RouteTable", "DEFAULT_HOSTS", "effective_hosts", "split_host",
           "normalize_host", "base_url_parts"]

DEFAULT_HOSTS: dict[str, tuple[str, ...]] = {
    "aws": ("*.amazonaws.com", "amazonaws.com"),
    "anthropic": ("api.anthropic.com",),
}
_CACHE_LIMIT = 4096


@dataclass(frozen=True)
class Connection:
    """A ClaudeConnection as the sidecar uses it (spec plus where its files are mounted)."""

    name: str
    type: str
    namespace: str = "default"
    hosts: tuple[str, ...] = ()  # effective host patterns, lower case
    spec: Mapping[str, Any] = field(default_factory=dict, compare=False, hash=False)
    base_url: str | None = None
    reverse_port: int | None = None
    credentials_dir: str | None = None  # mounted Secret (None: nothing mounted)
    web_identity_token_file: str | None = None
    upstream_ca_file: str | None = None
    resource_version: str = ""

    def describe(self) -> dict[str, Any]:
        """What an agent is told about this connection in a refusal."""
        out: dict[str, Any] = {"name": self.name, "type": self.type, "hosts": list(self.hosts)}
        if self.base_url and self.reverse_port:
            out["baseURL"] = f"http://127.0.0.1:{self.reverse_port}"
        return out


def normalize_host(host: str) -> str:
    host = (host or "").strip().lower()
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    return host.rstrip(".")


def split_host(value: str) -> tuple[str, int | None]:
    """``'h:443'`` -> ``('h', 443)``; ``'[::1]:443'`` -> ``('::1', 443)``; bare names/IPv6 -> port None."""
    value = value.strip().lower()
    if value.startswith("["):
        inner, _, rest = value[1:].partition("]")
        port = rest[1:] if rest.startswith(":") else ""
        return inner, int(port) if port.isdigit() else None
    if value.count(":") == 1:
        name, _, port = value.partition(":")
        return name, int(port) if port.isdigit() else None
    return value, None


def base_url_parts(url: str) -> tuple[str, str, int, str]:
    """``https://h:8443/v1/`` -> ``("https", "h", 8443, "/v1")`` (path without trailing slash)."""
    parts = urlsplit(url)
    scheme = (parts.scheme or "https").lower()
    host = normalize_host(parts.hostname or "")
    port = parts.port or (443 if scheme == "https" else 80)
    return scheme, host, port, parts.path.rstrip("/")


def effective_hosts(spec: Mapping[str, Any]) -> tuple[str, ...]:
    """spec.hosts (or the type's defaults) plus the hosts of baseURL and aws.endpointURL."""
    hosts = list(spec.get("hosts") or DEFAULT_HOSTS.get(str(spec.get("type", "")), ()))
    for url in (spec.get("baseURL"), (spec.get("aws") or {}).get("endpointURL")):
        if isinstance(url, str) and url:
            netloc = urlsplit(url).netloc.rsplit("@", 1)[-1]
            if netloc:
                hosts.append(netloc)
    return tuple(dict.fromkeys(h.strip().lower() for h in hosts if isinstance(h, str) and h.strip()))


@dataclass(frozen=True)
class _Pattern:
    text: str
    host: str
    port: int | None
    literal: bool
    weight: int  # literal characters in a glob (specificity)
    connection: Connection

    def sort_key(self) -> tuple:
        return (0 if self.literal else 1, -self.weight, 0 if self.port is not None else 1,
                self.connection.name)


class RouteTable:
    """Host routing for one snapshot of connections. Immutable after construction."""

    def __init__(self, connections: Iterable[Connection]):
        self.connections: dict[str, Connection] = {c.name: c for c in sorted(connections, key=lambda c: c.name)}
        self.problems: list[str] = []
        self.overlaps: list[str] = []
        self._literal: dict[tuple[str, int | None], Connection] = {}
        self._globs: list[tuple[_Pattern, Any]] = []
        self._reverse: dict[int, Connection] = {}
        self._cache: dict[tuple[str, int], Connection | None] = {}
        patterns: list[_Pattern] = []
        for conn in self.connections.values():
            for text in conn.hosts:
                host, port = split_host(text)
                host = normalize_host(host)
                why: str | None
                if "/" in text:
                    why = "give a host name (optionally with :port), not a URL"
                elif ":" in text and port is None and not _is_ip(host):
                    why = "the port must be a number"
                else:
                    why = "empty host" if not host else None if _is_ip(host) else glob_error(host, "host")
                if why:
                    self.problems.append(f"ClaudeConnection {conn.name}: host {text!r} ignored: {why}")
                    continue
                literal = is_literal(host)
                weight = sum(1 for ch in host if ch not in "*?")
                patterns.append(_Pattern(text, host, port, literal, weight, conn))
            if conn.base_url and conn.reverse_port is not None:
                if conn.reverse_port in self._reverse:
                    other = self._reverse[conn.reverse_port].name
                    self.problems.append(f"ClaudeConnection {conn.name}: reverse port {conn.reverse_port} "
                                         f"already used by {other}")
                else:
                    self._reverse[conn.reverse_port] = conn
        for pattern in sorted(patterns, key=_Pattern.sort_key):
            if pattern.literal:
                key = (pattern.host, pattern.port)
                owner = self._literal.get(key)
                if owner is None:
                    self._literal[key] = pattern.connection
                elif owner.name != pattern.connection.name:
                    self.overlaps.append(f"host {pattern.text!r} is claimed by ClaudeConnections "
                                         f"{owner.name} and {pattern.connection.name}; {owner.name} wins")
            else:
                self._globs.append((pattern, compile_glob(pattern.host, "host")))

    def __len__(self) -> int:
        return len(self.connections)

    def match(self, host: str, port: int | None = None) -> Connection | None:
        """The connection covering ``host`` (a name or IP) on ``port``, or None."""
        name = normalize_host(host)
        if not name:
            return None
        key = (name, port or 0)
        if key in self._cache:
            return self._cache[key]
        found = self._lookup(name, port)
        if len(self._cache) >= _CACHE_LIMIT:
            self._cache.clear()
        self._cache[key] = found
        return found

    def _lookup(self, name: str, port: int | None) -> Connection | None:
        if port is not None and (hit := self._literal.get((name, port))) is not None:
            return hit
        if (hit := self._literal.get((name, None))) is not None:
            return hit
        if _is_ip(name):
            return None  # globs are for names: "*.example.com" must not match an IP
        for pattern, regex in self._globs:
            if pattern.port is not None and pattern.port != port:
                continue
            if regex.match(name):
                return pattern.connection
        return None

    def for_reverse_port(self, port: int) -> Connection | None:
        return self._reverse.get(port)

    @property
    def reverse(self) -> dict[int, Connection]:
        """Reverse-mode listeners: port -> connection (connections with baseURL and a port)."""
        return dict(self._reverse)

    def describe(self) -> list[dict[str, Any]]:
        return [c.describe() for c in self.connections.values()]


def _is_ip(value: str) -> bool:
    try:
        ipaddress.ip_address(value)
    except ValueError:
        return False
    return True
