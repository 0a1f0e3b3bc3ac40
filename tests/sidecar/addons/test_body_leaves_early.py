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
