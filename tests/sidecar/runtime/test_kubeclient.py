"""The sidecar's one Kubernetes client (kubeclient) against the test bed's real kube-apiserver:
the shared watch parser re-lists on 410 Gone and survives a token rotation; the API names in
``chaperone_sidecar.api`` are the CRDs'."""

from __future__ import annotations

import asyncio
import contextlib
import json
import uuid
from pathlib import Path

import pytest
import yaml

from chaperone_sidecar import api
from chaperone_sidecar.kubeclient import KubeClient, KubeError, ListWatch

REPO = Path(__file__).resolve().parents[3]


def _conn(name: str) -> dict:
    return {"apiVersion": api.API_VERSION, "kind": api.KIND_CLAUDE_CONNECTION,
            "metadata": {"name": name}, "spec": {"type": "http", "hosts": [f"{name}.example.com"]}}


@pytest.fixture
def reader(control_plane, crds_installed, tmp_path):
    """A namespace and a ServiceAccount allowed to read and watch ClaudeConnections there."""
    cp = control_plane
    ns = f"kc-{uuid.uuid4().hex[:8]}"
    cp.create_namespace(ns)
    cp.kubectl("create", "serviceaccount", "agent", "-n", ns)
    role = {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "Role",
            "metadata": {"name": "reader", "namespace": ns},
            "rules": [{"apiGroups": [api.GROUP], "resources": [api.CLAUDE_CONNECTIONS],
                       "verbs": ["get", "list", "watch"]}]}
    binding = {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "RoleBinding",
               "metadata": {"name": "reader", "namespace": ns},
               "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": "reader"},
               "subjects": [{"kind": "ServiceAccount", "name": "agent", "namespace": ns}]}
    cp.kubectl("apply", "-f", "-", input=json.dumps({"apiVersion": "v1", "kind": "List",
                                                     "items": [role, binding]}))
    for _ in range(100):  # the authorizer caches RBAC for a moment
        if cp.kubectl("auth", "can-i", "watch", f"{api.CLAUDE_CONNECTIONS}.{api.GROUP}", "-n", ns,
                      f"--as=system:serviceaccount:{ns}:agent", check=False).stdout.strip() == "yes":
            break
    return cp, ns, tmp_path / "token"


def _bound_token(cp, ns: str, secret: str) -> str:
    """A TokenRequest token bound to a Secret: deleting the Secret revokes it (a rotation where
    the old token stops working, the worst case for a cached token)."""
    cp.kubectl("create", "secret", "generic", secret, "-n", ns)
    return cp.kubectl("create", "token", "agent", "-n", ns, "--bound-object-kind", "Secret",
                      "--bound-object-name", secret).stdout.strip()


async def _next(events, kind: str, timeout: float = 20.0):
    async with asyncio.timeout(timeout):
        async for event in events:
            if event.type == kind:
                return event
    raise AssertionError("stream ended")


def test_a_too_old_resource_version_re_lists(reader):
    """410 Gone from the real apiserver (a watch from a compacted/too-old version) -> a fresh
    list, then the watch continues from the new list's version and sees new objects."""
    cp, ns, token_file = reader
    token_file.write_text(cp.kubectl("create", "token", "agent", "-n", ns).stdout.strip())
    cp.kubectl("apply", "-n", ns, "-f", "-", input=json.dumps(_conn("before")))

    async def scenario():
        client = KubeClient(cp.url, token_file, cp.ca_path)
        stream = ListWatch(client, api.collection_path(api.CLAUDE_CONNECTIONS, ns), watch_timeout=30)
        stream.resource_version = "1"  # as if we had listed long ago: the server answers 410
        try:
            async with contextlib.aclosing(aiter(stream)) as events:
                listed = await _next(events, "LISTED")
                await asyncio.to_thread(cp.kubectl, "apply", "-n", ns, "-f", "-",
                                        input=json.dumps(_conn("after")))
                added = await _next(events, "ADDED")
            return stream, listed, added
        finally:
            await client.aclose()

    stream, listed, added = asyncio.run(scenario())
    assert [o["metadata"]["name"] for o in listed.items] == ["before"]
    assert added.object["metadata"]["name"] == "after"
    assert stream.lists == 1  # the 410 led to the one list; no list before it
    assert int(stream.resource_version) > 1


def test_the_watch_survives_a_token_rotation(reader):
    """The kubelet rotates the projected token and the old one stops working: the next watch
    call gets 401, the client re-reads the file at once and the stream goes on (no event lost:
    it resumes from the last version)."""
    cp, ns, token_file = reader
    token_file.write_text(_bound_token(cp, ns, "token-a"))

    async def scenario():
        # Refresh interval of an hour: only the 401 can make the client read the file again.
        client = KubeClient(cp.url, token_file, cp.ca_path, token_refresh_seconds=3600)
        stream = ListWatch(client, api.collection_path(api.CLAUDE_CONNECTIONS, ns),
                           watch_timeout=1, retry_delay=0.05)  # the server ends each watch after 1 s
        try:
            async with contextlib.aclosing(aiter(stream)) as events:
                await _next(events, "LISTED")
                token_file.write_text(await asyncio.to_thread(_bound_token, cp, ns, "token-b"))
                await asyncio.to_thread(cp.kubectl, "delete", "secret", "token-a", "-n", ns)
                # The apiserver caches a successful token authentication for 10 s: after that,
                # token A is refused.
                await asyncio.sleep(11)
                await asyncio.to_thread(cp.kubectl, "apply", "-n", ns, "-f", "-",
                                        input=json.dumps(_conn("rotated")))
                added = await _next(events, "ADDED")
            return stream, added, client
        finally:
            await client.aclose()

    stream, added, client = asyncio.run(scenario())
    assert added.object["metadata"]["name"] == "rotated"
    assert "401" in stream.last_error, stream.last_error  # token A was refused on a reconnect
    assert stream.lists == 1  # resumed from its version, not re-listed


def test_a_permanent_refusal_is_raised_not_retried(control_plane, crds_installed, tmp_path):
    """403 (no RBAC) is the caller's to decide: ListWatch raises KubeError(403) at once."""
    cp = control_plane
    ns = f"kc-{uuid.uuid4().hex[:8]}"
    cp.create_namespace(ns)
    cp.kubectl("create", "serviceaccount", "agent", "-n", ns)
    token_file = tmp_path / "token"
    token_file.write_text(cp.kubectl("create", "token", "agent", "-n", ns).stdout.strip())

    async def scenario():
        client = KubeClient(cp.url, token_file, cp.ca_path)
        try:
            with pytest.raises(KubeError) as err:
                async with asyncio.timeout(10):
                    async for _ in ListWatch(client, api.collection_path(api.CLAUDE_CONNECTIONS, ns)):
                        pass
            return err.value
        finally:
            await client.aclose()

    err = asyncio.run(scenario())
    assert err.status == 403 and not err.transient


def test_the_api_names_are_the_crds():
    """group, version, plurals and kinds in chaperone_sidecar.api match crds/ (the source)."""
    crds = {}
    for path in sorted((REPO / "crds").glob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text()):
            if doc and doc.get("kind") == "CustomResourceDefinition":
                crds[doc["spec"]["names"]["plural"]] = doc["spec"]
    pairs = {api.CLAUDE_CONNECTIONS: api.KIND_CLAUDE_CONNECTION, api.ACCESS_POLICIES: api.KIND_ACCESS_POLICY,
             api.APPROVAL_REQUESTS: api.KIND_APPROVAL_REQUEST}
    for plural, kind in pairs.items():
        spec = crds[plural]
        assert spec["group"] == api.GROUP and spec["names"]["kind"] == kind
        assert api.VERSION in [v["name"] for v in spec["versions"] if v.get("served")]


class _RawAPIServer:
    """A loopback server answering every watch with ``body`` in chunks of ``size`` bytes
    (chunked coding), then the last chunk only if ``complete``; every other GET with a list."""

    def __init__(self, body: bytes, size: int, complete: bool = True) -> None:
        self.body, self.size, self.complete = body, size, complete
        self.connections = 0

    async def _serve(self, reader, writer):
        self.connections += 1
        try:
            while head := await reader.readuntil(b"\r\n\r\n"):
                if b"watch=1" not in head.split(b"\r\n", 1)[0]:
                    data = json.dumps({"kind": "List", "metadata": {"resourceVersion": "1"}, "items": []}).encode()
                    writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
                                 b"Content-Length: %d\r\n\r\n%s" % (len(data), data))
                    continue
                writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n")
                for i in range(0, len(self.body), self.size):
                    part = self.body[i:i + self.size]
                    writer.write(b"%x\r\n%s\r\n" % (len(part), part))
                    await writer.drain()
                if not self.complete:
                    writer.close()
                    return
                writer.write(b"0\r\n\r\n")
        except (asyncio.IncompleteReadError, ConnectionError):
            writer.close()

    async def __aenter__(self) -> str:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        return f"http://127.0.0.1:{self.server.sockets[0].getsockname()[1]}"

    async def __aexit__(self, *exc):
        self.server.close()


def test_watch_events_across_chunks_and_a_stream_cut_short():
    """Events split over many chunks, one larger than any read, are parsed whole; a watch whose
    stream ends without its last chunk is an error (KubeError 0: ListWatch resumes), never a
    quiet end; requests share one kept-alive connection."""
    big = {"type": "ADDED", "object": {"metadata": {"name": "big", "resourceVersion": "7"},
                                       "data": "x" * (1 << 20)}}
    small = {"type": "MODIFIED", "object": {"metadata": {"name": "a", "resourceVersion": "8"}}}
    body = (json.dumps(big) + "\n" + json.dumps(small) + "\n").encode()

    async def watch(server: _RawAPIServer):
        async with server as url:
            client = KubeClient(url, None)
            try:
                await client.request("GET", "/api/v1/namespaces")
                events = [e async for e in client.watch("/api/v1/namespaces", {}, timeout_seconds=5)]
                await client.request("GET", "/api/v1/namespaces")
                return events, server.connections
            finally:
                await client.aclose()

    events, connections = asyncio.run(watch(_RawAPIServer(body, 1000)))
    assert [e["type"] for e in events] == ["ADDED", "MODIFIED"]
    assert len(events[0]["object"]["data"]) == 1 << 20
    assert connections == 1

    with pytest.raises(KubeError) as err:
        asyncio.run(watch(_RawAPIServer(body[:5000], 1000, complete=False)))
    assert err.value.status == 0 and err.value.transient
