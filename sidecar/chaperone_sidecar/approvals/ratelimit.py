"""Policy rate limits (``rateLimit`` rules): counted in Redis when configured, else in memory.

Two algorithms, same answer shape (``RateVerdict``: allowed, remaining, retry_after seconds):

* ``sliding`` (default): an exact sliding log. Each allowed hit is a sorted-set member scored
  by time; a hit is allowed while fewer than ``limit`` members are younger than ``period``.
  Exact (no burst of 2x at a window edge), at the cost of one member per allowed hit (limits
  in policies are human-sized: hundreds per minute, not millions).
* ``fixed``: INCR + PEXPIRE on one counter per window that starts at the first hit. O(1)
  memory, allows up to 2x ``limit`` across a window boundary.

In Redis each check is one Lua script (atomic: concurrent sidecars sharing the counter can
never both take the last slot), and it reads the time from Redis (``TIME``), so sidecars with
skewed clocks still agree on the window. Refused hits are not counted in the sliding log, so
an agent hammering a limit does not extend its own lockout.
"""

from __future__ import annotations

import asyncio
import collections
import math
import secrets
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Literal

from ..policy.model import Identity, RateLimit

__all__ = ["RateVerdict", "MemoryRateLimiter", "RedisRateLimiter", "rate_key", "check_limits"]

Algorithm = Literal["sliding", "fixed"]


@dataclass(frozen=True)
class RateVerdict:
    allowed: bool
    remaining: int  # hits still allowed in the current window after this one
    retry_after: float = 0.0  # seconds until a hit would be allowed (0 when allowed)

    @property
    def retry_after_header(self) -> str:
        """Whole seconds for a ``Retry-After`` header (rounded up, at least 1 when refused)."""
        return "0" if self.allowed else str(max(1, math.ceil(self.retry_after)))


def rate_key(limit: RateLimit, identity: Identity, connection: str) -> str:
    """The counter a ``RateLimit`` counts against, per its ``per`` (identity, pod, connection).

    The rule and the limit's numbers are part of the key, so editing a policy starts fresh
    counters instead of reinterpreting old ones.
    """
    if limit.per == "pod":
        who = f"pod={identity.pod_namespace}/{identity.pod_name}"
    elif limit.per == "connection":
        who = "connection"
    else:  # identity: the verified user the agent acts for, else the pod's service account
        who = (f"user={identity.on_behalf_of}" if identity.on_behalf_of
               else f"sa={identity.service_account}")
    source = str(limit.source) if limit.source else "-"
    return f"{source}:{limit.requests}/{limit.period_seconds}s:{connection}:{who}"


_SLIDING = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local limit = tonumber(ARGV[1])
local period = tonumber(ARGV[2])
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now - period)
local count = redis.call('ZCARD', KEYS[1])
if count < limit then
  redis.call('ZADD', KEYS[1], now, ARGV[3])
  redis.call('PEXPIRE', KEYS[1], math.ceil(period / 1000))
  return {1, limit - count - 1, 0}
end
local oldest = redis.call('ZRANGE', KEYS[1], 0, 0, 'WITHSCORES')
local wait = period
if oldest[2] then wait = tonumber(oldest[2]) + period - now end
return {0, 0, math.max(wait, 1)}
"""

_FIXED = """
local period_ms = math.ceil(tonumber(ARGV[2]) / 1000)
local count = redis.call('INCR', KEYS[1])
if count == 1 then redis.call('PEXPIRE', KEYS[1], period_ms) end
local ttl = redis.call('PTTL', KEYS[1])
if ttl < 0 then
  redis.call('PEXPIRE', KEYS[1], period_ms)
  ttl = period_ms
end
local limit = tonumber(ARGV[1])
if count <= limit then return {1, limit - count, 0} end
return {0, 0, ttl * 1000}
"""


class RedisRateLimiter:
    """Rate limits shared by every sidecar using the same Redis (``redis.asyncio`` client)."""

    def __init__(self, client, *, prefix: str = "chaperone:ratelimit:",
                 algorithm: Algorithm = "sliding") -> None:
        if algorithm not in ("sliding", "fixed"):
            raise ValueError(f"unknown rate-limit algorithm {algorithm!r}")
        self.client = client
        self.prefix = prefix
        self.algorithm = algorithm
        self._script = client.register_script(_SLIDING if algorithm == "sliding" else _FIXED)

    async def hit(self, key: str, limit: int, period: float) -> RateVerdict:
        """Count one request against ``key``: at most ``limit`` per ``period`` seconds."""
        if limit <= 0:
            return RateVerdict(False, 0, float(period))
        period_us = max(1, int(period * 1_000_000))
        member = f"{time.time_ns()}-{secrets.token_hex(4)}"  # unique: equal scores must not merge
        allowed, remaining, wait_us = await self._script(
            keys=[f"{self.prefix}{self.algorithm}:{key}"], args=[limit, period_us, member])
        return RateVerdict(bool(int(allowed)), int(remaining),
                           0.0 if int(allowed) else int(wait_us) / 1_000_000)

    async def close(self) -> None:
        return None


class MemoryRateLimiter:
    """The same algorithms in process memory (one sidecar; counters die with it)."""

    def __init__(self, *, algorithm: Algorithm = "sliding",
                 clock: Callable[[], float] = time.monotonic, max_keys: int = 100_000) -> None:
        if algorithm not in ("sliding", "fixed"):
            raise ValueError(f"unknown rate-limit algorithm {algorithm!r}")
        self.algorithm = algorithm
        self.clock = clock
        self.max_keys = max_keys
        self._logs: dict[str, collections.deque[float]] = {}
        self._windows: dict[str, tuple[float, int]] = {}  # key -> (window end, count)

    async def hit(self, key: str, limit: int, period: float) -> RateVerdict:
        if limit <= 0:
            return RateVerdict(False, 0, float(period))
        now = self.clock()
        self._evict(now, period)
        if self.algorithm == "fixed":
            end, count = self._windows.get(key, (0.0, 0))
            if now >= end:
                end, count = now + period, 0
            count += 1
            self._windows[key] = (end, count)
            if count <= limit:
                return RateVerdict(True, limit - count)
            return RateVerdict(False, 0, end - now)
        log = self._logs.setdefault(key, collections.deque())
        while log and log[0] <= now - period:
            log.popleft()
        if len(log) < limit:
            log.append(now)
            return RateVerdict(True, limit - len(log))
        return RateVerdict(False, 0, max(log[0] + period - now, 1e-6))

    def _evict(self, now: float, period: float) -> None:
        # Bound memory: when too many keys exist, drop the idle ones (no timer task needed).
        if len(self._logs) + len(self._windows) < self.max_keys:
            return
        self._logs = {k: v for k, v in self._logs.items() if v and v[-1] > now - period}
        self._windows = {k: v for k, v in self._windows.items() if v[0] > now}

    async def close(self) -> None:
        return None


async def check_limits(limiter, limits: Iterable[RateLimit], identity: Identity,
                       connection: str) -> tuple[RateVerdict, RateLimit | None]:
    """Hit every limit of a decision; the first refusal (and its rule), else the tightest pass."""
    limits = tuple(limits)
    verdicts = await asyncio.gather(*(
        limiter.hit(rate_key(lim, identity, connection), lim.requests, lim.period_seconds)
        for lim in limits))
    best: tuple[RateVerdict, RateLimit | None] = (RateVerdict(True, 2**31 - 1), None)
    for lim, verdict in zip(limits, verdicts, strict=True):
        if not verdict.allowed:
            return verdict, lim
        if verdict.remaining < best[0].remaining:
            best = (verdict, lim)
    return best
