"""AccessPolicy: validating admission with the policy engine's compiler, and status.

Admission refuses a policy the sidecar could not compile, listing every error with its field
path exactly as the compiler words it (``spec.rules[2].match.pathRegex: ...``), so ``kubectl
apply`` shows the author everything at once. The status handler is level-triggered
(``on.event``): it compiles what is stored and writes the Valid condition, ruleCount and
observedGeneration, patching only when something changed. Invalid stored policies happen only
when admission was bypassed or the compiler got stricter after an upgrade; status then carries
the same error list.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping

import kopf

from chaperone_sidecar.api import ACCESS_POLICIES, GROUP, VERSION
from chaperone_sidecar.policy.compiler import PolicyErrors, compile_policy

from ..conditions import condition, merge_conditions, status_differs

__all__ = ["policy_errors", "policy_status", "on_accesspolicy_validate", "on_accesspolicy_event"]


def policy_errors(obj: Mapping) -> tuple[int, list[str]]:
    """(rule count, every compile error as ``path: reason``) for one AccessPolicy object."""
    policy = copy.deepcopy(dict(obj))
    meta = policy.setdefault("metadata", {})
    if not meta.get("name") and meta.get("generateName"):
        meta["name"] = meta["generateName"] + "x"  # admission sees generateName objects unnamed
    try:
        compiled = compile_policy(policy, meta.get("namespace") or "default")
    except PolicyErrors as exc:
        return 0, [str(e) for e in exc.errors]
    return len(compiled.rules), []


def policy_status(obj: Mapping, current: Mapping | None, now) -> dict:
    """The status the operator wants for this policy (Valid condition, ruleCount, generation)."""
    generation = (obj.get("metadata") or {}).get("generation")
    count, errors = policy_errors(obj)
    if errors:
        valid = condition("Valid", False, "CompileFailed", "\n".join(errors), generation)
    else:
        valid = condition("Valid", True, "Compiled", f"{count} rule(s) compiled", generation)
    return {"observedGeneration": generation, "ruleCount": count,
            "conditions": merge_conditions((current or {}).get("conditions"), [valid], now)}


@kopf.on.validate(GROUP, VERSION, ACCESS_POLICIES, id="accesspolicy-validate",
                  operations=["CREATE", "UPDATE"])
def on_accesspolicy_validate(body, **_):
    """Refuse policies that do not compile, with every error and its field path."""
    _, errors = policy_errors(body)
    if errors:
        meta = body.get("metadata") or {}
        name = meta.get("name") or meta.get("generateName", "") + "*"
        raise kopf.AdmissionError(f"AccessPolicy {meta.get('namespace')}/{name} is invalid:\n"
                                  + "\n".join(errors), code=422)


@kopf.on.event(GROUP, VERSION, ACCESS_POLICIES, id="accesspolicy-status")
def on_accesspolicy_event(type, body, status, patch, memo, **_):
    """Keep status (Valid, ruleCount, observedGeneration) in line with the stored spec."""
    if type == "DELETED":
        return
    desired = policy_status(body, status, memo.runtime.now())
    if status_differs(status, desired):
        patch.status.update(desired)
