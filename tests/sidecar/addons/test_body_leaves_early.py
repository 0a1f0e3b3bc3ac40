"""body_leaves_early in one pass over the raw header fields (issue 16): the same answer as the
lookups it replaces (``"content-length" in headers``, ``headers.get("transfer-encoding")``)."""

from __future__ import annotations

import itertools

from mitmproxy import http
from mitmproxy.test import tflow, tutils

from chaperone_sidecar.addons.streaming import body_leaves_early


def reference(flow: http.HTTPFlow) -> bool:
    req = flow.request
    if req.stream:
        return True
    if "content-length" in req.headers:
        return False
    if req.is_http2 or req.is_http3:
        return True
    return "chunked" in req.headers.get("transfer-encoding", "").lower()


FIELDS = [(b"Content-Length", b"5"), (b"content-length", b""), (b"Transfer-Encoding", b"chunked"),
          (b"transfer-encoding", b"gzip"), (b"TRANSFER-ENCODING", b"gzip, CHUNKED"),
          (b"Transfer-Encoding", "CHUN\u212aED".encode()),  # Kelvin sign: str.lower() gives "k"
          (b"Transfer-Encoding", b"\xff chunked"), (b"Content-Type", b"text/plain"), (b"X-Chunked", b"chunked")]


def test_every_combination_answers_as_the_lookups_did():
    checked = 0
    for n in range(4):
        for fields in itertools.permutations(FIELDS, n):
            for version in ("HTTP/1.1", "HTTP/2.0", "HTTP/3"):
                for stream in (False, True):
                    f = tflow.tflow(req=tutils.treq(headers=http.Headers(list(fields)), content=b""))
                    f.request.http_version = version
                    f.request.stream = stream
                    assert body_leaves_early(f) == reference(f), (fields, version, stream)
                    checked += 1
    assert checked > 3000


def test_header_value_is_headers_get():
    from chaperone_sidecar.addons.streaming import header_value

    for n in range(3):
        for fields in itertools.permutations(FIELDS, n):
            headers = http.Headers(list(fields))
            for name in ("content-length", "transfer-encoding", "content-type", "x-missing"):
                assert header_value(headers, name.encode()) == headers.get(name, ""), (fields, name)
                assert header_value(headers, name.encode(), "dflt") == headers.get(name, "dflt")


def test_stream_large_streams_what_exceeds_the_size():
    from chaperone_sidecar.addons.streaming import stream_large

    for length, size, streams in ((b"11", 10, True), (b"10", 10, False), (b" 11 ", 10, True), (b"x", 1, False),
                                  (b"5, 5", 1, False), (None, 1, False), (b"11", None, False)):
        fields = [(b"Content-Length", length)] if length is not None else []
        f = tflow.tflow(req=tutils.treq(headers=http.Headers(fields), content=b""))
        f.request.stream = False
        stream_large(f, size)
        assert bool(f.request.stream) is streams, (length, size)
