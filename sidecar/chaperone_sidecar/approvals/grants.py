"""Grant cache and decision fan-out: Redis when configured (shared by all sidecars), else memory.

A *grant* is what an approval leaves behind: for ``ttl`` seconds a retry of the same request
(``exact`` scope, keyed by the request digest) or the same classified action (``action``
scope, keyed by the action key) passes without a new ApprovalRequest. Keys are built by the
service and include the requester, so one agent's approval never lets another agent through.

*Fan-out*: a sidecar (or the operator) that sees a final decision publishes it; every sidecar
holding a flow for that request is woken at once, even if its own watch is disconnected. The
message is only a wake-up: the service re-reads the ApprovalRequest before releasing a flow,
so a forged publish cannot approve anything. **Decision**: one pattern subscription per
process (``<prefix>decided:*``) read by one task, instead of a subscription per held flow:
constant Redis connections however many flows are held. The decision is also stored under a
key for ``decision_ttl`` so a waiter that subscribes after the publish still sees it, and
after a reconnect every waiter re-checks that key (messages published while disconnected are
lost by pub/sub).

**A grant is a claim, not proof** (decision). Whoever can write Redis can write a grant key, and
the agent container may reach Redis. So a grant only says *which* ApprovalRequest to look at:
the service (:mod:`.proof`) re-reads that request from the API and honours the grant only if
the request itself approves this subject, this digest or action, in this scope and window. A
value that does not even parse is reported as :class:`InvalidGrant` (an attempt, not a miss).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass
from typing import Any

__all__ = ["Grant", "InvalidGrant", "MemoryGrants", "RedisGrants", "grant_key"]

log = logging.getLogger("chaperone.approvals.grants")


class InvalidGrant(ValueError):
    """A grant key holds something no sidecar wrote (unreadable JSON or fields)."""


@dataclass(frozen=True)
class Grant:
    """What an approval allows until ``expires_at`` (epoch seconds)."""

    scope: str  # exact | action
    request: str  # the ApprovalRequest whose approval made this grant
    approvers: tuple[str, ...]
    expires_at: float

    def to_json(self) -> str:
        return json.dumps(asdict(self), separators=(",", ":"))

    @classmethod
    def from_json(cls, raw: str | bytes) -> Grant:
        try:
            doc = json.loads(raw)
            return cls(str(doc["scope"]), str(doc["request"]),
                       tuple(str(a) for a in doc.get("approvers") or ()), float(doc["expires_at"]))
        except (TypeError, ValueError, KeyError, AttributeError) as exc:
            raise InvalidGrant(f"unreadable grant ({exc.__class__.__name__}: {exc})") from None


def grant_key(scope: str, subject: str, key: str) -> str:
    """``scope:subject:key`` — subject from ``service.subject_key``, key a digest or action key."""
    return f"{scope}:{subject}:{key}"


class _Waiters:
    """Per-name queues of the flows waiting for a decision (shared by both implementations)."""

    RESYNC = object()  # "you may have missed a message: re-check the stored decision"

    def __init__(self) -> None:
        self._by_name: dict[str, set[asyncio.Queue]] = {}

    @contextlib.contextmanager
    def register(self, name: str):
        q: asyncio.Queue = asyncio.Queue()
        self._by_name.setdefault(name, set()).add(q)
        try:
            yield q
        finally:
            group = self._by_name.get(name)
            if group is not None:
                group.discard(q)
                if not group:
                    del self._by_name[name]

    def dispatch(self, name: str, payload: Any) -> None:
        for q in self._by_name.get(name, ()):
            q.put_nowait(payload)

    def resync(self) -> None:
        for group in self._by_name.values():
            for q in group:
                q.put_nowait(self.RESYNC)

    def __len__(self) -> int:
        return sum(len(g) for g in self._by_name.values())


class MemoryGrants:
    """In-process grants and fan-out (one sidecar, or several services in one process)."""

    def __init__(self, *, decision_ttl: float = 3600.0, clock: Callable[[], float] = time.time) -> None:
        self.decision_ttl = decision_ttl
        self.clock = clock
        self._grants: dict[str, Grant] = {}
        self._decisions: dict[str, tuple[float, dict]] = {}
        self._waiters = _Waiters()

    async def get(self, key: str) -> Grant | None:
        grant = self._grants.get(key)
        if grant is not None and grant.expires_at <= self.clock():
            del self._grants[key]
            return None
        return grant

    async def put(self, key: str, grant: Grant) -> None:
        if grant.expires_at > self.clock():
            self._grants[key] = grant
            self._prune()

    async def delete(self, key: str) -> None:
        self._grants.pop(key, None)

    def _prune(self) -> None:
        # Bounded memory without a timer task: drop expired entries now and then.
        if (len(self._grants) + len(self._decisions)) % 256 == 0:
            now = self.clock()
            self._grants = {k: g for k, g in self._grants.items() if g.expires_at > now}
            self._decisions = {k: v for k, v in self._decisions.items() if v[0] > now}

    async def publish_decision(self, name: str, decision: Mapping[str, Any]) -> None:
        doc = dict(decision)
        self._decisions[name] = (self.clock() + self.decision_ttl, doc)
        self._prune()
        self._waiters.dispatch(name, doc)

    def _stored(self, name: str) -> dict | None:
        entry = self._decisions.get(name)
        return entry[1] if entry and entry[0] > self.clock() else None

    async def wait_decision(self, name: str, timeout: float) -> dict | None:
        """The published decision for ``name``, or None when ``timeout`` runs out."""
        with self._waiters.register(name) as q:
            if (doc := self._stored(name)) is not None:
                return doc
            try:
                async with asyncio.timeout(max(0.0, timeout)):
                    return await q.get()
            except TimeoutError:
                return None

    async def close(self) -> None:
        return None


class RedisGrants:
    """Grants as Redis keys with TTLs; fan-out through one pattern subscription.

    ``client`` is a ``redis.asyncio.Redis`` owned by the caller (``close`` leaves it open).
    """

    def __init__(self, client, *, prefix: str = "chaperone:", decision_ttl: float = 3600.0,
                 reconnect_delay: float = 0.5, clock: Callable[[], float] = time.time) -> None:
        self.client = client
        self.prefix = prefix
        self.decision_ttl = decision_ttl
        self.reconnect_delay = reconnect_delay
        self.clock = clock
        self._waiters = _Waiters()
        self._listener: asyncio.Task | None = None
        self._ready = asyncio.Event()
        self.reconnects = 0  # listener (re)subscriptions after the first (telemetry, tests)

    # ------------------------------------------------------------------ grants
    def _grant_key(self, key: str) -> str:
        return f"{self.prefix}grant:{key}"

    async def get(self, key: str) -> Grant | None:
        raw = await self.client.get(self._grant_key(key))
        if raw is None:
            return None
        grant = Grant.from_json(raw)
        # PX is exact to the millisecond, but a clock step could leave a stale entry: re-check.
        return grant if grant.expires_at > self.clock() else None

    async def put(self, key: str, grant: Grant) -> None:
        ttl_ms = int((grant.expires_at - self.clock()) * 1000)
        if ttl_ms > 0:
            await self.client.set(self._grant_key(key), grant.to_json(), px=ttl_ms)

    async def delete(self, key: str) -> None:
        await self.client.delete(self._grant_key(key))

    # ------------------------------------------------------------------ fan-out
    def _channel(self, name: str) -> str:
        return f"{self.prefix}decided:{name}"

    def _decision_key(self, name: str) -> str:
        return f"{self.prefix}decision:{name}"

    async def publish_decision(self, name: str, decision: Mapping[str, Any]) -> None:
        """Store the decision (for late waiters) and wake every waiter on every sidecar."""
        doc = json.dumps(dict(decision), separators=(",", ":"))
        async with self.client.pipeline(transaction=True) as pipe:
            pipe.set(self._decision_key(name), doc, px=int(self.decision_ttl * 1000))
            pipe.publish(self._channel(name), doc)
            await pipe.execute()

    async def _stored(self, name: str) -> dict | None:
        raw = await self.client.get(self._decision_key(name))
        return json.loads(raw) if raw is not None else None

    def _start_listener(self) -> None:
        if self._listener is None or self._listener.done():
            self._listener = asyncio.get_running_loop().create_task(
                self._listen(), name="chaperone-approvals-fanout")

    async def _listen(self) -> None:
        pattern = self._channel("*")
        first, failures = True, 0
        while True:
            pubsub = self.client.pubsub()
            try:
                await pubsub.psubscribe(pattern)
                # Ready only once Redis confirmed: a publish after this point reaches us.
                while True:
                    msg = await pubsub.get_message(timeout=1.0)
                    if msg is not None and msg.get("type") in ("psubscribe", b"psubscribe"):
                        break
                self._ready.set()
                failures = 0
                if not first:
                    self.reconnects += 1
                first = False
                self._waiters.resync()  # anything published while we were away is in the key
                while True:
                    msg = await pubsub.get_message(ignore_subscribe_messages=True, timeout=5.0)
                    if msg is None or msg.get("type") not in ("pmessage", b"pmessage"):
                        continue
                    channel = msg["channel"]
                    channel = channel.decode() if isinstance(channel, bytes) else channel
                    try:
                        doc = json.loads(msg["data"])
                    except (TypeError, ValueError):
                        continue
                    self._waiters.dispatch(channel[len(self.prefix) + len("decided:"):], doc)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001 - any Redis failure: reconnect
                self._ready.clear()
                failures += 1
                # Warn once per outage, then back off (capped) so a long outage is not a log flood.
                log.log(logging.WARNING if failures == 1 else logging.DEBUG,
                        "decision fan-out: %s: %s; resubscribing", exc.__class__.__name__, exc)
                await asyncio.sleep(min(self.reconnect_delay * 2 ** (failures - 1), 10.0))
            finally:
                with contextlib.suppress(Exception):
                    await pubsub.aclose()

    async def wait_decision(self, name: str, timeout: float) -> dict | None:
        """The published decision for ``name``, or None when ``timeout`` runs out.

        Redis failures are ridden out (the listener resubscribes and wakes this waiter to
        re-check), so this returns early only with a decision.
        """
        loop = asyncio.get_running_loop()
        deadline = loop.time() + max(0.0, timeout)
        with self._waiters.register(name) as q:
            self._start_listener()
            try:
                async with asyncio.timeout(max(0.0, deadline - loop.time())):
                    await self._ready.wait()
                    failures = 0
                    while True:
                        try:
                            if (doc := await self._stored(name)) is not None:
                                return doc
                            failures = 0
                        except Exception as exc:  # noqa: BLE001 - Redis down: re-check soon
                            failures += 1
                            log.info("decision fan-out: reading %s: %s", name, exc)
                        # After a failed read re-check on a timer too: the resync may come
                        # before this connection pool has noticed the outage.
                        retry = min(self.reconnect_delay * 2 ** failures, 5.0) if failures else None
                        try:
                            payload = await asyncio.wait_for(q.get(), retry)
                        except TimeoutError:
                            continue
                        if payload is not _Waiters.RESYNC:
                            return payload
            except TimeoutError:
                return None

    @property
    def waiting(self) -> int:
        """Flows currently waiting for a fan-out (telemetry)."""
        return len(self._waiters)

    async def close(self) -> None:
        if self._listener is not None:
            self._listener.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._listener
            self._listener = None
            self._ready.clear()
