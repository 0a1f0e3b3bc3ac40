"""What the webhook does to every agent container (every container it did not add itself,
including the user's init containers, which also run behind the sidecar).

Why forcing some variables and merely defaulting others:
* Proxy and CA variables are *forced*, because an agent must not be able to opt out of the
  gateway by shipping its own HTTPS_PROXY or CA bundle. The user's previous value is recorded
  in the status annotation (credentials in proxy URLs redacted) so nothing is lost silently.
* Placeholder credentials and regions are *defaults*: added only when the container's env does
  not already configure them, so SDKs sign requests at all (the sidecar strips and re-signs).

Every function here is pure; `mutate_agent` edits the dict it is given (a deep copy owned by
`inject`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from chaperone_sidecar import contract as c

from .connections import ConnectionPlan, no_proxy_entry_reaches
from .sidecar import trust_mount


@dataclass(frozen=True)
class AgentEnvPlan:
    """The environment decisions shared by all agent containers of one pod."""

    forced: tuple[tuple[str, str], ...]      # (name, value): replace or append
    defaults: tuple[tuple[tuple[str, ...], tuple[tuple[str, str], ...]], ...] = ()
    # defaults: (guard names, (name, value)...): appended only if no guard name is in env
    no_proxy: bool = False                   # merge NO_PROXY/no_proxy (explicit mode)
    connection_hosts: tuple[str, ...] = field(default=())


def agent_env_plan(mode: str, proxy_port: int, plans: Sequence[ConnectionPlan]) -> AgentEnvPlan:
    proxy_url = f"http://127.0.0.1:{proxy_port}"
    # Transparent mode: an *empty* value, not a removed variable, so a proxy coming from envFrom
    # (which `env` overrides) is neutralised too; every common client treats "" as unset.
    proxy_value = proxy_url if mode == "explicit" else ""
    forced = [(name, proxy_value) for name in c.PROXY_VARS]
    forced += [(name, c.TRUST_FILE) for name in c.CA_VARS]
    reverse_anthropic = [p for p in plans if p.type == "anthropic" and p.reverse_port]
    if reverse_anthropic:
        # Several reverse-mode anthropic connections: the first by name wins (documented).
        forced.append((c.ANTHROPIC_BASE_URL_VAR,
                       f"http://127.0.0.1:{reverse_anthropic[0].reverse_port}"))
    postgres = [p for p in plans if p.type == "postgres" and p.postgres_port]
    if postgres:
        # libpq's defaults point at the sidecar's listener of the first postgres connection by
        # name (forced, like ANTHROPIC_BASE_URL: a PGHOST of the real server must not bypass it).
        forced += [(c.POSTGRES_HOST_VAR, "127.0.0.1"),
                   (c.POSTGRES_PORT_VAR, str(postgres[0].postgres_port))]
    defaults: list[tuple[tuple[str, ...], tuple[tuple[str, str], ...]]] = []
    aws = [p for p in plans if p.type == "aws"]
    if aws:
        defaults.append((c.AWS_CREDENTIAL_VARS,
                         tuple((name, c.PLACEHOLDER) for name in c.AWS_PLACEHOLDER_VARS)))
        region = next((p.region for p in aws if p.region), None)
        if region:
            defaults.append((c.AWS_REGION_VARS, tuple((n, region) for n in c.AWS_REGION_VARS)))
    if any(p.type == "anthropic" for p in plans):
        defaults.append((c.ANTHROPIC_CREDENTIAL_VARS, ((c.ANTHROPIC_KEY_VAR, c.PLACEHOLDER),)))
    hosts = tuple(h for p in plans for h in p.hosts)
    return AgentEnvPlan(tuple(forced), tuple(defaults), mode == "explicit", hosts)


def redact(value: str) -> str:
    """A URL's password replaced by "REDACTED" (proxy URLs may carry credentials)."""
    try:
        parts = urlsplit(value)
    except ValueError:
        return value
    if parts.password is None:
        return value
    netloc = f"{parts.username}:REDACTED@{parts.hostname or ''}"
    if parts.port is not None:
        netloc += f":{parts.port}"
    return urlunsplit(parts._replace(netloc=netloc))


def _recorded(entry: dict[str, Any]) -> Any:
    if "valueFrom" in entry:
        return {"valueFrom": entry["valueFrom"]}
    return redact(str(entry.get("value", "")))


def _env(name: str, value: str) -> dict[str, Any]:
    # The API server drops an empty "value" (omitempty); "defined but empty" is {"name": N}.
    # Emitting that canonical form keeps the stored pod equal to the one computed here.
    return {"name": name, "value": value} if value else {"name": name}


def merge_no_proxy(values: Sequence[str], hosts: Sequence[str]) -> str:
    """The user's NO_PROXY entries, minus any that reach a connection host, plus loopback."""
    entries: list[str] = []
    for value in values:
        for item in value.split(","):
            item = item.strip()
            if item and item not in entries and not no_proxy_entry_reaches(item, hosts):
                entries.append(item)
    entries += [d for d in c.NO_PROXY_DEFAULTS if d not in entries]
    return ",".join(entries)


def mutate_agent(container: dict[str, Any], plan: AgentEnvPlan,
                 dropped_volumes: set[str]) -> dict[str, Any]:
    """Apply the agent treatment to `container` in place; returns {VAR: previous user value}
    for every user value the webhook changed."""
    env: list[dict[str, Any]] = [dict(e) for e in container.get("env") or []]
    overridden: dict[str, Any] = {}

    def force(name: str, value: str) -> None:
        found = False
        for entry in env:
            if entry.get("name") != name:
                continue
            found = True
            if "valueFrom" in entry or entry.get("value", "") != value:
                overridden[name] = _recorded(entry)  # several duplicates: the last one wins
            entry.pop("valueFrom", None)
            entry.pop("value", None)
            entry.update(_env(name, value))
        if not found:
            env.append(_env(name, value))

    for name, value in plan.forced:
        force(name, value)
    if plan.no_proxy:
        # Literal user values are merged; a valueFrom cannot be read by a pure webhook and is
        # replaced (and recorded). NO_PROXY from envFrom is likewise shadowed by ours.
        existing = [e.get("value", "") for e in env
                    if e.get("name") in c.NO_PROXY_VARS and "valueFrom" not in e]
        merged = merge_no_proxy(existing, plan.connection_hosts)
        for name in c.NO_PROXY_VARS:
            force(name, merged)
    names = {e.get("name") for e in env}
    for guards, pairs in plan.defaults:
        if not names.intersection(guards):
            for name, value in pairs:
                env.append({"name": name, "value": value})
    container["env"] = env

    # No API credential for agents: drop mounts of the ServiceAccount plugin's token volume
    # (and of any webhook-owned volume left over from a copied pod), then add the trust bundle.
    mounts = [dict(m) for m in container.get("volumeMounts") or []
              if m.get("name") not in dropped_volumes
              and not str(m.get("name", "")).startswith(c.RESERVED_PREFIX)]
    mounts.append(trust_mount())
    container["volumeMounts"] = mounts
    return overridden
