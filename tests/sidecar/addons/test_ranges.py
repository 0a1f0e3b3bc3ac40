"""WidenRanges and TrimRanges with the real Mask between them, against an upstream that serves
byte ranges of one representation (``_serve``): the range an agent asks for comes back masked,
at its offsets, whatever range neighbours it; forms that cannot be widened get the whole body."""

from __future__ import annotations

import asyncio
import base64
import os
import re

import pytest
from mitmproxy import http
from mitmproxy.test import taddons, tflow, tutils

from chaperone_sidecar import flowctx
from chaperone_sidecar.addons import ADDON_ORDER
from chaperone_sidecar.addons.credentials import InjectCredentials
from chaperone_sidecar.addons.mask import Mask
from chaperone_sidecar.addons.ranges import PAD, TrimRanges, WidenRanges
from chaperone_sidecar.config import SidecarConfig
from chaperone_sidecar.flowctx import RecordingSettings
from chaperone_sidecar.policy.masking.decoded import mask_binary
from chaperone_sidecar.policy.masking.detectors import resolve_rules
from chaperone_sidecar.policy.model import Action, Decision, Identity, MaskSpec, RuleRef
from chaperone_sidecar.services import SidecarServices
from chaperone_sidecar.sources import Sources

AWS_KEY_ID = b"AKIAIOSFODNN7EXAMPLE"
ALL = MaskSpec(detectors=("all",), source=RuleRef("team-a/p", "mask-secrets"))
RULES = resolve_rules(["all"])


def services() -> SidecarServices:
    sources = Sources("team-a")
    sources.publish({"connection_objs": [
        {"metadata": {"name": "api"}, "spec": {"type": "http", "hosts": ["api.example.com"]}}],
        "policy_objs": []})
    return SidecarServices(config=SidecarConfig(standalone=True), sources=sources)


SERVICES = services()


def make_flow(range_value: str | None, masks=(ALL,), **headers: str) -> http.HTTPFlow:
    req_headers = http.Headers(host="api.example.com", **headers)
    if range_value is not None:
        req_headers["range"] = range_value
    f = tflow.tflow(req=tutils.treq(host="api.example.com", port=443, scheme=b"https", method=b"GET",
                                    path=b"/bucket/object", headers=req_headers, content=b""))
    ctx = flowctx.ensure(f)
    ctx.identity = Identity(service_account="team-a/claude", pod_namespace="team-a", pod_name="agent-0")
    ctx.connection, ctx.connection_type = "api", "http"
    ctx.snapshot = SERVICES.snapshot()
    ctx.recording = RecordingSettings()
    ctx.action = Action("http", "GET", "https", "api.example.com", 443, "/bucket/object", name="http:GET")
    ctx.decision = Decision("allow", masks=tuple(masks))
    return f


def _serve(f: http.HTTPFlow, representation: bytes, content_type: str = "application/octet-stream",
           ignore_range: bool = False, shift: int = 0) -> bytes:
    """The upstream: a 206 of the Range the request carries (as it left the sidecar), or 200."""
    value = f.request.headers.get("range")
    m = re.fullmatch(r"bytes=(\d+)-(\d*)", value or "")
    if m is None or ignore_range:
        status, body, headers = 200, representation, {}
    else:
        first = int(m[1]) + shift
        last = min(int(m[2]) if m[2] else len(representation) - 1, len(representation) - 1)
        status, body = 206, representation[first : last + 1]
        headers = {"content-range": f"bytes {first}-{last}/{len(representation)}"}
    f.response = http.Response.make(status)
    f.response.headers.clear()  # as responseheaders sees them: the body has not arrived
    for name, value in {"content-type": content_type, "content-length": str(len(body)), **headers}.items():
        f.response.headers[name] = value
    f.response.raw_content = None
    return body


def _run(result) -> None:
    if result is not None:
        asyncio.run(result)


@pytest.fixture
def addons():
    widen, mask, trim = WidenRanges(SERVICES), Mask(SERVICES), TrimRanges(SERVICES)
    with taddons.context(mask) as tctx:
        tctx.configure(mask, chaperone_mask_buffer="64k")
        yield widen, mask, trim


def fetch(addons, range_value: str | None, representation: bytes, chunk: int = 64 * 1024, **serve) -> http.HTTPFlow:
    """One GET through WidenRanges, the upstream, Mask and TrimRanges; the agent's body is in
    ``flow.response.content`` (streamed bodies collected through the stream callables)."""
    widen, mask, trim = addons
    f = make_flow(range_value)
    widen.request(f)
    body = _serve(f, representation, **serve)
    mask.responseheaders(f)
    trim.responseheaders(f)
    if flowctx.get(f).refused is not None:
        return f
    assert callable(f.response.stream) == (len(body) > 64 * 1024), "streamed exactly when over the buffer"
    if callable(f.response.stream):
        out: list[bytes] = []
        for i in range(0, len(body), chunk):
            out += f.response.stream(body[i : i + chunk])
        out += f.response.stream(b"")
        f.response.stream = False
        f.response.raw_content = b"".join(out)
    else:
        f.response.raw_content = body
        _run(mask.response(f))
        trim.response(f)
    return f


def test_a_key_split_between_two_ranges_is_masked_in_both(addons):
    """bytes=0-99 then bytes=100-: the key straddles byte 100. Masked per range as sent, each half
    goes out (no detector matches half a key); widened, both halves are masked."""
    text = b"x" * 90 + b" key=" + AWS_KEY_ID + b" and more text after it\n" * 3
    at = text.index(AWS_KEY_ID)
    assert at < 100 < at + len(AWS_KEY_ID)
    first, second = fetch(addons, "bytes=0-99", text), fetch(addons, "bytes=100-", text)
    assert first.response.status_code == second.response.status_code == 206
    assert first.response.headers["content-range"] == f"bytes 0-99/{len(text)}"
    assert second.response.headers["content-range"] == f"bytes 100-{len(text) - 1}/{len(text)}"
    assert len(first.response.content) == 100 and len(second.response.content) == len(text) - 100
    joined = first.response.content + second.response.content
    assert joined == mask_binary(text, RULES)
    assert AWS_KEY_ID[: 100 - at] not in first.response.content
    assert AWS_KEY_ID[100 - at :] not in second.response.content[:20]
    # the attack the widening answers: the same two ranges masked as they come give the key away
    widen, mask, trim = addons
    halves = []
    for value in ("bytes=0-99", "bytes=100-"):
        f = make_flow(value)
        body = _serve(f, text)
        mask.responseheaders(f)
        f.response.raw_content = body
        _run(mask.response(f))
        halves.append(f.response.content)
    assert AWS_KEY_ID in b"".join(halves)


@pytest.mark.parametrize("filler", ["random", "text"])
def test_parallel_parts_of_a_large_object_assemble_to_the_masked_whole(addons, filler):
    """An `aws s3 cp` of a 3 MiB object: three 1 MiB parts (streamed: over the buffer), keys at
    both part boundaries. Written at their offsets they are the whole object masked in place -
    a text object too (masked as text, its tokens would change the parts' lengths)."""
    part = 1 << 20
    line = b"quarterly numbers, nothing secret here\n"
    data = bytearray(os.urandom(3 * part) if filler == "random" else (line * (3 * part // len(line) + 1))[: 3 * part])
    for boundary in (part, 2 * part):
        secret = b" key=" + AWS_KEY_ID + b" "
        data[boundary - 10 : boundary - 10 + len(secret)] = secret
    data = bytes(data)
    parts = []
    for k in range(3):
        f = fetch(addons, f"bytes={k * part}-{(k + 1) * part - 1}", data, chunk=16 * 1024)
        assert f.response.headers["content-range"] == f"bytes {k * part}-{(k + 1) * part - 1}/{len(data)}"
        parts.append(f.response.content)
    assert [len(p) for p in parts] == [part] * 3
    assembled = b"".join(parts)
    assert assembled == mask_binary(data, RULES) and AWS_KEY_ID[:8] not in assembled


@pytest.mark.parametrize("shift", [0, 1, 2, 3])
def test_a_range_deep_inside_a_base64_blob_is_masked_at_any_offset(addons, shift):
    """An agent picking its offsets: a key inside a base64 blob that began more than PAD
    before the range. The widened part starts inside the run, at an alignment the part does
    not show; decoded from there alone, three offsets in four read noise and sent the key."""
    inner = b"x" * (2 * PAD) + b"aws_access_key_id = " + AWS_KEY_ID + b"\n" + b"y" * 3000
    blob = base64.b64encode(inner) + b"\n"
    at = 2 * PAD * 4 // 3  # about where the label's base64 starts
    first = at - 100 - shift  # widened: PAD before, well inside the run
    f = fetch(addons, f"bytes={first}-{at + 199}", blob)
    got = f.response.content
    assert f.response.status_code == 206 and len(got) == at + 200 - first and got != blob[first : at + 200]
    for k in range(4):  # the agent decodes its part at each alignment
        assert AWS_KEY_ID not in base64.b64decode(got[k:][: (len(got) - k) // 4 * 4]), k


def test_the_range_goes_up_widened_only_when_the_response_is_masked(addons):
    widen = addons[0]
    f = make_flow("bytes=100000-199999")
    widen.request(f)
    assert f.request.headers["range"] == f"bytes={100000 - PAD}-{199999 + PAD}"
    assert flowctx.get(f).requested_range == (100000, 199999)
    f = make_flow("bytes=10-")
    widen.request(f)
    assert f.request.headers["range"] == "bytes=0-" and flowctx.get(f).requested_range == (10, None)
    f = make_flow("bytes=0-99", masks=())
    widen.request(f)
    assert f.request.headers["range"] == "bytes=0-99" and flowctx.get(f).requested_range is None
    f = make_flow("bytes=0-99")
    f.request.method = "HEAD"  # no body comes back: its headers describe the range as asked
    widen.request(f)
    assert f.request.headers["range"] == "bytes=0-99" and flowctx.get(f).requested_range is None


@pytest.mark.parametrize("value", ["bytes=-500", "bytes=0-1,5-6", "items=0-5", "bytes=9-3"])
def test_ranges_that_cannot_be_widened_are_dropped_for_the_whole_body(addons, value):
    widen = addons[0]
    f = make_flow(value, **{"if-range": '"etag"'})
    widen.request(f)
    assert "range" not in f.request.headers and "if-range" not in f.request.headers
    text = b"start " + AWS_KEY_ID + b" end"
    f2 = fetch(addons, value, text)
    assert f2.response.status_code == 200 and f2.response.content == b"start [MASKED:aws-access-key-id] end"


def test_a_server_ignoring_the_range_sends_the_whole_body_masked(addons):
    text = b"start " + AWS_KEY_ID + b" end"
    f = fetch(addons, "bytes=0-3", text, ignore_range=True)
    assert f.response.status_code == 200 and AWS_KEY_ID not in f.response.content


def test_a_part_that_does_not_cover_the_range_is_refused(addons):
    text = b"y" * 200_000
    f = fetch(addons, "bytes=100000-100099", text, shift=PAD + 50)  # starts past byte 100000
    ctx = flowctx.get(f)
    assert f.response.status_code == 502 and ctx.refused["error"] == "chaperone_response_unmaskable"


def test_the_pipeline_widens_before_signing_and_trims_after_masking():
    order = list(ADDON_ORDER)
    assert order.index(WidenRanges) < order.index(InjectCredentials)
    assert order.index(Mask) < order.index(TrimRanges)


def test_an_s3_part_number_is_dropped_on_an_aws_connection_under_masks(addons):
    """GetObject?partNumber=2 is a 206 of one uploaded part: a key across the uploader's part
    boundary would come out in halves, so the whole object is asked for instead."""
    widen = addons[0]
    f = make_flow(None)
    f.request.query["partNumber"] = "2"
    flowctx.get(f).connection_type = "aws"
    widen.request(f)
    assert "partNumber" not in f.request.query
    for connection_type, masks in (("http", (ALL,)), ("aws", ())):
        f = make_flow(None, masks=masks)
        f.request.query["partNumber"] = "2"
        flowctx.get(f).connection_type = connection_type
        widen.request(f)
        assert f.request.query["partNumber"] == "2"
