"""The approvals façade the approval addon calls: grant cache → ApprovalRequest → decision.

``await ApprovalService.request(...)`` for a flow whose decision is ``require_approval``:

1. A cached grant (exact digest first, then the action key) passes the flow, once the
   ApprovalRequest it names proves it (:mod:`.proof`: re-read from the API, bound to subject,
   digest or action, scope and window). A grant the request disproves (forged, altered,
   replayed to another key, revoked by deleting the request) is refused, dropped from the
   cache and reported in ``Outcome.refused_grants``; the flow then takes step 2.
2. Otherwise the subject's earlier requests for this digest (and, with ``action`` scope, this
   action) are looked up in the API (labels ``chaperone.dev/subject`` + ``request-digest`` /
   ``action-key``, then checked on the object):

   * an *approved* one whose grant window is still open (approved while nobody was holding,
     or the cache lost it) passes the flow and refills the cache;
   * a *denied* or *expired* one answers the retry with that outcome - approver, reason,
     name - for ``remember_outcome_seconds`` (policy ``rememberOutcomeSeconds``, default 1 h)
     after the decision or deadline, instead of paging approvers again. **Decision**: the
     memory is the ApprovalRequest objects themselves, not a cache entry, so an agent that
     erases Redis changes nothing; a retry from another replica of the same subject is
     answered the same way;
   * a *pending* one for the same digest is reused: an agent that retries while a request
     is pending must not flood approvers with duplicates;
   * else a new ApprovalRequest is opened.
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
import re
import time
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, replace
from typing import Any, Protocol

from ..api import LABEL_ACTION, LABEL_DIGEST, LABEL_SUBJECT
from ..policy.model import Action, ApprovalRequirement, Identity, RuleRef
from ..timefmt import epoch_to_rfc3339, rfc3339_to_epoch
from . import ApprovalError, ApprovalUnavailable, BackendError, Conflict
from .digest import action_key, request_name
from .grants import Grant, InvalidGrant, MemoryGrants, grant_key
from .objects import (
    State,
    approvers_text,
    binding_problem,
    build_request,
    label_value,
    read_state,
    request_action_key,
    subject_key,
)
from .proof import ProofCache, window_end
from .proof import check as check_proof

__all__ = ["ApprovalService", "Outcome"]

log = logging.getLogger("chaperone.approvals")

_OBJECT_NAME = re.compile(r"^[a-z0-9]([-a-z0-9.]{0,251}[a-z0-9])?$")  # a DNS-1123 subdomain
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
    # denied/expired answered from an earlier request: retries get this answer until then
    remembered_until: str = ""
    # grants found in the cache but refused (forged, altered, replayed, revoked): why
    refused_grants: tuple[str, ...] = ()

    def to_dict(self) -> dict[str, Any]:
        return {k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(self).items() if v}


class Backend(Protocol):
    namespace: str  # where this backend's ApprovalRequests live (refusals name it)

    async def create(self, obj: dict) -> dict: ...
    async def get(self, name: str) -> dict | None: ...
    async def find(self, labels: Mapping[str, str]) -> list[dict]: ...
    async def wait(self, name: str, timeout: float, done: Callable[[dict], bool]) -> dict | None: ...


def _remembered_until(obj: Mapping, state: State, requirement: ApprovalRequirement) -> float:
    """Until when a denial or expiry answers retries (epoch; 0 when not at all).

    A denial counts from its decision, an expiry from the deadline; without ``decidedAt`` (no
    operator webhook) the deadline is the later, stricter anchor."""
    spec = obj.get("spec") or {}
    keep = max(0, requirement.remember_outcome_seconds)
    if not keep or state not in ("denied", "expired"):
        return 0.0
    anchor = (rfc3339_to_epoch(spec.get("decidedAt")) if state == "denied" else None) \
        or rfc3339_to_epoch(spec.get("expiresAt")) or 0.0
    return anchor + keep if anchor else 0.0


# ---------------------------------------------------------------------------- the service

class ApprovalService:
    """One per sidecar. ``backend``: ``KubeApprovalBackend`` or ``LocalApprovalStore``;
    ``grants``: ``RedisGrants`` (shared) or ``MemoryGrants`` (default)."""

    def __init__(self, backend: Backend, grants=None, *, clock: Callable[[], float] = time.time,
                 proofs: ProofCache | None = None) -> None:
        self.backend = backend
        self.grants = grants if grants is not None else MemoryGrants()
        self.clock = clock
        self.proofs = proofs if proofs is not None else ProofCache()
        self.held = 0  # flows currently held (the "pending approvals" gauge)
        self.refused_grants = 0  # grants refused because their ApprovalRequest disproved them
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
                          digest: str) -> tuple[Outcome | None, tuple[str, ...]]:
        """A proven grant for this exact request, else for this action; and why the grants that
        were found but disproved were refused (see :mod:`.proof`)."""
        subject = subject_key(identity, connection)
        refused: list[str] = []
        for scope, key in (("exact", digest), ("action", action_key(connection, action))):
            cache_key = grant_key(scope, subject, key)
            try:
                grant = await self.grants.get(cache_key)
            except InvalidGrant as exc:
                refused.append(f"{scope} grant: {exc}")
                await self._forget(cache_key)
                continue
            except Exception as exc:  # noqa: BLE001 - cache down: ask for approval (fail closed)
                log.warning("grant cache unavailable: %s: %s", exc.__class__.__name__, exc)
                break
            if grant is None:
                continue
            obj = self.proofs.get(grant.request)
            if obj is None and _OBJECT_NAME.match(grant.request):  # never a path of our making
                try:
                    obj = await self.backend.get(grant.request)
                except BackendError as exc:
                    # Cannot prove it now: not an attempt, just no grant (fail closed).
                    log.warning("cannot verify the %s grant from %s: %s", scope, grant.request, exc)
                    continue
                except ApprovalError:  # a name the store cannot hold: no such request
                    obj = None
                if obj is not None:
                    self.proofs.put(obj)
            proof, why = check_proof(obj, grant, scope=scope, key=key, identity=identity,
                                     connection=connection, now=self.clock())
            if proof is None:
                refused.append(f"{scope} grant: {why}")
                await self._forget(cache_key)
                continue
            self.refused_grants += len(refused)
            return Outcome("approved", grant.request, proof.approvers,
                           f"{scope} grant from {grant.request}", epoch_to_rfc3339(proof.end),
                           grant=scope, refused_grants=tuple(refused)), tuple(refused)
        # Counted here; the addon logs and records each attempt with the flow's fields.
        self.refused_grants += len(refused)
        return None, tuple(refused)

    async def _forget(self, cache_key: str) -> None:
        """Drop a disproved grant (best effort): it must not be tried again and again."""
        delete = getattr(self.grants, "delete", None)
        if delete is None:
            return
        with contextlib.suppress(Exception):
            await delete(cache_key)

    async def _store_grant(self, obj: Mapping, approvers: tuple[str, ...], subject: str,
                           digest: str, akey: str, requirement: ApprovalRequirement,
                           since: float) -> float:
        """Cache the grant an approval made; returns its end (epoch; ``since`` when none)."""
        spec = obj.get("spec") or {}
        grant = spec.get("grant") or {}
        scope = grant.get("scope") or requirement.grant_scope
        ttl = grant.get("ttlSeconds", requirement.grant_ttl_seconds)
        end = since + max(0, int(ttl))
        # Never claim more than the request proves (see proof.window_end), or the grant
        # would later be refused as altered.
        end = min(end, window_end(obj) or end)
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
        cached, refused = await self.check_grant(identity=identity, connection=connection,
                                                 action=action, digest=digest)
        if cached is not None:
            return cached
        outcome = await self._decide(identity=identity, connection=connection, action=action,
                                     digest=digest, rule=rule, requirement=requirement,
                                     session_id=session_id, body_preview=body_preview)
        return replace(outcome, refused_grants=refused) if refused else outcome

    async def _earlier(self, identity: Identity, connection: str, digest: str, akey: str,
                       scope: str) -> list[dict]:
        """This subject's earlier requests for this digest (and, for action scope, this action).

        Found by labels, then checked on the object itself: labels only narrow the search."""
        subject = subject_key(identity, connection)
        selectors = [{LABEL_SUBJECT: subject, LABEL_DIGEST: label_value(digest)}]
        if scope == "action":
            selectors.append({LABEL_SUBJECT: subject, LABEL_ACTION: label_value(akey)})
        found: dict[str, dict] = {}
        for labels in selectors:
            try:
                items = await self.backend.find(labels)
            except BackendError as exc:
                raise ApprovalUnavailable(f"cannot look up ApprovalRequests: {exc}") from exc
            for obj in items:
                spec = obj.get("spec") or {}
                same = spec.get("requestDigest") == digest or (
                    scope == "action" and request_action_key(obj) == akey)
                if same and binding_problem(obj, identity, connection) is None:
                    found[(obj.get("metadata") or {}).get("name", "")] = obj
        return list(found.values())

    async def _decide(self, *, identity: Identity, connection: str, action: Action, digest: str,
                      rule: RuleRef, requirement: ApprovalRequirement, session_id: str,
                      body_preview: str) -> Outcome:
        if not (requirement.approvers.users or requirement.approvers.groups):
            raise ApprovalUnavailable(f"rule {rule} names no approvers: nobody could decide")
        subject, akey = subject_key(identity, connection), action_key(connection, action)
        async with self._keyed(f"{subject}|{digest}"):
            existing = await self._earlier(identity, connection, digest, akey,
                                           requirement.grant_scope)
            now = self.clock()
            pending: list[dict] = []
            remembered: list[tuple[float, dict, State, tuple[str, ...], str]] = []
            for obj in existing:
                spec = obj.get("spec") or {}
                state, approvers, reason = read_state(obj, now)
                exact = spec.get("requestDigest") == digest
                if state == "approved":
                    # Approved while nobody held the flow (or the grant cache lost it): the
                    # grant window runs from the decision. Another request's approval counts
                    # only if it granted the whole action.
                    if not exact and (spec.get("grant") or {}).get("scope") != "action":
                        continue
                    self.proofs.put(obj)
                    since = (rfc3339_to_epoch(spec.get("decidedAt"))
                             or rfc3339_to_epoch(spec.get("requestedAt")) or 0.0)
                    if window_end(obj) is None:
                        continue
                    end = await self._store_grant(obj, approvers, subject, digest, akey,
                                                  requirement, since)
                    if end > now:
                        return Outcome("approved", obj["metadata"]["name"], approvers,
                                       "approved", epoch_to_rfc3339(end))
                elif state == "pending":
                    if exact:
                        pending.append(obj)
                elif (until := _remembered_until(obj, state, requirement)) > now:
                    remembered.append((until, obj, state, approvers, reason))
            if remembered:
                # The latest outcome answers: no new request, nobody is paged again.
                until, obj, state, approvers, reason = max(remembered, key=lambda r: r[0])
                return Outcome(state, obj["metadata"]["name"], approvers, reason,
                               (obj.get("spec") or {}).get("expiresAt", ""),
                               remembered_until=epoch_to_rfc3339(until))
            if pending:
                obj = max(pending, key=lambda o: rfc3339_to_epoch(o["spec"].get("expiresAt")) or 0.0)
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
        expires = rfc3339_to_epoch((obj.get("spec") or {}).get("expiresAt"))
        budget = float(requirement.hold_seconds)
        if expires is not None and expires - self.clock() <= budget:
            budget = max(0.0, expires - self.clock()) + _EXPIRY_GRACE
        self.held += 1
        try:
            found, gone = await self._await_final(name, budget)
        finally:
            self.held -= 1
        if gone:
            log.warning("ApprovalRequest %s was deleted while a flow waited for it", name)
            return Outcome("expired", name, (), f"request deleted: ApprovalRequest {name} was "
                                                 "deleted before a decision; a retry opens a new one")
        found = found or obj  # nothing newer seen: judge the object we opened (maybe expired now)
        now = self.clock()
        state, approvers, reason = read_state(found, now)
        if state == "approved":
            self.proofs.put(found)
            since = rfc3339_to_epoch((found.get("spec") or {}).get("decidedAt")) or now
            end = await self._store_grant(found, approvers, subject, digest, akey, requirement,
                                          min(since, now))
            return Outcome("approved", name, approvers, reason or "approved",
                           epoch_to_rfc3339(end) if end > now else "")
        if state == "pending":
            return waiting
        until = _remembered_until(found, state, requirement)
        return Outcome(state, name, approvers, reason,
                       remembered_until=epoch_to_rfc3339(until) if until > now else "")

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
            for pending in (watch, fan):
                if pending is not None:
                    pending.cancel()
            for pending in (watch, fan):
                if pending is not None:
                    with contextlib.suppress(BaseException):
                        await pending
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
