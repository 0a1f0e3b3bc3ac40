"""The approvals façade the approval addon calls: grant cache → ApprovalRequest → decision.

``await ApprovalService.request(...)`` for a flow whose decision is ``require_approval``:

1. A cached grant (exact digest first, then the action key) passes the flow at once.
2. Otherwise an ApprovalRequest is opened — or an existing one for the same digest and
   requester reused: an agent that retries while a request is pending must not flood
   approvers with duplicates. An already *approved* one whose grant window is still open
   (approved while nobody was holding) passes the flow and refills the cache.
3. ``defer`` mode returns ``pending`` (the addon answers 403 naming the request); ``hold``
   mode waits up to ``hold_seconds`` for the decision, racing the backend's watch against
   the decision fan-out, and never blocks the event loop.

The decision is read from ``spec.decision`` (final by the CRD's rules) and, when the operator
has written it, ``status.phase`` (Approved/Denied/Expired). A fan-out message only wakes the
holder; the decision is re-read from the backend before a flow is released.

This module is the deciding part; the ApprovalRequest objects themselves (building one, reading
its state, labels, the texts shown to the agent) are pure functions in :mod:`.objects`, re-exported
here because callers have always imported them from ``approvals.service``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from dataclasses import asdict, dataclass
from typing import Any, Callable, Mapping, Protocol

from ..policy.model import Action, ApprovalRequirement, Identity, RuleRef
from . import ApprovalUnavailable, BackendError, Conflict
from .digest import action_key, request_name
from .grants import Grant, MemoryGrants, grant_key
from .objects import (
    LABEL_DIGEST, LABEL_REQUESTER, State, approve_command, approvers_text, build_request,
    parse_rfc3339, read_state, requester_label, rfc3339, subject_key,
)

__all__ = ["ApprovalService", "Outcome", "read_state", "build_request", "subject_key",
           "approvers_text", "approve_command", "LABEL_DIGEST", "LABEL_REQUESTER"]

log = logging.getLogger("chaperone.approvals")

_EXPIRY_GRACE = 0.05  # wake just after expiresAt, so "expired" is decided on our clock too


@dataclass(frozen=True)
class Outcome:
    """What the addon does with the flow: approved passes; anything else is a 403."""

    state: State
    name: str = ""  # the ApprovalRequest (also for grants: the request that made the grant)
    approvers: tuple[str, ...] = ()
    reason: str = ""
    expires_at: str = ""  # pending: the request's deadline; approved: the grant's end (RFC 3339)
    grant: str = ""  # "exact" | "action" when a cached grant passed the flow

    def to_dict(self) -> dict[str, Any]:
        return {k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(self).items() if v}


class Backend(Protocol):
    async def create(self, obj: dict) -> dict: ...
    async def get(self, name: str) -> dict | None: ...
    async def find(self, labels: Mapping[str, str]) -> list[dict]: ...
    async def wait(self, name: str, timeout: float, done: Callable[[dict], bool]) -> dict | None: ...


# ---------------------------------------------------------------------------- the service

class ApprovalService:
    """One per sidecar. ``backend``: ``KubeApprovalBackend`` or ``LocalApprovalStore``;
    ``grants``: ``RedisGrants`` (shared) or ``MemoryGrants`` (default)."""

    def __init__(self, backend: Backend, grants=None, *, clock: Callable[[], float] = time.time) -> None:
        self.backend = backend
        self.grants = grants if grants is not None else MemoryGrants()
        self.clock = clock
        self.held = 0  # flows currently held (the "pending approvals" gauge)
        self._locks: dict[str, list] = {}  # key -> [Lock, users]

    def _final(self, obj: Mapping) -> bool:
        return read_state(obj, self.clock())[0] != "pending"

    @contextlib.asynccontextmanager
    async def _keyed(self, key: str):
        # One find-or-create at a time per digest+requester: concurrent retries share a request.
        entry = self._locks.setdefault(key, [asyncio.Lock(), 0])
        entry[1] += 1
        try:
            async with entry[0]:
                yield
        finally:
            entry[1] -= 1
            if entry[1] == 0:
                self._locks.pop(key, None)

    async def check_grant(self, *, identity: Identity, connection: str, action: Action,
                          digest: str) -> Outcome | None:
        """A cached grant for this exact request, else for this action; None when neither."""
        subject = subject_key(identity, connection)
        for scope, key in (("exact", digest), ("action", action_key(connection, action))):
            try:
                grant = await self.grants.get(grant_key(scope, subject, key))
            except Exception as exc:  # noqa: BLE001 - cache down: ask for approval (fail closed)
                log.warning("grant cache unavailable: %s: %s", exc.__class__.__name__, exc)
                return None
            if grant is not None:
                return Outcome("approved", grant.request, grant.approvers,
                               f"{scope} grant from {grant.request}", rfc3339(grant.expires_at),
                               grant=scope)
        return None

    async def _store_grant(self, obj: Mapping, approvers: tuple[str, ...], subject: str,
                           digest: str, akey: str, requirement: ApprovalRequirement,
                           since: float) -> float:
        """Cache the grant an approval made; returns its end (epoch; ``since`` when none)."""
        spec = obj.get("spec") or {}
        grant = spec.get("grant") or {}
        scope = grant.get("scope") or requirement.grant_scope
        ttl = grant.get("ttlSeconds", requirement.grant_ttl_seconds)
        end = since + max(0, int(ttl))
        if end <= self.clock():
            return end
        key = grant_key("exact", subject, digest) if scope != "action" else grant_key(
            "action", subject, akey)
        try:
            await self.grants.put(key, Grant(scope if scope == "action" else "exact",
                                             (obj.get("metadata") or {}).get("name", ""),
                                             approvers, end))
        except Exception as exc:  # noqa: BLE001 - the flow still passes; retries ask again
            log.warning("could not cache grant: %s: %s", exc.__class__.__name__, exc)
        return end

    async def request(self, *, identity: Identity, connection: str, action: Action, digest: str,
                      rule: RuleRef, requirement: ApprovalRequirement, session_id: str = "",
                      body_preview: str = "") -> Outcome:
        """Decide a ``require_approval`` flow (see the module docstring).

        Raises ``ApprovalUnavailable`` when no ApprovalRequest can be opened (refuse the flow).
        """
        if (cached := await self.check_grant(identity=identity, connection=connection,
                                             action=action, digest=digest)) is not None:
            return cached
        if not (requirement.approvers.users or requirement.approvers.groups):
            raise ApprovalUnavailable(f"rule {rule} names no approvers: nobody could decide")
        subject, akey = subject_key(identity, connection), action_key(connection, action)
        labels = {LABEL_DIGEST: digest.split(":", 1)[-1][:63],
                  LABEL_REQUESTER: requester_label(identity)}
        async with self._keyed("|".join(sorted(labels.values()))):
            try:
                existing = await self.backend.find(labels)
            except BackendError as exc:
                raise ApprovalUnavailable(f"cannot look up ApprovalRequests: {exc}") from exc
            now = self.clock()
            pending: list[dict] = []
            for obj in existing:
                spec = obj.get("spec") or {}
                if spec.get("requestDigest") != digest:
                    continue
                state, approvers, _ = read_state(obj, now)
                if state == "approved":
                    # Approved while nobody held the flow: the grant window runs from the
                    # decision (or, without decidedAt, conservatively from the request).
                    since = (parse_rfc3339(spec.get("decidedAt"))
                             or parse_rfc3339(spec.get("requestedAt")) or 0.0)
                    end = await self._store_grant(obj, approvers, subject, digest, akey,
                                                  requirement, since)
                    if end > now:
                        return Outcome("approved", obj["metadata"]["name"], approvers,
                                       "approved", rfc3339(end))
                elif state == "pending":
                    pending.append(obj)
            if pending:
                obj = max(pending, key=lambda o: parse_rfc3339(o["spec"].get("expiresAt")) or 0.0)
            else:
                obj = await self._create(identity=identity, connection=connection, action=action,
                                         digest=digest, rule=rule, requirement=requirement,
                                         session_id=session_id, body_preview=body_preview)
        name, spec = obj["metadata"]["name"], obj.get("spec") or {}
        waiting = Outcome("pending", name, (), "waiting for " + approvers_text(requirement),
                          spec.get("expiresAt", ""))
        if requirement.mode == "defer" or requirement.hold_seconds <= 0:
            return waiting
        return await self._hold(obj, waiting, subject, digest, akey, requirement)

    async def _create(self, *, requirement: ApprovalRequirement, **fields: Any) -> dict:
        for _ in range(3):  # a name collision is only possible in the random suffix: retry
            body = build_request(name=request_name(fields["action"].name, fields["digest"]),
                                 requirement=requirement, now=self.clock(), **fields)
            try:
                return await self.backend.create(body)
            except Conflict:
                continue
            except BackendError as exc:
                raise ApprovalUnavailable(f"cannot open an ApprovalRequest: {exc}") from exc
        raise ApprovalUnavailable("cannot open an ApprovalRequest: name collisions")

    async def _hold(self, obj: dict, waiting: Outcome, subject: str, digest: str, akey: str,
                    requirement: ApprovalRequirement) -> Outcome:
        name = waiting.name
        expires = parse_rfc3339((obj.get("spec") or {}).get("expiresAt"))
        budget = float(requirement.hold_seconds)
        if expires is not None and expires - self.clock() <= budget:
            budget = max(0.0, expires - self.clock()) + _EXPIRY_GRACE
        self.held += 1
        try:
            found, gone = await self._await_final(name, budget)
        finally:
            self.held -= 1
        if gone:
            return Outcome("expired", name, (), f"ApprovalRequest {name} was deleted before a "
                                                 "decision; ask again")
        found = found or obj  # nothing newer seen: judge the object we opened (maybe expired now)
        now = self.clock()
        state, approvers, reason = read_state(found, now)
        if state == "approved":
            since = parse_rfc3339((found.get("spec") or {}).get("decidedAt")) or now
            end = await self._store_grant(found, approvers, subject, digest, akey, requirement,
                                          min(since, now))
            return Outcome("approved", name, approvers, reason or "approved",
                           rfc3339(end) if end > now else "")
        if state == "pending":
            return waiting
        return Outcome(state, name, approvers, reason)

    async def _await_final(self, name: str, timeout: float) -> tuple[dict | None, bool]:
        """(latest object, deleted): races the backend's watch against the decision fan-out."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        watch: asyncio.Task | None = loop.create_task(self.backend.wait(name, timeout, self._final))
        fan: asyncio.Task | None = loop.create_task(self.grants.wait_decision(name, timeout))
        latest: dict | None = None
        watch_failed = False
        try:
            while watch is not None or fan is not None:
                tasks = {t for t in (watch, fan) if t is not None}
                done, _ = await asyncio.wait(tasks, timeout=max(0.0, deadline - loop.time()),
                                             return_when=asyncio.FIRST_COMPLETED)
                if not done:
                    break
                if watch in done:
                    task, watch = watch, None
                    try:
                        result = task.result()
                    except Exception as exc:  # noqa: BLE001 - keep holding on the fan-out
                        log.warning("watching %s failed: %s", name, exc)
                        watch_failed = True
                        continue
                    if result is None:
                        return None, True
                    latest = result
                    if self._final(result):
                        await self._publish(name, result)
                        return result, False
                    break  # the watch ran out of time: so did we
                if fan in done:
                    task, fan = fan, None
                    try:
                        hint = task.result()
                    except Exception as exc:  # noqa: BLE001 - keep holding on the watch
                        log.warning("decision fan-out for %s failed: %s", name, exc)
                        continue
                    if hint is None:
                        continue
                    # A wake-up, not a verdict: the backend is the source of truth.
                    try:
                        current = await self.backend.get(name)
                    except BackendError as exc:
                        log.warning("re-reading %s after a fan-out: %s", name, exc)
                        continue
                    if current is None:
                        return None, True
                    latest = current
                    if self._final(current):
                        return current, False
        finally:
            for task in (watch, fan):
                if task is not None:
                    task.cancel()
            for task in (watch, fan):
                if task is not None:
                    with contextlib.suppress(BaseException):
                        await task
        if watch_failed:  # one last look, the watch could not tell us
            with contextlib.suppress(BackendError):
                current = await self.backend.get(name)
                return current, current is None
        return latest, False

    async def _publish(self, name: str, obj: Mapping) -> None:
        state, approvers, reason = read_state(obj, self.clock())
        try:
            await self.grants.publish_decision(name, {"name": name, "state": state,
                                                      "approvers": list(approvers), "reason": reason})
        except Exception as exc:  # noqa: BLE001 - fan-out is an optimisation
            log.warning("could not publish the decision on %s: %s", name, exc)

    async def close(self) -> None:
        for part in (self.backend, self.grants):
            closer = getattr(part, "close", None)
            if closer is not None:
                await closer()
