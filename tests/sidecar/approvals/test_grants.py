"""Grant cache and decision fan-out: RedisGrants on the real redis-server, and MemoryGrants."""

from __future__ import annotations

import asyncio
import time
import uuid

import pytest
import redis.asyncio as aioredis

from chaperone_sidecar.approvals.grants import Grant, MemoryGrants, RedisGrants, grant_key


class Pair:
    """Two grant stores that share state: two RedisGrants on two connections, or one memory."""

    def __init__(self, kind: str, url: str) -> None:
        self.kind, self.url = kind, url

    async def __aenter__(self):
        if self.kind == "memory":
            shared = MemoryGrants()
            self.a = self.b = shared
            self.clients = []
        else:
            prefix = f"test-{uuid.uuid4().hex[:8]}:"
            self.clients = [aioredis.Redis.from_url(self.url) for _ in range(2)]
            self.a, self.b = (RedisGrants(c, prefix=prefix, reconnect_delay=0.05)
                              for c in self.clients)
        return self

    async def __aexit__(self, *exc):
        for g in {id(self.a): self.a, id(self.b): self.b}.values():
            await g.close()
        for c in self.clients:
            await c.aclose()


@pytest.fixture(params=["redis", "memory"])
def pair(request):
    url = request.getfixturevalue("redis_server").url if request.param == "redis" else ""
    return Pair(request.param, url)


def test_grant_round_trip_shared_between_instances(pair):
    async def scenario():
        async with pair as p:
            key = grant_key("exact", "subject", "sha256:" + "a" * 64)
            grant = Grant("exact", "ar-1", ("alice",), time.time() + 60)
            assert await p.b.get(key) is None
            await p.a.put(key, grant)
            assert await p.b.get(key) == grant
            assert await p.b.get(grant_key("action", "subject", "sha256:" + "a" * 64)) is None
            assert await p.b.get(grant_key("exact", "other-subject", "sha256:" + "a" * 64)) is None

    asyncio.run(scenario())


def test_grant_ttl_expiry(pair):
    async def scenario():
        async with pair as p:
            key = grant_key("action", "s", "k")
            await p.a.put(key, Grant("action", "ar-1", ("alice",), time.time() + 0.5))
            await p.a.put(grant_key("action", "s", "already-over"),
                          Grant("action", "ar-0", (), time.time() - 1))
            assert (await p.b.get(key)).request == "ar-1"
            assert await p.b.get(grant_key("action", "s", "already-over")) is None
            await asyncio.sleep(0.7)
            assert await p.b.get(key) is None

    asyncio.run(scenario())


def test_redis_keys_carry_a_ttl(redis_server):
    async def scenario():
        client = aioredis.Redis.from_url(redis_server.url)
        grants = RedisGrants(client, prefix="ttlcheck:")
        try:
            await grants.put("exact:s:k", Grant("exact", "ar", (), time.time() + 30))
            return await client.pttl("ttlcheck:grant:exact:s:k")
        finally:
            await grants.close()
            await client.aclose()

    assert 25_000 < asyncio.run(scenario()) <= 30_000


def test_fanout_wakes_every_waiter_of_that_request_only(pair):
    async def scenario():
        async with pair as p:
            waiters = [asyncio.create_task(p.a.wait_decision("ar-1", 10)) for _ in range(3)]
            other = asyncio.create_task(p.a.wait_decision("ar-2", 1.0))
            await asyncio.sleep(0.3)  # let them subscribe
            assert not any(w.done() for w in waiters)
            await p.b.publish_decision("ar-1", {"state": "approved", "approvers": ["alice"]})
            results = await asyncio.wait_for(asyncio.gather(*waiters), 5)
            return results, await other

    results, other = asyncio.run(scenario())
    assert results == [{"state": "approved", "approvers": ["alice"]}] * 3
    assert other is None


def test_a_late_waiter_still_sees_the_decision(pair):
    async def scenario():
        async with pair as p:
            await p.b.publish_decision("ar-late", {"state": "denied"})
            return await asyncio.wait_for(p.a.wait_decision("ar-late", 10), 5)

    assert asyncio.run(scenario()) == {"state": "denied"}


def test_wait_decision_times_out(pair):
    async def scenario():
        async with pair as p:
            start = time.monotonic()
            result = await p.a.wait_decision("nobody-decides", 0.5)
            return result, time.monotonic() - start

    result, took = asyncio.run(scenario())
    assert result is None and 0.4 < took < 3


def test_redis_fanout_survives_a_dropped_subscription(redis_server):
    """Kill the pub/sub connection, publish in the gap: the waiter re-checks after resubscribing."""

    async def scenario():
        async with Pair("redis", redis_server.url) as p:
            waiter = asyncio.create_task(p.a.wait_decision("ar-gap", 20))
            await asyncio.sleep(0.3)
            admin = aioredis.Redis.from_url(redis_server.url)
            try:
                killed = await admin.execute_command("CLIENT", "KILL", "TYPE", "pubsub")
                assert killed >= 1
                await p.b.publish_decision("ar-gap", {"state": "approved"})  # likely unheard
            finally:
                await admin.aclose()
            result = await asyncio.wait_for(waiter, 10)
            # and the subscription works again for later decisions
            later = asyncio.create_task(p.a.wait_decision("ar-after", 10))
            await asyncio.sleep(0.3)
            await p.b.publish_decision("ar-after", {"state": "denied"})
            return result, await asyncio.wait_for(later, 5), p.a.reconnects

    result, later, reconnects = asyncio.run(scenario())
    assert result == {"state": "approved"} and later == {"state": "denied"}
    assert reconnects >= 1


def test_redis_waiter_rides_out_a_redis_outage():
    """redis-server stopped while a flow waits, started again on the same port: still woken."""
    from chaperone_testbed.services import RedisServer

    server = RedisServer().start()
    try:
        async def scenario():
            async with Pair("redis", server.url) as p:
                waiter = asyncio.create_task(p.a.wait_decision("ar-outage", 30))
                await asyncio.sleep(0.3)
                await asyncio.to_thread(server.stop)
                await asyncio.sleep(0.5)
                assert not waiter.done()
                await asyncio.to_thread(server.start)  # same port, empty data
                await p.b.publish_decision("ar-outage", {"state": "approved"})
                return await asyncio.wait_for(waiter, 15)

        assert asyncio.run(scenario()) == {"state": "approved"}
    finally:
        server.close()
