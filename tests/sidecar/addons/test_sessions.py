"""KubeStreams: exec/attach/port-forward session content - masked for the agent, recorded as
``stream`` events, port-forward streams judged by port (issue 15).

Flows are mitmproxy's test flows as Route/Enforce leave them for a kubernetes connection; the
recorder is the real one (spool, DirStore, read back with the sessions reader); SPDY frames are
built with zlib and the SPDY/3 dictionary as moby/spdystream writes them.
"""

from __future__ import annotations

import asyncio
import base64
import json
import struct
import zlib
from pathlib import Path

import pytest
from mitmproxy import http
from mitmproxy.test import tflow
from mitmproxy.websocket import WebSocketData, WebSocketMessage
from wsproto.frame_protocol import Opcode

from chaperone_sidecar import flowctx
from chaperone_sidecar.addons.sessions import FULL_FRAME, KubeStreams
from chaperone_sidecar.config import SidecarConfig
from chaperone_sidecar.flowctx import RecordingSettings
from chaperone_sidecar.policy.classify import classify
from chaperone_sidecar.policy.evaluator import evaluate
from chaperone_sidecar.policy.model import HTTPRequest, Identity
from chaperone_sidecar.recording import Recorder
from chaperone_sidecar.recording import k8s_streams as ks
from chaperone_sidecar.recording.manifest import key_from_bytes
from chaperone_sidecar.recording.reader import find_session, load_session
from chaperone_sidecar.recording.shipper import DirStore
from chaperone_sidecar.recording.spool import SpoolConfig
from chaperone_sidecar.services import SidecarServices
from chaperone_sidecar.sources import Sources

NS = "team-a"
AGENT = Identity(service_account=f"{NS}/claude", pod_namespace=NS, pod_name="agent-0")
SECRET = b"AKIAIOSFODNN7EXAMPLE"
CONNECTION = {"metadata": {"name": "cluster"},
              "spec": {"type": "kubernetes", "hosts": ["kube.example.com"],
                       "credentials": {"source": "secret", "secretRef": {"name": "t"}}}}
POLICY = {"apiVersion": "chaperone.dev/v1alpha1", "kind": "AccessPolicy",
          "metadata": {"name": "exec", "namespace": NS},
          "spec": {"defaultEffect": "block", "masking": {"detectors": ["all"]}, "rules": [
              {"name": "no-ssh", "match": {"kubernetes": {"ports": ["22"]}},
               "block": {"message": "no ssh tunnels"}},
              {"name": "no-rm", "match": {"kubernetes": {"commands": ["rm *"]}}, "block": {}},
              {"name": "sessions", "match": {"kubernetes": {"resources": ["pods/exec",
                                                                          "pods/portforward"]}},
               "allow": {}}]}}


def services(rec) -> SidecarServices:
    sources = Sources(NS)
    sources.publish({"connection_objs": [CONNECTION], "policy_objs": [POLICY]})
    return SidecarServices(config=SidecarConfig(standalone=True), sources=sources, recorder=rec)


def recorder(tmp_path: Path, mode: str = "strict") -> Recorder:
    return Recorder(SpoolConfig(tmp_path / "spool", mode=mode, fsync_interval=0.01),
                    namespace=NS, pod="agent-0", identity={"namespace": NS, "pod": "agent-0"},
                    session="s1", store=DirStore(tmp_path / "store"),
                    key=key_from_bytes(b"k" * 32))


def session_flow(svc: SidecarServices, target: str, *, upgrade: str = "websocket",
                 protocol: str = "v5.channel.k8s.io") -> http.HTTPFlow:
    """A connect request as Route and Enforce leave it, answered 101 by the upstream."""
    f = tflow.twebsocketflow(messages=False)
    path, _, query = target.partition("?")
    f.request.host, f.request.port, f.request.scheme = "kube.example.com", 443, "https"
    f.request.path = target
    f.request.headers["upgrade"] = upgrade
    f.response.headers["sec-websocket-protocol"] = protocol
    f.websocket = None
    ctx = flowctx.ensure(f)
    ctx.identity, ctx.connection, ctx.connection_type = AGENT, "cluster", "kubernetes"
    ctx.snapshot = svc.snapshot()
    ctx.recording = RecordingSettings()
    ctx.action = classify(HTTPRequest("GET", "https", "kube.example.com", 443, path, query),
                          "kubernetes")
    ctx.decision = evaluate(ctx.snapshot.policies, ctx.action, AGENT, "cluster")
    return f


async def upgraded(addon: KubeStreams, f: http.HTTPFlow) -> None:
    addon.requestheaders(f)
    addon.request(f)
    assert f.response.status_code == 101
    addon.responseheaders(f)
    f.websocket = WebSocketData()
    await addon.websocket_start(f)


async def send(addon: KubeStreams, f: http.HTTPFlow, content: bytes, *, from_client: bool,
               injected: bool = False) -> WebSocketMessage:
    message = WebSocketMessage(Opcode.BINARY, from_client, content, injected=injected)
    f.websocket.messages.append(message)
    await addon.websocket_message(f)
    return message


def delivered(message: WebSocketMessage) -> bytes | None:
    return None if message.dropped else message.content


async def events_of(rec: Recorder, tmp_path: Path) -> list[dict]:
    await rec.close("test")
    store = DirStore(tmp_path / "store")
    return [e for e in load_session(store, find_session(store, "s1")).events
            if e["type"] == "stream"]


def run(body):
    return asyncio.run(body())


# ---------------------------------------------------------------------------- exec (WebSocket)

def full_frame(text: bytes) -> bytes:
    """A stdout payload that filled the 32 KiB copy buffer, ending with ``text``."""
    return b"line of output\n" * ((FULL_FRAME - len(text)) // 15) + b"x" * (
        (FULL_FRAME - len(text)) % 15) + text


def test_exec_output_is_masked_across_messages_and_recorded_masked(tmp_path):
    rec = recorder(tmp_path)
    svc = services(rec)
    addon = KubeStreams(svc)
    injected: list[bytes] = []
    addon._inject = lambda flow, content, is_text: injected.append(content)  # type: ignore[method-assign]

    async def main():
        await rec.start()
        f = session_flow(svc, "/api/v1/namespaces/team-a/pods/web/exec"
                              "?command=cat&command=/etc/creds&container=app&stdout=true")
        await upgraded(addon, f)
        # The secret split across two stdout frames (the first filled the copy buffer): the
        # agent never gets it whole.
        first = await send(addon, f, b"\x01" + full_frame(b"key=" + SECRET[:8]), from_client=False)
        second = await send(addon, f, b"\x01" + SECRET[8:] + b"\nbye", from_client=False)
        typed = await send(addon, f, b"\x00echo " + SECRET + b"\n", from_client=True)
        # A full frame right before the exit status: its held tail follows the status.
        last = await send(addon, f, b"\x02" + full_frame(b"the end"), from_client=False)
        status = await send(addon, f, b'\x03{"metadata":{},"status":"Failure","reason":"NonZeroExitCode",'
                                      b'"details":{"causes":[{"reason":"ExitCode","message":"3"}]}}',
                            from_client=False)
        await addon.websocket_end(f)
        return f, first, second, typed, last, status, await events_of(rec, tmp_path)

    f, first, second, typed, last, status, events = run(main)
    agent_got = b"".join(delivered(m)[1:] for m in (first, second))
    assert SECRET not in agent_got and b"key=[MASKED:aws-access-key-id]\nbye" in agent_got
    assert agent_got.startswith(b"line of output\n")
    # A short frame is delivered whole ("bye" is not held back for a next frame).
    assert delivered(second).endswith(b"\nbye")
    # The status is never risked: it goes as it came; what the full frame held follows it.
    assert delivered(status)[:1] == b"\x03" and b"ExitCode" in delivered(status)
    assert len(injected) == 1 and injected[0][:1] == b"\x02", injected
    assert delivered(last)[1:] + injected[0][1:] == full_frame(b"the end")
    assert injected[0].endswith(b"end")  # a trailing word waits: it may start a secret
    assert delivered(typed) == b"\x00echo " + SECRET + b"\n"  # stdin goes upstream as typed
    stored = json.dumps(events)
    assert SECRET.decode() not in stored
    channels = [e["data"]["channel"] for e in events]
    assert channels[0] == "open" and channels[-1] == "end"
    assert {"stdout", "stdin", "error"} <= set(channels)
    opened = events[0]["data"]
    assert opened["command"] == ["cat", "/etc/creds"] and opened["container"] == "app"
    exit_event = next(e for e in events if e["data"]["channel"] == "error")
    assert exit_event["data"]["exit"]["exitCode"] == 3
    stdin = next(e for e in events if e["data"]["channel"] == "stdin")
    assert "[MASKED:" in stdin["data"]["data"]["text"]
    assert all(isinstance(e["data"]["elapsedMs"], int) for e in events)


def test_plain_spdy_is_refused_before_it_is_forwarded(tmp_path):
    svc = services(None)
    addon = KubeStreams(svc)
    f = session_flow(svc, "/api/v1/namespaces/team-a/pods/web/exec?command=ls",
                     upgrade="SPDY/3.1")
    f.response = None
    addon.request(f)  # Route classifies a request without a streamed body in `request`
    assert f.response is not None and f.response.status_code == 403
    body = json.loads(f.response.content)
    assert body["error"] == "chaperone_blocked" and "WebSocket" in body["message"]


def test_a_subprotocol_that_cannot_be_read_is_refused(tmp_path):
    svc = services(None)
    addon = KubeStreams(svc)
    f = session_flow(svc, "/api/v1/namespaces/team-a/pods/web/exec?command=ls",
                     protocol="v9.mystery.example")
    addon.responseheaders(f)
    assert f.response.status_code == 403
    assert flowctx.ensure(f).kube_stream is None


def test_strict_recording_closes_a_session_it_cannot_record(tmp_path):
    rec = recorder(tmp_path)
    svc = services(rec)
    addon = KubeStreams(svc)

    async def main():
        await rec.start()
        f = session_flow(svc, "/api/v1/namespaces/team-a/pods/web/exec?command=ls")
        await upgraded(addon, f)

        async def broken(events):
            return [RuntimeError("spool full")] * len(events)
        rec.append_many = broken  # type: ignore[method-assign]
        message = await send(addon, f, b"\x01bin\n", from_client=False)
        return f, message

    f, message = run(main)
    assert message.dropped and f.killable is False  # killed: nothing more is relayed
    assert addon.unrecorded == 1


# ---------------------------------------------------------------------------- SPDY port-forward

class Peer:
    """One SPDY endpoint's header compression (as moby/spdystream writes)."""

    def __init__(self) -> None:
        self.deflate = zlib.compressobj(9, zlib.DEFLATED, 15, 9, zdict=ks.SPDY_DICTIONARY)

    def syn_stream(self, stream_id: int, headers: dict[str, str]) -> bytes:
        block = self.deflate.compress(ks.header_block(headers)) + self.deflate.flush(zlib.Z_SYNC_FLUSH)
        body = struct.pack(">IIBB", stream_id, 0, 0, 0) + block
        return struct.pack(">HHI", 0x8003, 1, len(body)) + body

    def syn_reply(self, stream_id: int) -> bytes:
        block = self.deflate.compress(ks.header_block({})) + self.deflate.flush(zlib.Z_SYNC_FLUSH)
        body = struct.pack(">I", stream_id) + block
        return struct.pack(">HHI", 0x8003, 2, len(body)) + body


def test_spdy_tunnel_refuses_a_blocked_port_and_forwards_an_allowed_one(tmp_path):
    rec = recorder(tmp_path)
    svc = services(rec)
    addon = KubeStreams(svc)
    injections: list[bytes] = []
    addon._inject = lambda flow, content, is_text: injections.append(content)  # type: ignore[method-assign]
    kubectl, kubelet = Peer(), Peer()
    to_server, to_client = ks.SpdyReader(), ks.SpdyReader()  # the real peers' decompressors

    async def main():
        await rec.start()
        f = session_flow(svc, "/api/v1/namespaces/team-a/pods/web/portforward",
                         protocol=ks.SPDY_TUNNEL)
        await upgraded(addon, f)
        ssh = kubectl.syn_stream(1, {"streamtype": "error", "port": "22", "requestid": "0"})
        # cut mid-frame: nothing complete, nothing forwarded yet
        part = await send(addon, f, ssh[:7], from_client=True)
        assert part.dropped
        refused = await send(addon, f, ssh[7:], from_client=True)
        assert refused.dropped and injections == [b""]
        answer = await send(addon, f, b"", from_client=False, injected=True)
        frames = to_client.feed(answer.content)
        web = kubectl.syn_stream(3, {"streamtype": "data", "port": "8080", "requestid": "1"})
        fwd = await send(addon, f, web + ks.data_frames(3, b"GET / HTTP/1.1\r\n\r\n", 0),
                         from_client=True)
        upstream = to_server.feed(fwd.content)
        reply = await send(addon, f, kubelet.syn_reply(3) + ks.data_frames(3, b"HTTP/1.1 200", 0),
                           from_client=False)
        frames += to_client.feed(reply.content)
        await addon.websocket_end(f)
        return frames, upstream, await events_of(rec, tmp_path)

    frames, upstream, events = run(main)
    # kubectl gets the sidecar's answer to stream 1: SYN_REPLY, the refusal JSON, FIN.
    assert [(fr.kind, fr.stream_id) for fr in frames[:2]] == [("SYN_REPLY", 1), ("DATA", 1)]
    refusal = json.loads(frames[1].data)
    assert refusal["error"] == "chaperone_blocked" and refusal["message"] == "no ssh tunnels"
    assert refusal["rule"]["name"] == "no-ssh" and frames[1].fin
    # ... then the kubelet's reply to stream 3 (re-encoded in the same context) and its data.
    assert [(fr.kind, fr.stream_id) for fr in frames[2:]] == [("SYN_REPLY", 3), ("DATA", 3)]
    # The kubelet never heard of port 22; port 8080 went through, headers intact.
    assert [(fr.kind, fr.headers.get("port")) for fr in upstream] == [("SYN_STREAM", "8080"),
                                                                       ("DATA", None)]
    opens = [e["data"] for e in events if e["data"]["channel"] == "open" and "port" in e["data"]]
    assert [(o["port"], bool(o["refused"])) for o in opens] == [("22", True), ("8080", False)]
    data = [e["data"] for e in events if e["data"]["channel"] == "data"]
    assert data and all("data" not in d for d in data)  # tunnel content: sizes only


def test_garbage_in_a_spdy_tunnel_closes_it(tmp_path):
    svc = services(None)
    addon = KubeStreams(svc)

    async def main():
        f = session_flow(svc, "/api/v1/namespaces/team-a/pods/web/portforward",
                         protocol=ks.SPDY_TUNNEL)
        await upgraded(addon, f)
        bad = struct.pack(">HHI", 0x8002, 1, 10) + b"\x00" * 10  # SPDY/2
        message = await send(addon, f, bad, from_client=True)
        return f, message

    f, message = run(main)
    assert message.dropped and f.killable is False


@pytest.mark.parametrize("payload,expected", [
    (b'{"status":"Success"}', {"status": "Success", "exitCode": 0}),
    (b'{"status":"Failure","message":"command terminated with non-zero exit code: 137",'
     b'"details":{"causes":[{"reason":"ExitCode","message":"137"}]}}',
     {"status": "Failure", "exitCode": 137,
      "message": "command terminated with non-zero exit code: 137"}),
    (b"plain text error", {"status": "Failure", "message": "plain text error"}),
])
def test_exit_status(payload, expected):
    assert ks.exit_status(payload) == expected


# ---------------------------------------------------------------------------- replay

def test_sessions_replay_prints_the_transcript(tmp_path, capsys):
    from chaperone_sidecar.recording.sessions_cli import main as sessions_main

    rec = recorder(tmp_path)
    svc = services(rec)
    addon = KubeStreams(svc)
    addon._inject = lambda flow, content, is_text: None  # type: ignore[method-assign]

    async def main():
        await rec.start()
        f = session_flow(svc, "/api/v1/namespaces/team-a/pods/web/exec"
                              "?command=sh&command=-c&command=ls+/srv;cat+/srv/key&container=app")
        await upgraded(addon, f)
        await send(addon, f, b"\x00y\n", from_client=True)
        await send(addon, f, b"\x01app\nkey\n", from_client=False)
        await send(addon, f, b"\x01" + SECRET + b"\n", from_client=False)
        await send(addon, f, b"\x02warning: \x1b[31mred\x1b[0m\n", from_client=False)
        await send(addon, f, b'\x03{"status":"Success"}', from_client=False)
        await addon.websocket_end(f)
        await rec.close("test")

    run(main)
    assert sessions_main(["sessions", "replay", "s1", "--dir", str(tmp_path / "store")]) == 0
    out = capsys.readouterr().out
    assert "$ kubectl exec team-a/web -c app -- sh -c 'ls /srv;cat /srv/key'" in out
    lines = [line.split("| ", 1) for line in out.splitlines() if "| " in line]
    by_channel = [(head.split()[-1], text) for head, text in lines]
    assert ("stdin", "y") in by_channel and ("stdout", "app") in by_channel
    assert ("stdout", "[MASKED:aws-access-key-id]  [masked aws-access-key-id x1]") in by_channel
    assert ("stderr", "warning: \\x1b[31mred\\x1b[0m") in by_channel  # escaped, not interpreted
    assert ("exit", "exit status 0") in by_channel
    assert SECRET.decode() not in out
    # every transcript line carries its time and the milliseconds since the session opened
    assert all(" +" in head and "ms" in head for head, _ in lines)


def test_channel_protocol_port_forward_records_ports_and_sizes_only(tmp_path):
    """The WebSocket port-forward (``portforward.k8s.io``, ports in the URL): data channel 0,
    error channel 1; the server's first message on each starts with the port."""
    rec = recorder(tmp_path)
    svc = services(rec)
    addon = KubeStreams(svc)

    async def main():
        await rec.start()
        f = session_flow(svc, "/api/v1/namespaces/team-a/pods/web/portforward?ports=8080",
                         protocol="portforward.k8s.io")
        await upgraded(addon, f)
        await send(addon, f, b"\x00" + (8080).to_bytes(2, "little"), from_client=False)
        await send(addon, f, b"\x00GET / HTTP/1.1\r\n\r\n", from_client=True)
        reply = await send(addon, f, b"\x00HTTP/1.1 200 OK\r\n\r\n" + SECRET, from_client=False)
        await addon.websocket_end(f)
        return reply, await events_of(rec, tmp_path)

    reply, events = run(main)
    assert delivered(reply).endswith(SECRET)  # tunnel data is not masked (docs/exec-sessions.md)
    data = [e["data"] for e in events if e["data"]["channel"] == "data"]
    assert [(d["direction"], d["port"], d["size"]) for d in data] == [
        ("out", "8080", 0), ("in", "8080", 18), ("out", "8080", 39)]
    assert SECRET.decode() not in json.dumps(events)  # ... and never recorded


def test_base64_exec_is_masked_and_re_encoded(tmp_path):
    svc = services(None)
    addon = KubeStreams(svc)

    async def main():
        f = session_flow(svc, "/api/v1/namespaces/team-a/pods/web/exec?command=env&container=app",
                         protocol="v4.base64.channel.k8s.io")
        await upgraded(addon, f)
        return await send(addon, f, b"1" + base64.b64encode(b"KEY=" + SECRET + b"\n"),
                          from_client=False)

    message = run(main)
    assert delivered(message)[:1] == b"1"
    assert base64.b64decode(delivered(message)[1:]) == b"KEY=[MASKED:aws-access-key-id]\n"


def test_a_port_needing_approval_is_refused_per_stream(tmp_path):
    pol = json.loads(json.dumps(POLICY))
    pol["spec"]["rules"].insert(0, {"name": "db-ask", "match": {"kubernetes": {"ports": ["5432"]}},
                                    "requireApproval": {"approvers": {"users": ["alice"]}}})
    sources = Sources(NS)
    sources.publish({"connection_objs": [CONNECTION], "policy_objs": [pol]})
    svc = SidecarServices(config=SidecarConfig(standalone=True), sources=sources, recorder=None)
    addon = KubeStreams(svc)
    addon._inject = lambda flow, content, is_text: None  # type: ignore[method-assign]

    async def main():
        f = session_flow(svc, "/api/v1/namespaces/team-a/pods/web/portforward",
                         protocol=ks.SPDY_TUNNEL)
        await upgraded(addon, f)
        await send(addon, f, Peer().syn_stream(1, {"streamtype": "error", "port": "5432"}),
                   from_client=True)
        answer = await send(addon, f, b"", from_client=False, injected=True)
        return ks.SpdyReader().feed(answer.content)

    frames = run(main)
    refusal = json.loads(frames[1].data)
    assert refusal["rule"]["name"] == "db-ask" and "cannot wait" in refusal["message"]
