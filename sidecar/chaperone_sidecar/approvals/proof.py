"""Grant proof: a cached grant passes a flow only when the ApprovalRequest it names approves it.

A grant in Redis (or memory) is only a *claim*: "ApprovalRequest R approved this, until T".
Redis is shared by every sidecar and, unless the network says otherwise, reachable from the
agent container, so anybody there can write a ``chaperone:grant:*`` key. **Decision**: instead
of signing grants (a key to distribute, rotate and keep away from the agent) the sidecar re-reads
the ApprovalRequest the grant names from the apiserver, with its own service-account token, in
its own namespace, and checks that the *request* approves what the grant claims. The
ApprovalRequest is proof the agent cannot forge: only sidecars create it (admission checks the
pod-bound token), only approvers decide it (admission stamps ``decidedBy``/``decidedAt``), and
the CRD's CEL rules keep the requester, digest, action, grant and deadline immutable.

What is bound, each checked against the stored object (:func:`check`):

* the request exists and is approved: ``spec.decision: Approved`` with ``decidedBy`` (stamped by
  admission; the CEL rules require it), or ``status.phase: Approved`` (the operator's);
* the subject: ``requester.serviceAccount``, ``requester.creator``, ``requester.onBehalfOf`` and
  ``spec.connection`` are this flow's (a grant copied to another subject's key is refused);
* the scope: the request's ``spec.grant.scope`` is the key's scope, and the key's digest is the
  request's ``requestDigest`` (exact) or the key's action key is the request's action (action);
* the window: ``decidedAt + grant.ttlSeconds``; a grant claiming a later end was altered.
  Without ``decidedAt`` (no operator webhook) the bound is ``expiresAt + ttlSeconds``: a request
  cannot be decided after it expired.

Cost: grants are consulted only for ``requireApproval`` flows, and a verified request is kept
in memory for ``fresh_seconds`` (10 s by default): its decision is final and its bindings are
immutable, so only a deletion (which revokes the grant) can make the memory stale, for at most
that long. The hold that saw the approval seeds the memory, so the retry that follows an
approval costs no extra API call.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from ..policy.model import Identity
from ..timefmt import epoch_to_rfc3339, rfc3339_to_epoch
from .grants import Grant
from .objects import binding_problem, read_state, request_action_key

__all__ = ["Proof", "check", "ProofCache"]

_SLACK = 1.0  # seconds: a grant's end is computed from second-resolution timestamps


@dataclass(frozen=True)
class Proof:
    """A verified grant: it passes until ``end`` (epoch), approved by ``approvers``."""

    end: float
    approvers: tuple[str, ...]


def window_end(obj: Mapping) -> float | None:
    """When the grant made by this approved request ends (epoch), None when unreadable."""
    spec = obj.get("spec") or {}
    grant = spec.get("grant") or {}
    ttl = grant.get("ttlSeconds", 900)
    since = rfc3339_to_epoch(spec.get("decidedAt")) or rfc3339_to_epoch(spec.get("expiresAt"))
    if since is None or not isinstance(ttl, int):
        return None
    return since + max(0, ttl)


def check(obj: Mapping | None, grant: Grant, *, scope: str, key: str, identity: Identity,
          connection: str, now: float) -> tuple[Proof | None, str]:
    """(proof, "") when ``obj`` (the request ``grant`` names, None if absent) approves the grant
    stored under ``scope``/``key`` for this flow; else (None, why it does not)."""
    name = grant.request
    if obj is None:
        return None, f"it names ApprovalRequest {name!r}, which does not exist"
    if grant.scope != scope:
        return None, f"it claims scope {grant.scope!r} but is stored under an {scope!r} key"
    spec = obj.get("spec") or {}
    # spec.decision carries decidedBy (CEL) stamped by admission; status.phase is written by
    # the operator only (the sidecar's role has no status access).
    state, approvers, _ = read_state(obj, now)
    if state != "approved":
        return None, f"ApprovalRequest {name} is {state}, not approved"
    if problem := binding_problem(obj, identity, connection):
        return None, f"ApprovalRequest {name} was asked by someone else: {problem}"
    approved_scope = (spec.get("grant") or {}).get("scope") or "exact"
    if approved_scope != scope:
        return None, (f"ApprovalRequest {name} granted scope {approved_scope!r}, the grant "
                      f"claims {scope!r}")
    if scope == "exact" and spec.get("requestDigest") != key:
        return None, (f"ApprovalRequest {name} approved request {spec.get('requestDigest')}, "
                      f"not {key}")
    if scope == "action" and request_action_key(obj) != key:
        return None, f"ApprovalRequest {name} approved another action ({(spec.get('action') or {}).get('name')})"
    end = window_end(obj)
    if end is None:
        return None, f"ApprovalRequest {name} has no readable decision time"
    if grant.expires_at > end + _SLACK:
        return None, (f"it claims to last until {epoch_to_rfc3339(grant.expires_at)}, ApprovalRequest "
                      f"{name} grants until {epoch_to_rfc3339(end)}")
    if now >= end:
        return None, f"ApprovalRequest {name}'s grant ended at {epoch_to_rfc3339(end)}"
    return Proof(min(end, grant.expires_at), approvers), ""


class ProofCache:
    """Approved ApprovalRequests recently read from the API, by name (bounded, short-lived)."""

    def __init__(self, *, fresh_seconds: float = 10.0, size: int = 1024,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.fresh_seconds = fresh_seconds
        self.size = size
        self.clock = clock
        self._items: OrderedDict[str, tuple[float, dict]] = OrderedDict()

    def get(self, name: str) -> dict | None:
        entry = self._items.get(name)
        if entry is None:
            return None
        if self.clock() - entry[0] > self.fresh_seconds:
            del self._items[name]
            return None
        return entry[1]

    def put(self, obj: Mapping[str, Any]) -> None:
        """Remember ``obj`` if it is approved (only a final approval is worth remembering)."""
        name = (obj.get("metadata") or {}).get("name")
        if not name or read_state(obj, time.time())[0] != "approved":
            return
        self._items[name] = (self.clock(), dict(obj))
        self._items.move_to_end(name)
        while len(self._items) > self.size:
            self._items.popitem(last=False)

    def drop(self, name: str) -> None:
        self._items.pop(name, None)
