"""What an ApprovalRequest's status and Events should say, derived from its spec and the clock.

PURE, like :mod:`.approvals`: the operator's status handler and the expiry daemon both call
:func:`desired_status` (one source of truth, so the daemon only has to wake up at the deadline)
and :func:`decision_events` to report each review and the final phase exactly once.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Mapping

from chaperone_sidecar.timefmt import format_rfc3339, parse_rfc3339

from .approvals import APPROVED, DECISIONS, DENIED, EXPIRED, PENDING, UserInfo, describe_approvers

__all__ = ["desired_status", "decision_events", "deletion_event"]


def _spec(obj: Mapping) -> dict:
    spec = obj.get("spec")
    return spec if isinstance(spec, dict) else {}


def _approvals(reviews) -> list[dict]:
    return [r for r in reviews or () if isinstance(r, dict) and r.get("decision") == APPROVED]


def desired_status(obj: Mapping, now: dt.datetime) -> dict:
    """status.phase/approvals/message/observedGeneration as the spec and the clock say."""
    spec = _spec(obj)
    needed = spec.get("minApprovals") or 1
    reviews = [r for r in spec.get("reviews") or () if isinstance(r, dict)]
    given = len(_approvals(reviews))
    decision = spec.get("decision")
    expires = parse_rfc3339(spec.get("expiresAt"))
    if decision in DECISIONS:
        phase = decision
        message = f"{decision.lower()} by {spec.get('decidedBy')} at {spec.get('decidedAt')}"
        if spec.get("reason"):
            message += f": {spec['reason']}"
    elif expires is not None and now >= expires:
        phase, message = EXPIRED, f"expired at {spec.get('expiresAt')} without a decision"
    else:
        phase = PENDING
        message = (f"waiting for {needed - given} more approval(s) from "
                   f"{describe_approvers(spec)} until {spec.get('expiresAt')}")
    status = {"phase": phase, "approvals": f"{given}/{needed}", "message": message}
    generation = (obj.get("metadata") or {}).get("generation")
    if generation is not None:
        status["observedGeneration"] = generation
    return status


def decision_events(obj: Mapping, current: Mapping | None, desired: Mapping) -> list[tuple[str, str, str]]:
    """(type, reason, message) Kubernetes Events for what changed since ``current`` status.

    Reviews are append-only and any denial is final, so the approvals already reflected in
    ``current.approvals`` tell exactly which reviews are new: one Event per new review, plus
    one when the request was first seen, and one for the final phase.
    """
    spec = _spec(obj)
    current = current or {}
    events: list[tuple[str, str, str]] = []
    phase, old_phase = desired.get("phase"), current.get("phase")
    if not old_phase:
        req = spec.get("requester") or {}
        action = (spec.get("action") or {}).get("summary") or (spec.get("action") or {}).get("name")
        events.append(("Normal", "Requested", f"{req.get('serviceAccount')} asks to: {action}; "
                                              f"approvers: {describe_approvers(spec)}"))
    try:
        reflected = int(str(current.get("approvals", "0/0")).split("/")[0])
    except ValueError:
        reflected = 0
    needed = spec.get("minApprovals") or 1
    approvals = _approvals(spec.get("reviews") or ())
    for i, review in enumerate(approvals[reflected:], start=reflected + 1):
        if phase == APPROVED and i == len(approvals):
            continue  # the final approval is reported as "Approved" below
        events.append(("Normal", "Reviewed", f"{review.get('user')} approved ({i}/{needed})"
                                             + (f": {review['reason']}" if review.get("reason") else "")))
    if phase != old_phase and phase in (APPROVED, DENIED, EXPIRED):
        kind = "Normal" if phase == APPROVED else "Warning"
        events.append((kind, phase, desired.get("message", "")))
    return events


def deletion_event(obj: Mapping, now: dt.datetime, deleter: UserInfo | None = None
                   ) -> tuple[str, str, str] | None:
    """The Warning Event recording that a request was deleted before anyone decided it.

    A decided or expired request going away is housekeeping; a *pending* one going away is worth
    an audit trail: the agent's held flow is refused ("request deleted") and a retry opens a new
    request. ``deleter`` is the admission ``userInfo`` of the DELETE (the approvalrequest-delete
    webhook sees it); a watch event does not carry it, so the watch fallback names nobody and
    points at the apiserver's audit log."""
    if desired_status(obj, now).get("phase") != PENDING:
        return None
    spec = _spec(obj)
    req = spec.get("requester") or {}
    action = (spec.get("action") or {}).get("summary") or (spec.get("action") or {}).get("name")
    when = format_rfc3339(now)
    if deleter is not None:
        groups = ", ".join(deleter.groups) or "none"
        who = f" by {deleter.username or '(unknown user)'} (groups: {groups})"
    else:
        who = " by an unknown user (not seen by admission; see the apiserver audit log)"
    return ("Warning", "DeletedPending",
            f"deleted while pending at {when}{who} (undecided request from {req.get('serviceAccount')}: "
            f"{action}); the held request is refused and a retry opens a new ApprovalRequest")
