"""ApprovalRequest objects as the sidecar writes and reads them: pure functions, no I/O.

:func:`build_request` makes the object the sidecar opens (crds/approvalrequests.chaperone.dev.yaml,
every field capped to the CRD's limits); :func:`read_state` tells what a stored object decides at a
given time; :func:`subject_key` and the requester label say whose grant and whose request it is;
:func:`approvers_text` and :func:`approve_command` are what the agent is shown.

They live apart from :mod:`.service`, which decides when to open, reuse or wait on a request:
the object's shape changes with the CRD, the deciding with the hold/grant rules, and being pure
these are testable without a backend. :mod:`.service` re-exports them (its import path is the
one callers use).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Literal

from ..api import LABEL_ACTION, LABEL_DIGEST, LABEL_REQUESTER, LABEL_SUBJECT
from ..policy.model import Action, ApprovalRequirement, Identity, RuleRef
from ..timefmt import epoch_to_rfc3339, rfc3339_to_epoch
from .digest import action_key, action_resources, named_action_key, short_hash

__all__ = ["State", "SA_PREFIX", "subject_key", "requester_label",
           "read_state", "approvers_text", "approve_command", "build_request", "label_value",
           "request_action_key", "binding_problem"]

State = Literal["approved", "denied", "expired", "pending"]
SA_PREFIX = "system:serviceaccount:"


def _service_account(identity: Identity) -> str:
    sa = identity.service_account
    if sa.startswith(SA_PREFIX) or not sa:
        return sa
    ns, _, name = sa.partition("/")
    return f"{SA_PREFIX}{ns}:{name}" if name else f"{SA_PREFIX}{identity.pod_namespace}:{ns}"


def subject_key(identity: Identity, connection: str) -> str:
    """Whose grant: service account, pod creator, on-behalf-of user and connection.

    Not the pod: grants survive pod restarts and are shared by replicas (the point of Redis).
    The creator is included so that a pod created by an approver never inherits a grant that
    approver gave a colleague's pod under the same service account.
    """
    return short_hash("subject", _service_account(identity), identity.creator,
                      identity.on_behalf_of, connection)


def label_value(digest: str) -> str:
    """A ``sha256:<hex>`` digest or action key as a label value (the hex, cut to 63)."""
    return digest.split(":", 1)[-1][:63]


def requester_label(identity: Identity) -> str:
    # Reuse is per pod: a retry comes from the same sidecar.
    return short_hash("requester", _service_account(identity), identity.pod_namespace,
                      identity.pod_name, identity.on_behalf_of)


def read_state(obj: Mapping, now: float) -> tuple[State, tuple[str, ...], str]:
    """(state, approvers, reason) of an ApprovalRequest object at ``now`` (epoch seconds)."""
    spec = obj.get("spec") or {}
    status = obj.get("status") or {}
    decision = spec.get("decision") or (status.get("phase") if status.get("phase") in
                                         ("Approved", "Denied") else None)
    reason = spec.get("reason") or ""
    if decision == "Approved":
        users = tuple(r["user"] for r in spec.get("reviews") or ()
                      if isinstance(r, dict) and r.get("decision") == "Approved" and r.get("user"))
        if not users and spec.get("decidedBy"):
            users = (spec["decidedBy"],)
        return "approved", users, reason
    if decision == "Denied":
        by = spec.get("decidedBy") or ""
        why = f"denied by {by}" if by else "denied"
        return "denied", ((by,) if by else ()), (f"{why}: {reason}" if reason else why)
    expires = rfc3339_to_epoch(spec.get("expiresAt"))
    if status.get("phase") == "Expired" or (expires is not None and now >= expires):
        return "expired", (), f"expired undecided at {spec.get('expiresAt')}; ask again"
    return "pending", (), ""


def approvers_text(requirement: ApprovalRequirement) -> str:
    """Who may approve, for the agent's error body: "1 approval from user alice or ..."."""
    who = []
    users, groups = requirement.approvers.users, requirement.approvers.groups
    if users:
        who.append(("users " if len(users) > 1 else "user ") + ", ".join(users))
    if groups:
        who.append(("members of groups " if len(groups) > 1 else "members of group ")
                   + ", ".join(groups))
    n = requirement.min_approvals
    return f"{n} approval{'s' if n != 1 else ''} from " + (" or ".join(who) or "nobody")


def approve_command(name: str, namespace: str = "") -> str:
    """The command an approver runs (shown to the agent so it can tell its human)."""
    ns = f" -n {namespace}" if namespace else ""
    return (f"kubectl{ns} patch approvalrequest {name} --type=merge "
            "-p '{\"spec\":{\"decision\":\"Approved\"}}'")


def build_request(*, name: str, identity: Identity, connection: str, action: Action, digest: str,
                  rule: RuleRef, requirement: ApprovalRequirement, now: float,
                  session_id: str = "", body_preview: str = "") -> dict:
    """The ApprovalRequest object (crds/approvalrequests.chaperone.dev.yaml), fields capped."""
    requested = int(now)  # RFC 3339 to the second: expiresAt must stay > requestedAt
    requester: dict[str, Any] = {
        "serviceAccount": _service_account(identity)[:317],
        "pod": {"namespace": identity.pod_namespace, "name": identity.pod_name}}
    if identity.pod_uid:
        requester["pod"]["uid"] = identity.pod_uid
    if identity.creator:
        requester["creator"] = identity.creator[:253]
    if identity.on_behalf_of:
        requester["onBehalfOf"] = identity.on_behalf_of[:253]
    groups = identity.on_behalf_of_groups if identity.on_behalf_of else identity.creator_groups
    if groups:
        requester["groups"] = list(groups[:64])
    act: dict[str, Any] = {"name": (action.name or "unknown")[:256],
                           "summary": (action.summary or action.name or "unknown")[:1024]}
    for key, value, cap in (("method", action.method, 16), ("host", action.host, 260),
                            ("path", action.path, 4096), ("bodyPreview", body_preview, 4096)):
        if value:
            act[key] = value[:cap]
    if resources := action_resources(action):
        act["resources"] = [r[:2048] for r in resources[:32]]
    approvers = {k: list(v)[:64] for k, v in (("users", requirement.approvers.users),
                                               ("groups", requirement.approvers.groups)) if v}
    spec: dict[str, Any] = {
        "requester": requester, "connection": connection[:253], "action": act,
        "requestDigest": digest, "rule": {"policy": rule.policy, "name": rule.rule},
        "approvers": approvers, "minApprovals": max(1, min(10, requirement.min_approvals)),
        "grant": {"scope": requirement.grant_scope,
                  "ttlSeconds": max(0, min(86400, requirement.grant_ttl_seconds))},
        "requestedAt": epoch_to_rfc3339(requested),
        "expiresAt": epoch_to_rfc3339(requested + max(1, requirement.timeout_seconds)),
    }
    if session_id:
        spec["sessionID"] = session_id[:128]
    labels = {"app.kubernetes.io/managed-by": "chaperone-sidecar",
              LABEL_DIGEST: label_value(digest),
              LABEL_REQUESTER: requester_label(identity),
              LABEL_SUBJECT: subject_key(identity, connection),
              LABEL_ACTION: label_value(action_key(connection, action))}
    return {"metadata": {"name": name, "labels": labels}, "spec": spec}


def request_action_key(obj: Mapping) -> str:
    """The action key of what a stored ApprovalRequest asked for (its connection, action name
    and resources as stored), computed like :func:`~.digest.action_key` for a live flow."""
    spec = obj.get("spec") or {}
    act = spec.get("action") or {}
    return named_action_key(str(spec.get("connection") or ""), str(act.get("name") or ""),
                            [str(r) for r in act.get("resources") or ()])


def binding_problem(obj: Mapping, identity: Identity, connection: str) -> str | None:
    """Why ``obj`` was not asked for by this subject (service account, pod creator,
    on-behalf-of user, connection), or None when it was: the grant's *who*."""
    spec = obj.get("spec") or {}
    req = spec.get("requester") or {}
    want = {"requester.serviceAccount": _service_account(identity)[:317],
            "requester.creator": identity.creator[:253],
            "requester.onBehalfOf": identity.on_behalf_of[:253],
            "connection": connection[:253]}
    have = {"requester.serviceAccount": req.get("serviceAccount") or "",
            "requester.creator": req.get("creator") or "",
            "requester.onBehalfOf": req.get("onBehalfOf") or "",
            "connection": spec.get("connection") or ""}
    for field, value in want.items():
        if have[field] != value:
            return f"spec.{field} is {have[field]!r}, not this requester's {value!r}"
    return None
