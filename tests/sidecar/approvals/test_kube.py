"""KubeApprovalBackend against the real apiserver, authenticated as a service account."""

from __future__ import annotations

import asyncio
import json
import time
from urllib.parse import urlsplit

import pytest

from chaperone_sidecar.approvals import BackendError, Conflict
from chaperone_sidecar.approvals.digest import request_digest, request_name
from chaperone_sidecar.approvals.kube import KubeApprovalBackend
from chaperone_sidecar.approvals.objects import build_request, read_state
from chaperone_sidecar.kubeclient import KubeClient, retry_after

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
        backend.client.server = f"https://127.0.0.1:{port}"
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


# ---------------------------------------------------------------------------- transient answers

class FlakyApiserver:
    """A stand-in apiserver (plain HTTP) that answers 429 "storage is (re)initializing" - what a
    just-created CRD's resource answers on Kubernetes 1.33 while its watch cache starts - a
    given number of times per call before the real answer."""

    STATUS = {"kind": "Status", "apiVersion": "v1", "status": "Failure", "code": 429,
              "reason": "TooManyRequests", "message": "storage is (re)initializing"}

    def __init__(self, failures: dict[str, int], retry_after: str | None = "1",
                 status: int = 429) -> None:
        self.failures = dict(failures)  # call -> how many times it fails first
        self.retry_after, self.status = retry_after, status
        self.calls: list[tuple[str, float]] = []
        self.objects: dict[str, dict] = {}

    def _flaky(self, call: str):
        from aiohttp import web

        self.calls.append((call, time.monotonic()))
        if self.failures.get(call, 0) > 0:
            self.failures[call] -= 1
            headers = {"Retry-After": self.retry_after} if self.retry_after else {}
            return web.json_response({**self.STATUS, "code": self.status}, status=self.status,
                                     headers=headers)
        return None

    async def collection(self, request):
        from aiohttp import web

        if request.method == "POST":
            if (failed := self._flaky("create")) is not None:
                return failed
            obj = await request.json()
            obj["metadata"]["resourceVersion"] = "1"
            self.objects[obj["metadata"]["name"]] = obj
            return web.json_response(obj, status=201)
        if request.query.get("watch"):
            if (failed := self._flaky("watch")) is not None:
                return failed
            resp = web.StreamResponse()
            await resp.prepare(request)
            for obj in self.objects.values():
                obj = {**obj, "spec": {**obj["spec"], "decision": "Approved", "decidedBy": "alice"},
                       "metadata": {**obj["metadata"], "resourceVersion": "2"}}
                await resp.write(json.dumps({"type": "MODIFIED", "object": obj}).encode() + b"\n")
            return resp
        if (failed := self._flaky("list")) is not None:
            return failed
        return web.json_response({"kind": "List", "metadata": {"resourceVersion": "1"},
                                  "items": list(self.objects.values())})

    async def one(self, request):
        from aiohttp import web

        if (failed := self._flaky("get")) is not None:
            return failed
        obj = self.objects.get(request.match_info["name"])
        return web.json_response(obj) if obj else web.json_response({}, status=404)

    async def __aenter__(self) -> str:
        from aiohttp import web

        app = web.Application()
        base = "/apis/chaperone.dev/v1alpha1/namespaces/ns/approvalrequests"
        app.router.add_route("*", base, self.collection)
        app.router.add_get(base + "/{name}", self.one)
        self.runner = web.AppRunner(app)
        await self.runner.setup()
        site = web.TCPSite(self.runner, "127.0.0.1", 0)
        await site.start()
        return f"http://127.0.0.1:{site._server.sockets[0].getsockname()[1]}"

    async def __aexit__(self, *exc) -> None:
        await self.runner.cleanup()

    def gaps(self, call: str) -> list[float]:
        times = [t for c, t in self.calls if c == call]
        return [b - a for a, b in zip(times, times[1:])]


def flaky_backend(url: str, tmp_path, **kwargs):
    token = tmp_path / "token"
    token.write_text("t")
    client = KubeClient(url, token, retry_delay=0.05, **kwargs)
    return KubeApprovalBackend(client, "ns", retry_delay=0.05)


def test_storage_initializing_429_is_retried_honouring_retry_after(tmp_path):
    """A just-created CRD answers 429 until its watch cache is ready: create, find, get and the
    wait's watch are retried after Retry-After instead of failing the flow."""
    obj = {"metadata": {"name": "ar-1", "labels": {"chaperone.dev/request-digest": "d"}},
           "spec": {"requestDigest": "sha256:d"}}
    server = FlakyApiserver({"create": 1, "list": 1, "get": 1, "watch": 1})

    async def scenario():
        async with server as url:
            backend = flaky_backend(url, tmp_path)
            try:
                created = await backend.create(obj)
                found = await backend.find({"chaperone.dev/request-digest": "d"})
                got = await backend.get("ar-1")
                decided = await backend.wait("ar-1", 10, lambda o: bool(o["spec"].get("decision")))
                return created, found, got, decided, backend.transient_retried
            finally:
                await backend.close()

    created, found, got, decided, retried = asyncio.run(scenario())
    assert created["metadata"]["name"] == "ar-1" and [o["metadata"]["name"] for o in found] == ["ar-1"]
    assert got["metadata"]["name"] == "ar-1" and decided["spec"]["decision"] == "Approved"
    assert retried == 3  # create, list, get (the watch is retried by wait)
    for call in ("create", "get", "watch"):
        assert [c for c, _ in server.calls].count(call) == 2, call
        assert server.gaps(call)[0] >= 0.9, f"{call} retried before Retry-After: 1"


def test_transient_retries_are_bounded_and_503_backs_off_without_retry_after(tmp_path):
    server = FlakyApiserver({"list": 100, "get": 2}, retry_after=None, status=503)

    async def scenario():
        async with server as url:
            backend = flaky_backend(url, tmp_path, transient_retries=3)
            try:
                with pytest.raises(BackendError) as err:
                    await backend.find({})
                assert await backend.get("missing") is None  # 503, 503, then the answer
                return err.value
            finally:
                await backend.close()

    err = asyncio.run(scenario())
    assert err.status == 503 and err.transient and "storage is (re)initializing" in str(err)
    assert [c for c, _ in server.calls].count("list") == 4  # the first call and 3 retries
    gaps = server.gaps("list")  # no Retry-After: retry_delay (0.05 s), doubling
    assert all(gap >= 0.9 * want for gap, want in zip(gaps, (0.05, 0.1, 0.2))), gaps


def test_retry_after_header_forms():
    from email.utils import formatdate


    assert retry_after("1") == 1.0 and retry_after(" 2.5 ") == 2.5 and retry_after("-3") == 0.0
    assert retry_after(None) is None and retry_after("soon") is None
    assert 9 <= retry_after(formatdate(time.time() + 10, usegmt=True)) <= 10


def test_a_create_retried_after_a_503_it_survived_returns_that_object(tmp_path):
    """A 503 from something in front of the apiserver after the object was created: the retry
    gets 409 for the same name and labels - that is our object, not a name collision (which
    would open a second ApprovalRequest under a new name)."""
    from aiohttp import web

    class Processed503(FlakyApiserver):
        async def collection(self, request):
            if request.method != "POST":
                return await super().collection(request)
            obj = await request.json()
            name = obj["metadata"]["name"]
            self.calls.append(("create", time.monotonic()))
            if name in self.objects:
                return web.json_response({**self.STATUS, "code": 409, "reason": "AlreadyExists",
                                          "message": f"{name} already exists"}, status=409)
            self.objects[name] = obj
            return web.json_response({**self.STATUS, "code": 503}, status=503,
                                     headers={"Retry-After": "0"})

    server = Processed503({})
    labels = {"chaperone.dev/request-digest": "d"}

    async def scenario():
        async with server as url:
            backend = flaky_backend(url, tmp_path)
            try:
                created = await backend.create({"metadata": {"name": "ar-1", "labels": labels},
                                                "spec": {}})
                with pytest.raises(Conflict):  # not retried: a real collision stays one
                    await backend.create({"metadata": {"name": "ar-1", "labels": {"other": "x"}},
                                          "spec": {}})
                return created
            finally:
                await backend.close()

    created = asyncio.run(scenario())
    assert created["metadata"]["name"] == "ar-1" and list(server.objects) == ["ar-1"]
