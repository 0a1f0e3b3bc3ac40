"""When a request body streams: the one test every addon uses (not an addon itself).

mitmproxy streams a request body - sends the headers upstream, then each chunk - in two cases,
and in both the ``request`` hook fires only after the body has gone:

* ``flow.request.stream`` is set when ``requestheaders`` returns (mitmproxy sets it itself
  for a ``Content-Length`` above ``stream_large_bodies``; an addon may set a stream function);
* a body of *unknown length* (HTTP/1 ``Transfer-Encoding: chunked``, HTTP/2 or HTTP/3 without
  ``Content-Length``) is read into memory, but once it grew past ``stream_large_bodies``
  mitmproxy switches to streaming *while reading*, without asking any addon: it sets
  ``flow.request.stream = True`` and forwards what it has.

So whatever must happen before a request leaves - judging it (Enforce), approving it (Approve),
giving it its credentials (InjectCredentials), recording it (Record) - happens in
``requestheaders`` when :func:`body_leaves_early` says so. Mask uses the same test and captures
such a body for the recording where it can (see :mod:`.mask`).
"""

from __future__ import annotations

from mitmproxy import http

__all__ = ["body_leaves_early"]


def body_leaves_early(flow: http.HTTPFlow) -> bool:
    """Whether the request may be on its way upstream before the ``request`` hook fires.

    True when ``flow.request.stream`` is set, and for a body of unknown length: HTTP/1
    ``Transfer-Encoding: chunked``, and HTTP/2 or HTTP/3 without ``Content-Length`` (a body may
    follow the headers). Enforce, Approve, InjectCredentials, Mask and Record all use this one
    test.
    """
    req = flow.request
    if req.stream:
        return True
    if "content-length" in req.headers:
        return False
    if req.is_http2 or req.is_http3:
        return True
    return "chunked" in req.headers.get("transfer-encoding", "").lower()
