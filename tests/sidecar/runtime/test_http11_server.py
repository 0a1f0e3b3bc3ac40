"""The health port's server (http11_server.py) with real clients on loopback: the stdlib's
``http.client`` (keep-alive, HEAD) and raw sockets for what a well-behaved client never sends."""

from __future__ import annotations

import asyncio
import http.client
import socket

from chaperone_sidecar.http11_server import Answer, Request, Server


async def _ok(request: Request) -> Answer:
    return Answer(200, f"ok {request.query} {request.headers.get('accept', '')}".encode(), "text/plain")


async def _boom(_: Request) -> Answer:
    raise RuntimeError("handler failed")


def serve(test, **kw):
    """Run ``test(port)`` in a thread against a started server; close the server after."""
    async def main():
        server = Server({"/ok": _ok, "/boom": _boom}, **kw)
        await server.start("127.0.0.1", 0)
        try:
            return await asyncio.to_thread(test, server.ports[0])
        finally:
            await server.close()
    return asyncio.run(main())


def test_get_head_and_keep_alive():
    def client(port):
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
        out = []
        for method, path in (("GET", "/ok?x=1"), ("HEAD", "/ok"), ("GET", "/missing"), ("POST", "/ok"),
                             ("GET", "/boom"), ("GET", "/ok")):
            conn.request(method, path, body=b"ignored" if method == "POST" else None,
                         headers={"Accept": "text/plain"})
            resp = conn.getresponse()
            out.append((resp.status, resp.read(), resp.getheader("Content-Length")))
        sock = conn.sock
        conn.close()
        return out, sock

    out, _ = serve(client)
    assert out[0] == (200, b"ok x=1 text/plain", "17")
    assert out[1] == (200, b"", "14")  # HEAD: the GET's length, no body
    assert [o[0] for o in out[2:]] == [404, 405, 500, 200]  # all on one connection


def _raw(port: int, data: bytes) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
        s.sendall(data)
        chunks = []
        try:
            while chunk := s.recv(65536):
                chunks.append(chunk)
        except ConnectionResetError:
            pass  # an aborted connection: what arrived before is the answer
        return b"".join(chunks)


def test_malformed_and_closing_requests():
    def client(port):
        return (_raw(port, b"GARBAGE\r\n\r\n"),
                _raw(port, b"GET /ok HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"),
                _raw(port, b"GET /ok HTTP/1.0\r\n\r\n"),
                _raw(port, b"POST /ok HTTP/1.1\r\nHost: x\r\nContent-Length: 100000\r\n\r\n" + b"a" * 70000))

    garbage, closing, http10, big = serve(client)
    # each read ends: the server closed the connection after the one answer
    assert garbage.startswith(b"HTTP/1.1 400 ")
    assert closing.startswith(b"HTTP/1.1 200 ") and closing.endswith(b"ok  ")
    assert http10.startswith(b"HTTP/1.1 200 ")
    assert big.startswith(b"HTTP/1.1 413 ")  # past 64 KiB of body: refused before the rest


def test_idle_connections_time_out_and_close_ends_kept_ones():
    def client(port):
        idle = socket.create_connection(("127.0.0.1", port), timeout=5)
        quiet = idle.recv(10)  # the server closes it after idle_timeout: b""
        kept = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
        kept.request("GET", "/ok")
        kept.getresponse().read()
        return quiet, kept

    quiet, kept = serve(client, idle_timeout=0.3)
    assert quiet == b""
    kept.sock.settimeout(2)
    assert kept.sock.recv(10) == b""  # Server.close() closed the kept-alive connection
    kept.close()


def test_connection_limit():
    def client(port):
        held = [socket.create_connection(("127.0.0.1", port), timeout=5) for _ in range(2)]
        try:
            return _raw(port, b"GET /ok HTTP/1.1\r\nHost: x\r\n\r\n")
        finally:
            for s in held:
                s.close()

    assert serve(client, max_connections=2) == b""  # refused: closed at once
