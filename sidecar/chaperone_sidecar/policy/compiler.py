"""Compile AccessPolicy objects (dicts, as read from the apiserver or local YAML) for evaluation.

Two jobs, one pass:

* **Validate** everything, reporting one :class:`PolicyError` per problem with the field path in
  Kubernetes notation (``spec.rules[2].match.pathRegex: invalid regular expression: ...``). The
  operator shows these verbatim at admission and in ``status``; ``chaperone policy test`` prints
  them for local files. The schema part (types, enums, bounds, unknown and required fields,
  defaults) is the CRD itself, checked by :mod:`.schema` with jsonschema, because the standalone
  CLI has no apiserver. This module holds only what no OpenAPI schema can say: regexes compile,
  globs are usable, one effect per rule (the CRD's CEL rule, which jsonschema cannot run),
  unique rule names, approvers exist and can reach ``minApprovals``, masking detectors and JSON
  paths are known to the masker, names that can never match (:mod:`.vocabulary`).
* **Compile** a valid policy into immutable matchers with the CRD's defaults filled in (built
  by :mod:`.matching`): globs become regexes once, each rule becomes a short tuple of match
  tests, and rules are bucketed by (connection type, method, AWS action, host) so an evaluation
  only looks at rules that can match. :mod:`.evaluator` documents precedence.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, Literal

from ..api import ACCESS_POLICIES
from .classify.postgres_names import STATEMENT_NAMES
from .errors import PolicyError
from .globs import glob_error
from .globs import quote as _q
from .masking.detectors import validate_detectors
from .masking.fields import compile_path
from .matching import CompiledPolicy, CompiledPolicySet, build_policy
from .matching_mcp import mcp_errors
from .matching_tool_use import tool_use_errors
from .schema import crd, validate_object
from .vocabulary import unknown_names

__all__ = ["CompileResult", "PolicyErrors", "compile_policies", "compile_policy", "validate_policy"]

EFFECTS = ("allow", "block", "requireApproval", "mask", "rateLimit")
_TYPED = ("aws", "kubernetes", "anthropic", "postgres", "git", "mcp")
# RequestInfo verbs; exec/attach/portforward/log are subresources, not verbs.
KUBERNETES_VERBS = frozenset("get list watch create update patch delete deletecollection proxy *".split())
# Not in the CRD (no maximum there): beyond a million per window a limit limits nothing.
MAX_RATE_REQUESTS = 1_000_000


class PolicyErrors(Exception):
    """All problems of one policy (raised by :func:`compile_policy`)."""

    def __init__(self, errors: Iterable[PolicyError], policy: str = ""):
        self.errors: tuple[PolicyError, ...] = tuple(errors)
        self.policy = policy  # "namespace/name", or "objs[i]" when the object has no name
        super().__init__(str(self))

    def __str__(self) -> str:
        return "\n".join(str(e) for e in self.errors)

    def __iter__(self):
        return iter(self.errors)

    def __len__(self) -> int:
        return len(self.errors)


# ---------------------------------------------------------------------------- semantic checks

class _Checker:
    """The checks no OpenAPI schema can express; works on the schema-checked, defaulted spec.

    Values that failed the schema check were removed (list items became ``None``), so every
    value seen here has the right type.
    """

    def __init__(self, errors: list[PolicyError]):
        self.errors = errors

    def err(self, path: str, reason: str) -> None:
        self.errors.append(PolicyError(path, reason))

    def globs(self, values: list | None, path: str, kind: Literal["name", "path", "host"] = "name",
              allow_empty: bool = False) -> None:
        for i, value in enumerate(values or ()):
            if isinstance(value, str) and (why := glob_error(value, kind, allow_empty=allow_empty)):
                self.err(f"{path}[{i}]", why)

    def regex(self, value: Any, path: str) -> None:
        if isinstance(value, str):
            try:
                re.compile(value)
            except re.error as exc:
                self.err(path, f"invalid regular expression: {exc}")

    def subjects(self, subjects: list | None, path: str) -> None:
        for i, subject in enumerate(subjects or ()):
            for key, value in (subject or {}).items():
                at = f"{path}[{i}].{key}"
                if key != "serviceAccount":  # user and group names may contain anything, even spaces
                    if value == "":
                        self.err(at, "must not be empty")
                elif value and (value.count("/") > 1 or "" in value.split("/")):
                    self.err(at, f'invalid service account {_q(value)}: use "namespace/name" or "name"')
                elif why := glob_error(value, "name"):
                    self.err(at, why)

    def masking(self, masking: dict | None, path: str) -> None:
        for i, name in enumerate((masking or {}).get("detectors") or ()):
            if isinstance(name, str):
                for reason in validate_detectors([name]):
                    self.err(f"{path}.detectors[{i}]", reason)
        for i, json_path in enumerate((masking or {}).get("fields") or ()):
            if isinstance(json_path, str):
                try:
                    compile_path(json_path)
                except ValueError as exc:
                    self.err(f"{path}.fields[{i}]", str(exc))  # the masker's reason names the path

    def match(self, match: dict, path: str) -> None:
        self.subjects(match.get("subjects"), f"{path}.subjects")
        self.globs(match.get("hosts"), f"{path}.hosts", "host")
        self.globs(match.get("paths"), f"{path}.paths", "path")
        self.regex(match.get("pathRegex"), f"{path}.pathRegex")
        self.regex(match.get("bodyRegex"), f"{path}.bodyRegex")
        aws, kube, claude = (match.get(k) or {} for k in ("aws", "kubernetes", "anthropic"))
        self.globs(aws.get("regions"), f"{path}.aws.regions")
        self.globs(aws.get("resources"), f"{path}.aws.resources")
        for where, why in unknown_names(match, path):  # typos that would never match (fail open)
            self.err(where, why)
        for i, verb in enumerate(kube.get("verbs") or ()):
            if isinstance(verb, str) and verb not in KUBERNETES_VERBS:
                hint = (f'; {verb} is a subresource, match it with resources: ["pods/{verb}"]'
                        if verb in ("exec", "attach", "portforward", "log") else "")
                self.err(f"{path}.kubernetes.verbs[{i}]", f"unknown verb {_q(verb)}{hint}")
        self.globs(kube.get("apiGroups"), f"{path}.kubernetes.apiGroups", allow_empty=True)
        for key in ("resources", "namespaces", "names", "containers"):
            self.globs(kube.get(key), f"{path}.kubernetes.{key}")
        for i, command in enumerate(kube.get("commands") or ()):  # spaces are part of them
            if isinstance(command, str) and (not command.strip() or "***" in command):
                self.err(f"{path}.kubernetes.commands[{i}]",
                         f"invalid command glob {_q(command)}: give a command such as \"rm *\"")
        for i, port in enumerate(kube.get("ports") or ()):
            if isinstance(port, str) and not (port.replace("*", "").replace("?", "").isdigit()
                                              or port == "*"):
                self.err(f"{path}.kubernetes.ports[{i}]",
                         f"invalid port {_q(port)}: a port number (1-65535) or a glob of one")
            elif isinstance(port, str) and port.isdigit() and not 0 < int(port) < 65536:
                self.err(f"{path}.kubernetes.ports[{i}]", f"invalid port {_q(port)}: not in 1-65535")
        if (kube.get("commands") or kube.get("containers") or kube.get("ports")) \
                and kube.get("verbs") and "create" not in kube["verbs"] and "*" not in kube["verbs"]:
            self.err(f"{path}.kubernetes", "commands, containers and ports describe exec, attach "
                                           "and portforward, whose verb is create: this rule can "
                                           "never match")
        for key in ("models", "tools"):
            self.globs(claude.get(key), f"{path}.anthropic.{key}")
        self.postgres(match.get("postgres") or {}, f"{path}.postgres")
        self.git(match.get("git") or {}, f"{path}.git")
        for where, why in mcp_errors(match.get("mcp") or {}, f"{path}.mcp"):
            self.err(where, why)
        typed = [k for k in _TYPED if k in match]
        if len(typed) > 1:
            self.err(path, f"conditions for {' and '.join(typed)} can never hold together: "
                           "a request has one connection type; split them into separate rules")

    def git(self, git: dict, path: str) -> None:
        self.globs(git.get("repositories"), f"{path}.repositories")
        self.globs(git.get("refs"), f"{path}.refs")
        for i, ref in enumerate(git.get("refs") or ()):
            # A pattern that is neither a full ref nor starts with a wildcard matches no ref
            # a push names ("main" for "refs/heads/main"): a block rule would fail open.
            if isinstance(ref, str) and ref and not ref.startswith(("refs/", "*", "?")):
                self.err(f"{path}.refs[{i}]", f"{_q(ref)} can never match: refs are full names; "
                                               f"did you mean {_q('refs/heads/' + ref)}?")

    def postgres(self, pg: dict, path: str) -> None:
        for key in ("tables", "functions"):
            self.globs(pg.get(key), f"{path}.{key}")
        for i, name in enumerate(pg.get("statements") or ()):
            # A misspelled command would match nothing: a block rule would fail open.
            if isinstance(name, str) and "*" not in name and "?" not in name \
                    and name.upper() not in STATEMENT_NAMES:
                self.err(f"{path}.statements[{i}]", f"unknown SQL command {_q(name)}; one of "
                                                    f"{', '.join(sorted(STATEMENT_NAMES))}")

    def approval(self, approval: dict, policy_approvers: dict | None, path: str) -> None:
        if "approvers" in approval:
            approvers, where = approval["approvers"], f"{path}.approvers"
            if not (approvers.get("users") or approvers.get("groups")):
                self.err(where, "must name at least one user or group")
                return
        elif policy_approvers and (policy_approvers.get("users") or policy_approvers.get("groups")):
            approvers = policy_approvers
        else:
            self.err(f"{path}.approvers", "required: name users or groups here or in spec.approvers")
            return
        users = sorted({u for u in approvers.get("users") or () if u})
        needed = approval.get("minApprovals", 1)
        if not approvers.get("groups") and len(users) < needed:
            named = f"{len(users)} user is" if len(users) == 1 else f"{len(users)} users are"
            self.err(f"{path}.minApprovals", f"needs {needed} distinct approvals but only {named} named "
                                             f"({', '.join(users)}) and no groups")
        hold, timeout = approval.get("holdSeconds", 0), approval.get("timeoutSeconds", 0)
        if approval.get("mode") == "hold" and hold > timeout:
            self.err(f"{path}.holdSeconds", f"must not exceed timeoutSeconds ({timeout}): the "
                                            "ApprovalRequest would expire while the request is held")

    def rules(self, rules: list, raw_rules: list, policy_approvers: dict | None) -> None:
        seen: dict[str, int] = {}
        for i, rule in enumerate(rules):
            if not isinstance(rule, dict):
                continue
            path, raw = f"spec.rules[{i}]", raw_rules[i] if isinstance(raw_rules[i], dict) else {}
            name = rule.get("name")
            if isinstance(name, str):
                if name in seen:
                    self.err(f"{path}.name",
                             f"duplicate rule name {_q(name)} (also spec.rules[{seen[name]}])")
                seen.setdefault(name, i)
            effects = [e for e in EFFECTS if e in rule]
            if len(effects) != 1:
                got = "none" if not effects else ", ".join(effects)
                nulls = [e for e in EFFECTS if e in raw and raw[e] is None]
                hint = f' ("{nulls[0]}:" without a value is null; write "{nulls[0]}: {{}}")' if nulls else ""
                self.err(path, "a rule needs exactly one effect (allow, block, requireApproval, "
                               f"mask or rateLimit), got {got}{hint}")
            if isinstance(rule.get("match"), dict):
                self.match(rule["match"], f"{path}.match")
            for where, why in tool_use_errors(rule, path):  # response rules: only block
                self.err(where, why)
            if isinstance(rule.get("requireApproval"), dict):
                self.approval(rule["requireApproval"], policy_approvers, f"{path}.requireApproval")
            mask = rule.get("mask")
            if isinstance(mask, dict):
                self.masking(mask, f"{path}.mask")
                # An empty mask is already a schema error ("must not be empty"); one error each.
                if raw.get("mask") and not mask.get("detectors") and not mask.get("fields") \
                        and not mask.get("kubernetesSecrets"):
                    self.err(f"{path}.mask", "masks nothing: set detectors, fields or kubernetesSecrets")
            limit = rule.get("rateLimit")
            if isinstance(limit, dict) and limit.get("requests", 0) > MAX_RATE_REQUESTS:
                self.err(f"{path}.rateLimit.requests",
                         f"must be at most {MAX_RATE_REQUESTS} per window; a larger number limits nothing")


def _sort_key(error: PolicyError) -> list:
    # Natural order so spec.rules[10] sorts after spec.rules[2]; stable for equal paths.
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", error.path)]


def validate_policy(obj: Any) -> tuple[dict | None, list[PolicyError]]:
    """Check one AccessPolicy; returns (the object with defaults filled, errors sorted by path)."""
    out, errors = validate_object(obj, crd(ACCESS_POLICIES))
    if out is None:
        return None, errors
    spec = out.get("spec")
    if isinstance(spec, dict):
        raw_spec = obj.get("spec") or {}
        checker = _Checker(errors)
        checker.globs(spec.get("connections"), "spec.connections")
        checker.subjects(spec.get("subjects"), "spec.subjects")
        checker.masking(spec.get("masking"), "spec.masking")
        raw_rules: list = raw_spec["rules"] if isinstance(raw_spec.get("rules"), list) else []
        checker.rules(spec.get("rules") or [], raw_rules, spec.get("approvers"))
    unique = list(dict.fromkeys(errors))  # one error per problem, even if two checks found it
    unique.sort(key=_sort_key)
    return out, unique


# ---------------------------------------------------------------------------- entry points

@dataclass(frozen=True)
class CompileResult:
    """Every valid policy compiled into one set, plus the errors of the invalid ones."""

    policies: CompiledPolicySet
    errors: tuple[PolicyErrors, ...] = ()

    @property
    def ok(self) -> bool:
        return not self.errors


def compile_policy(obj: Any, default_namespace: str = "default") -> CompiledPolicy:
    """Validate and compile one AccessPolicy; raises :class:`PolicyErrors` listing every problem.

    ``default_namespace`` stands in for ``metadata.namespace`` when a local file has none.
    """
    out, errors = validate_policy(obj)
    if errors or out is None:
        meta = obj.get("metadata") if isinstance(obj, dict) else None
        label = ""
        if isinstance(meta, dict) and isinstance(meta.get("name"), str):
            label = f"{meta.get('namespace') or default_namespace}/{meta['name']}"
        raise PolicyErrors(errors, label)
    return build_policy(out, default_namespace)


def compile_policies(objs: Iterable[Any], default_namespace: str = "default") -> CompileResult:
    """Compile many policies; invalid ones are reported and left out, never raised."""
    compiled, errors, seen = [], [], set()
    for i, obj in enumerate(objs):
        try:
            policy = compile_policy(obj, default_namespace)
        except PolicyErrors as exc:
            errors.append(exc if exc.policy else PolicyErrors(exc.errors, f"objs[{i}]"))
            continue
        if policy.key in seen:
            duplicate = PolicyError("metadata.name", f"duplicate AccessPolicy {_q(policy.key)}")
            errors.append(PolicyErrors([duplicate], policy.key))
            continue
        seen.add(policy.key)
        compiled.append(policy)
    return CompileResult(CompiledPolicySet(compiled), tuple(errors))
