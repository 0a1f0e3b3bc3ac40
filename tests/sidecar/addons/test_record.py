"""Record: session events per flow (masked only), hash-chained, strict vs best-effort recording.

Mask and Record run in pipeline order on hand-made FlowContexts (as Identify ... InjectCredentials
would leave them) with a real ``Recorder``: spool on disk, shipped to a ``DirStore`` with a
signed manifest, read back and verified with the ``chaperone sessions`` reader.
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest
from mitmproxy import http
from mitmproxy.test import taddons, tflow, tutils

from chaperone_sidecar import flowctx
from chaperone_sidecar.addons.mask import Mask
from chaperone_sidecar.addons.record import Record
from chaperone_sidecar.addons.refusal import refuse
from chaperone_sidecar.config import SidecarConfig
from chaperone_sidecar.flowctx import RecordingSettings
from chaperone_sidecar.policy.model import Action, Decision, Identity, MaskSpec, RuleRef
from chaperone_sidecar.recording import Recorder
from chaperone_sidecar.recording.flow_events import REDACTED
from chaperone_sidecar.recording.manifest import key_from_bytes
from chaperone_sidecar.recording.reader import find_session, load_session, verify_session
from chaperone_sidecar.recording.shipper import DirStore
from chaperone_sidecar.recording.spool import SpoolConfig, SpoolUnavailable
from chaperone_sidecar.services import SidecarServices
from chaperone_sidecar.sources import Sources

NS = "team-a"
AWS_KEY_ID = b"AKIAIOSFODNN7EXAMPLE"
AWS_SECRET = b"wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY"
INJECTED = "ghp_realTokenTheAgentNeverSees0123456789"  # what InjectCredentials put in
AGENT = Identity(service_account=f"{NS}/claude", pod_namespace=NS, pod_name="agent-0",
                 creator="alice", on_behalf_of="bob")
RULE = RuleRef(f"{NS}/api", "mask-secrets")
MASKS = (MaskSpec(detectors=("all",), target="both", source=RULE),)
KEY = key_from_bytes(b"manifest-hmac-secret-for-tests")


def connection(name: str, recording: dict | None = None) -> dict:
    spec: dict = {"type": "http", "hosts": [f"{name}.example.com"],
                  "credentials": {"source": "secret", "secretRef": {"name": "s"},
                                  "header": "X-Custom-Credential-Header"}}
    if recording is not None:
        spec["recording"] = recording
    return {"metadata": {"name": name}, "spec": spec}


CONNECTIONS = [connection("api"), connection("small", {"maxBodyBytes": 16}),
               connection("nobodies", {"bodies": "none"}), connection("off", {"enabled": False}),
               connection("lenient", {"mode": "best-effort"})]


def services(recorder) -> SidecarServices:
    sources = Sources(NS)
    sources.publish({"connection_objs": CONNECTIONS, "policy_objs": []})
    return SidecarServices(config=SidecarConfig(standalone=True), sources=sources, recorder=recorder)


def recorder(tmp_path: Path, mode: str = "strict", spool: Path | None = None) -> Recorder:
    return Recorder(SpoolConfig(spool or tmp_path / "spool", mode=mode, fsync_interval=0.01),
                    namespace=NS, pod="agent-0", identity={"namespace": NS, "pod": "agent-0"},
                    session="s1", store=DirStore(tmp_path / "store"), key=KEY)


def unwritable(tmp_path: Path) -> Path:
    """A spool path nobody can create, root included: its parent is a regular file."""
    blocker = tmp_path / "blocker"
    blocker.write_text("not a directory")
    return blocker / "spool"


def make_flow(conn="api", *, method=b"POST", content=b"", decision=None, **headers) -> http.HTTPFlow:
    hdrs = http.Headers(host=f"{conn}.example.com", **headers)
    f = tflow.tflow(req=tutils.treq(host=f"{conn}.example.com", port=443, scheme=b"https",
                                    method=method, path=b"/v1/items?page=2&token=agent-token-123",
                                    headers=hdrs, content=content))
    ctx = flowctx.ensure(f)
    ctx.identity, ctx.connection, ctx.connection_type = AGENT, conn, "http"
    ctx.action = Action("http", method.decode(), "https", f"{conn}.example.com", 443, "/v1/items",
                        name=f"http:{method.decode()}", summary=f"{method.decode()} /v1/items")
    ctx.decision = decision or Decision("allow", rule=RuleRef(f"{NS}/api", "writes"), masks=MASKS)
    routed(ctx)
    return f


def routed(ctx: flowctx.FlowContext) -> None:
    """What Route fills for Mask and Record: the snapshot and the connection's recording."""
    ctx.snapshot = services(None).snapshot()
    conn = ctx.snapshot.connection(ctx.connection)
    ctx.recording = RecordingSettings.from_spec(conn.spec.get("recording") if conn else None)


def upstream(f: http.HTTPFlow, content: bytes = b"", **headers: str) -> None:
    f.response = http.Response.make(200)
    f.response.headers.clear()
    for name, value in headers.items():
        f.response.headers[name.replace("_", "-")] = value
    f.response.raw_content = content or None


class Pipeline:
    """Mask then Record (their pipeline order), hook by hook as mitmproxy calls them."""

    def __init__(self, rec: Recorder) -> None:
        self.services = services(rec)
        self.mask, self.record = Mask(self.services), Record(self.services)

    async def request(self, f: http.HTTPFlow) -> None:
        if f.request.stream:
            self.mask.requestheaders(f)
            await self.record.requestheaders(f)
        self.mask.request(f)
        await self.record.request(f)

    async def response(self, f: http.HTTPFlow, chunks=None) -> None:
        self.mask.responseheaders(f)
        if chunks is not None:
            sent = [c for chunk in [*chunks, b""] for c in f.response.stream(chunk)]
            f.metadata["sent"] = b"".join(sent)
        self.mask.response(f)
        await self.record.response(f)


def run(body):
    return asyncio.run(body())


def stored_bytes(*roots: Path) -> bytes:
    return b"".join(p.read_bytes() for root in roots if root.exists()
                    for p in sorted(root.rglob("*")) if p.is_file())


# ---------------------------------------------------------------------------- the happy path

def test_events_in_order_chained_and_only_ever_masked(tmp_path):
    rec = recorder(tmp_path)
    pipe = Pipeline(rec)
    request_body = json.dumps({"note": "deploy", "aws_secret_access_key": AWS_SECRET.decode()}).encode()
    jwt_free_sse = b"data: {\"text\": \"your key is " + AWS_KEY_ID + b"\"}\n\ndata: [DONE]\n\n"

    async def main():
        with taddons.context(pipe.mask, pipe.record) as tctx:
            tctx.configure(pipe.mask, chaperone_mask_buffer="64k")
            await pipe.record.running()
            # 1. buffered JSON both ways, with the credential InjectCredentials added
            f1 = make_flow(content=request_body, content_type="application/json",
                           authorization=f"Bearer {INJECTED}",
                           x_custom_credential_header=INJECTED,
                           x_trace_note=f"key {AWS_KEY_ID.decode()}")  # detectors run on headers
            await pipe.request(f1)
            assert f1.response is None  # recorded, then forwarded
            body = json.dumps({"AccessKeyId": AWS_KEY_ID.decode()}).encode()
            upstream(f1, body, content_type="application/json", content_length=str(len(body)))
            await pipe.response(f1)
            # 2. an SSE stream, the secret split across chunks
            f2 = make_flow(method=b"GET")
            await pipe.request(f2)
            upstream(f2, content_type="text/event-stream", transfer_encoding="chunked")
            cut = jwt_free_sse.index(AWS_KEY_ID) + 7
            await pipe.response(f2, [jwt_free_sse[:cut], jwt_free_sse[cut:]])
            # 3. blocked by Enforce: refused in the request hook, never forwarded
            f3 = make_flow(method=b"DELETE", decision=Decision(
                "block", rule=RuleRef(f"{NS}/api", "no-deletes"), message="no deletes", masks=MASKS))
            refuse(f3, "blocked", "no deletes")
            await pipe.request(f3)
            await pipe.response(f3)
            await pipe.record.done()
        return f1, f2, f3

    f1, f2, f3 = run(main)
    assert AWS_KEY_ID not in f2.metadata["sent"]
    store = DirStore(tmp_path / "store")
    ref = find_session(store, "s1")
    report = verify_session(store, ref, KEY)
    assert report.ok and report.signature == "valid", report.problems  # chain + signed manifest
    events = load_session(store, ref).events
    assert [(e["type"], e.get("flow")) for e in events] == [
        ("session-start", None),
        ("request", f1.id), ("response", f1.id),  # the decision is in the request event
        ("request", f2.id), ("response", f2.id),
        ("request", f3.id), ("response", f3.id),
        ("session-end", None)]
    assert [e["seq"] for e in events] == list(range(len(events)))
    assert all(b["prev"] == a["hash"] for a, b in zip(events, events[1:]))

    req1, resp1 = events[1:3]
    dec1 = req1["data"]["decision"]
    assert req1["identity"] == {"namespace": NS, "pod": "agent-0", "serviceAccount": "claude",
                                "creator": "alice", "onBehalfOf": "bob"}
    assert req1["data"]["connection"] == "api" and req1["data"]["action"]["name"] == "http:POST"
    headers = dict((k.lower(), v) for k, v in req1["data"]["headers"])
    assert headers["authorization"] == REDACTED and headers["x-custom-credential-header"] == REDACTED
    assert headers["x-trace-note"] == "key [MASKED:aws-access-key-id]"
    assert "token=[REDACTED]" in req1["data"]["url"] and "page=2" in req1["data"]["url"]
    assert req1["data"]["body"]["masked"] == {"aws-secret-key": 1}
    assert json.loads(req1["data"]["body"]["text"])["note"] == "deploy"
    assert dec1["effect"] == "allow" and dec1["rule"] == {"policy": f"{NS}/api", "name": "writes"}
    assert resp1["data"]["status"] == 200 and resp1["data"]["masked"] == {"aws-access-key-id": 1}
    assert "[MASKED:aws-access-key-id]" in resp1["data"]["body"]["text"]

    resp2 = events[4]["data"]
    assert resp2["streamed"] and resp2["body"]["streamed"] and resp2["body"]["text"].endswith("[DONE]\n\n")
    dec3, resp3 = events[5]["data"]["decision"], events[6]["data"]
    assert dec3["effect"] == "block" and dec3["refused"] == "chaperone_blocked"
    assert resp3["status"] == 403 and resp3["refused"] == "chaperone_blocked"
    assert json.loads(resp3["body"]["text"])["error"] == "chaperone_blocked"

    everything = stored_bytes(tmp_path / "spool", tmp_path / "store")
    assert b"session-end" in everything
    for planted in (AWS_KEY_ID, AWS_SECRET, INJECTED.encode(), b"agent-token-123"):
        assert planted not in everything, f"{planted!r} reached the recording"


def test_approval_event_names_the_request_and_approvers(tmp_path):
    rec = recorder(tmp_path)
    pipe = Pipeline(rec)

    async def main():
        with taddons.context(pipe.mask, pipe.record):
            await pipe.record.running()
            f = make_flow(method=b"GET", decision=Decision("require_approval", rule=RuleRef(f"{NS}/api", "ask")))
            ctx = flowctx.get(f)
            ctx.approval_request, ctx.approved_by = "ar-abc123", ("carol", "dave")
            ctx.request_digest = "sha256:00ff"
            await pipe.request(f)
            upstream(f, b"ok", content_type="text/plain", content_length="2")
            await pipe.response(f)
            await pipe.record.done()

    run(main)
    events = load_session(DirStore(tmp_path / "store"), find_session(DirStore(tmp_path / "store"), "s1")).events
    assert [e["type"] for e in events] == ["session-start", "request", "approval",
                                           "response", "session-end"]
    assert events[2]["data"] == {"name": "ar-abc123", "approvedBy": ["carol", "dave"], "grant": None,
                                 "approver": "carol, dave",
                                 "digest": "sha256:00ff", "state": "approved"}


# ---------------------------------------------------------------------------- bodies

def test_bodies_follow_the_connection_settings(tmp_path):
    rec = recorder(tmp_path)
    pipe = Pipeline(rec)
    content = b"0123456789" * 10

    async def main():
        with taddons.context(pipe.mask, pipe.record):
            await pipe.record.running()
            for conn in ("small", "nobodies", "off"):
                f = make_flow(conn, content=content, content_type="text/plain")
                await pipe.request(f)
                upstream(f, content, content_type="text/plain", content_length=str(len(content)))
                await pipe.response(f)
            await pipe.record.done()

    run(main)
    events = load_session(DirStore(tmp_path / "store"), find_session(DirStore(tmp_path / "store"), "s1")).events
    requests = [e["data"] for e in events if e["type"] == "request"]
    assert len(requests) == 2  # "off" is not recorded at all
    assert requests[0]["body"] == {"text": "0123456789012345", "size": 100, "truncated": True}
    assert requests[1]["body"] == {"size": 100, "omitted": "recording.bodies is none"}


def test_a_body_mask_did_not_handle_is_never_recorded(tmp_path):
    rec = recorder(tmp_path)
    services_ = services(rec)
    record = Record(services_)  # Mask not in the pipeline

    async def main():
        with taddons.context(record):
            await record.running()
            f = make_flow(content=b"secret " + AWS_KEY_ID)
            await record.request(f)
            upstream(f, AWS_KEY_ID, content_type="text/plain", content_length="20")
            await record.response(f)
            await record.done()

    run(main)
    events = load_session(DirStore(tmp_path / "store"), find_session(DirStore(tmp_path / "store"), "s1")).events
    bodies = [e["data"]["body"] for e in events if e["type"] in ("request", "response")]
    assert all(set(b) == {"size", "omitted"} for b in bodies)
    assert AWS_KEY_ID not in stored_bytes(tmp_path / "spool", tmp_path / "store")


def test_settings_from_the_crd_fields():
    assert RecordingSettings.from_spec(None).body_limit == 65536
    assert RecordingSettings.from_spec({"bodies": "none"}).body_limit == 0
    assert RecordingSettings.from_spec({"bodies": "full"}).body_limit == 16 * 1024 * 1024
    assert RecordingSettings.from_spec({"mode": "best-effort"}).mode == "best-effort"
    assert RecordingSettings.from_spec({}).mode == "strict"


# ---------------------------------------------------------------------------- recording modes

@pytest.mark.parametrize("conn, spool_mode, refused", [
    ("api", "strict", True),          # connection strict (the CRD default)
    ("api", "best-effort", True),     # the connection's mode wins over the spool's
    ("lenient", "strict", False),     # connection best-effort
    ("lenient", "best-effort", False),
])
def test_unwritable_spool_strict_refuses_before_forwarding_best_effort_passes(
        tmp_path, conn, spool_mode, refused):
    rec = recorder(tmp_path, spool_mode, spool=unwritable(tmp_path))
    pipe = Pipeline(rec)

    async def main():
        with taddons.context(pipe.mask, pipe.record):
            await pipe.record.running()  # reports, does not raise
            f = make_flow(conn, content=b"hello")
            await pipe.request(f)
            return f

    f = run(main)
    if refused:
        assert f.response is not None and f.response.status_code == 503
        body = json.loads(f.response.content)
        assert body["error"] == "chaperone_recording_unavailable"
        assert pipe.record.refused == 1
    else:
        assert f.response is None  # forwarded
        assert pipe.record.unrecorded == 1 and pipe.record.refused == 0  # the request (with its decision) lost


def test_strict_streamed_request_is_killed_when_it_cannot_be_recorded(tmp_path):
    rec = recorder(tmp_path, spool=unwritable(tmp_path))
    pipe = Pipeline(rec)

    async def main():
        with taddons.context(pipe.mask, pipe.record):
            await pipe.record.running()
            f = make_flow(content=b"")
            f.request.stream = True
            pipe.mask.requestheaders(f)
            await pipe.record.requestheaders(f)
            return f

    f = run(main)
    assert f.response is None  # mitmproxy cannot answer a streaming request: it is killed
    assert f.error is not None and f.error.msg == "Connection killed."


def test_strict_buffered_response_is_withheld_when_it_cannot_be_recorded(tmp_path):
    rec = recorder(tmp_path)
    pipe = Pipeline(rec)

    async def main():
        with taddons.context(pipe.mask, pipe.record):
            await pipe.record.running()
            f = make_flow(method=b"GET")
            await pipe.request(f)

            async def broken(event):
                raise SpoolUnavailable("disk full")
            async def broken_many(events):
                return [SpoolUnavailable("disk full") for _ in events]
            rec.append = broken  # the spool fails between request and response
            rec.append_many = broken_many
            upstream(f, b"the answer", content_type="text/plain", content_length="10")
            await pipe.response(f)
            return f

    f = run(main)
    assert f.response.status_code == 503 and b"the answer" not in f.response.content
    assert "response cannot be recorded" in json.loads(f.response.content)["message"]


def test_streamed_request_body_is_recorded_masked_with_the_response(tmp_path):
    rec = recorder(tmp_path)
    pipe = Pipeline(rec)
    body = b"upload " + AWS_KEY_ID + b" done"

    async def main():
        with taddons.context(pipe.mask, pipe.record):
            await pipe.record.running()
            f = make_flow(content_type="text/plain")
            f.request.stream = True
            pipe.mask.requestheaders(f)
            await pipe.record.requestheaders(f)
            sent = b"".join(c for part in (body, b"") for c in f.request.stream(part))
            await pipe.record.request(f)  # mitmproxy fires it after the body went
            upstream(f, b"ok", content_type="text/plain", content_length="2")
            await pipe.response(f)
            await pipe.record.done()
            return sent

    assert run(main) == body  # upstream got the body as sent
    events = load_session(DirStore(tmp_path / "store"), find_session(DirStore(tmp_path / "store"), "s1")).events
    request = next(e for e in events if e["type"] == "request")["data"]
    response = next(e for e in events if e["type"] == "response")["data"]
    assert request["body"] == {"streamed": True, "recordedIn": "response"}
    assert response["requestBody"]["text"] == "upload [MASKED:aws-access-key-id] done"


def test_error_event_for_a_flow_that_failed(tmp_path):
    rec = recorder(tmp_path)
    pipe = Pipeline(rec)

    async def main():
        with taddons.context(pipe.mask, pipe.record):
            await pipe.record.running()
            f = make_flow(method=b"GET")
            await pipe.request(f)
            f.error = tflow.terr("server disconnected")
            await pipe.record.error(f)
            await pipe.record.done()

    run(main)
    events = load_session(DirStore(tmp_path / "store"), find_session(DirStore(tmp_path / "store"), "s1")).events
    assert [e["type"] for e in events] == ["session-start", "request", "error", "session-end"]
    assert events[2]["data"]["message"] == "server disconnected"


# ---------------------------------------------------------------------------- unknown length

def appended_types(rec: Recorder) -> list[str]:
    """Event types in the order they were handed to the recorder (a spy on ``append`` and
    ``append_many``)."""
    seen: list[str] = []
    real = rec.append

    async def spy(event):
        seen.append(event["type"])
        return await real(event)
    real_many = rec.append_many

    async def spy_many(events):
        seen.extend(event["type"] for event in events)
        return await real_many(events)
    rec.append = spy
    rec.append_many = spy_many
    return seen


@pytest.mark.parametrize("version, headers", [
    ("HTTP/1.1", {"transfer_encoding": "chunked"}),
    ("HTTP/2.0", {}),
], ids=["chunked", "h2-without-length"])
def test_body_of_unknown_length_is_recorded_before_it_can_leave(tmp_path, version, headers):
    """mitmproxy may stream such a body on by itself, before `request` fires: the request is
    recorded in `requestheaders`; read after all, its masked body goes with the response."""
    rec = recorder(tmp_path)
    pipe = Pipeline(rec)
    seen = appended_types(rec)
    body = b"upload " + AWS_KEY_ID + b" done"

    async def main():
        with taddons.context(pipe.mask, pipe.record):
            await pipe.record.running()
            f = make_flow(content=body, content_type="text/plain", **headers)
            f.request.http_version = version
            pipe.mask.requestheaders(f)
            await pipe.record.requestheaders(f)
            before_request_hook = list(seen)
            pipe.mask.request(f)  # it stayed small: mitmproxy read it
            await pipe.record.request(f)
            upstream(f, b"ok", content_type="text/plain", content_length="2")
            await pipe.response(f)
            await pipe.record.done()
            return before_request_hook

    assert run(main) == ["session-start", "request"]
    events = load_session(DirStore(tmp_path / "store"), find_session(DirStore(tmp_path / "store"), "s1")).events
    assert [e["type"] for e in events] == ["session-start", "request", "response", "session-end"]
    assert events[1]["data"]["body"] == {"streamed": True, "recordedIn": "response"}
    assert events[2]["data"]["requestBody"]["text"] == "upload [MASKED:aws-access-key-id] done"


def test_strict_body_of_unknown_length_is_refused_before_it_can_leave(tmp_path):
    rec = recorder(tmp_path, spool=unwritable(tmp_path))
    pipe = Pipeline(rec)

    async def main():
        with taddons.context(pipe.mask, pipe.record):
            await pipe.record.running()
            f = make_flow(content=b"hello", transfer_encoding="chunked")
            pipe.mask.requestheaders(f)
            await pipe.record.requestheaders(f)
            return f

    f = run(main)
    assert f.response is not None and f.response.status_code == 503  # not streaming yet: refused
    assert json.loads(f.response.content)["error"] == "chaperone_recording_unavailable"


def test_a_decision_changed_after_the_early_record_is_recorded_again(tmp_path):
    """Enforce judges a body of unknown length on its headers, and again once it was read: a
    stricter decision then is recorded before the request would have left."""
    rec = recorder(tmp_path)
    pipe = Pipeline(rec)

    async def main():
        with taddons.context(pipe.mask, pipe.record):
            await pipe.record.running()
            f = make_flow(content=b"DROP TABLE", transfer_encoding="chunked")
            pipe.mask.requestheaders(f)
            await pipe.record.requestheaders(f)
            ctx = flowctx.get(f)  # what Enforce's `request` hook does on a stricter re-judgement
            ctx.decision = Decision("block", rule=RuleRef(f"{NS}/api", "no-drops"), message="no")
            refuse(f, "blocked", "no")
            pipe.mask.request(f)
            await pipe.record.request(f)
            await pipe.response(f)
            await pipe.record.done()

    run(main)
    events = load_session(DirStore(tmp_path / "store"), find_session(DirStore(tmp_path / "store"), "s1")).events
    assert [e["type"] for e in events] == ["session-start", "request", "decision",
                                           "response", "session-end"]
    assert events[1]["data"]["decision"]["effect"] == "allow"  # in the request event
    assert events[2]["data"]["effect"] == "block" and events[2]["data"]["refused"] == "chaperone_blocked"
    assert events[3]["data"]["status"] == 403


def test_redact_headers_masks_value_by_value_after_one_joined_scan():
    from chaperone_sidecar.addons.mask import masker_for
    from chaperone_sidecar.recording.flow_events import redact_headers

    masker = masker_for(MASKS, None)
    clean = http.Headers(accept="*/*", x_note="nothing secret here", authorization="Bearer abc")
    assert redact_headers(clean, "", masker) == [
        ["accept", "*/*"], ["x-note", "nothing secret here"], ["authorization", REDACTED]]
    mixed = http.Headers(x_a="plain", x_b="key " + AWS_KEY_ID.decode(), x_c="also plain")
    assert redact_headers(mixed, "", masker) == [
        ["x-a", "plain"], ["x-b", "key [MASKED:aws-access-key-id]"], ["x-c", "also plain"]]
    # A secret split over two headers is two harmless halves, as when each value was masked
    # on its own: the joined scan never masks across a header boundary.
    split = http.Headers(x_a="AKIAIOSFOD", x_b="NN7EXAMPLE")
    assert redact_headers(split, "", masker) == [["x-a", "AKIAIOSFOD"], ["x-b", "NN7EXAMPLE"]]
    # The injected credential header is redacted by name, never scanned.
    assert redact_headers(http.Headers(x_token_here="AKIAIOSFODNN7EXAMPLE"), "x-token-here", None) == [
        ["x-token-here", REDACTED]]
