"""Egress: a transparent-mode connection that never carried an HTTP request is recorded.

A real Recorder (spool + directory store); the connection hooks called as mitmproxy calls
them. The end-to-end proof (real netns, iptables, sidecar) is
tests/sidecar/integration/test_transparent.py.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from types import SimpleNamespace

from mitmproxy import connection
from mitmproxy.proxy import mode_specs
from mitmproxy.test import tflow

from chaperone_sidecar.addons.egress import Egress
from chaperone_sidecar.config import SidecarConfig
from chaperone_sidecar.recording import Recorder
from chaperone_sidecar.recording.manifest import key_from_bytes
from chaperone_sidecar.recording.reader import find_session, load_session
from chaperone_sidecar.recording.shipper import DirStore
from chaperone_sidecar.recording.spool import SpoolConfig
from chaperone_sidecar.services import SidecarServices
from chaperone_sidecar.sources import Sources

NS = "team-a"


def client(mode: str = "transparent", sni: str | None = None) -> connection.Client:
    return connection.Client(peername=("10.0.0.5", 40000), sockname=("127.0.0.1", 15001),
                             sni=sni, proxy_mode=mode_specs.ProxyMode.parse(mode))


def next_layer(egress: Egress, cl: connection.Client, destination: tuple[str, int]) -> None:
    server = connection.Server(address=destination)
    egress.next_layer(SimpleNamespace(context=SimpleNamespace(client=cl, server=server)))


def test_connections_without_a_request_are_recorded(tmp_path: Path) -> None:
    async def body() -> list[dict]:
        store = DirStore(tmp_path / "store")
        rec = Recorder(SpoolConfig(tmp_path / "spool", fsync_interval=0.01), namespace=NS,
                       pod="agent-0", identity={"namespace": NS, "pod": "agent-0"},
                       session="s1", store=store, key=key_from_bytes(b"k" * 32))
        await rec.start()
        config = SidecarConfig(standalone=True, pod_namespace=NS, pod_name="agent-0")
        egress = Egress(SidecarServices(config=config, sources=Sources(NS), recorder=rec))

        ssh = client()  # not HTTP: never a flow
        egress.client_connected(ssh)
        next_layer(egress, ssh, ("198.51.100.7", 22))
        await egress.client_disconnected(ssh)

        tls_failed = client(sni="tickets.example.com")  # the agent refused our certificate
        egress.client_connected(tls_failed)
        next_layer(egress, tls_failed, ("2001:db8::7", 9443))
        egress.tls_failed_client(SimpleNamespace(context=SimpleNamespace(client=tls_failed)))
        await egress.client_disconnected(tls_failed)

        http_conn = client()  # carried a request: Record's, not ours
        egress.client_connected(http_conn)
        next_layer(egress, http_conn, ("10.0.0.9", 8080))
        flow = tflow.tflow()
        flow.client_conn = http_conn
        egress.requestheaders(flow)
        await egress.client_disconnected(http_conn)

        explicit = client("regular")  # explicit mode: the agent chose the proxy, not a target
        egress.client_connected(explicit)
        await egress.client_disconnected(explicit)

        assert egress.recorded == 2 and not egress._open
        await rec.close("test")
        return [e for e in load_session(store, find_session(store, "s1")).events
                if e["type"] == "error"]

    events = asyncio.run(body())
    assert [e["data"]["destination"] for e in events] == ["198.51.100.7:22", "[2001:db8::7]:9443"]
    ssh, tls_failed = events
    assert ssh["data"]["kind"] == "connection" and "no HTTP request" in ssh["data"]["message"]
    assert "nothing was forwarded" in ssh["data"]["message"] and ssh["data"]["sni"] is None
    assert tls_failed["data"]["sni"] == "tickets.example.com"
    assert "TLS handshake" in tls_failed["data"]["message"]
    assert ssh["identity"] == {"namespace": NS, "pod": "agent-0"}
