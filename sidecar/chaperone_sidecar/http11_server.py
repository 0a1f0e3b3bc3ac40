"""The health port's HTTP/1.1 server (``/ready``, ``/metrics``): asyncio streams + h11.

**Why hand-written and not aiohttp.web** (what :mod:`.proxy` used until issue 16, session 5):
importing aiohttp (with yarl, multidict, propcache, frozenlist, aiosignal, aiohappyeyeballs,
attrs) was measured at ~12 MB of the idle full-profile sidecar's RSS (docs/benchmarks.md),
for two GET routes answered to the kubelet and a Prometheus scraper. h11 (the sans-IO
HTTP/1.1 state machine) is already loaded by mitmproxy, so this costs ~0 MB. The client
half is :mod:`.http11`.

What it does: GET and HEAD on exact paths (the query string is ignored), answers with
``Content-Length``; anything else is ``404`` or ``405``; a malformed request is ``400`` and the
connection is closed; a handler that raises is a logged ``500``. Keep-alive as HTTP/1.1 has it
(a scraper's kept connection), closed after ``idle_timeout`` seconds of silence; at most
``max_connections`` at once (more are closed at once: the port is reachable from the pod
network); request bodies are read and discarded up to 64 KiB (larger: 413, closed).
:meth:`Server.close` stops listening and closes every open connection.

What it does not do: HTTP/2, TLS, chunked or streamed answers, routing beyond exact paths.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass

import h11

__all__ = ["Server", "Request", "Answer", "Handler"]

log = logging.getLogger("chaperone.health")

_MAX_HEAD = 16 * 1024
_MAX_BODY = 64 * 1024


@dataclass(frozen=True)
class Request:
    method: str
    path: str
    query: str
    headers: Mapping[str, str]  # names lower-cased


@dataclass(frozen=True)
class Answer:
    status: int
    body: bytes = b""
    content_type: str = "text/plain; charset=utf-8"


Handler = Callable[[Request], Awaitable[Answer]]


class Server:
    """Serves ``routes`` (exact path -> handler) on one listening address."""

    def __init__(self, routes: Mapping[str, Handler], *, idle_timeout: float = 30.0,
                 max_connections: int = 32) -> None:
        self.routes = dict(routes)
        self.idle_timeout = idle_timeout
        self.max_connections = max_connections
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._writers: set[asyncio.StreamWriter] = set()

    async def start(self, host: str | None, port: int) -> None:
        """Listen on ``host`` (None or "": every interface) and ``port`` (0: any free port)."""
        self._server = await asyncio.start_server(self._accept, host or None, port)

    @property
    def ports(self) -> list[int]:
        return [s.getsockname()[1] for s in (self._server.sockets if self._server else ())]

    async def close(self) -> None:
        if self._server is None:
            return
        server, self._server = self._server, None
        server.close()
        for writer in list(self._writers):
            writer.transport.abort()
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await server.wait_closed()

    # ------------------------------------------------------------------ connections
    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self._server is None or len(self._writers) >= self.max_connections:
            writer.transport.abort()
            return
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        self._writers.add(writer)
        try:
            await self._serve(reader, writer)
        except (ConnectionError, TimeoutError):
            pass  # the client went away or fell silent
        except asyncio.CancelledError:
            pass  # close(): the task is ours and nothing awaits its result
        finally:
            self._tasks.discard(task)
            self._writers.discard(writer)
            writer.close()  # flushes what is still buffered, then closes

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        conn = h11.Connection(h11.SERVER, max_incomplete_event_size=_MAX_HEAD)
        while True:
            try:
                event = await self._next(conn, reader)
            except h11.RemoteProtocolError as exc:
                if conn.our_state in (h11.IDLE, h11.SEND_RESPONSE):
                    await self._answer(conn, writer, None, Answer(exc.error_status_hint, b"bad request\n"),
                                       close=True)
                return
            if isinstance(event, h11.ConnectionClosed):
                return
            assert isinstance(event, h11.Request)
            request = Request(event.method.decode("ascii"), *self._split(event.target),
                              {k.decode("latin-1"): v.decode("latin-1") for k, v in event.headers})
            size = 0
            try:
                while not isinstance(part := await self._next(conn, reader), h11.EndOfMessage):
                    size += len(part.data) if isinstance(part, h11.Data) else 0
                    if size > _MAX_BODY:
                        await self._answer(conn, writer, request, Answer(413, b"request body too large\n"),
                                           close=True)
                        return
            except h11.RemoteProtocolError:
                await self._answer(conn, writer, request, Answer(400, b"bad request\n"), close=True)
                return
            await self._answer(conn, writer, request, await self._dispatch(request))
            if conn.our_state is not h11.DONE or conn.their_state is not h11.DONE:
                return  # either side asked to close (Connection: close, HTTP/1.0)
            conn.start_next_cycle()

    async def _next(self, conn: h11.Connection, reader: asyncio.StreamReader) -> object:
        """The next event (a request, its body, or the end), waiting at most idle_timeout for
        each read."""
        while (event := conn.next_event()) is h11.NEED_DATA:
            async with asyncio.timeout(self.idle_timeout):
                data = await reader.read(65536)
            conn.receive_data(data)
        return event

    async def _dispatch(self, request: Request) -> Answer:
        handler = self.routes.get(request.path)
        if handler is None:
            return Answer(404, b"not found\n")
        if request.method not in ("GET", "HEAD"):
            return Answer(405, b"method not allowed\n")
        try:
            return await handler(request)
        except Exception:
            log.exception("health server: %s %s failed", request.method, request.path)
            return Answer(500, b"internal error\n")

    @staticmethod
    def _split(target: bytes) -> tuple[str, str]:
        path, _, query = target.decode("latin-1").partition("?")
        return path, query

    @staticmethod
    async def _answer(conn: h11.Connection, writer: asyncio.StreamWriter, request: Request | None,
                      answer: Answer, close: bool = False) -> None:
        headers = [("Content-Type", answer.content_type), ("Content-Length", str(len(answer.body))),
                   ("Cache-Control", "no-store")]
        if close:
            headers.append(("Connection", "close"))
        out = conn.send(h11.Response(status_code=answer.status, headers=headers)) or b""
        if answer.body and not (request is not None and request.method == "HEAD"):
            out += conn.send(h11.Data(data=answer.body)) or b""
        out += conn.send(h11.EndOfMessage()) or b""
        writer.write(out)
        await writer.drain()
