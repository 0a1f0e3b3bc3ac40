"""When a request body streams: the one test every addon uses (not an addon itself).

mitmproxy streams a request body - sends the headers upstream, then each chunk - in two cases,
and in both the ``request`` hook fires only after the body has gone:

* ``flow.request.stream`` is set when ``requestheaders`` returns (mitmproxy sets it itself
  for a ``Content-Length`` above ``stream_large_bodies``; an addon may set a stream function);
* a body of *unknown length* (HTTP/1 ``Transfer-Encoding: chunked``, HTTP/2 or HTTP/3 without
  ``Content-Length``) is read into memory, but once it grew past ``stream_large_bodies``
  mitmproxy switches to streaming *while reading*, without asking any addon: it sets
  ``flow.request.stream = True`` and forwards what it has.

**Who decides to stream** (since the bodyRegex bypass): mitmproxy's own ``stream_large_bodies``
is set to :data:`READ_LIMIT` (64 MiB, proxy.py), the most the sidecar ever reads into memory to
judge a body, and Chaperone applies its streaming size (config ``stream_large_bodies``, 1 MiB)
itself, in Route's ``requestheaders``, with :func:`stream_large` - exactly mitmproxy's rule for a
``Content-Length`` above it. Why: mitmproxy applies its option to *every* flow, also to one an
addon told to buffer (``flow.request.stream = False``) - once the buffer passes the option it
streams the body on by itself, before ``request``, so a 2 MiB body that a ``bodyRegex`` rule
blocks reached the upstream unjudged. With the option at ``READ_LIMIT``, a body Enforce decides
to read (up to its limit, never above ``READ_LIMIT``) stays buffered until ``request``. A body
of unknown length is still buffered by mitmproxy and streamed past ``READ_LIMIT``; Enforce
refuses one (411) when it must judge it, since it cannot know its size in advance.

So whatever must happen before a request leaves - judging it (Enforce), approving it (Approve),
giving it its credentials (InjectCredentials), recording it (Record) - happens in
``requestheaders`` when :func:`body_leaves_early` says so. Mask uses the same test and captures
such a body for the recording where it can (see :mod:`.mask`).
"""

from __future__ import annotations

from mitmproxy import http

__all__ = ["READ_LIMIT", "body_leaves_early", "header_value", "stream_large"]

# The most the sidecar reads into memory to judge a request body (bodyRegex limits, MCP, AWS
# form and Anthropic bodies are capped at it); mitmproxy's own stream_large_bodies (proxy.py).
READ_LIMIT = 64 * 1024 * 1024


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
    # One pass over the raw fields (seven addons ask this per flow): ``name in headers`` and
    # ``headers.get`` each scan and lower-case every field and raise KeyError when the header
    # is missing - for a GET both lookups missed (issue 16). Names match as mitmproxy's do
    # (ASCII lower case); values are decoded and folded as ``headers.get`` gives them.
    chunked = False
    for name, value in req.headers.fields:
        name = name.lower()
        if name == b"content-length":
            return False
        if name == b"transfer-encoding" and not chunked:
            chunked = "chunked" in value.decode("utf-8", "surrogateescape").lower()
    if req.is_http2 or req.is_http3:
        return True
    return chunked


def stream_large(flow: http.HTTPFlow, size: int | None) -> None:
    """Stream a request whose ``Content-Length`` exceeds ``size`` (Chaperone's streaming size),
    as mitmproxy itself would - before any addon looks at it. Addons that must read the body
    switch it back off (Enforce), and mitmproxy then buffers it up to :data:`READ_LIMIT`."""
    if size is None or flow.request.stream:
        return
    length = header_value(flow.request.headers, b"content-length").strip()
    if length.isdigit() and int(length) > size:
        flow.request.stream = True


def header_value(headers: http.Headers, name: bytes, default: str = "") -> str:
    """``headers.get(name, default)`` for a lower-case ``name``: every value of the header,
    folded with ", ", decoded as mitmproxy decodes them - without the KeyError a missing header
    costs ``headers.get`` (issue 16: on the per-flow path most looked-up headers are missing)."""
    values = [value for key, value in headers.fields if key.lower() == name]
    if not values:
        return default
    return ", ".join(value.decode("utf-8", "surrogateescape") for value in values)
