"""Admission rules for ApprovalRequests: who may open one, who may decide it, what gets stamped.

This is the security core of Chaperone's approvals, kept PURE (no kopf, no API calls, the clock
passed in) so every rule is unit-tested directly; ``handlers/approvalrequests.py`` only feeds it
the admission review and turns a :class:`Verdict` into a kopf patch or ``AdmissionError``.

**Who may create** (decision: the sidecar identity rule). A sidecar talks to the apiserver with
its pod's projected service-account token, which the kubelet binds to the pod: the apiserver
then reports the pod in ``userInfo.extra`` (``authentication.kubernetes.io/pod-name`` and
``pod-uid``). A CREATE is accepted only when

* the user is a service account of the request's own namespace and
  ``spec.requester.serviceAccount`` is exactly that user,
* the token is bound to the pod named by ``spec.requester.pod`` (name, and uid when given),
* that pod exists, runs as that service account and carries the injection annotation
  (``chaperone.dev/status``) — the operator looks the pod up and passes it in,
* nothing of a decision is present yet (decision, reason, decidedBy, decidedAt, reviews), at
  least one approver is named and ``expiresAt`` lies in the future.

Admission then stamps ``spec.requester.pod.uid`` (from the token) and ``spec.requester.creator``
(from the pod's creator annotation written at injection), so self-approval checks never trust
what the sidecar claimed. Agent containers hold no token at all, so they cannot create requests.

**Deciding** (UPDATE). An approver sets ``spec.decision`` (optionally ``spec.reason``); admission
stamps a review ``{user, groups, decision, time, reason}`` from ``userInfo`` and the clock, and
``decidedBy``/``decidedAt`` when the decision becomes final. Client-sent ``decidedBy``,
``decidedAt`` and ``reviews`` are overwritten when they come with a decision and refused
otherwise. N-of-M: while fewer than ``minApprovals`` distinct approvers approved, the review is
recorded and ``spec.decision`` removed again so the next approver can patch; a single denial is
final. Refused: self-approval (below), users not named by ``spec.approvers``, a second review by
the same user, any change once a decision is final, deciding at or after ``expiresAt``, decision
values other than Approved/Denied, and approvers changing anything else in ``spec``.

**Self-approval** (decision): the deciding user must not be the requester's service account, any
service account of the request's namespace (a sibling agent's sidecar), the user who created the
requesting pod, or the verified user the agent acted for (``onBehalfOf``).

**Nothing but the decision changes after creation** (decision): every field the sidecar wrote -
requester, connection, action, digest, rule, approvers, minApprovals, grant (scope, TTL),
sessionID, requestedAt, expiresAt - is fixed when the request is opened. The requesting sidecar
in particular cannot widen a pending request's grant (scope ``exact`` -> ``action``, a longer
``ttlSeconds``) after an approver saw it: what the approver approves is what was asked. The
CRD's CEL transition rules hold the same even if this webhook is bypassed; admission refuses
first, naming the fields and who tried.

**Deletion** (decision): deleting a pending request is not an admission decision (RBAC says who
may delete; the ``approvalrequest-delete`` webhook never refuses, it only remembers the deleter's
``userInfo``); the operator records it as one Warning Event ``DeletedPending`` on the request
naming who deleted it and when (:mod:`.approval_status`), the sidecar holding a flow for it
refuses that flow with "request deleted", and a retry opens a new request that approvers see
again - a deletion never lets anything through.
"""

from __future__ import annotations

import datetime as dt
import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from chaperone_sidecar.contract import CREATOR_ANNOTATION, STATUS_ANNOTATION
from chaperone_sidecar.timefmt import format_rfc3339, parse_rfc3339

__all__ = [
    "APPROVED", "DENIED", "EXPIRED", "PENDING", "SidecarIdentityRule", "UserInfo", "Verdict",
    "admit_create", "admit_update", "describe_approvers", "recheck",
    "self_approval",
]

APPROVED, DENIED, PENDING, EXPIRED = "Approved", "Denied", "Pending", "Expired"
DECISIONS = (APPROVED, DENIED)
SA_PREFIX = "system:serviceaccount:"
POD_NAME_EXTRA = "authentication.kubernetes.io/pod-name"
POD_UID_EXTRA = "authentication.kubernetes.io/pod-uid"

DECIDER_FIELDS = ("decision", "reason")  # what an approver sends
STAMPED_FIELDS = ("decidedBy", "decidedAt", "reviews")  # written by admission only
STAMP_TOLERANCE = dt.timedelta(minutes=5)  # recheck: stamped times near the webhook's clock


@dataclass(frozen=True)
class UserInfo:
    """The authenticated identity of an admission request (``request.userInfo``)."""

    username: str
    groups: tuple[str, ...] = ()
    extra: Mapping[str, tuple[str, ...]] = field(default_factory=dict)

    @classmethod
    def from_admission(cls, info: Mapping[str, Any] | None) -> UserInfo:
        info = info or {}
        extra = {k: tuple(v or ()) for k, v in (info.get("extra") or {}).items()}
        return cls(str(info.get("username") or ""), tuple(info.get("groups") or ()), extra)

    def service_account(self) -> tuple[str, str] | None:
        """(namespace, name) when this is a service account, else None."""
        if not self.username.startswith(SA_PREFIX):
            return None
        ns, _, name = self.username[len(SA_PREFIX):].partition(":")
        return (ns, name) if ns and name else None

    def extra_value(self, key: str) -> str | None:
        values = self.extra.get(key) or ()
        return values[0] if len(values) == 1 else None


@dataclass(frozen=True)
class SidecarIdentityRule:
    """How a CREATE proves it comes from a sidecar (see the module docstring)."""

    require_pod_bound_token: bool = True
    require_injected_pod: bool = True
    injected_annotation: str = STATUS_ANNOTATION
    creator_annotation: str = CREATOR_ANNOTATION  # JSON userInfo written at injection


@dataclass(frozen=True)
class Verdict:
    """Admission outcome: allowed with JSONPatch ops (relative to the incoming object), or not."""

    allowed: bool
    message: str = ""
    patch: tuple[dict, ...] = ()

    @classmethod
    def allow(cls, patch: list[dict] | tuple[dict, ...] = ()) -> Verdict:
        return cls(True, "", tuple(patch))

    @classmethod
    def refuse(cls, message: str) -> Verdict:
        return cls(False, message)


# ---------------------------------------------------------------------------- helpers

def _dict(value: object) -> dict:
    """``value`` if it is an object, else an empty one (fields of an agent-written object)."""
    return value if isinstance(value, dict) else {}


def _spec(obj: Mapping | None) -> dict:
    return _dict((obj or {}).get("spec"))


def _fields(names) -> str:
    return ", ".join(f"spec.{n}" for n in sorted(names))


def _approvals(reviews: list) -> list[dict]:
    return [r for r in reviews if isinstance(r, dict) and r.get("decision") == APPROVED]


def describe_approvers(spec: Mapping) -> str:
    appr = spec.get("approvers") or {}
    parts = []
    if appr.get("users"):
        parts.append("users " + ", ".join(appr["users"]))
    if appr.get("groups"):
        parts.append("groups " + ", ".join(appr["groups"]))
    return "; ".join(parts) or "nobody"


def _creator(annotation: Any) -> str | None:
    """The pod creator's user name from the injection's creator annotation (JSON userInfo)."""
    if not isinstance(annotation, str) or not annotation:
        return None
    try:
        info = json.loads(annotation)
    except ValueError:
        return annotation  # a bare user name
    return (info.get("username") or None) if isinstance(info, dict) else None


def _set_ops(current: Mapping, target: Mapping, base: str, keys) -> list[dict]:
    """JSONPatch ops turning ``current`` into ``target`` for ``keys`` ("add" replaces members)."""
    ops = []
    for key in keys:
        if key in target and current.get(key) != target[key]:
            ops.append({"op": "add", "path": f"{base}/{key}", "value": target[key]})
        elif key not in target and key in current:
            ops.append({"op": "remove", "path": f"{base}/{key}"})
    return ops


# ---------------------------------------------------------------------------- CREATE

def admit_create(obj: Mapping, user: UserInfo, now: dt.datetime, *,
                 rule: SidecarIdentityRule = SidecarIdentityRule(),
                 pod: Mapping | None = None) -> Verdict:
    """Only the sidecar of an injected pod opens requests, for itself, undecided."""
    ns = (obj.get("metadata") or {}).get("namespace") or ""
    spec = _spec(obj)
    requester = _dict(spec.get("requester"))
    pod_ref = _dict(requester.get("pod"))
    sa = user.service_account()
    if sa is None:
        return Verdict.refuse(f"only Chaperone sidecars may create ApprovalRequests: {user.username!r} "
                              "is not a service account (approvers decide existing requests with "
                              "kubectl patch; they never create them)")
    if sa[0] != ns:
        return Verdict.refuse(f"only a Chaperone sidecar in namespace {ns!r} may create ApprovalRequests "
                              f"there; {user.username!r} belongs to namespace {sa[0]!r}")
    if requester.get("serviceAccount") != user.username:
        return Verdict.refuse(f"spec.requester.serviceAccount must be the creating identity "
                              f"{user.username!r}, got {requester.get('serviceAccount')!r}")
    if pod_ref.get("namespace") != ns:
        return Verdict.refuse(f"spec.requester.pod.namespace must be {ns!r} (the request's namespace), "
                              f"got {pod_ref.get('namespace')!r}")
    decided = [f for f in DECIDER_FIELDS + STAMPED_FIELDS if f in spec]
    if decided:
        return Verdict.refuse(f"a new ApprovalRequest must not carry {_fields(decided)}: decisions are "
                              "made by approvers after creation and stamped by admission")
    appr = spec.get("approvers") or {}
    if not (appr.get("users") or appr.get("groups")):
        return Verdict.refuse("spec.approvers must name at least one user or group: nobody could "
                              "decide this request")
    expires = parse_rfc3339(spec.get("expiresAt"))
    if expires is None or expires <= now:
        return Verdict.refuse(f"spec.expiresAt {spec.get('expiresAt')!r} is not in the future")

    bound_name, bound_uid = user.extra_value(POD_NAME_EXTRA), user.extra_value(POD_UID_EXTRA)
    if rule.require_pod_bound_token:
        if not bound_name:
            return Verdict.refuse(f"{user.username!r} did not authenticate with a pod-bound token: "
                                  "sidecars use their pod's projected service-account token")
        if pod_ref.get("name") != bound_name:
            return Verdict.refuse(f"spec.requester.pod.name {pod_ref.get('name')!r} is not the pod the "
                                  f"token is bound to ({bound_name!r})")
        if pod_ref.get("uid") and bound_uid and pod_ref["uid"] != bound_uid:
            return Verdict.refuse(f"spec.requester.pod.uid {pod_ref['uid']!r} is not the uid of the pod "
                                  f"the token is bound to ({bound_uid!r})")
    ops: list[dict] = []
    uid = pod_ref.get("uid") or bound_uid
    if rule.require_injected_pod:
        where = f"{ns}/{pod_ref.get('name')}"
        if pod is None:
            return Verdict.refuse(f"the requesting pod {where} does not exist")
        pmeta = pod.get("metadata") or {}
        if uid and pmeta.get("uid") != uid:
            return Verdict.refuse(f"the requesting pod {where} has uid {pmeta.get('uid')!r}, not {uid!r}")
        pod_sa = (pod.get("spec") or {}).get("serviceAccountName") or "default"
        if pod_sa != sa[1]:
            return Verdict.refuse(f"the requesting pod {where} runs as service account {pod_sa!r}, "
                                  f"not {sa[1]!r}")
        annotations = pmeta.get("annotations") or {}
        if rule.injected_annotation not in annotations:
            return Verdict.refuse(f"the requesting pod {where} is not a Chaperone-injected pod (no "
                                  f"{rule.injected_annotation} annotation)")
        uid = uid or pmeta.get("uid")
        creator = _creator(annotations.get(rule.creator_annotation))
        if creator and requester.get("creator") != creator:
            ops.append({"op": "add", "path": "/spec/requester/creator", "value": creator})
    if uid and pod_ref.get("uid") != uid:
        ops.append({"op": "add", "path": "/spec/requester/pod/uid", "value": uid})
    if "status" in obj:
        ops.append({"op": "remove", "path": "/status"})
    return Verdict.allow(ops)


# ---------------------------------------------------------------------------- UPDATE

def self_approval(spec: Mapping, namespace: str, user: UserInfo) -> str | None:
    """Why ``user`` deciding this request would be self-approval, or None."""
    req = spec.get("requester") or {}
    name = user.username
    if name == req.get("serviceAccount"):
        return f"{name} is the requesting pod's service account"
    sa = user.service_account()
    if (sa and sa[0] == namespace) or f"system:serviceaccounts:{namespace}" in user.groups:
        return f"{name} is a service account of the requesting namespace {namespace!r}"
    if name == req.get("creator"):
        return f"{name} created the requesting pod"
    if name == req.get("onBehalfOf"):
        return f"the agent acted on behalf of {name}"
    return None


def _is_approver(spec: Mapping, user: UserInfo) -> bool:
    appr = spec.get("approvers") or {}
    return user.username in (appr.get("users") or ()) or bool(
        set(user.groups) & set(appr.get("groups") or ()))


def admit_update(old: Mapping, new: Mapping, user: UserInfo, now: dt.datetime) -> Verdict:
    """Stamp a decision (N-of-M) or refuse; metadata-only and status changes pass untouched."""
    old_spec, new_spec = _spec(old), _spec(new)
    changed = {k for k in set(old_spec) | set(new_spec) if old_spec.get(k) != new_spec.get(k)}
    if not changed:
        return Verdict.allow()
    name = user.username
    old_decision, decision = old_spec.get("decision"), new_spec.get("decision")
    if old_decision:
        return Verdict.refuse(f"this request is final: {old_decision} by {old_spec.get('decidedBy')} at "
                              f"{old_spec.get('decidedAt')}; a final decision and its request cannot change "
                              f"(tried to change {_fields(changed)})")
    if not decision:
        if stamped := changed & set(STAMPED_FIELDS):
            return Verdict.refuse(f"{_fields(stamped)} are stamped by admission and cannot be set by clients")
        if "reason" in changed:
            return Verdict.refuse("spec.reason can only be given together with spec.decision")
        requester = (old_spec.get("requester") or {}).get("serviceAccount")
        who = "the requesting sidecar" if name == requester else name
        return Verdict.refuse(f"{_fields(changed)} cannot change after creation ({who} tried): only "
                              "spec.decision (with spec.reason) is set later, by an approver")

    namespace = (old.get("metadata") or {}).get("namespace") or ""
    if decision not in DECISIONS:
        return Verdict.refuse(f"spec.decision must be Approved or Denied, got {decision!r}")
    if others := changed - set(DECIDER_FIELDS) - set(STAMPED_FIELDS):
        return Verdict.refuse(f"a decision may only set spec.decision and spec.reason; {_fields(others)} "
                              "changed too")
    expires = parse_rfc3339(old_spec.get("expiresAt"))
    if (expires is not None and now >= expires) or (old.get("status") or {}).get("phase") == EXPIRED:
        return Verdict.refuse(f"this request expired at {old_spec.get('expiresAt')}; it can no longer be "
                              "decided (the agent has to ask again)")
    if why := self_approval(old_spec, namespace, user):
        return Verdict.refuse(f"{name} may not decide this request: self-approval ({why})")
    if not _is_approver(old_spec, user):
        return Verdict.refuse(f"{name} may not decide this request: not named by spec.approvers "
                              f"({describe_approvers(old_spec)})")
    reviews = [r for r in old_spec.get("reviews") or () if isinstance(r, dict)]
    mine = next((r for r in reviews if r.get("user") == name), None)
    if mine is not None:
        return Verdict.refuse(f"{name} already reviewed this request ({mine.get('decision')} at "
                              f"{mine.get('time')}); each approver decides once")

    stamp = format_rfc3339(now)
    review = {"user": name, "groups": list(user.groups), "decision": decision, "time": stamp}
    reason = new_spec.get("reason")
    if reason:
        review["reason"] = reason
    reviews = reviews + [review]
    needed = old_spec.get("minApprovals") or 1
    target: dict[str, Any] = {"reviews": reviews}
    if decision == DENIED or len(_approvals(reviews)) >= needed:
        target.update(decision=decision, decidedBy=name, decidedAt=stamp)
        if reason:
            target["reason"] = reason
    ops = _set_ops(new_spec, target, "/spec", DECIDER_FIELDS + STAMPED_FIELDS)
    return Verdict.allow(ops)


# ---------------------------------------------------------------------------- re-check

def recheck(operation: str, old: Mapping | None, new: Mapping, user: UserInfo,
            now: dt.datetime) -> str | None:
    """Validating admission: the stored object must look exactly as the mutation stamped it.

    Runs after every mutating webhook, so a later mutation (or a mutating webhook that was
    bypassed) cannot slip in a forged review or decidedBy. Returns the problem, or None.
    """
    spec = _spec(new)
    if operation == "CREATE":
        if decided := [f for f in DECIDER_FIELDS + STAMPED_FIELDS if f in spec]:
            return f"a new ApprovalRequest must not carry {_fields(decided)}"
        return None
    old_spec = _spec(old)
    old_reviews, reviews = list(old_spec.get("reviews") or ()), list(spec.get("reviews") or ())
    if reviews[:len(old_reviews)] != old_reviews:
        return "spec.reviews were rewritten; reviews are append-only and stamped by admission"
    added = reviews[len(old_reviews):]
    if len(added) > 1:
        return "only one review can be added per update"
    if added:
        review = added[0]
        when = parse_rfc3339(review.get("time"))
        if review.get("user") != user.username:
            return f"the new review must be stamped with the deciding user {user.username!r}"
        if when is None or abs(when - now) > STAMP_TOLERANCE:
            return "the new review must be stamped with the admission time"
    decision, old_decision = spec.get("decision"), old_spec.get("decision")
    if decision != old_decision:
        if old_decision or not added or added[0].get("decision") != decision:
            return "spec.decision changed without a matching stamped review"
        if spec.get("decidedBy") != user.username or parse_rfc3339(spec.get("decidedAt")) is None:
            return "a final decision must be stamped with decidedBy/decidedAt of the deciding user"
    elif any(spec.get(f) != old_spec.get(f) for f in ("decidedBy", "decidedAt")):
        return "spec.decidedBy/decidedAt are stamped by admission and cannot be set by clients"
    return None
