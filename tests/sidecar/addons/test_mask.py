"""Mask: responses masked buffered or as they stream; request bodies masked for the recording.

Hooks are called the way mitmproxy calls them (``responseheaders``, then - for a stream - the
``flow.response.stream`` callable with each chunk and ``b""`` at the end, then ``response``).
"""

from __future__ import annotations

import asyncio
import base64
import gzip
import hashlib
import hmac
import json
import os
import zlib

import pytest
from mitmproxy import http
from mitmproxy.test import taddons, tflow, tutils

from chaperone_sidecar import flowctx
from chaperone_sidecar.addons.mask import Mask
from chaperone_sidecar.config import SidecarConfig
from chaperone_sidecar.flowctx import BodyCapture, RecordingSettings
from chaperone_sidecar.policy.masking.decoded import mask_binary
from chaperone_sidecar.policy.masking.detectors import resolve_rules
from chaperone_sidecar.policy.masking.stream import BINARY_BATCH, MAX_HELD
from chaperone_sidecar.policy.model import Action, Decision, Identity, MaskSpec, RuleRef
from chaperone_sidecar.services import SidecarServices
from chaperone_sidecar.sources import Sources

AWS_KEY_ID = b"AKIAIOSFODNN7EXAMPLE"
AWS_SECRET = b"wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY"
ALL = MaskSpec(detectors=("all",), source=RuleRef("team-a/p", "mask-secrets"))

def _hook(result) -> None:
    """Run a Mask hook to its end: it returns a coroutine when it masks off the event loop
    (a large or compressed body, ``mask.OFFLOAD_BYTES``), which mitmproxy awaits."""
    if result is not None:
        asyncio.run(result)



def b64url(data: bytes) -> bytes:
    return base64.urlsafe_b64encode(data).rstrip(b"=")


def make_jwt() -> bytes:
    head = b64url(json.dumps({"alg": "HS256", "typ": "JWT"}).encode())
    body = b64url(json.dumps({"sub": "1234567890", "name": "Ada"}).encode())
    sig = b64url(hmac.new(b"k", head + b"." + body, hashlib.sha256).digest())
    return head + b"." + body + b"." + sig


JWT = make_jwt()


def services() -> SidecarServices:
    sources = Sources("team-a")
    sources.publish({"connection_objs": [
        {"metadata": {"name": "api"}, "spec": {"type": "http", "hosts": ["api.example.com"],
                                               "recording": {"maxBodyBytes": 4096}}}],
        "policy_objs": []})
    return SidecarServices(config=SidecarConfig(standalone=True), sources=sources)


def make_flow(masks=(ALL,), *, method=b"GET", content=b"", req_headers=None) -> http.HTTPFlow:
    headers = http.Headers(host="api.example.com", **(req_headers or {}))
    f = tflow.tflow(req=tutils.treq(host="api.example.com", port=443, scheme=b"https",
                                    method=method, path=b"/v1/things", headers=headers,
                                    content=content))
    ctx = flowctx.ensure(f)
    ctx.identity = Identity(service_account="team-a/claude", pod_namespace="team-a", pod_name="agent-0")
    ctx.connection, ctx.connection_type = "api", "http"
    ctx.snapshot = services().snapshot()  # what Route fills: the snapshot, the recording settings
    ctx.recording = RecordingSettings.from_spec(ctx.snapshot.connection("api").spec["recording"])
    ctx.action = Action("http", method.decode(), "https", "api.example.com", 443, "/v1/things",
                        name=f"http:{method.decode()}")
    ctx.decision = Decision("allow", masks=tuple(masks))
    return f


def respond(f: http.HTTPFlow, content: bytes = b"", *, status=200, **headers: str) -> http.Response:
    """Upstream response headers as mitmproxy hands them to ``responseheaders``."""
    f.response = http.Response.make(status)
    f.response.headers.clear()
    for name, value in headers.items():
        f.response.headers[name.replace("_", "-")] = value
    f.response.raw_content = content if content else None
    return f.response


def stream_through(f: http.HTTPFlow, chunks) -> bytes:
    """What the agent receives: every chunk through the stream callable, then b"" (end)."""
    stream = f.response.stream
    assert callable(stream), "the response was not streamed"
    out = []
    for chunk in [*chunks, b""]:
        result = stream(chunk)
        assert isinstance(result, list) and all(isinstance(c, bytes) and c for c in result)
        out += result
    return b"".join(out)


@pytest.fixture
def mask():
    addon = Mask(services())
    with taddons.context(addon) as tctx:
        tctx.configure(addon, chaperone_mask_buffer="64k")
        yield addon


# ---------------------------------------------------------------------------- streaming

@pytest.mark.parametrize("secret", [AWS_KEY_ID, JWT], ids=["aws-key-id", "jwt"])
def test_sse_stream_split_mid_secret_is_still_masked(mask, secret):
    event = b'data: {"type":"content_block_delta","delta":{"text":"key ' + secret + b' ok"}}\n\n'
    body = b"event: ping\ndata: {}\n\n" + event + b"data: [DONE]\n\n"
    at = body.index(secret)
    for cut in range(at - 1, at + len(secret) + 1):  # every split point through the secret
        f = make_flow()
        respond(f, content_type="text/event-stream", transfer_encoding="chunked")
        mask.responseheaders(f)
        out = stream_through(f, [body[:cut], body[cut:]])
        assert secret not in out, f"leaked when split at {cut - at}"
        assert out.count(b"[MASKED:") == 1 and out.endswith(b"data: [DONE]\n\n")
        _hook(mask.response(f))
        ctx = flowctx.get(f)
        assert sum(ctx.masked.values()) == 1
        capture = flowctx.get(f).bodies.get("response")
        assert capture.streamed and capture.complete and secret not in bytes(capture.data)


def test_sse_is_streamed_without_buffering_and_reframed(mask):
    f = make_flow()
    respond(f, content_type="text/event-stream; charset=utf-8", transfer_encoding="chunked")
    mask.responseheaders(f)
    first = f.response.stream(b"data: hello\n\n")
    assert first == [b"data: hello\n\n"]  # a complete event goes out at once: no buffering
    assert "content-length" not in f.response.headers
    assert f.response.headers["transfer-encoding"] == "chunked"


def test_sse_without_masks_still_streams_unchanged(mask):
    f = make_flow(masks=())
    respond(f, content_type="text/event-stream", transfer_encoding="chunked")
    mask.responseheaders(f)
    assert stream_through(f, [b"data: " + AWS_KEY_ID + b"\n\n"]) == b"data: " + AWS_KEY_ID + b"\n\n"


def test_large_body_streams_and_drops_content_length(mask):
    body = (b"line without secrets\n" * 5000) + b"token " + AWS_KEY_ID + b"\n"
    f = make_flow()
    respond(f, content_type="text/plain", content_length=str(len(body)))
    mask.responseheaders(f)
    out = stream_through(f, [body[i:i + 7000] for i in range(0, len(body), 7000)])
    assert AWS_KEY_ID not in out and out.startswith(b"line without secrets\n")
    assert "content-length" not in f.response.headers


def test_gzip_stream_is_decoded_masked_and_sent_identity(mask):
    body = b"data: " + AWS_KEY_ID + b"\n\n" * 10
    wire = gzip.compress(body)
    f = make_flow()
    respond(f, content_type="text/event-stream", content_encoding="gzip", transfer_encoding="chunked")
    mask.responseheaders(f)
    assert "content-encoding" not in f.response.headers
    out = stream_through(f, [wire[i:i + 5] for i in range(0, len(wire), 5)])
    assert AWS_KEY_ID not in out and out.startswith(b"data: [MASKED:aws-access-key-id]")


def test_streamed_gzip_bomb_is_cut_off_and_the_flow_killed(mask):
    cap = 1 << 20
    comp = zlib.compressobj(9, zlib.DEFLATED, 16 + zlib.MAX_WBITS)
    bomb = b"".join(comp.compress(b"A" * (1 << 20)) for _ in range(50)) + comp.flush()
    assert len(bomb) < 100_000  # 50 MiB of text in well under 100 KB
    f = make_flow(masks=(MaskSpec(detectors=("all",), max_body_bytes=cap),))
    respond(f, content_type="text/plain", content_encoding="gzip", transfer_encoding="chunked")
    mask.responseheaders(f)
    out = stream_through(f, [bomb[i:i + 4096] for i in range(0, len(bomb), 4096)])
    assert len(out) <= cap  # never more than the cap decoded and sent
    assert f.error is not None and f.error.msg == "Connection killed."  # the client sees a broken transfer
    assert any("exceeds the masking limit" in n for n in flowctx.get(f).bodies.get("response").notes)


AGENT_CHOSEN_TYPES = ["text/plain", "application/json", "text/event-stream", "application/x-ndjson",
                      "application/json;stream=watch", "image/png", "application/octet-stream",
                      "text/plain; charset=utf-16le", "text/plain; charset=utf-32", "application/grpc",
                      "multipart/byteranges; boundary=x", "application/vnd.kubernetes.protobuf", "text/html"]


@pytest.mark.parametrize("content_type", AGENT_CHOSEN_TYPES)
@pytest.mark.parametrize("size", ["buffered", "streamed"])
def test_a_content_type_the_agent_chooses_never_unmasks_a_text_object(mask, content_type, size):
    """S3 answers GetObject with the Content-Type it is asked for (``response-content-type``),
    and other APIs echo what they are told: whatever the label, the key in a text object is
    masked. (``charset=utf-16le`` let it through for an hour of session 13, see wide_text.py.)"""
    body = (b"line one\nkey = " + AWS_KEY_ID + b"\nowner alice@example.com\n") * (1 if size == "buffered" else 3000)
    f = make_flow()
    respond(f, content_type=content_type, content_length=str(len(body)))
    mask.responseheaders(f)
    assert callable(f.response.stream) == (size == "streamed" or content_type == "text/event-stream")
    if callable(f.response.stream):  # (SSE streams whatever its size)
        out = stream_through(f, [body[i : i + 7001] for i in range(0, len(body), 7001)])
    else:
        f.response.content = body
        _hook(mask.response(f))
        out = f.response.content
    assert AWS_KEY_ID not in out and b"alice@example.com" not in out


@pytest.mark.parametrize("size", ["buffered", "streamed"])
def test_a_utf16_file_is_masked_as_text(mask, size):
    """A PowerShell 5 output file (UTF-16LE, a mark) downloaded as octet-stream: it was binary
    to the masker and the key went out. Masked as text, written back as UTF-16."""
    text = "AWS_ACCESS_KEY_ID = " + AWS_KEY_ID.decode() + "\r\n"
    body = b"\xff\xfe" + ((text if size == "buffered" else "x" * 70_000 + "\r\n" + text) * 2).encode("utf-16-le")
    f = make_flow()
    respond(f, content_type="application/octet-stream", content_length=str(len(body)))
    mask.responseheaders(f)
    if size == "streamed":
        assert callable(f.response.stream)
        out = stream_through(f, [body[i : i + 16383] for i in range(0, len(body), 16383)])
    else:
        f.response.content = body
        _hook(mask.response(f))
        out = f.response.content
        assert f.response.headers["content-length"] == str(len(out))
    assert out.startswith(b"\xff\xfe") and AWS_KEY_ID.decode().encode("utf-16-le") not in out
    assert out[2:].decode("utf-16-le").count("[MASKED:aws-access-key-id]") == 2


def test_a_streamed_flood_held_past_the_cap_kills_the_flow(mask):
    """An endless flood of overlapping matches (an object of "AKIA" repeated, one the agent
    uploaded) is one finding that never ends: it was held whole, however long. Past MAX_HELD
    the stream fails: nothing of it went out, the flow is killed, the note says why."""
    f = make_flow()
    respond(f, content_type="text/plain", transfer_encoding="chunked")
    mask.responseheaders(f)
    flood = b"AKIA" * (16 * 1024)
    out = stream_through(f, [flood] * (MAX_HELD // len(flood) + 2))
    assert out == b"" and f.error is not None and f.error.msg == "Connection killed."
    assert any("data held unsettled" in n for n in flowctx.get(f).bodies.get("response").notes)


# ---------------------------------------------------------------------------- buffered

def test_small_body_is_buffered_and_masked_whole(mask):
    body = json.dumps({"AccessKeyId": AWS_KEY_ID.decode(), "note": "hi"}).encode()
    f = make_flow()
    respond(f, body, content_type="application/json", content_length=str(len(body)))
    mask.responseheaders(f)
    assert f.response.stream is False
    _hook(mask.response(f))
    assert AWS_KEY_ID not in f.response.raw_content
    assert json.loads(f.response.raw_content)["note"] == "hi"
    assert int(f.response.headers["content-length"]) == len(f.response.raw_content)
    assert flowctx.get(f).masked == {"aws-access-key-id": 1}


def test_gzip_body_is_masked_and_re_encoded(mask):
    plain = json.dumps({"credentials": {"aws_secret_access_key": AWS_SECRET.decode()},
                        "id": AWS_KEY_ID.decode(), "pad": "x" * 2000}).encode()
    wire = gzip.compress(plain)
    f = make_flow()
    respond(f, wire, content_type="application/json", content_encoding="gzip",
            content_length=str(len(wire)))
    mask.responseheaders(f)
    _hook(mask.response(f))
    sent = f.response.raw_content
    assert f.response.headers["content-encoding"] == "gzip"
    assert int(f.response.headers["content-length"]) == len(sent)
    decoded = gzip.decompress(sent)  # still gzip on the wire, as the client asked
    assert AWS_SECRET not in decoded and AWS_KEY_ID not in decoded
    assert json.loads(decoded)["pad"] == "x" * 2000
    capture = flowctx.get(f).bodies.get("response")  # the recording gets the decoded, masked text
    assert AWS_KEY_ID not in bytes(capture.data) and bytes(capture.data).startswith(b"{")


def test_gzip_bomb_is_refused_with_a_502_never_passed_unmasked(mask):
    comp = zlib.compressobj(9, zlib.DEFLATED, 16 + zlib.MAX_WBITS)
    bomb = b"".join(comp.compress(b"A" * (1 << 20)) for _ in range(40)) + comp.flush()
    f = make_flow(masks=(MaskSpec(detectors=("all",), max_body_bytes=1 << 20),))
    respond(f, bomb, content_type="text/plain", content_encoding="gzip",
            content_length=str(len(bomb)))
    mask.responseheaders(f)
    assert f.response.stream is False  # small on the wire: buffered
    _hook(mask.response(f))
    assert f.response.status_code == 502
    body = json.loads(f.response.content)
    assert body["error"] == "chaperone_response_unmaskable"
    assert "exceeds the masking limit of 1048576 bytes" in body["message"]
    assert body["action"]["connection"] == "api"
    assert flowctx.get(f).refused == body
    capture = flowctx.get(f).bodies.get("response")
    assert not capture.recordable and not capture.data


def test_unknown_encoding_is_refused_before_the_response_starts(mask):
    f = make_flow()
    respond(f, content_type="text/plain", content_encoding="compress", transfer_encoding="chunked")
    mask.responseheaders(f)
    assert f.response.status_code == 502  # these headers go out instead of the upstream's
    refusal = f.response.raw_content
    assert int(f.response.headers["content-length"]) == len(refusal)
    # the upstream body is drained and dropped; the refusal body is sent at the end
    assert stream_through(f, [b"secret " + AWS_KEY_ID, b"more"]) == refusal
    assert json.loads(refusal)["error"] == "chaperone_response_unmaskable"


def test_oversized_known_length_for_field_rules_is_refused_early(mask):
    f = make_flow(masks=(MaskSpec(fields=("$.password",), max_body_bytes=2048),))
    respond(f, content_type="application/json", content_length="100000")
    mask.responseheaders(f)
    assert f.response.status_code == 502


def test_field_rules_collect_a_chunked_json_body_then_mask_it(mask):
    doc = {"user": "ada", "password": "hunter2-but-longer", "items": list(range(3000))}
    body = json.dumps(doc).encode()
    f = make_flow(masks=(MaskSpec(fields=("$.password",)),))
    respond(f, content_type="application/json", transfer_encoding="chunked")
    mask.responseheaders(f)
    out = stream_through(f, [body[i:i + 1000] for i in range(0, len(body), 1000)])
    masked = json.loads(out)
    assert masked["password"] != doc["password"] and masked["items"] == doc["items"]
    assert flowctx.get(f).masked == {"field": 1}


def test_binary_body_passes_through_unmasked_and_says_so(mask):
    png = b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR" + b"not a key at all" + b"\x00\x01\x02" * 50
    f = make_flow()
    respond(f, png, content_type="image/png", content_length=str(len(png)))
    mask.responseheaders(f)
    _hook(mask.response(f))
    assert f.response.raw_content == png
    capture = flowctx.get(f).bodies.get("response")  # masks applied: a body they cannot cover is not kept
    assert capture.binary and not capture.recordable and not capture.data
    assert any("binary" in n for n in capture.notes) and capture.size == len(png)
    assert flowctx.get(f).masked == {}


def test_binary_stream_is_masked_in_place_chunk_by_chunk(mask):
    """A binary stream of unknown length (a watch, a live protocol) is scanned as each chunk
    comes: its printable runs masked in place, length preserving (session 12: it passed
    through unscanned)."""
    blob = bytes(range(256)) * 600 + b"\x00" + AWS_KEY_ID + b"\x00"
    f = make_flow()
    respond(f, content_type="application/octet-stream", transfer_encoding="chunked")
    mask.responseheaders(f)
    assert f.response.stream.masker.batch == 0
    cut = 39 * 256 + 100  # inside a printable stretch (bytes 32-126 of the 40th ramp)
    first = f.response.stream(blob[:cut])
    assert b"".join(first) == blob[:39 * 256 + 32]  # all but the printable bytes at its end
    out = b"".join(first) + stream_through(f, [blob[i:i + 10000] for i in range(cut, len(blob), 10000)])
    assert out == mask_binary(blob, resolve_rules(['all'])) and len(out) == len(blob) and AWS_KEY_ID not in out
    capture = flowctx.get(f).bodies.get("response")
    assert capture.binary and not capture.data and capture.size == len(blob)
    assert flowctx.get(f).masked == {"aws-access-key-id": 1}


def test_a_binary_download_is_scanned_in_batches(mask):
    """A binary body of known length too long to buffer (a download) is gathered to
    BINARY_BATCH before each scan: the same bytes out, fewer scans."""
    blob = os.urandom(3 * BINARY_BATCH) + b"\x00" + AWS_KEY_ID + b"\x00" + os.urandom(1000)
    f = make_flow()
    respond(f, content_type="application/octet-stream", content_length=str(len(blob)))
    mask.responseheaders(f)
    assert f.response.stream.masker.batch == BINARY_BATCH
    first = f.response.stream(blob[:16384])  # scanned (sniffed binary)
    assert f.response.stream(blob[16384:32768]) == []  # gathered
    out = b"".join(first) + stream_through(f, [blob[i:i + 16384] for i in range(32768, len(blob), 16384)])
    assert out == mask_binary(blob, resolve_rules(['all'])) and AWS_KEY_ID not in out


def test_body_digests_are_dropped_when_the_body_may_be_masked(mask):
    """A digest of the upstream's body (S3's x-amz-checksum-*, Content-MD5, RFC 9530) no longer
    holds once the body is masked - an SDK that checks it refuses the response."""
    digests = {"x-amz-checksum-crc32": "3J0Uqg==", "x_amz_checksum_type": "FULL_OBJECT",
               "content_md5": "Q2hlY2sgSW50ZWdyaXR5IQ==", "repr_digest": "sha-256=:AAAA:"}
    f = make_flow()
    respond(f, b"key " + AWS_KEY_ID, content_type="text/plain", content_length="24", **digests)
    mask.responseheaders(f)
    assert not [n for n in f.response.headers if "checksum" in n.lower() or "md5" in n.lower()
                or "digest" in n.lower()]
    f = make_flow(masks=())
    respond(f, b"key " + AWS_KEY_ID, content_type="text/plain", content_length="24", **digests)
    mask.responseheaders(f)
    assert f.response.headers["x-amz-checksum-crc32"] == "3J0Uqg==" and "content-md5" in f.response.headers


def test_binary_without_masks_is_kept_as_is(mask):
    png = b"\x89PNG\r\n\x1a\n\x00\x00" + AWS_KEY_ID
    f = make_flow(masks=())
    respond(f, png, content_type="image/png", content_length=str(len(png)))
    mask.responseheaders(f)
    _hook(mask.response(f))
    assert bytes(flowctx.get(f).bodies.get("response").data) == png  # no masks: recorded like any body


# ---------------------------------------------------------------------------- guards

def test_refusals_and_bodiless_responses_are_left_alone(mask):
    f = make_flow()
    flowctx.get(f).refused = {"error": "chaperone_blocked"}
    respond(f, b'{"error":"chaperone_blocked"}', content_type="application/json")
    mask.responseheaders(f)
    _hook(mask.response(f))
    assert f.response.stream is False and not flowctx.get(f).bodies
    head = make_flow(method=b"HEAD")
    respond(head, content_type="text/plain", content_length="123")
    mask.responseheaders(head)
    assert head.response.headers["content-length"] == "123"


def test_buffer_limit_never_exceeds_mitmproxys_stream_threshold():
    addon = Mask(services())
    with taddons.context(addon) as tctx:
        tctx.options.add_option("stream_large_bodies", str | None, None, "test copy")
        tctx.configure(addon, chaperone_mask_buffer="10m", stream_large_bodies="100k")
        assert addon.buffer_limit == 100 * 1024
        tctx.configure(addon, chaperone_mask_buffer="8k")
        assert addon.buffer_limit == 8 * 1024


# ---------------------------------------------------------------------------- requests

def test_request_body_is_masked_for_the_recording_only(mask):
    body = json.dumps({"token": "x", "id": AWS_KEY_ID.decode()}).encode()
    f = make_flow(masks=(MaskSpec(detectors=("all",), target="request"),), method=b"POST",
                  content=body, req_headers={"content-type": "application/json"})
    _hook(mask.request(f))
    assert f.request.raw_content == body  # upstream gets the request as the agent sent it
    capture = flowctx.get(f).bodies.get("request")
    assert AWS_KEY_ID not in bytes(capture.data) and b'"x"' not in bytes(capture.data)
    assert capture.counts == {"aws-access-key-id": 1, "secret-json-key": 1}


def test_response_only_masks_leave_the_recorded_request_as_sent(mask):
    f = make_flow(method=b"POST", content=b"hello " + AWS_KEY_ID)  # ALL targets responses
    _hook(mask.request(f))
    assert bytes(flowctx.get(f).bodies.get("request").data) == b"hello " + AWS_KEY_ID


def test_streamed_request_goes_upstream_unchanged_with_a_masked_copy(mask):
    f = make_flow(masks=(MaskSpec(detectors=("all",), target="both"),), method=b"PUT",
                  req_headers={"content-type": "text/plain"})
    f.request.stream = True  # mitmproxy's stream_large_bodies decided to stream it
    mask.requestheaders(f)
    tee = f.request.stream
    body = b"x" * 5000 + b" " + AWS_KEY_ID + b" " + b"y" * 5000
    sent = [c for part in (body[:5003], body[5003:], b"") for c in tee(part)]
    assert b"".join(sent) == body
    capture = flowctx.get(f).bodies.get("request")
    assert capture.streamed and capture.complete and capture.counts == {"aws-access-key-id": 1}
    assert capture.size == len(body) - len(AWS_KEY_ID) + len(b"[MASKED:aws-access-key-id]")
    assert len(capture.data) == 4096 and capture.truncated  # recording.maxBodyBytes of "api"
    _hook(mask.request(f))  # fires after the stream: nothing more to do
    assert flowctx.get(f).bodies.get("request") is capture


def test_body_without_a_decision_is_never_kept(mask):
    f = make_flow(method=b"POST", content=b"secret " + AWS_KEY_ID)
    flowctx.get(f).decision = None
    _hook(mask.request(f))
    capture = flowctx.get(f).bodies.get("request")
    assert not capture.recordable and not capture.data


def test_capture_keeps_a_bounded_prefix():
    capture = BodyCapture(10)
    for _ in range(5):
        capture.add(b"0123456")
    assert bytes(capture.data) == b"0123456012" and capture.size == 35 and capture.truncated


def test_streamed_request_tee_wraps_the_stream_function_in_place(mask):
    """InjectCredentials (before Mask) may install an aws-chunked decoder as the request's
    stream function: Mask's tee runs it first and captures what it lets through - replacing it
    would send the upload upstream still chunk-framed."""
    f = make_flow(masks=(MaskSpec(detectors=("all",), target="both"),), method=b"PUT",
                  req_headers={"content-type": "text/plain", "content-length": "99999999"})
    f.request.stream = lambda data: [data.replace(b"#", b"")] if data else []  # "the decoder"
    mask.requestheaders(f)
    framed = b"##up#load " + AWS_KEY_ID + b" done##"
    sent = [c for part in (framed[:13], framed[13:], b"") for c in f.request.stream(part)]
    assert b"".join(sent) == b"upload " + AWS_KEY_ID + b" done" and all(sent)
    capture = flowctx.get(f).bodies.get("request")
    assert bytes(capture.data) == b"upload [MASKED:aws-access-key-id] done"
    assert capture.complete and capture.counts == {"aws-access-key-id": 1}


@pytest.mark.parametrize("version, headers", [
    ("HTTP/1.1", {"transfer-encoding": "chunked"}),
    ("HTTP/2.0", {}),
], ids=["chunked", "h2-without-length"])
def test_body_of_unknown_length_is_captured_whether_read_or_streamed_by_mitmproxy(
        mask, version, headers):
    """mitmproxy reads such a body, but streams it on by itself (``stream = True``, no hook)
    once it grew past stream_large_bodies: both cases leave a capture - never an empty one that
    would make the recording say "no body"."""
    body = b"token " + AWS_KEY_ID
    masks = (MaskSpec(detectors=("all",), target="both"),)
    read = make_flow(masks=masks, method=b"POST", content=body, req_headers=headers)
    read.request.http_version = version
    mask.requestheaders(read)
    assert not read.request.stream  # not forced to stream: Route and Enforce read the body
    _hook(mask.request(read))  # it stayed small: read whole
    assert bytes(flowctx.get(read).bodies.get("request").data) == b"token [MASKED:aws-access-key-id]"

    late = make_flow(masks=masks, method=b"POST", req_headers=headers)
    late.request.http_version = version
    mask.requestheaders(late)
    late.request.stream, late.request.raw_content = True, None  # mitmproxy switched to streaming
    _hook(mask.request(late))
    capture = flowctx.get(late).bodies.get("request")
    assert capture is not None and capture.streamed and not capture.recordable
    assert "stream_large_bodies" in capture.notes[0] and not capture.data


def test_unmaskable_refusal_is_built_by_the_shared_refusal_module(mask, monkeypatch):
    from chaperone_sidecar.addons import refusal

    calls = []
    real = refusal.refuse
    monkeypatch.setattr(refusal, "refuse", lambda *a, **k: calls.append(a[1]) or real(*a, **k))
    f = make_flow()
    respond(f, content_type="text/plain", content_encoding="compress", transfer_encoding="chunked")
    mask.responseheaders(f)
    assert calls == ["response_unmaskable"] and f.response.status_code == 502
    assert f.response.headers[refusal.HEADER] == "response_unmaskable"


# ---------------------------------------------------------------------------- issue 11: headers, escapes, base64, binary

def test_response_header_values_are_masked_for_the_agent(mask):
    """X-Debug-Key: AKIA... reached the agent: only the recorded copy was masked."""
    body = b'{"ok": true}'
    f = make_flow()
    respond(f, body, content_type="application/json", content_length=str(len(body)),
            x_debug_key=AWS_KEY_ID.decode(), x_creds=base64.b64encode(b"id=" + AWS_KEY_ID).decode(),
            x_trace="abc123", set_cookie="session=" + JWT.decode())
    mask.responseheaders(f)
    headers = f.response.headers
    assert headers["x-debug-key"] == "[MASKED:aws-access-key-id]"
    assert headers["x-creds"] == "[MASKED:aws-access-key-id]"
    assert headers["set-cookie"] == "session=[MASKED:jwt]"
    assert headers["x-trace"] == "abc123" and headers["content-length"] == str(len(body))
    assert flowctx.get(f).masked == {"aws-access-key-id": 2, "jwt": 1}
    _hook(mask.response(f))
    assert f.response.raw_content == body


@pytest.mark.parametrize("how", ["head", "204", "streamed"])
def test_headers_are_masked_whatever_the_body_path(mask, how):
    f = make_flow(method=b"HEAD" if how == "head" else b"GET")
    if how == "streamed":
        respond(f, content_type="text/event-stream", x_debug_key=AWS_KEY_ID.decode())
    else:
        respond(f, status=204 if how == "204" else 200, x_debug_key=AWS_KEY_ID.decode(),
                content_length="0" if how == "204" else "10")
    mask.responseheaders(f)
    assert AWS_KEY_ID.decode() not in str(f.response.headers)


def test_headers_without_masks_are_left_alone(mask):
    f = make_flow(masks=())
    respond(f, b"{}", content_type="application/json", content_length="2", x_debug_key=AWS_KEY_ID.decode())
    mask.responseheaders(f)
    assert f.response.headers["x-debug-key"] == AWS_KEY_ID.decode()


def test_buffered_json_with_escaped_and_base64_secrets_is_masked_for_agent_and_recording(mask):
    escaped = '{"k": "\\u0041' + AWS_KEY_ID[1:].decode() + '", "blob": "' + \
        base64.b64encode(b"aws_access_key_id=" + AWS_KEY_ID).decode() + '"}'
    body = escaped.encode()
    f = make_flow()
    respond(f, body, content_type="application/json", content_length=str(len(body)))
    mask.responseheaders(f)
    _hook(mask.response(f))
    sent = f.response.raw_content
    assert json.loads(sent) == {"k": "[MASKED:aws-access-key-id]", "blob": "[MASKED:aws-access-key-id]"}
    assert int(f.response.headers["content-length"]) == len(sent)
    assert json.loads(bytes(flowctx.get(f).bodies.get("response").data)) == json.loads(sent)


def test_binary_body_printable_runs_are_masked_in_place(mask):
    blob = b"\x00\x01\x02 " + AWS_KEY_ID + b" \xff\xfe" * 40
    f = make_flow()
    respond(f, blob, content_type="application/octet-stream", content_length=str(len(blob)))
    mask.responseheaders(f)
    _hook(mask.response(f))
    sent = f.response.raw_content
    assert AWS_KEY_ID not in sent and len(sent) == len(blob)
    assert f.response.headers["content-length"] == str(len(blob))
    assert flowctx.get(f).masked == {"aws-access-key-id": 1}
    assert not flowctx.get(f).bodies.get("response").recordable  # binary bodies are still not recorded


# ---------------------------------------------------------------------------- issue 11: Kubernetes Secrets

SECRET_VALUE = base64.b64encode(b"db-password-hunter2").decode()


def kube_flow(verb="get", resource="secrets", masks=(), group=""):
    from chaperone_sidecar.policy.model import KubernetesAction

    f = make_flow(masks=masks)
    ctx = flowctx.get(f)
    ctx.connection, ctx.connection_type = "cluster", "kubernetes"
    ctx.action = Action("kubernetes", "GET", "https", "api.example.com", 443, "/api/v1/namespaces/a/secrets",
                        name=f"kubernetes:{verb}/{resource}",
                        kubernetes=KubernetesAction(verb, group, "v1", resource, namespace="a"))
    return f


def secret_doc(name="db"):
    return {"kind": "Secret", "apiVersion": "v1", "metadata": {"name": name},
            "data": {"password": SECRET_VALUE}, "type": "Opaque"}


def test_kubernetes_secret_get_and_list_are_masked_without_any_policy_mask(mask):
    for doc in (secret_doc(), {"kind": "SecretList", "items": [secret_doc("a"), secret_doc("b")]}):
        body = json.dumps(doc).encode()
        f = kube_flow("get" if doc["kind"] == "Secret" else "list")
        respond(f, body, content_type="application/json", content_length=str(len(body)))
        mask.responseheaders(f)
        _hook(mask.response(f))
        sent = f.response.raw_content
        assert SECRET_VALUE.encode() not in sent and b"kubernetes-secret" not in sent  # base64 token
        assert SECRET_VALUE.encode() not in bytes(flowctx.get(f).bodies.get("response").data)
        assert flowctx.get(f).masked["kubernetes-secret"] == (1 if doc["kind"] == "Secret" else 2)


def test_kubernetes_secret_watch_streams_masked_event_by_event(mask):
    f = kube_flow("watch")
    respond(f, content_type="application/json", transfer_encoding="chunked")
    mask.responseheaders(f)
    stream = f.response.stream
    event = json.dumps({"type": "ADDED", "object": secret_doc()}).encode() + b"\n"
    first = stream(event)  # out at once: the watch never ends, nothing waits for it
    assert len(first) == 1 and SECRET_VALUE.encode() not in first[0]
    assert json.loads(first[0])["object"]["data"]["password"] != SECRET_VALUE
    assert stream(event[:40]) == [] and SECRET_VALUE.encode() not in b"".join(stream(event[40:]) + stream(b""))


def test_kubernetes_secret_as_protobuf_is_refused_not_passed(mask):
    body = b"k8s\x00\n\x0c\n\x02v1\x12\x06Secret" + SECRET_VALUE.encode()
    f = kube_flow()
    respond(f, body, content_type="application/vnd.kubernetes.protobuf", content_length=str(len(body)))
    mask.responseheaders(f)
    _hook(mask.response(f))
    assert f.response.status_code == 502 and SECRET_VALUE.encode() not in f.response.content
    assert "application/json" in json.loads(f.response.content)["message"]


def test_a_rule_can_reveal_secret_data_and_other_resources_are_untouched(mask):
    reveal = MaskSpec(kubernetes_secrets="reveal", source=RuleRef("team-a/p", "reveal-db"))
    body = json.dumps(secret_doc()).encode()
    for f in (kube_flow(masks=(reveal,)), kube_flow(resource="configmaps"),
              kube_flow(group="example.com")):
        respond(f, body, content_type="application/json", content_length=str(len(body)))
        mask.responseheaders(f)
        _hook(mask.response(f))
        assert SECRET_VALUE.encode() in f.response.raw_content


def test_recorded_secret_create_request_is_masked(mask):
    body = json.dumps(secret_doc()).encode()
    f = kube_flow("create")
    f.request.method, f.request.content = "POST", body
    _hook(mask.request(f))
    assert f.request.content == body  # upstream unchanged
    assert SECRET_VALUE.encode() not in bytes(flowctx.get(f).bodies.get("request").data)


# ---------------------------------------------------------------------------- header lookups

def test_missing_headers_are_looked_up_without_a_key_error(mask, monkeypatch):
    """Mask's per-flow header reads (content-type, content-length, transfer-encoding,
    content-encoding) raise no KeyError for a header that is absent - ``Headers.get`` and
    ``in`` do, and most flows lack most of them (issue 16: a raise and catch each) - and
    still frame and mask as before."""
    misses = []
    original = http.Headers.__getitem__

    def counting(self, key):
        try:
            return original(self, key)
        except KeyError:
            misses.append(key)
            raise

    body = json.dumps({"AccessKeyId": AWS_KEY_ID.decode(), "note": "hi"}).encode()
    f = make_flow()
    respond(f, body, content_type="application/json", content_length=str(len(body)))
    monkeypatch.setattr(http.Headers, "__getitem__", counting)
    mask.responseheaders(f)
    _hook(mask.response(f))
    monkeypatch.undo()
    assert f.response.stream is False  # a known length under the buffer limit: masked whole
    assert AWS_KEY_ID not in f.response.raw_content
    assert misses == []


@pytest.mark.parametrize(("headers", "length"), [
    ([(b"Content-Length", b"12")], 12),
    ([(b"content-length", b" 7 ")], 7),
    ([(b"Content-Length", b"5"), (b"Content-Length", b"5")], None),  # "5, 5": not a length
    ([(b"Content-Length", b"12"), (b"Transfer-Encoding", b"chunked")], None),
    ([(b"Transfer-Encoding", b"")], None),  # present, even empty: the body is not framed by length
    ([(b"Content-Length", b"-1")], None),
    ([], None),
])
def test_length_reads_content_length_as_headers_get_did(headers, length):
    from chaperone_sidecar.addons.mask import _length

    resp = http.Response.make(200)
    resp.headers = http.Headers(headers)
    assert _length(resp) == length


def test_the_masking_pool_yields_to_the_event_loop():
    # SCHED_BATCH (helper_threads): a body masked off the loop never preempts it when done.
    from chaperone_sidecar.addons import mask as mask_module

    assert mask_module._MASK_POOL.submit(os.sched_getscheduler, 0).result() == os.SCHED_BATCH
    assert os.sched_getscheduler(0) == os.SCHED_OTHER

