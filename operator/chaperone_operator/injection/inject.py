"""`inject()`: a labelled pod in, the JSONPatch that puts it behind the Chaperone sidecar out.

A pure function, as Istio's injector: no I/O, no clock, no randomness, nothing derived from the
pod's name (absent for `generateName` pods) or namespace; the same input always yields the same
output. The webhook handler (elsewhere) only decodes the AdmissionReview, calls this, and
encodes the result, so dry-run requests need no special handling.

Idempotence is by construction rather than by trusting the `chaperone.dev/status` annotation
(which any client can write): the function removes whatever it owns (reserved `chaperone-`
containers and volumes) and rebuilds it, and every agent change is "set to" rather than "add".
Re-running it on its own output therefore yields no operation at all; a pod that merely *claims*
to be injected, or a copy of an injected pod created by someone else, is (re)injected and gets
the current creator. Refusals are returned as a reason, which the webhook turns into a denial.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from chaperone_sidecar import contract as c

from .agent import agent_env_plan, mutate_agent
from .connections import applicable_connections, plan_connections
from .patch import make_patch
from .settings import MAX_REVERSE_PORTS, InjectionSettings
from .sidecar import init_container, pod_volumes, sidecar_container

# Capabilities that defeat transparent mode; an agent asking for one is refused. Compared
# after `_cap_name`: runtimes accept "net_admin" and "CAP_NET_ADMIN" alike.
# NET_ADMIN/SYS_ADMIN/ALL: rewrite the pod's netfilter rules. NET_RAW: packet sockets
# (AF_PACKET) send frames below netfilter - a whole TCP/IP stack around the rules. SETUID:
# become the sidecar UID, the one UID the rules exempt.
_NET_BYPASS_CAPS = {"NET_ADMIN", "SYS_ADMIN", "ALL", "NET_RAW", "SETUID"}
# What runtimes grant by default and transparent mode takes away from every agent: NET_RAW and
# SETUID (above). With allowPrivilegeEscalation false (no_new_privs) no setuid binary - which
# a root agent could chown to the sidecar UID and chmod u+s - changes its UID on exec either.
_TRANSPARENT_AGENT_DROP = ("NET_RAW", "SETUID")


def _cap_name(cap: Any) -> str:
    return str(cap).strip().upper().removeprefix("CAP_")


@dataclass(frozen=True)
class InjectionResult:
    """The outcome: a patch and the mutated pod, or a refusal reason (then pod/patch empty)."""

    patch: list[dict[str, Any]]
    pod: dict[str, Any] | None
    status: dict[str, Any] | None = None
    refused: str | None = None

    @property
    def allowed(self) -> bool:
        return self.refused is None


def _refuse(reason: str) -> InjectionResult:
    return InjectionResult(patch=[], pod=None, status=None, refused=reason)


def _json(value: Any) -> str:
    return json.dumps(value, sort_keys=True, separators=(",", ":"))


def creator_of(user_info: Mapping[str, Any] | None) -> dict[str, Any]:
    """The normalised admission userInfo (groups sorted; `{}` when unknown)."""
    if not user_info:
        return {}
    creator: dict[str, Any] = {"username": user_info.get("username", "")}
    if user_info.get("uid"):
        creator["uid"] = user_info["uid"]
    creator["groups"] = sorted(user_info.get("groups") or [])
    if user_info.get("extra"):
        creator["extra"] = {k: list(v) for k, v in sorted(user_info["extra"].items())}
    return creator


def _is_api_token_volume(volume: Mapping[str, Any], settings: InjectionSettings) -> bool:
    """A projected volume holding a token the API server accepts (no or an API audience)."""
    for source in (volume.get("projected") or {}).get("sources") or []:
        token = source.get("serviceAccountToken")
        if token is not None and (not token.get("audience")
                                  or token["audience"] in settings.api_audiences):
            return True
    return False


def _check(spec: Mapping[str, Any], agents: Sequence[Mapping[str, Any]], mode: str,
           settings: InjectionSettings, sa_volumes: set[str]) -> str | None:
    """Why the pod cannot be injected safely, or None."""
    for flag in ("hostNetwork", "hostPID", "shareProcessNamespace"):
        if spec.get(flag):
            # hostNetwork: the sidecar ports and iptables rules would be the node's;
            # shared PIDs: agents could read the sidecar's memory and mounted credentials.
            return f"spec.{flag} is not allowed for pods behind the Chaperone sidecar"
    for container in spec.get("containers") or []:
        if str(container.get("name", "")).startswith(c.RESERVED_PREFIX):
            return (f"container name {container['name']!r}: names starting with "
                    f"{c.RESERVED_PREFIX!r} are reserved for Chaperone")
    for container in spec.get("initContainers") or []:
        name = str(container.get("name", ""))
        if name.startswith(c.RESERVED_PREFIX) and name not in (c.SIDECAR_NAME, c.INIT_NAME):
            return (f"init container name {name!r}: names starting with "
                    f"{c.RESERVED_PREFIX!r} are reserved for Chaperone")
    pod_sc = spec.get("securityContext") or {}
    if pod_sc.get("runAsUser") == settings.sidecar_uid:
        return (f"spec.securityContext.runAsUser {settings.sidecar_uid} is the Chaperone sidecar "
                "UID, reserved for the sidecar")
    volumes = {v.get("name"): v for v in spec.get("volumes") or []}
    if reason := _sidecar_secret_use(spec, agents, settings):
        return reason
    own_ports = {settings.proxy_port, settings.health_port}
    own_ports |= set(range(settings.reverse_port_base,
                           settings.reverse_port_base + MAX_REVERSE_PORTS))
    for agent in agents:
        where = f"container {agent.get('name')!r}"
        sc = agent.get("securityContext") or {}
        if sc.get("runAsUser") == settings.sidecar_uid:
            return f"{where}: runAsUser {settings.sidecar_uid} is reserved for the sidecar"
        if mode == "transparent":
            caps = {_cap_name(cap) for cap in (sc.get("capabilities") or {}).get("add") or []}
            if sc.get("privileged") or caps & _NET_BYPASS_CAPS:
                return (f"{where}: privileged agents and agents adding NET_ADMIN, SYS_ADMIN, "
                        "NET_RAW or SETUID could remove or go around the transparent-mode "
                        "netfilter rules")
        for port in agent.get("ports") or []:
            if port.get("containerPort") in own_ports:
                return (f"{where}: port {port['containerPort']} is used by the Chaperone "
                        "sidecar")
        for mount in agent.get("volumeMounts") or []:
            vname, path = mount.get("name"), str(mount.get("mountPath", "")).rstrip("/")
            if vname in sa_volumes or str(vname).startswith(c.RESERVED_PREFIX):
                continue  # the SA plugin's token and webhook-owned volumes: removed, not refused
            if path == c.TRUST_DIR or path.startswith(c.TRUST_DIR + "/"):
                return f"{where}: {c.TRUST_DIR} is where Chaperone mounts its CA bundle"
            if path == c.SA_TOKEN_MOUNT_PATH:
                return (f"{where}: agent containers get no service-account token; nothing may "
                        f"be mounted at {c.SA_TOKEN_MOUNT_PATH}")
            if vname in volumes and _is_api_token_volume(volumes[vname], settings):
                return (f"{where}: volume {vname!r} holds a Kubernetes API token; agent "
                        "containers reach the API only through a kubernetes connection")
    return None


def _secret_names(volume: Mapping[str, Any]) -> set[str]:
    names = {(volume.get("secret") or {}).get("secretName")}
    names |= {(source.get("secret") or {}).get("name")
              for source in (volume.get("projected") or {}).get("sources") or []}
    return {n for n in names if n}


def _sidecar_secret_use(spec: Mapping[str, Any], agents: Sequence[Mapping[str, Any]],
                        settings: InjectionSettings) -> str | None:
    """An agent container reading a Secret that belongs to the sidecar: the Redis password (the
    agent could then write grants into Redis), the interception CA's key, the sidecar's
    credentials. The webhook never gives them to agents; a pod spec must not either."""
    owned = {settings.redis_secret, settings.ca_secret_name, settings.sidecar_secret} - {""}
    if not owned:
        return None
    volumes = {v.get("name"): _secret_names(v) & owned for v in spec.get("volumes") or []
               if not str(v.get("name", "")).startswith(c.RESERVED_PREFIX)}
    for agent in agents:
        where = f"container {agent.get('name')!r}"
        used = set()
        for env in agent.get("env") or []:
            used.add(((env.get("valueFrom") or {}).get("secretKeyRef") or {}).get("name"))
        for source in agent.get("envFrom") or []:
            used.add((source.get("secretRef") or {}).get("name"))
        for mount in agent.get("volumeMounts") or []:
            used |= volumes.get(mount.get("name"), set())
        if hit := sorted(n for n in used & owned if n):
            return (f"{where}: Secret {hit[0]!r} belongs to the Chaperone sidecar (Redis "
                    "password, interception CA or sidecar credentials); agent containers must "
                    "not read it")
    return None


def _confine_transparent_agent(agent: dict[str, Any]) -> dict[str, Any]:
    """Keep a transparent-mode agent from going around its netfilter rules by privilege:
    `allowPrivilegeEscalation: false` and NET_RAW and SETUID dropped (set in place; an agent
    *adding* them was refused before). Returns the user's previous values that changed,
    keyed like the status' `overridden`."""
    sc = dict(agent.get("securityContext") or {})
    changed: dict[str, Any] = {}
    if sc.get("allowPrivilegeEscalation") is not False:
        if "allowPrivilegeEscalation" in sc:
            changed["securityContext.allowPrivilegeEscalation"] = sc["allowPrivilegeEscalation"]
        sc["allowPrivilegeEscalation"] = False
    caps = dict(sc.get("capabilities") or {})
    drop = list(caps.get("drop") or [])
    dropped = {_cap_name(cap) for cap in drop}
    if "ALL" not in dropped:
        missing = [cap for cap in _TRANSPARENT_AGENT_DROP if cap not in dropped]
        if missing:
            caps["drop"] = drop + missing
    sc["capabilities"] = caps
    agent["securityContext"] = sc
    return changed


def _previous_status(annotations: Mapping[str, str]) -> dict[str, Any]:
    try:
        previous = json.loads(annotations.get(c.STATUS_ANNOTATION, ""))
    except ValueError:
        return {}
    return previous if isinstance(previous, dict) else {}


def _carry_over(previous: Mapping[str, Any], overridden: dict[str, dict[str, Any]],
                removed: set[str]) -> None:
    """Keep what an earlier injection recorded (the original user values), so re-injecting an
    injected pod reproduces the same status. Informational only; never trusted for decisions."""
    prev_over = previous.get("overridden")
    if isinstance(prev_over, dict):
        for container, values in prev_over.items():
            if isinstance(values, dict) and container in overridden:
                overridden[container] = {**values, **overridden[container]}
    prev_removed = previous.get("removedVolumes")
    if isinstance(prev_removed, list):
        removed.update(str(v) for v in prev_removed)


def inject(pod: Mapping[str, Any], settings: InjectionSettings,
           connections: Sequence[Mapping[str, Any]],
           user_info: Mapping[str, Any] | None = None) -> InjectionResult:
    """Inject the Chaperone sidecar into `pod` (the admission request's object).

    `connections`: the ClaudeConnections of the pod's namespace (filtered here by podSelector);
    `user_info`: the admission request's userInfo, recorded as the pod's creator.
    """
    new: dict[str, Any] = copy.deepcopy(dict(pod))
    meta = new.setdefault("metadata", {})
    spec = new.setdefault("spec", {})
    annotations: dict[str, str] = dict(meta.get("annotations") or {})
    labels: dict[str, str] = dict(meta.get("labels") or {})

    mode = annotations.get(c.MODE_ANNOTATION, settings.default_mode)
    if mode not in c.MODES:
        return _refuse(f"annotation {c.MODE_ANNOTATION} must be one of {', '.join(c.MODES)}, "
                       f"not {mode!r}")
    approval_mode = annotations.get(c.APPROVAL_MODE_ANNOTATION, settings.approval_mode)
    if approval_mode not in c.APPROVAL_MODES:
        return _refuse(f"annotation {c.APPROVAL_MODE_ANNOTATION} must be one of "
                       f"{', '.join(c.APPROVAL_MODES)}, not {approval_mode!r}")

    plans = plan_connections(applicable_connections(connections, labels),
                             settings.reverse_port_base)
    if sum(1 for p in plans if p.reverse_port) > MAX_REVERSE_PORTS:
        return _refuse(f"more than {MAX_REVERSE_PORTS} reverse-mode (baseURL) connections")

    user_inits = [ct for ct in spec.get("initContainers") or []
                  if not str(ct.get("name", "")).startswith(c.RESERVED_PREFIX)]
    agents = user_inits + list(spec.get("containers") or [])
    volumes = list(spec.get("volumes") or [])
    # The ServiceAccount admission plugin runs before mutating webhooks, so a pod without
    # automountServiceAccountToken: false arrives with a kube-api-access-* volume mounted into
    # every container. Those volumes are removed; any other API-token volume is refused.
    sa_volumes = {v["name"] for v in volumes
                  if str(v.get("name", "")).startswith(c.SA_PLUGIN_VOLUME_PREFIX)
                  and _is_api_token_volume(v, settings)}
    reason = _check(spec, agents, mode, settings, sa_volumes)
    if reason:
        return _refuse(reason)

    creator = creator_of(user_info)
    creator_json = _json(creator)
    env_plan = agent_env_plan(mode, settings.proxy_port, plans)
    dropped = sa_volumes | {str(v.get("name")) for v in volumes
                            if str(v.get("name", "")).startswith(c.RESERVED_PREFIX)}
    overridden: dict[str, dict[str, Any]] = {}
    for agent in agents:  # the deep copies inside `new`: mutated in place
        changed = mutate_agent(agent, env_plan, dropped)
        if mode == "transparent":
            changed.update(_confine_transparent_agent(agent))
        overridden[agent.get("name", "")] = changed
    removed = set(sa_volumes)
    previous = _previous_status(annotations)
    _carry_over(previous, overridden, removed)
    overridden = {k: v for k, v in sorted(overridden.items()) if v}

    ours = [sidecar_container(settings, mode, approval_mode, plans, creator_json)]
    if mode == "transparent":
        ours.insert(0, init_container(settings))
    spec["initContainers"] = ours + user_inits
    new_volumes = [v for v in volumes if v.get("name") not in dropped]
    spec["volumes"] = new_volumes + pod_volumes(settings, plans)
    # Pod-level switch: also keeps the ServiceAccount plugin (re-run after a webhook mutates
    # the pod) from mounting a token into the containers added here.
    spec["automountServiceAccountToken"] = False

    status = {
        "version": settings.version,
        "image": settings.sidecar_image,
        "mode": mode,
        "sidecar": c.SIDECAR_NAME,
        "initContainers": [ct["name"] for ct in ours],
        "agentContainers": [a.get("name", "") for a in agents],
        "connections": [p.name for p in plans],
        # No applicable connection: still injected; the sidecar then refuses every request
        # (no connection covers any host), so the pod can never reach a target unwatched.
        "denyAll": not plans,
        "proxyPort": settings.proxy_port,
        "overridden": overridden,
        "removedVolumes": sorted(removed),
    }
    annotations[c.STATUS_ANNOTATION] = _json(status)
    # Always the admission userInfo, whatever the client sent under this key (spoofing).
    annotations[c.CREATOR_ANNOTATION] = creator_json
    meta["annotations"] = annotations
    return InjectionResult(patch=make_patch(pod, new), pod=new, status=status)
