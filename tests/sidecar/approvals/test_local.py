"""LocalApprovalStore: standalone-mode requests as JSON files, decided by `chaperone approve|deny`."""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import threading
import time

import pytest

from chaperone_sidecar.approvals import ApprovalError, Conflict
from chaperone_sidecar.approvals.digest import request_digest, request_name
from chaperone_sidecar.approvals.local import LocalApprovalStore
from chaperone_sidecar.approvals.objects import build_request, read_state

from .conftest import RULE, Ticker, http_action, http_request, identity, requirement


def new_body(**req):
    digest = request_digest(http_request())
    action = http_action()
    return build_request(name=request_name(action.name, digest), identity=identity("local"),
                         connection="example-api", action=action, digest=digest, rule=RULE,
                         requirement=requirement(**req), now=time.time())


def final(obj) -> bool:
    return read_state(obj, time.time())[0] != "pending"


def test_create_get_find_list(tmp_path):
    store = LocalApprovalStore(tmp_path / "approvals")

    async def scenario():
        body = new_body()
        created = await store.create(body)
        name = created["metadata"]["name"]
        assert created["status"]["phase"] == "Pending" and created["metadata"]["uid"]
        assert (await store.get(name))["spec"] == body["spec"]
        assert [o["metadata"]["name"] for o in await store.find(body["metadata"]["labels"])] == [name]
        assert await store.find({"chaperone.dev/requester": "nobody"}) == []
        assert await store.get("missing") is None
        with pytest.raises(Conflict):
            await store.create(body)
        return name

    name = asyncio.run(scenario())
    assert json.loads((tmp_path / "approvals" / f"{name}.json").read_text())["metadata"]["name"] == name
    assert [o["metadata"]["name"] for o in store.list()] == [name]
    assert not [p for p in (tmp_path / "approvals").iterdir() if p.name.startswith(".tmp")]


def test_names_cannot_escape_the_directory(tmp_path):
    store = LocalApprovalStore(tmp_path)
    for bad in ("../etc/passwd", "a/b", "", "UPPER"):
        with pytest.raises(ApprovalError):
            store.decide(bad, "Approved", "me")


def test_decide_approve_and_deny(tmp_path):
    store = LocalApprovalStore(tmp_path)

    async def make():
        return [(await store.create(new_body()))["metadata"]["name"] for _ in range(2)]

    a, b = asyncio.run(make())
    approved = store.decide(a, "approved", "alice", "looks fine")
    assert approved["spec"]["decision"] == "Approved" and approved["spec"]["decidedBy"] == "alice"
    assert approved["status"] == {"phase": "Approved", "approvals": "1/1"}
    assert approved["spec"]["reviews"][0]["user"] == "alice"
    denied = store.decide(b, "Denied", "bob", "not today")
    assert read_state(denied, time.time()) == ("denied", ("bob",), "denied by bob: not today")
    with pytest.raises(ApprovalError, match="final"):
        store.decide(a, "Denied", "bob")
    with pytest.raises(ApprovalError, match="Approved or Denied"):
        store.decide(b, "Maybe", "bob")
    with pytest.raises(ApprovalError, match="no ApprovalRequest"):
        store.decide("missing", "Approved", "bob")


def test_n_of_m_needs_distinct_approvers(tmp_path):
    store = LocalApprovalStore(tmp_path)
    name = asyncio.run(store.create(new_body(min_approvals=2)))["metadata"]["name"]
    first = store.decide(name, "Approved", "alice")
    assert "decision" not in first["spec"] and first["status"]["approvals"] == "1/2"
    with pytest.raises(ApprovalError, match="already reviewed"):
        store.decide(name, "Approved", "alice")
    second = store.decide(name, "Approved", "bob")
    assert second["spec"]["decision"] == "Approved" and second["spec"]["decidedBy"] == "bob"
    assert read_state(second, time.time())[1] == ("alice", "bob")


def test_no_decision_after_expiry(tmp_path):
    store = LocalApprovalStore(tmp_path)
    name = asyncio.run(store.create(new_body(timeout_seconds=60)))["metadata"]["name"]
    later = dt.datetime.now(dt.timezone.utc) + dt.timedelta(minutes=2)
    with pytest.raises(ApprovalError, match="expired"):
        store.decide(name, "Approved", "alice", now=later)


def test_concurrent_deciders_never_lose_a_review(tmp_path):
    store = LocalApprovalStore(tmp_path)
    name = asyncio.run(store.create(new_body(min_approvals=10)))["metadata"]["name"]
    users = [f"user{i}" for i in range(8)]
    threads = [threading.Thread(target=store.decide, args=(name, "Approved", u)) for u in users]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    reviews = store.load(name)["spec"]["reviews"]
    assert sorted(r["user"] for r in reviews) == sorted(users)


def test_wait_polls_until_decided_without_blocking_the_loop(tmp_path):
    store = LocalApprovalStore(tmp_path)

    async def scenario():
        name = (await store.create(new_body()))["metadata"]["name"]

        async def decide_later():
            await asyncio.sleep(1.0)
            await asyncio.to_thread(store.decide, name, "Approved", "alice")

        with Ticker() as ticker:
            task = asyncio.create_task(decide_later())
            obj = await store.wait(name, 10, final)
            await task
        return obj, ticker.ticks

    obj, ticks = asyncio.run(scenario())
    assert obj["spec"]["decision"] == "Approved"
    assert ticks >= 5


def test_wait_timeout_and_deletion(tmp_path):
    store = LocalApprovalStore(tmp_path, poll_interval=0.05)

    async def scenario():
        name = (await store.create(new_body()))["metadata"]["name"]
        pending = await store.wait(name, 0.3, final)
        assert pending is not None and "decision" not in pending["spec"]

        async def delete_later():
            await asyncio.sleep(0.3)
            store.path(name).unlink()

        task = asyncio.create_task(delete_later())
        gone = await store.wait(name, 5, final)
        await task
        return gone, await store.wait("missing", 1, final)

    assert asyncio.run(scenario()) == (None, None)
