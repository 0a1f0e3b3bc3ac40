"""The sidecar's HTTP/1.1 client: asyncio streams + h11, a small keep-alive pool.

Used for every request the sidecar process makes itself (not the agent's traffic, which is
mitmproxy's): the Kubernetes API with its watch streams (:mod:`.kubeclient`), the OIDC
discovery document and JWKS (:mod:`.oidc`) and the recorder's S3 uploads
(:mod:`.recording.s3http`). Its server half is :mod:`.http11_server` (the health port).

**Why hand-written and not aiohttp** (what these callers used until issue 16, session 5):
aiohttp (with yarl, multidict, propcache, frozenlist, aiosignal, aiohappyeyeballs, attrs)
was measured at ~12 MB of the idle full-profile sidecar's RSS (docs/benchmarks.md, "Idle
RSS, per-protocol libraries"), for a handful of request shapes to three kinds of server. h11
(the sans-IO HTTP/1.1 state machine: framing, chunked coding, header validation, keep-alive
rules) is already loaded by mitmproxy, so this module costs ~0 MB; what is ours is the I/O
around it - connect, TLS, timeouts, the pool, retry of a stale kept-alive connection.

What it does:

* ``http``/``https`` URLs; TLS through :mod:`ssl` with the caller's context (a CA bundle,
  client certificates), else the system trust store; the host name is checked.
* Bodies: request bodies are bytes sent with ``Content-Length``; response bodies are read
  whole (:meth:`Client.request`, optionally bounded by ``max_body``) or streamed
  (:meth:`Client.stream`), with ``Content-Length``, chunked or read-until-close framing. A body
  cut short (the peer closed before ``Content-Length`` bytes or the last chunk) is an error,
  never partial data.
* Timeouts: ``connect_timeout`` (TCP + TLS handshake), ``read_timeout`` (each wait for the
  peer: a read, or a write the peer is not draining) and an optional total deadline per call.
* Keep-alive: an idle connection goes back to a per-origin pool (``max_idle`` each, dropped
  after ``idle_expiry`` seconds) when both sides finished the exchange and neither said
  ``Connection: close``; a pooled connection the peer has closed is not used. When a reused
  connection turns out dead before any byte of the answer (the server closed it as we sent),
  an idempotent request (GET, HEAD, PUT, DELETE, OPTIONS) is sent again on a new connection
  once; any other method raises (it may have been processed).
* Header values, names, methods and targets are validated by h11 before anything is sent: a
  CR/LF (header injection) raises :class:`InvalidRequest`.
* Redirects only when asked (``max_redirects``, GET/HEAD only, never https -> http, the
  ``Authorization`` header dropped when the host changes).
* Errors: every transport or protocol failure is :class:`HTTPError` (:class:`HTTPTimeout` for
  timeouts) naming the method and URL; a connection is closed on any error and on
  cancellation, and :meth:`Client.aclose` closes the pool (no unclosed-transport warnings).

What it does not do: HTTP/2, proxies (``HTTP_PROXY`` is ignored, as the aiohttp sessions did),
cookies, authentication schemes, content decoding (no ``Accept-Encoding`` is sent),
``Expect: 100-continue``, request body streaming, connection limits per origin (a watch
holds a connection of its own for as long as it runs).
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl
import time
from collections.abc import AsyncIterator, Callable, Iterable, Mapping
from typing import Any
from urllib.parse import urlencode, urljoin, urlsplit

import h11

__all__ = ["Client", "Headers", "HTTPError", "HTTPTimeout", "InvalidRequest", "Response",
           "StreamResponse", "IDEMPOTENT"]

IDEMPOTENT = frozenset({"GET", "HEAD", "PUT", "DELETE", "OPTIONS"})
_REDIRECTS = frozenset({301, 302, 303, 307, 308})
_READ_SIZE = 65536
_MAX_HEAD = 64 * 1024  # status line + headers of one answer


class HTTPError(Exception):
    """No complete answer: connect, TLS, timeout, a protocol error or a connection closed early."""


class HTTPTimeout(HTTPError, TimeoutError):
    """A connect, read or total deadline passed (also a :class:`TimeoutError`)."""


class InvalidRequest(HTTPError, ValueError):
    """The request cannot be sent as given (a CR/LF in a header, a bad URL); nothing was sent."""


class Headers:
    """An answer's headers: case-insensitive, repeated names kept in order."""

    __slots__ = ("_items",)

    def __init__(self, raw: Iterable[tuple[bytes, bytes]] = ()) -> None:
        self._items = [(k.decode("latin-1").lower(), v.decode("latin-1")) for k, v in raw]

    def get(self, name: str, default: str | None = None) -> str | None:
        name = name.lower()
        return next((v for k, v in self._items if k == name), default)

    def get_all(self, name: str) -> list[str]:
        name = name.lower()
        return [v for k, v in self._items if k == name]

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and self.get(name) is not None

    def items(self) -> list[tuple[str, str]]:
        return list(self._items)

    def __repr__(self) -> str:
        return f"Headers({self._items!r})"


class Response:
    """A whole answer: ``status``, ``reason``, ``headers``, ``body``."""

    __slots__ = ("status", "reason", "headers", "body", "url")

    def __init__(self, status: int, reason: str, headers: Headers, body: bytes, url: str) -> None:
        self.status, self.reason, self.headers, self.body, self.url = status, reason, headers, body, url

    def __repr__(self) -> str:
        return f"<Response {self.status} {self.url} {len(self.body)} bytes>"


class _Origin:
    __slots__ = ("scheme", "host", "port", "netloc")

    def __init__(self, scheme: str, host: str, port: int, netloc: str) -> None:
        self.scheme, self.host, self.port, self.netloc = scheme, host, port, netloc

    @property
    def key(self) -> tuple[str, str, int]:
        return self.scheme, self.host, self.port


def _parse(url: str, params: Mapping[str, str] | None) -> tuple[_Origin, str]:
    """(origin, request target) of an absolute http(s) URL; the path is sent as given
    (already percent-encoded), ``params`` are appended url-encoded."""
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise InvalidRequest(f"not an http(s) URL: {url!r}")
    try:
        port = parts.port or (443 if parts.scheme == "https" else 80)
    except ValueError as exc:
        raise InvalidRequest(f"bad port in {url!r}: {exc}") from None
    netloc = parts.netloc.rpartition("@")[2]  # no userinfo in Host
    if netloc.endswith(f":{443 if parts.scheme == 'https' else 80}"):
        netloc = netloc.rpartition(":")[0]
    target = parts.path or "/"
    query = parts.query
    if params:
        query = (query + "&" if query else "") + urlencode(dict(params))
    if query:
        target += "?" + query
    return _Origin(parts.scheme, parts.hostname, port, netloc), target


class _Conn:
    """One TCP (+TLS) connection and its h11 state."""

    __slots__ = ("origin", "reader", "writer", "h11", "uses", "idle_since", "received")

    def __init__(self, origin: _Origin, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.origin, self.reader, self.writer = origin, reader, writer
        self.h11 = h11.Connection(h11.CLIENT, max_incomplete_event_size=_MAX_HEAD)
        self.uses = 0
        self.idle_since = time.monotonic()
        self.received = False  # any byte of the current answer arrived

    def alive(self) -> bool:
        """Still usable for the next request: open, and the peer has not closed or spoken."""
        return not (self.writer.transport.is_closing() or self.reader.at_eof()
                    or self.h11.our_state is not h11.IDLE)

    def abort(self) -> None:
        """Close now, dropping anything unsent (error paths, cancellation, a surplus idle
        connection): a plain ``close()`` would wait to flush a body the peer is not reading,
        past the end of the loop."""
        self.writer.transport.abort()

    async def aclose(self) -> None:
        self.writer.close()
        try:
            async with asyncio.timeout(1.0):
                await self.writer.wait_closed()
        except (TimeoutError, OSError, ssl.SSLError):
            self.writer.transport.abort()


class _Stale(Exception):
    """A reused connection was found closed before any byte of the answer."""


class StreamResponse:
    """An answer whose body is read as it arrives (:meth:`Client.stream`)."""

    def __init__(self, client: Client, conn: _Conn, status: int, reason: str, headers: Headers,
                 url: str, read_timeout: float | None) -> None:
        self.status, self.reason, self.headers, self.url = status, reason, headers, url
        self._client, self._conn, self._read_timeout = client, conn, read_timeout
        self.complete = False  # the whole body arrived

    async def chunks(self) -> AsyncIterator[bytes]:
        """The body's bytes as they arrive; raises :class:`HTTPError` if it is cut short."""
        conn = self._conn
        while not self.complete:
            event = await self._client._next_event(conn, self._read_timeout, self.url)
            if isinstance(event, h11.Data):
                if event.data:
                    yield bytes(event.data)
            elif isinstance(event, h11.EndOfMessage):
                self.complete = True
            else:
                raise HTTPError(f"{self.url}: unexpected {type(event).__name__} in the body")

    async def read(self, max_body: int | None = None) -> bytes:
        body = bytearray()
        async for chunk in self.chunks():
            body += chunk
            if max_body is not None and len(body) > max_body:
                raise HTTPError(f"{self.url}: answer body larger than {max_body} bytes")
        return bytes(body)


class Client:
    """An HTTP/1.1 client with a keep-alive pool (see the module doc). Use it on one event
    loop; :meth:`aclose` closes its connections (it may be used again afterwards)."""

    def __init__(self, *, ssl_context: ssl.SSLContext | None = None, connect_timeout: float = 10.0,
                 read_timeout: float | None = 30.0, max_idle: int = 4, idle_expiry: float = 15.0,
                 connect_host: Callable[[str], str] | None = None,
                 default_headers: Mapping[str, str] | None = None) -> None:
        self._ssl = ssl_context
        self.connect_timeout = connect_timeout
        self.read_timeout = read_timeout
        self.max_idle = max_idle
        self.idle_expiry = idle_expiry
        # the address to connect to for a host name (tests: bucket.localhost -> 127.0.0.1);
        # TLS still checks the URL's host name
        self._connect_host = connect_host
        self._default_headers = dict(default_headers or {})
        self._idle: dict[tuple[str, str, int], list[_Conn]] = {}
        self._busy: set[_Conn] = set()
        self.connections_opened = 0  # telemetry, tests

    # ------------------------------------------------------------------ public
    async def request(self, method: str, url: str, *, params: Mapping[str, str] | None = None,
                      headers: Mapping[str, str] | None = None, body: bytes | None = None,
                      timeout: float | None = None, read_timeout: float | None = None,
                      max_body: int | None = None, max_redirects: int = 0) -> Response:
        """Send one request and read the whole answer. ``timeout``: a deadline for all of it
        (connect, send, answer); ``read_timeout`` overrides the client's for this call."""
        method = method.upper()
        try:
            async with asyncio.timeout(timeout):
                for _ in range(max_redirects + 1):
                    async with self.stream(method, url, params=params, headers=headers, body=body,
                                           read_timeout=read_timeout) as resp:
                        data = await resp.read(max_body)
                    location = resp.headers.get("location")
                    if not (resp.status in _REDIRECTS and location and max_redirects
                            and method in ("GET", "HEAD")):
                        return Response(resp.status, resp.reason, resp.headers, data, resp.url)
                    url, params, headers = self._redirect(resp.url, location, headers)
                    max_redirects -= 1
                return Response(resp.status, resp.reason, resp.headers, data, resp.url)
        except TimeoutError:
            raise HTTPTimeout(f"{method} {url}: no complete answer within {timeout} s") from None

    @contextlib.asynccontextmanager
    async def stream(self, method: str, url: str, *, params: Mapping[str, str] | None = None,
                     headers: Mapping[str, str] | None = None, body: bytes | None = None,
                     read_timeout: float | None = None) -> AsyncIterator[StreamResponse]:
        """Send one request; yield the answer once its head arrived, the body to be read from
        :meth:`StreamResponse.chunks`. Leaving the block early closes the connection; a body
        read to its end returns it to the pool."""
        method = method.upper()
        origin, target = _parse(url, params)
        shown = f"{origin.scheme}://{origin.netloc}{target.partition('?')[0]}"
        rt = self.read_timeout if read_timeout is None else read_timeout
        request = self._build(method, origin, target, headers, body)
        for attempt in (0, 1):
            conn = await self._acquire(origin, shown)
            try:
                status, reason, head = await self._send(conn, request, body, rt, shown)
            except _Stale:
                self._discard(conn)
                for idle in self._idle.pop(origin.key, []):  # closed by the same server, likely
                    idle.abort()
                if attempt == 0 and method in IDEMPOTENT:
                    continue  # once more, on a new connection
                raise HTTPError(f"{method} {shown}: the server closed the kept-alive connection "
                                f"before answering (not retried: {method} is not idempotent)") from None
            except BaseException:
                self._discard(conn)
                raise
            break
        resp = StreamResponse(self, conn, status, reason, head, shown, rt)
        try:
            if method == "HEAD" or status in (204, 304):
                await resp.read()  # h11 knows these have no body: only the end of message
            yield resp
        except BaseException:
            self._discard(conn)
            raise
        if resp.complete:
            self._release(conn)
        else:
            self._discard(conn)  # body not read to its end: the connection is unusable

    async def aclose(self) -> None:
        """Close every connection (idle ones and any still in use)."""
        conns = [c for idle in self._idle.values() for c in idle] + list(self._busy)
        self._idle.clear()
        self._busy.clear()
        await asyncio.gather(*(c.aclose() for c in conns), return_exceptions=True)

    # ------------------------------------------------------------------ internals
    def _build(self, method: str, origin: _Origin, target: str, headers: Mapping[str, str] | None,
               body: bytes | None) -> h11.Request:
        merged = {**self._default_headers, **(headers or {})}
        names = {k.lower() for k in merged}
        out: list[tuple[str, str]] = []
        if "host" not in names:
            out.append(("Host", origin.netloc))
        out += [(k, v) for k, v in merged.items() if k.lower() not in ("content-length", "transfer-encoding")]
        if body or method in ("POST", "PUT", "PATCH"):
            out.append(("Content-Length", str(len(body or b""))))
        try:
            return h11.Request(method=method, target=target, headers=out)
        except h11.LocalProtocolError as exc:
            raise InvalidRequest(f"{method} {origin.netloc}: refused to send: {exc}") from None

    @staticmethod
    def _redirect(current: str, location: str, headers: Mapping[str, str] | None
                  ) -> tuple[str, None, Mapping[str, str] | None]:
        new = urljoin(current, location)
        old_parts, new_parts = urlsplit(current), urlsplit(new)
        if old_parts.scheme == "https" and new_parts.scheme != "https":
            raise HTTPError(f"{current}: refused a redirect from https to {new!r}")
        if headers and new_parts.netloc != old_parts.netloc:
            headers = {k: v for k, v in headers.items() if k.lower() != "authorization"}
        return new, None, headers

    async def _acquire(self, origin: _Origin, shown: str) -> _Conn:
        idle = self._idle.get(origin.key)
        now = time.monotonic()
        while idle:
            conn = idle.pop()
            if conn.alive() and now - conn.idle_since < self.idle_expiry:
                self._busy.add(conn)
                return conn
            conn.abort()
        return await self._open(origin, shown)

    async def _open(self, origin: _Origin, shown: str) -> _Conn:
        context: ssl.SSLContext | None = None
        if origin.scheme == "https":
            if self._ssl is None:
                self._ssl = ssl.create_default_context()
            context = self._ssl
        address = self._connect_host(origin.host) if self._connect_host else origin.host
        try:
            async with asyncio.timeout(self.connect_timeout):
                reader, writer = await asyncio.open_connection(
                    address, origin.port, ssl=context, limit=_READ_SIZE,
                    server_hostname=origin.host if context else None)
        except TimeoutError:
            raise HTTPTimeout(f"{shown}: connect timeout ({self.connect_timeout} s)") from None
        except ssl.SSLError as exc:
            raise HTTPError(f"{shown}: TLS: {exc}") from exc
        except OSError as exc:
            raise HTTPError(f"{shown}: cannot connect: {exc}") from exc
        self.connections_opened += 1
        conn = _Conn(origin, reader, writer)
        self._busy.add(conn)
        return conn

    def _release(self, conn: _Conn) -> None:
        self._busy.discard(conn)
        h = conn.h11
        if h.our_state is h11.DONE and h.their_state is h11.DONE:
            h.start_next_cycle()
            idle = self._idle.setdefault(conn.origin.key, [])
            if len(idle) < self.max_idle:
                conn.idle_since = time.monotonic()
                idle.append(conn)
                return
        conn.abort()

    def _discard(self, conn: _Conn) -> None:
        self._busy.discard(conn)
        conn.abort()

    async def _send(self, conn: _Conn, request: h11.Request, body: bytes | None, rt: float | None,
                    shown: str) -> tuple[int, str, Headers]:
        reused, conn.received = conn.uses > 0, False
        conn.uses += 1
        h = conn.h11
        pieces = [h.send(request) or b""]
        if body:  # the body is passed through, not copied into one buffer with the head
            pieces += h.send_with_data_passthrough(h11.Data(data=body)) or []
        pieces.append(h.send(h11.EndOfMessage()) or b"")
        try:
            conn.writer.writelines(pieces)
            async with asyncio.timeout(rt):
                await conn.writer.drain()
        except TimeoutError:
            raise HTTPTimeout(f"{request.method.decode()} {shown}: the server did not take the "
                              f"request within {rt} s") from None
        except (ConnectionError, ssl.SSLError) as exc:
            if reused:
                raise _Stale from exc
            raise HTTPError(f"{request.method.decode()} {shown}: {type(exc).__name__}: {exc}") from exc
        while True:
            try:
                event = await self._next_event(conn, rt, shown)
            except HTTPError as exc:
                if reused and not conn.received and not isinstance(exc, HTTPTimeout):
                    raise _Stale from exc
                raise
            if isinstance(event, h11.InformationalResponse):
                continue  # 100 Continue and friends: the answer follows
            if isinstance(event, h11.Response):
                return event.status_code, event.reason.decode("latin-1"), Headers(event.headers)
            raise HTTPError(f"{shown}: unexpected {type(event).__name__} instead of an answer")

    async def _next_event(self, conn: _Conn, rt: float | None, shown: str) -> Any:
        h = conn.h11
        while True:
            try:
                event = h.next_event()
            except h11.RemoteProtocolError as exc:
                raise HTTPError(f"{shown}: {exc}") from None
            if event is not h11.NEED_DATA:
                if event is h11.PAUSED or isinstance(event, h11.ConnectionClosed):
                    raise HTTPError(f"{shown}: the server closed the connection before the answer ended")
                return event
            try:
                async with asyncio.timeout(rt):
                    data = await conn.reader.read(_READ_SIZE)
            except TimeoutError:
                raise HTTPTimeout(f"{shown}: no data from the server for {rt} s") from None
            except (ConnectionError, ssl.SSLError) as exc:
                raise HTTPError(f"{shown}: {type(exc).__name__}: {exc}") from exc
            if data:
                conn.received = True
            try:
                h.receive_data(data)
            except h11.RemoteProtocolError as exc:
                raise HTTPError(f"{shown}: {exc}") from None
