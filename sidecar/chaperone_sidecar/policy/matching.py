"""The compiled form of AccessPolicies: matchers built once, used on every flow.

:func:`build_policy` turns a validated, defaulted AccessPolicy (see :mod:`.compiler`) into a
:class:`CompiledPolicy`: each rule's ``match`` becomes a tuple of :class:`Condition` tests (cheap
and selective ones first), its effect becomes ready-made model values (``ApprovalRequirement``,
``MaskSpec``, ``RateLimit``) with the CRD defaults and the policy-level fallbacks resolved.

Speed: the conditions on the connection type (``match.aws`` / ``match.kubernetes`` /
``match.anthropic`` sections), ``methods``, ``aws.actions`` and ``hosts`` depend on a few request
values only, so a policy decides them once per bucket - (type, method, AWS action), then host -
and keeps the surviving rules; a request only runs the remaining tests (paths, regexes,
resources, subjects...) of the rules in its bucket. Buckets are built on first use and kept in
bounded dicts (agents can send any method or host; a miss costs one pass over the rules).

Matching semantics worth knowing:

* Empty lists are the same as absent fields (not checked).
* Paths are matched in their canonical form (:func:`.classify.paths.canonical_path`, the one
  function every classifier uses: unreserved characters decoded, slashes collapsed, dot segments
  resolved), so ``//admin``, ``/%61dmin`` and ``/x/../admin`` cannot dodge ``/admin``. On a
  connection with ``pathNormalization.caseInsensitive`` (``Action.path_case_insensitive``)
  ``paths`` and ``pathRegex`` ignore case, so ``/ADMIN`` cannot dodge it either.
* A condition on a field the request does not have never holds (``namespaces`` for a
  cluster-scoped call, ``aws.resources`` when no resource was derived, ``models`` with no model).
* Multi-valued fields (``aws.resources``, ``anthropic.tools``): a restricting rule (block,
  requireApproval, mask, rateLimit) matches when ANY value matches; an ``allow`` rule only when
  EVERY value matches, so allowing ``bucket-a/*`` never lets a call that also touches
  ``bucket-b`` through.
* ``match.anthropic.toolUses``/``toolInputRegex`` make a *tool-use rule*
  (:mod:`.matching_tool_use`): judged on the tool_use blocks of the answer, never on the
  request (rank 0, left out of both candidate lists); :mod:`.tool_use` picks and applies them.
* ``match.git`` conditions (:mod:`.matching_git`) hold only on ``http`` connections' git
  requests; refs, operations and forcePush are tested together on each ref update.
* ``kubernetes.commands`` is tested on each simple command the exec runs
  (:func:`.classify.kubernetes.command_units`: the argv, a shell's ``-c`` script split into
  commands, wrappers such as ``env``/``timeout`` seen through); a unit matches when any of its
  forms (joined argv, ``argv[0]``, their base-name variants) matches. Restricting rules: any
  unit; allow: every unit - ``allow ["ls *"]`` never lets ``sh -c 'ls; rm -rf /'`` through.
* Fail closed on what the kubelet decides, not the request: an exec/attach without
  ``container=`` runs in the pod's default container, which may be the one a rule names, so
  ``kubernetes.containers`` holds for a restricting rule (never for allow); it never holds for
  a port-forward (the pod's network namespace is every container's); a SPDY
  port-forward names its ports per stream, not in the URL, so at the handshake
  ``kubernetes.ports`` holds for allow rules only - each stream's port is judged again when it
  opens (``addons/sessions.py``).
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from .classify.kubernetes import CONNECT_SUBRESOURCES, command_units
from .classify.paths import canonical_path, path_rules
from .globs import GlobKind, GlobSet
from .globs import match as glob_match
from .globs import quote as _q
from .matching_git import git_conditions
from .matching_mcp import mcp_condition
from .matching_postgres import postgres_conditions
from .matching_tool_use import ToolUseMatch, tool_use_match
from .model import Action, ApprovalRequirement, Approvers, Identity, MaskSpec, RateLimit, RuleRef

RANK = {"allow": 1, "require_approval": 2, "block": 3}  # decision strength; 0 = not a decision
_CACHE_LIMIT = 4096


def normalize_path(path: str, connection_type: str = "http") -> str:
    """The canonical path rules match (the path unchanged when it is ambiguous: the sidecar
    refuses such requests before they are judged, see addons/route.py)."""
    canonical, problem = canonical_path(path, path_rules(connection_type))
    return path if problem else canonical


class MatchContext:
    """Per-request values derived once and shared by every rule test."""

    __slots__ = ("action", "identity", "body", "host", "path", "target", "fold", "_texts")

    def __init__(self, action: Action, identity: Identity, body: bytes = b""):
        self.action = action
        self.identity = identity
        self.body = body
        self.host = action.host.rstrip(".").lower()
        self.path = normalize_path(action.path, action.connection_type)
        self.fold = action.path_case_insensitive
        self.target = f"{self.path}?{action.query}" if action.query else self.path  # for pathRegex
        self._texts: dict[int, str] | None = None

    def body_text(self, limit: int) -> str:
        """The first ``limit`` body bytes as text (for bodyRegex), decoded once per limit."""
        texts = self._texts if self._texts is not None else {}
        self._texts = texts
        if limit not in texts:
            texts[limit] = self.body[:limit].decode("utf-8", errors="replace")
        return texts[limit]


class SubjectMatcher:
    """``subjects`` entries: service account ("ns/name" or "name" = policy namespace), user
    (the pod's creator or the on-behalf-of user), group (of either). Any entry may match."""

    __slots__ = ("entries", "_sas", "_users", "_groups")

    def __init__(self, entries: list[dict], namespace: str):
        self.entries = tuple(entries)
        sas = [e["serviceAccount"] for e in entries if "serviceAccount" in e]
        sas = [sa if "/" in sa else f"{namespace}/{sa}" for sa in sas]
        users = [e["user"] for e in entries if "user" in e]
        self._sas = GlobSet(sas) if sas else None
        self._users = GlobSet(users) if users else None
        self._groups = frozenset(e["group"] for e in entries if "group" in e)

    def why(self, identity: Identity) -> str | None:
        """Which identity attribute matched (for explanations), or ``None``."""
        sa = identity.service_account
        if self._sas is not None and sa and self._sas.match(sa):
            return f"serviceAccount {sa}"
        if self._users is not None:
            for label, user in (("creator", identity.creator), ("on-behalf-of", identity.on_behalf_of)):
                if user and self._users.match(user):
                    return f"user {user} ({label})"
        if self._groups:
            for group in identity.creator_groups + identity.on_behalf_of_groups:
                if group in self._groups:
                    return f"group {group}"
        return None

    def matches(self, identity: Identity) -> bool:
        return self.why(identity) is not None


@dataclass(frozen=True, slots=True)
class Condition:
    """One ``match`` field: its path, the patterns as written, its test and the tested value."""

    field: str
    patterns: tuple[str, ...]
    test: Callable[[MatchContext], bool]
    value: Callable[[MatchContext], object]
    indexed: bool = False  # decided by bucketing, so left out of the per-request tests


@dataclass(frozen=True, eq=False)
class CompiledRule:
    ref: RuleRef
    index: int
    effect: str  # allow | block | require_approval | mask | rate_limit
    conditions: tuple[Condition, ...]
    connection_type: str | None = None  # only this connection type can match
    methods: frozenset[str] | None = None  # only these methods can match
    actions: GlobSet | None = None  # only AWS actions these match can match
    hosts: GlobSet | None = None  # only hosts these match can match
    message: str = ""
    approval: ApprovalRequirement | None = None
    mask: MaskSpec | None = None
    rate_limit: RateLimit | None = None
    tests: tuple[Callable[[MatchContext], bool], ...] = ()
    rank: int = 0  # RANK of the effect (a field, not a property: read in the hot loop)
    # match.anthropic.toolUses/toolInputRegex: judged on the response's tool_use blocks
    # (.matching_tool_use), never a decision about the request (rank 0)
    tool_use: ToolUseMatch | None = None

    def matches(self, ctx: MatchContext) -> bool:
        for test in self.tests:
            if not test(ctx):
                return False
        return True


# (decision rules, mask/rateLimit rules) of one (type, method, action, host) bucket
_Hit = tuple[tuple[CompiledRule, ...], tuple[CompiledRule, ...]]


@dataclass(eq=False)
class CompiledPolicy:
    key: str  # "namespace/name": the RuleRef policy and the precedence tie-breaker
    namespace: str
    connections: GlobSet | None
    subjects: SubjectMatcher | None
    default_effect: str
    masking: MaskSpec | None
    rules: tuple[CompiledRule, ...]
    spec: dict  # the validated spec with CRD defaults filled (for status and display)
    _buckets: dict[tuple[str, str, str], tuple[dict[str, _Hit], list[CompiledRule]]] = field(
        default_factory=dict, repr=False)

    def applies(self, connection: str, identity: Identity) -> bool:
        if self.connections is not None and not self.connections.match(connection):
            return False
        return self.subjects is None or self.subjects.matches(identity)

    def candidates(self, ctype: str, method: str, action: str,
                   host: str) -> tuple[tuple[CompiledRule, ...], tuple[CompiledRule, ...]]:
        """(decision rules, mask/rateLimit rules) that can match this bucket, in rule order.

        ``action`` is the lower-cased AWS action ("" for other calls), ``host`` the lower-cased
        host without a trailing dot.
        """
        outer = self._buckets.get((ctype, method, action))
        if outer is None:
            if len(self._buckets) >= _CACHE_LIMIT:
                self._buckets.clear()
            outer = ({}, [r for r in self.rules
                          if (r.connection_type is None or r.connection_type == ctype)
                          and (r.methods is None or method in r.methods)
                          and (r.actions is None or (action != "" and _action_fits(r, action)))])
            self._buckets[(ctype, method, action)] = outer
        by_host, fits = outer
        hit = by_host.get(host)
        if hit is None:
            if len(by_host) >= _CACHE_LIMIT:
                by_host.clear()
            fits = [r for r in fits if r.hosts is None or r.hosts.match(host)]
            hit = by_host[host] = (tuple(r for r in fits if r.rank),
                                   tuple(r for r in fits if not r.rank and r.tool_use is None))
        return hit


def _action_fits(rule: CompiledRule, action: str) -> bool:
    """Whether a rule's ``aws.actions`` can match ``action`` (lower-cased "service:operation").

    Fail closed: a call whose operation could not be classified ("service:*") may be any
    operation of that service, so every block or requireApproval rule naming the service
    applies to it, while an allow rule needs a pattern that covers the whole service.
    """
    assert rule.actions is not None  # only rules with aws.actions get here
    if rule.actions.match(action):
        return True
    if not action.endswith(":*") or rule.effect not in ("block", "require_approval"):
        return False
    service = action[:-2]
    return any(glob_match(p.split(":", 1)[0], service, "name", True) for p in rule.actions.patterns)


class CompiledPolicySet:
    """All compiled policies of one scope, ordered by key (the precedence tie-breaker)."""

    def __init__(self, policies=()):
        self.policies: tuple[CompiledPolicy, ...] = tuple(sorted(policies, key=lambda p: p.key))
        keys = [p.key for p in self.policies]
        if len(set(keys)) != len(keys):
            raise ValueError(f"duplicate AccessPolicy keys: {sorted(k for k in keys if keys.count(k) > 1)}")
        self._applicable: dict[tuple[str, Identity], tuple[CompiledPolicy, ...]] = {}

    def applicable(self, connection: str, identity: Identity) -> tuple[CompiledPolicy, ...]:
        key = (connection, identity)
        hit = self._applicable.get(key)
        if hit is None:
            if len(self._applicable) >= _CACHE_LIMIT:
                self._applicable.clear()
            hit = self._applicable[key] = tuple(p for p in self.policies if p.applies(connection, identity))
        return hit

    def __iter__(self):
        return iter(self.policies)

    def __len__(self) -> int:
        return len(self.policies)


# ---------------------------------------------------------------------------- building

def _kube(ctx: MatchContext):
    k = ctx.action.kubernetes
    return k if k is not None and k.is_resource_request else None


# field -> (value getter, glob kind, ignore case); getters return None when the request lacks it
_SINGLE: dict[str, tuple[Callable[[MatchContext], str | None], GlobKind, bool]] = {
    "match.methods": (lambda c: c.action.method, "name", False),
    "match.aws.actions": (lambda c: c.action.aws.action if c.action.aws else None, "name", True),
    "match.kubernetes.verbs": (lambda c: c.action.kubernetes.verb if c.action.kubernetes else None, "name", False),
    "match.hosts": (lambda c: c.host, "host", True),
    "match.paths": (lambda c: c.path, "path", False),
    "match.aws.regions": (lambda c: c.action.aws.region if c.action.aws else None, "name", False),
    "match.kubernetes.apiGroups": (lambda c: k.api_group if (k := _kube(c)) else None, "name", False),
    "match.kubernetes.resources": (
        lambda c: ((f"{k.resource}/{k.subresource}" if k.subresource else k.resource)
                   if (k := _kube(c)) and k.resource else None),
        "name", False),
    "match.kubernetes.namespaces": (lambda c: (k.namespace or None) if (k := _kube(c)) else None, "name", False),
    "match.kubernetes.names": (lambda c: (k.name or None) if (k := _kube(c)) else None, "name", False),
}
_MULTI: dict[str, Callable[[MatchContext], tuple[str, ...]]] = {
    "match.anthropic.models": lambda c: a.models if (a := c.action.anthropic) else (),
    "match.aws.resources": lambda c: c.action.aws.resources if c.action.aws else (),
    "match.anthropic.tools": lambda c: tuple(dict.fromkeys(a.tools + a.tool_uses)) if (a := c.action.anthropic) else (),
}


def _connect(ctx: MatchContext):
    k = _kube(ctx)
    return k if k is not None and k.subresource in CONNECT_SUBRESOURCES else None


def _container_test(globs: GlobSet, effect: str) -> Callable[[MatchContext], bool]:
    def test(ctx: MatchContext) -> bool:
        k = _connect(ctx)
        if k is None or k.subresource == "portforward":  # a pod's ports, not a container's
            return False
        if not k.container:  # the pod's default container: maybe the named one
            return effect != "allow"
        return globs.match(k.container)
    return test


def _command_test(globs: GlobSet, effect: str) -> Callable[[MatchContext], bool]:
    def unit_matches(unit: tuple[str, ...]) -> bool:
        return any(map(globs.match, unit))

    def test(ctx: MatchContext) -> bool:
        k = _connect(ctx)
        if k is None or not k.command:
            return False
        units = command_units(k.command)
        return all(map(unit_matches, units)) if effect == "allow" else any(map(unit_matches, units))
    return test


def _ports_test(globs: GlobSet, effect: str) -> Callable[[MatchContext], bool]:
    def test(ctx: MatchContext) -> bool:
        k = _connect(ctx)
        if k is None or k.subresource != "portforward":
            return False
        if not k.ports:  # a SPDY tunnel: each stream's port is judged when it opens
            return effect == "allow"
        return all(map(globs.match, k.ports)) if effect == "allow" else any(map(globs.match, k.ports))
    return test


_CONNECT_FIELDS: dict[str, tuple[Callable[[GlobSet, str], Callable[[MatchContext], bool]],
                                  Callable[[MatchContext], object]]] = {
    "match.kubernetes.containers": (_container_test,
                                    lambda c: (k.container or "(default)") if (k := _connect(c)) else None),
    "match.kubernetes.commands": (_command_test,
                                  lambda c: command_units(k.command) if (k := _connect(c)) else None),
    "match.kubernetes.ports": (_ports_test, lambda c: k.ports if (k := _connect(c)) else None),
}


def _single_test(globs: GlobSet, get) -> Callable[[MatchContext], bool]:
    match = globs.match

    def test(ctx: MatchContext) -> bool:
        value = get(ctx)
        return value is not None and match(value)
    return test


def _path_test(exact: Callable[[MatchContext], bool],
               folded: Callable[[MatchContext], bool]) -> Callable[[MatchContext], bool]:
    def test(ctx: MatchContext) -> bool:
        return folded(ctx) if ctx.fold else exact(ctx)
    return test


def _multi_test(globs: GlobSet, get, every: bool) -> Callable[[MatchContext], bool]:
    match = globs.match

    def test(ctx: MatchContext) -> bool:
        values = get(ctx)
        if not values:
            return False
        return all(map(match, values)) if every else any(map(match, values))
    return test


def _conditions(match: dict, effect: str, namespace: str, body_limit: int) -> list[Condition]:
    flat: dict[str, Any] = {"match.subjects": match.get("subjects"), "match.methods": match.get("methods"),
            "match.hosts": match.get("hosts"), "match.paths": match.get("paths")}
    for section in ("aws", "kubernetes", "anthropic"):
        for key, value in (match.get(section) or {}).items():
            flat[f"match.{section}.{key}"] = value
    out: list[Condition] = []
    if flat.pop("match.subjects"):
        subjects = SubjectMatcher(match["subjects"], namespace)
        out.append(Condition("match.subjects", tuple(f"{k}={v}" for e in match["subjects"] for k, v in e.items()),
                             lambda c: subjects.matches(c.identity), lambda c: subjects.why(c.identity)))
    for name, (get, kind, fold) in _SINGLE.items():  # dict order = cheap and selective first
        if flat.get(name):
            globs = GlobSet(flat[name], kind, fold)
            test = _single_test(globs, get)
            if name == "match.paths":  # case-insensitive connections match folded
                test = _path_test(test, _single_test(GlobSet(flat[name], kind, True), get))
            out.append(Condition(name, globs.patterns, test, get))
    for name, get_all in _MULTI.items():
        if flat.get(name):
            globs = GlobSet(flat[name])
            out.append(Condition(name, globs.patterns, _multi_test(globs, get_all, effect == "allow"), get_all))
    for name, (make_test, get_value) in _CONNECT_FIELDS.items():
        if flat.get(name):
            globs = GlobSet(flat[name])
            out.append(Condition(name, globs.patterns, make_test(globs, effect), get_value))
    for name, patterns, test, value in git_conditions(match.get("git") or {}, effect):
        out.append(Condition(name, patterns, test, value))
    for name, patterns, test, value in postgres_conditions(match.get("postgres") or {}, effect):
        out.append(Condition(name, patterns, test, value))
    if any((match.get("mcp") or {}).values()):  # one test: every field about the same call
        out.append(Condition("match.mcp", *mcp_condition(match["mcp"], effect)))
    if match.get("pathRegex"):
        search = re.compile(match["pathRegex"]).search
        isearch = re.compile(match["pathRegex"], re.IGNORECASE).search
        out.append(Condition("match.pathRegex", (match["pathRegex"],),
                             lambda c: (isearch if c.fold else search)(c.target) is not None,
                             lambda c: c.target))
    if match.get("bodyRegex"):
        body_search = re.compile(match["bodyRegex"]).search
        out.append(Condition("match.bodyRegex", (match["bodyRegex"],),
                             lambda c: body_search(c.body_text(body_limit)) is not None,
                             lambda c: f"<{len(c.body)} body bytes>"))
    return out


def _approval(spec: dict, policy: dict) -> ApprovalRequirement:
    approvers = spec.get("approvers") or policy.get("approvers") or {}
    grant = spec.get("grant") or policy.get("grant") or {}
    return ApprovalRequirement(
        approvers=Approvers(tuple(approvers.get("users") or ()), tuple(approvers.get("groups") or ())),
        min_approvals=spec["minApprovals"], timeout_seconds=spec["timeoutSeconds"], mode=spec["mode"],
        hold_seconds=spec["holdSeconds"], grant_ttl_seconds=grant.get("ttlSeconds", 900),
        grant_scope=grant.get("scope", "exact"),
        remember_outcome_seconds=spec.get("rememberOutcomeSeconds", 3600))


def _build_rule(index: int, rule: dict, key: str, namespace: str, spec: dict, body_limit: int) -> CompiledRule:
    ref = RuleRef(key, rule["name"])
    effect_key = next(k for k in ("allow", "block", "requireApproval", "mask", "rateLimit") if k in rule)
    effect = {"requireApproval": "require_approval", "rateLimit": "rate_limit"}.get(effect_key, effect_key)
    body = rule[effect_key]
    match = rule.get("match") or {}
    conditions = _conditions(match, effect, namespace, body_limit)
    typed = [k for k in ("aws", "kubernetes", "anthropic", "postgres", "mcp") if match.get(k) is not None]
    typed = [*typed, *(["http"] if match.get("git") is not None else [])]  # git: http connections
    methods = frozenset(match["methods"]) if match.get("methods") else None
    aws_actions = (match.get("aws") or {}).get("actions")
    actions = GlobSet(aws_actions, ignore_case=True) if aws_actions else None
    hosts = GlobSet(match["hosts"], "host") if match.get("hosts") else None
    indexed = {"match.methods", "match.aws.actions", "match.hosts"}  # decided per bucket
    conditions = [Condition(c.field, c.patterns, c.test, c.value, c.field in indexed) for c in conditions]
    description = rule.get("description", "")
    if effect == "block":
        message = body.get("message") or description or f"blocked by rule {_q(ref.rule)} of AccessPolicy {key}"
    elif effect == "require_approval":
        message = description or f"approval required by rule {_q(ref.rule)} of AccessPolicy {key}"
    else:
        message = description
    masking = spec.get("masking") or {}
    tool_use = tool_use_match(match.get("anthropic") or {})
    return CompiledRule(
        ref=ref, index=index, effect=effect, conditions=tuple(conditions),
        connection_type=typed[0] if typed else None, methods=methods, actions=actions, hosts=hosts,
        message=message,
        approval=_approval(body, spec) if effect == "require_approval" else None,
        mask=MaskSpec(tuple(body.get("detectors") or ()), tuple(body.get("fields") or ()), body["target"],
                      masking.get("maxBodyBytes", 64 * 1024 * 1024), ref,
                      body.get("kubernetesSecrets") or "") if effect == "mask" else None,
        rate_limit=(RateLimit(body["requests"], body["periodSeconds"], body["per"], ref)
                    if effect == "rate_limit" else None),
        tests=tuple(c.test for c in conditions if not c.indexed),
        rank=0 if tool_use is not None else RANK.get(effect, 0), tool_use=tool_use)


def build_policy(obj: dict, default_namespace: str = "default") -> CompiledPolicy:
    """Compile a validated, defaulted AccessPolicy (as returned by ``validate_policy``)."""
    meta, spec = obj.get("metadata") or {}, obj["spec"]
    namespace = meta.get("namespace") or default_namespace
    key = f"{namespace}/{meta['name']}"
    masking = spec.get("masking") or {}
    body_limit = masking.get("maxBodyBytes", 64 * 1024 * 1024)
    policy_mask = None
    if masking.get("detectors") or masking.get("fields"):
        policy_mask = MaskSpec(tuple(masking.get("detectors") or ()), tuple(masking.get("fields") or ()),
                               masking["target"], masking["maxBodyBytes"], None)
    subjects = spec.get("subjects")
    return CompiledPolicy(
        key=key, namespace=namespace,
        connections=GlobSet(spec["connections"]) if spec.get("connections") else None,
        subjects=SubjectMatcher(subjects, namespace) if subjects else None,
        default_effect=spec["defaultEffect"], masking=policy_mask,
        rules=tuple(_build_rule(i, r, key, namespace, spec, body_limit) for i, r in enumerate(spec["rules"])),
        spec=spec)
