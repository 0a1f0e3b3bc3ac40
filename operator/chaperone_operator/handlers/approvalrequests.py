"""ApprovalRequest handlers: the admission pair, status/Events, and the expiry daemon.

All decisions live in the pure modules :mod:`..approvals` (admission) and
:mod:`..approval_status` (status, Events); these handlers only gather inputs (userInfo, the
requesting pod, the clock) and apply outputs.

* ``approvalrequest-mutate`` (CREATE, UPDATE): refuses abuse or stamps the decision. Mutating,
  because stamping must rewrite what the client sent.
* ``approvalrequest-validate`` (CREATE, UPDATE): re-checks the final object after every
  mutating webhook ran (``approvals.recheck``), so nothing can be slipped in after the stamp.
* ``approvalrequest-delete`` (DELETE, validating): never refuses (RBAC alone says who may
  delete) and has no side effect outside the operator: it only remembers the deleter's
  ``userInfo`` and the time in the object's kopf memo (one memo per uid, shared with the watch
  handlers). Dry-run deletes are not remembered. The chart registers it with
  ``failurePolicy: Ignore``: an operator outage must never block cleanup.
* ``approvalrequest-status`` (event): mirrors phase/approvals/message into status and posts one
  Kubernetes Event per review and per final phase. When a *pending* request's DELETED arrives it
  posts ONE Warning ``DeletedPending`` naming the deleter (username, groups) and the time of the
  DELETE as admission saw them; without them (webhook down or bypassed, operator restarted in
  between) the same Event says the deleter is unknown and points at the audit log. Design
  choice: the Event is posted from the watch, not from admission, because only the watch knows
  the object really went away (a DELETE that another webhook refuses deletes nothing), and
  kopf's event poster is not available in the webhook's context.
* ``approvalrequest-deadline`` (daemon, pending requests only): sleeps until ``expiresAt`` and
  then writes the Expired status. It stops by itself once the request is decided.

Both webhooks match every namespace (no namespaceSelector in the chart): ApprovalRequests are not
needed to start the operator, so there is no bootstrap deadlock to avoid, and an excluded
namespace would be an unguarded one.
"""

from __future__ import annotations

import asyncio
import copy
import functools

import jsonpatch
import kopf

from chaperone_sidecar.api import APPROVAL_REQUESTS, GROUP, VERSION
from chaperone_sidecar.timefmt import parse_rfc3339

from .. import kube
from ..approval_status import decision_events, deletion_event, desired_status
from ..approvals import EXPIRED, UserInfo, Verdict, admit_create, admit_update, recheck
from ..conditions import status_differs

__all__ = ["on_approvalrequest_mutate", "on_approvalrequest_validate", "on_approvalrequest_delete",
           "on_approvalrequest_event", "on_approvalrequest_deadline"]


# Key in the object's kopf memo (kopf keeps one memo per object uid, shared by admission and
# watch handlers): (UserInfo, time) of the last admitted DELETE of that object.
DELETED_BY = "chaperone_deleted_by"


def _apply(ops: list[dict], body: dict) -> None:
    jsonpatch.apply_patch(body, ops, in_place=True)


def apply_verdict(verdict: Verdict, patch: kopf.Patch) -> None:
    """Refuse with the verdict's message (403), or queue its JSONPatch ops on kopf's patch."""
    if not verdict.allowed:
        raise kopf.AdmissionError(verdict.message, code=403)
    if verdict.patch:
        patch.fns.append(functools.partial(_apply, [copy.deepcopy(op) for op in verdict.patch]))


# The arg-type ignores below: kopf passes operation, old and new to admission handlers, but its
# WebhookFn protocol does not list them.
@kopf.on.mutate(GROUP, VERSION, APPROVAL_REQUESTS, id="approvalrequest-mutate",  # type: ignore[arg-type]
                operations=["CREATE", "UPDATE"])
def on_approvalrequest_mutate(operation, body, old, new, userinfo, patch, memo, **_):
    """Only sidecars create; approvers' decisions are stamped from userInfo (N-of-M)."""
    runtime = memo.runtime
    user, now = UserInfo.from_admission(userinfo), runtime.now()
    if operation == "CREATE":
        obj = copy.deepcopy(dict(body))
        pod = None
        ref = ((obj.get("spec") or {}).get("requester") or {}).get("pod") or {}
        ns = (obj.get("metadata") or {}).get("namespace")
        if runtime.settings.require_injected_pod and ref.get("name") and ref.get("namespace") == ns:
            pod = kube.read_pod(runtime.api, ns, ref["name"])
        verdict = admit_create(obj, user, now, rule=runtime.settings.sidecar_rule(), pod=pod)
    else:
        verdict = admit_update(copy.deepcopy(dict(old)), copy.deepcopy(dict(new)), user, now)
    apply_verdict(verdict, patch)


@kopf.on.validate(GROUP, VERSION, APPROVAL_REQUESTS, id="approvalrequest-validate",  # type: ignore[arg-type]
                  operations=["CREATE", "UPDATE"])
def on_approvalrequest_validate(operation, old, new, userinfo, memo, **_):
    """The stored object must carry exactly what the mutation stamped."""
    problem = recheck(operation, dict(old) if old is not None else None, dict(new),
                      UserInfo.from_admission(userinfo), memo.runtime.now())
    if problem:
        raise kopf.AdmissionError(problem, code=403)


@kopf.on.validate(GROUP, VERSION, APPROVAL_REQUESTS, id="approvalrequest-delete",
                  operations=["DELETE"])
def on_approvalrequest_delete(userinfo, dryrun, memo, **_):
    """Never refuses; remembers who asked to delete (and when) for the DeletedPending Event."""
    if not dryrun:  # a dry run deletes nothing, so it must not be blamed for a later deletion
        memo[DELETED_BY] = (UserInfo.from_admission(userinfo), memo.runtime.now())


@kopf.on.event(GROUP, VERSION, APPROVAL_REQUESTS, id="approvalrequest-status")
def on_approvalrequest_event(type, body, status, patch, memo, **_):
    """Mirror phase/approvals into status; one Event per review and per final phase."""
    if type == "DELETED":
        deleter, when = memo.get(DELETED_BY) or (None, memo.runtime.now())
        if (event := deletion_event(body, when, deleter)) is not None:
            kopf.event(body, type=event[0], reason=event[1], message=event[2])
        return
    desired = desired_status(body, memo.runtime.now())
    if status_differs(status, desired):
        for kind, reason, message in decision_events(body, status, desired):
            kopf.event(body, type=kind, reason=reason, message=message)
        patch.status.update(desired)


def _pending(body, **_) -> bool:
    return not (body.get("spec") or {}).get("decision") and \
        (body.get("status") or {}).get("phase") != EXPIRED


@kopf.daemon(GROUP, VERSION, APPROVAL_REQUESTS, id="approvalrequest-deadline", when=_pending,
             cancellation_timeout=5.0)
async def on_approvalrequest_deadline(body, stopped, memo, logger, **_):
    """Sleep until expiresAt, then mark the request Expired (unless decided meanwhile)."""
    runtime = memo.runtime
    deadline = parse_rfc3339((body.get("spec") or {}).get("expiresAt"))
    if deadline is None:
        return
    delay = (deadline - runtime.now()).total_seconds()
    if delay > 0:
        await stopped.wait(delay)
    if stopped:
        return
    current = copy.deepcopy(dict(body))  # the daemon's body is kept fresh by kopf
    desired = desired_status(current, runtime.now())
    if desired["phase"] != EXPIRED or not status_differs(current.get("status"), desired):
        return
    for kind, reason, message in decision_events(current, current.get("status"), desired):
        kopf.event(body, type=kind, reason=reason, message=message)
    meta = current["metadata"]
    await asyncio.to_thread(kube.patch_status, runtime.api, APPROVAL_REQUESTS, meta["namespace"], meta["name"], desired)
    logger.info(f"ApprovalRequest expired at {current['spec']['expiresAt']}")
