"""Rate limiters: RedisRateLimiter shared by two instances on the real redis-server; memory."""

from __future__ import annotations

import asyncio
import uuid

import pytest
import redis.asyncio as aioredis

from chaperone_sidecar.approvals.ratelimit import (
    MemoryRateLimiter, RateVerdict, RedisRateLimiter, check_limits, rate_key,
)
from chaperone_sidecar.policy.model import Identity, RateLimit, RuleRef

ALGORITHMS = ["sliding", "fixed"]


class Limiters:
    """Two limiters sharing counters: two Redis clients, or one memory limiter used twice."""

    def __init__(self, kind: str, algorithm: str, url: str) -> None:
        self.kind, self.algorithm, self.url = kind, algorithm, url

    async def __aenter__(self):
        if self.kind == "memory":
            self.clients = []
            self.a = self.b = MemoryRateLimiter(algorithm=self.algorithm)
        else:
            prefix = f"rl-{uuid.uuid4().hex[:8]}:"
            self.clients = [aioredis.Redis.from_url(self.url) for _ in range(2)]
            self.a, self.b = (RedisRateLimiter(c, prefix=prefix, algorithm=self.algorithm)
                              for c in self.clients)
        return self

    async def __aexit__(self, *exc):
        for c in self.clients:
            await c.aclose()


@pytest.fixture(params=[(k, a) for k in ("redis", "memory") for a in ALGORITHMS],
                ids=lambda p: f"{p[0]}-{p[1]}")
def limiters(request):
    kind, algorithm = request.param
    url = request.getfixturevalue("redis_server").url if kind == "redis" else ""
    return Limiters(kind, algorithm, url)


def test_limit_is_shared_and_window_resets(limiters):
    async def scenario():
        async with limiters as l:
            got = [await (l.a if i % 2 else l.b).hit("k", 3, 1.0) for i in range(3)]
            assert [v.allowed for v in got] == [True] * 3
            assert [v.remaining for v in got] == [2, 1, 0]
            refused = await l.a.hit("k", 3, 1.0)
            assert not refused.allowed and 0 < refused.retry_after <= 1.0
            assert refused.retry_after_header == "1"
            assert (await l.b.hit("other-key", 3, 1.0)).allowed  # counters are per key
            await asyncio.sleep(refused.retry_after + 0.05)
            again = await l.b.hit("k", 3, 1.0)
            assert again.allowed
            return again

    asyncio.run(scenario())


def test_concurrent_hits_never_exceed_the_limit(limiters):
    async def scenario():
        async with limiters as l:
            verdicts = await asyncio.gather(*((l.a if i % 2 else l.b).hit("burst", 5, 10.0)
                                              for i in range(40)))
            return sum(v.allowed for v in verdicts)

    assert asyncio.run(scenario()) == 5


@pytest.mark.parametrize("kind", ["redis", "memory"])
def test_sliding_window_has_no_double_burst_at_the_boundary(kind, request):
    """Fixed windows allow 2x at an edge; the sliding log does not."""
    url = request.getfixturevalue("redis_server").url if kind == "redis" else ""

    async def scenario():
        async with Limiters(kind, "sliding", url) as l:
            assert [(await l.a.hit("edge", 2, 1.0)).allowed for _ in range(2)] == [True, True]
            await asyncio.sleep(0.6)
            assert not (await l.b.hit("edge", 2, 1.0)).allowed  # 0.6 s later: still 2 in the last 1 s
            await asyncio.sleep(0.5)  # the first two are now older than 1 s
            assert (await l.b.hit("edge", 2, 1.0)).allowed

    asyncio.run(scenario())


def test_refused_hits_do_not_extend_a_sliding_lockout():
    async def scenario():
        limiter = MemoryRateLimiter()
        await limiter.hit("k", 1, 0.5)
        for _ in range(10):
            assert not (await limiter.hit("k", 1, 0.5)).allowed
        await asyncio.sleep(0.55)
        return await limiter.hit("k", 1, 0.5)

    assert asyncio.run(scenario()).allowed


def test_zero_limit_refuses():
    assert not asyncio.run(MemoryRateLimiter().hit("k", 0, 60)).allowed


def test_rate_keys_follow_per():
    who = Identity("ns/agent", "ns", "pod-a", creator="dave")
    user = Identity("ns/agent", "ns", "pod-b", on_behalf_of="erin")
    rule = RuleRef("ns/p", "r")
    per_identity = RateLimit(10, 60, "identity", rule)
    per_pod = RateLimit(10, 60, "pod", rule)
    per_conn = RateLimit(10, 60, "connection", rule)
    assert rate_key(per_identity, who, "c") == rate_key(per_identity, Identity("ns/agent", "ns", "pod-z"), "c")
    assert rate_key(per_identity, who, "c") != rate_key(per_identity, user, "c")
    assert rate_key(per_pod, who, "c") != rate_key(per_pod, Identity("ns/agent", "ns", "pod-z"), "c")
    assert rate_key(per_conn, who, "c") == rate_key(per_conn, user, "c")
    assert rate_key(per_conn, who, "c") != rate_key(per_conn, who, "d")
    assert rate_key(per_conn, who, "c") != rate_key(RateLimit(11, 60, "connection", rule), who, "c")


def test_check_limits_reports_the_refusing_rule(redis_server):
    async def scenario():
        client = aioredis.Redis.from_url(redis_server.url)
        try:
            limiter = RedisRateLimiter(client, prefix=f"cl-{uuid.uuid4().hex[:6]}:")
            who = Identity("ns/agent", "ns", "pod")
            loose = RateLimit(100, 60, "identity", RuleRef("ns/p", "loose"))
            tight = RateLimit(1, 60, "identity", RuleRef("ns/p", "tight"))
            first = await check_limits(limiter, [loose, tight], who, "c")
            second = await check_limits(limiter, (x for x in [loose, tight]), who, "c")
            none = await check_limits(limiter, [], who, "c")
            return first, second, none
        finally:
            await client.aclose()

    first, second, none = asyncio.run(scenario())
    assert first[0].allowed and first[1].source.rule == "tight"  # tightest remaining
    assert not second[0].allowed and second[1].source.rule == "tight"
    assert none[0].allowed and none[1] is None


def test_unknown_algorithm_is_refused():
    with pytest.raises(ValueError):
        MemoryRateLimiter(algorithm="leaky")
    assert RateVerdict(True, 3).retry_after_header == "0"
