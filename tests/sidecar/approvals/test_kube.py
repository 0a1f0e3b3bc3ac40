"""KubeApprovalBackend against the real apiserver, authenticated as a service account."""

from __future__ import annotations

import asyncio
import time
from urllib.parse import urlsplit

import pytest

from chaperone_sidecar.approvals import BackendError, Conflict
from chaperone_sidecar.approvals.digest import request_digest, request_name
from chaperone_sidecar.approvals.service import build_request, read_state

from .conftest import RULE, Ticker, http_action, http_request, identity, requirement


def body_for(env, **req):
    digest = request_digest(http_request())
    action = http_action()
    return build_request(name=request_name(action.name, digest), identity=identity(env.ns),
                         connection="example-api", action=action, digest=digest, rule=RULE,
                         requirement=requirement(**req), now=time.time(),
                         session_id="sess-1", body_preview='{"force":true}')


def final(obj) -> bool:
    return read_state(obj, time.time())[0] != "pending"


def test_create_get_find_as_the_sidecar_service_account(kube_env):
    async def scenario():
        backend = kube_env.backend()
        try:
            body = body_for(kube_env)
            created = await backend.create(body)
            name = created["metadata"]["name"]
            assert created["spec"]["requester"]["serviceAccount"] == \
                f"system:serviceaccount:{kube_env.ns}:agent"
            assert created["spec"]["minApprovals"] == 1
            got = await backend.get(name)
            assert got["spec"]["requestDigest"] == body["spec"]["requestDigest"]
            found = await backend.find(body["metadata"]["labels"])
            assert [o["metadata"]["name"] for o in found] == [name]
            assert await backend.find({**body["metadata"]["labels"],
                                       "chaperone.dev/requester": "someone-else"}) == []
            assert await backend.get("does-not-exist") is None
            with pytest.raises(Conflict):
                await backend.create(body)
            return name
        finally:
            await backend.close()

    name = asyncio.run(scenario())
    assert kube_env.names() == [name]
    assert kube_env.get(name)["spec"]["action"]["summary"] == "DELETE api.example.com/v1/things/42"


def test_rbac_is_enforced_the_sidecar_cannot_write_other_namespaces(kube_env, control_plane):
    control_plane.create_namespace("appr-elsewhere")

    async def scenario():
        backend = kube_env.backend()
        backend.namespace = "appr-elsewhere"
        try:
            with pytest.raises(BackendError) as err:
                await backend.create(body_for(kube_env))
            return err.value
        finally:
            await backend.close()

    err = asyncio.run(scenario())
    assert err.status == 403 and not err.transient


def test_wait_returns_the_decision_seen_by_watch_and_keeps_the_loop_free(kube_env):
    async def scenario():
        backend = kube_env.backend()
        try:
            name = (await backend.create(body_for(kube_env)))["metadata"]["name"]
            with Ticker() as ticker:
                decider = asyncio.create_task(kube_env.decide_later("Approved", delay=1.0))
                obj = await backend.wait(name, 20, final)
                await decider
            return obj, ticker.ticks
        finally:
            await backend.close()

    obj, ticks = asyncio.run(scenario())
    assert obj["spec"]["decision"] == "Approved" and obj["spec"]["decidedBy"] == "alice"
    assert ticks >= 5  # ~20 ticks expected during the 1 s before the decision


def test_wait_times_out_with_the_latest_state(kube_env):
    async def scenario():
        backend = kube_env.backend()
        try:
            name = (await backend.create(body_for(kube_env)))["metadata"]["name"]
            start = time.monotonic()
            obj = await backend.wait(name, 1.0, final)
            return obj, time.monotonic() - start
        finally:
            await backend.close()

    obj, took = asyncio.run(scenario())
    assert obj is not None and "decision" not in obj["spec"]
    assert 0.9 <= took < 5


def test_wait_reports_deletion_and_missing_objects(kube_env):
    async def scenario():
        backend = kube_env.backend()
        try:
            assert await backend.wait("no-such-request", 1.0, final) is None
            name = (await backend.create(body_for(kube_env)))["metadata"]["name"]

            async def delete_later():
                await asyncio.sleep(0.5)
                await asyncio.to_thread(kube_env.cp.kubectl, "delete", "ar", name, "-n", kube_env.ns)

            deleter = asyncio.create_task(delete_later())
            obj = await backend.wait(name, 20, final)
            await deleter
            return obj
        finally:
            await backend.close()

    assert asyncio.run(scenario()) is None


def test_wait_resumes_when_the_server_ends_the_watch(kube_env):
    async def scenario():
        # Server-side watch timeout of 1 s: the decision at ~2.5 s arrives on a resumed watch.
        backend = kube_env.backend(watch_timeout_seconds=1)
        try:
            name = (await backend.create(body_for(kube_env)))["metadata"]["name"]
            decider = asyncio.create_task(kube_env.decide_later("Denied", delay=2.5, reason="no"))
            obj = await backend.wait(name, 20, final)
            await decider
            return obj, backend.watch_restarts
        finally:
            await backend.close()

    obj, restarts = asyncio.run(scenario())
    assert obj["spec"]["decision"] == "Denied" and obj["spec"]["reason"] == "no"
    assert restarts >= 1


class DroppingProxy:
    """A TCP forwarder to the apiserver whose connections the test can cut (TLS passes through)."""

    def __init__(self, host: str, port: int) -> None:
        self.target = (host, port)
        self.writers: set[asyncio.StreamWriter] = set()
        self.connections = 0

    async def start(self) -> int:
        self.server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        return self.server.sockets[0].getsockname()[1]

    async def _handle(self, reader, writer):
        self.connections += 1
        up_reader, up_writer = await asyncio.open_connection(*self.target)
        self.writers |= {writer, up_writer}

        async def pipe(src, dst):
            try:
                while data := await src.read(65536):
                    dst.write(data)
                    await dst.drain()
            except (ConnectionError, OSError):
                pass
            finally:
                dst.close()

        await asyncio.gather(pipe(reader, up_writer), pipe(up_reader, writer))

    def drop(self) -> None:
        for w in list(self.writers):
            w.transport.abort()
        self.writers.clear()

    async def close(self) -> None:
        self.drop()
        self.server.close()


def test_wait_resumes_after_the_connection_drops(kube_env):
    async def scenario():
        url = urlsplit(kube_env.cp.url)
        proxy = DroppingProxy(url.hostname, url.port)
        port = await proxy.start()
        backend = kube_env.backend(retry_delay=0.1)
        backend.server = f"https://127.0.0.1:{port}"
        try:
            name = (await backend.create(body_for(kube_env)))["metadata"]["name"]

            async def cut_then_approve():
                await asyncio.sleep(1.0)
                proxy.drop()  # mid-watch: the sidecar must reconnect and resume
                await asyncio.sleep(0.5)
                await asyncio.to_thread(kube_env.decide, name, "Approved", "bob")

            task = asyncio.create_task(cut_then_approve())
            obj = await backend.wait(name, 20, final)
            await task
            return obj, backend.watch_restarts, proxy.connections
        finally:
            await backend.close()
            await proxy.close()

    obj, restarts, connections = asyncio.run(scenario())
    assert obj["spec"]["decision"] == "Approved" and obj["spec"]["decidedBy"] == "bob"
    assert restarts >= 1 and connections >= 2


def test_token_file_is_reread_after_rotation(kube_env):
    good = kube_env.token_file.read_text()
    kube_env.token_file.write_text("not-a-valid-token")

    async def scenario():
        backend = kube_env.backend(token_refresh_seconds=3600)
        try:
            with pytest.raises(BackendError) as err:
                await backend.find({})
            assert err.value.status == 401
            kube_env.token_file.write_text(good)  # the kubelet rotated the projected token
            return await backend.find({})  # a 401 re-reads the file at once
        finally:
            await backend.close()

    assert asyncio.run(scenario()) == []


def test_token_file_is_reread_periodically(kube_env):
    good = kube_env.token_file.read_text()

    async def scenario():
        backend = kube_env.backend(token_refresh_seconds=0.2)
        try:
            await backend.find({})
            kube_env.token_file.write_text("rotated-but-wrong")
            await asyncio.sleep(0.3)
            with pytest.raises(BackendError) as err:  # proves the new file content was used
                await backend.find({})
            assert err.value.status == 401
            kube_env.token_file.write_text(good)
            await asyncio.sleep(0.3)
            return await backend.find({})
        finally:
            await backend.close()

    assert asyncio.run(scenario()) == []
