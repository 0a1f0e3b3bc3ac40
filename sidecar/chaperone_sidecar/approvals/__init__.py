"""Approvals: ApprovalRequests, grants, decision fan-out and rate limits for the sidecar.

The approval addon calls one façade (``service.ApprovalService``)::

    svc = ApprovalService(KubeApprovalBackend(...), RedisGrants(redis_client))
    outcome = await svc.request(identity=..., connection=..., action=..., digest=...,
                                rule=..., requirement=...)
    # outcome.state: approved | denied | expired | pending (pending: answer 403 with the name)

Modules: ``digest`` (canonical request digest, action key, request names), ``kube``
(ApprovalRequests through the apiserver with the sidecar's KubeClient + watch), ``local``
(standalone mode: one JSON file per request), ``grants`` (grant cache + decision fan-out,
Redis or memory), ``proof`` (a cached grant is honoured only when the ApprovalRequest it names
proves it), ``ratelimit`` (policy rate limits, Redis or memory), ``objects`` (ApprovalRequest
objects built and read, pure), ``service`` (the façade).

The errors live here; everything else is imported from its module (the package re-exports
nothing), so the standalone proxy imports neither the Kubernetes client nor redis unless it
uses them.
"""

from __future__ import annotations


class ApprovalError(Exception):
    """Base class: approvals could not do what was asked."""


class BackendError(ApprovalError):
    """The ApprovalRequest store refused or failed (``status`` is the HTTP status, 0 if none)."""

    def __init__(self, message: str, status: int = 0, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.retry_after = retry_after  # seconds the server asked to wait (Retry-After), if any

    @property
    def transient(self) -> bool:
        """Worth retrying: no answer, overload or a server error."""
        return self.status == 0 or self.status == 429 or self.status >= 500


class Conflict(BackendError):
    """An object of that name exists already."""


class ApprovalUnavailable(ApprovalError):
    """No ApprovalRequest could be opened; the caller must refuse the flow (fail closed)."""
