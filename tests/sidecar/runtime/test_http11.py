"""The sidecar's HTTP/1.1 client (http11.py) against real servers on loopback: the stdlib's
``http.server`` (threaded, HTTP/1.1 keep-alive) in plain TCP and behind TLS with a test CA.

Each test runs its client in a fresh event loop - the standard one and uvloop (the sidecar's
default) - and fails on any ResourceWarning (an unclosed transport or socket) left after the
loop closed.
"""

from __future__ import annotations

import asyncio
import gc
import json
import ssl
import threading
import time
import warnings
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import uvloop

from chaperone_sidecar.http11 import Client, HTTPError, HTTPTimeout, InvalidRequest
from chaperone_testbed.pki import CertAuthority


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: Upstream

    def log_message(self, *args):  # quiet
        pass

    def setup(self):
        super().setup()
        self.served = 0  # requests answered on this connection
        self.server.connections += 1

    def _send(self, status: int, body: bytes, headers: dict[str, str] | None = None) -> None:
        self.send_response(status)
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def do_GET(self):  # noqa: C901, N802 - one route table
        self.server.requests.append((self.command, self.path))
        self.served += 1
        body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        path = self.path.partition("?")[0]
        if path == "/hello":
            self._send(200, b"hello")
        elif path == "/echo":
            self._send(200, json.dumps({"method": self.command, "path": self.path, "body": body.decode(),
                                        "headers": dict(self.headers.items())}).encode(),
                       {"Content-Type": "application/json"})
        elif path == "/chunked":
            self.send_response(200)
            self.send_header("Transfer-Encoding", "chunked")
            self.end_headers()
            for part in (b'{"a": 1}\n{"b"', b': 2}\n'):
                self.wfile.write(b"%x\r\n%s\r\n" % (len(part), part))
                self.wfile.flush()
            self.server.release.wait(10)  # the test reads the first chunks before this one
            self.wfile.write(b"7\r\n{\"c\":3}\r\n0\r\n\r\n")
        elif path == "/truncated":
            self.send_response(200)
            self.send_header("Content-Length", "100")
            self.end_headers()
            self.wfile.write(b"only ten b")
            self.close_connection = True
        elif path == "/truncated-chunked":
            self.send_response(200)
            self.send_header("Transfer-Encoding", "chunked")
            self.end_headers()
            self.wfile.write(b"5\r\nfirst\r\n")
            self.close_connection = True  # no last chunk
        elif path == "/slow":
            time.sleep(1.5)
            self._send(200, b"late")
        elif path == "/drop-reused":
            # A kept-alive connection the server closes as the next request arrives: nothing
            # of an answer is sent.
            if self.served > 1:
                self.close_connection = True
                return
            self._send(200, b"first")
        elif path == "/close-after":
            self._send(200, b"bye")  # kept alive by the headers, closed by the server anyway
            self.close_connection = True
        elif path == "/redirect":
            self._send(302, b"", {"Location": self.server.redirect_to})
        elif path == "/big":
            self._send(200, b"x" * 100_000)
        else:
            self._send(404, b"no")

    do_HEAD = do_POST = do_PUT = do_DELETE = do_GET  # noqa: N815


class Upstream(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, context: ssl.SSLContext | None = None) -> None:
        super().__init__(("127.0.0.1", 0), Handler)
        if context is not None:
            self.socket = context.wrap_socket(self.socket, server_side=True)
        self.connections = 0
        self.requests: list[tuple[str, str]] = []
        self.release = threading.Event()
        self.redirect_to = "/hello"
        self.scheme = "https" if context else "http"
        threading.Thread(target=self.serve_forever, daemon=True).start()

    def handle_error(self, request, client_address):
        pass  # a client that went away (the timeout and truncation tests): expected

    def url(self, path: str, host: str = "127.0.0.1") -> str:
        return f"{self.scheme}://{host}:{self.server_address[1]}{path}"

    def close(self) -> None:
        self.release.set()
        self.shutdown()
        self.server_close()


@pytest.fixture
def upstream():
    server = Upstream()
    yield server
    server.close()


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    d = tmp_path_factory.mktemp("pki")
    ca, other = CertAuthority("http11-test-ca"), CertAuthority("some-other-ca")
    return {"ca": ca.write_cert(d / "ca.pem"), "other": other.write_cert(d / "other.pem"),
            "server": ca.write_server_cert(d, "server"),
            "client": ca.write_client_cert(d, "client", user="sidecar")}


_LOOPS = {"asyncio": asyncio.new_event_loop, "uvloop": uvloop.new_event_loop}
_loop = ["asyncio"]  # the loop of the running test (the fixture below)


@pytest.fixture(autouse=True, params=sorted(_LOOPS))
def event_loop_kind(request):
    """Every test on both loops the sidecar runs on (uvloop is its default)."""
    _loop[0] = request.param
    yield request.param
    _loop[0] = "asyncio"


def run(coro):
    """Run ``coro`` on a fresh loop, failing on any ResourceWarning (unclosed transport/socket)
    it leaves."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", ResourceWarning)
        with asyncio.Runner(loop_factory=_LOOPS[_loop[0]]) as runner:
            result = runner.run(coro)
        gc.collect()
    leaks = [str(w.message) for w in caught if issubclass(w.category, ResourceWarning)]
    assert not leaks, leaks
    return result


def with_client(**kw):
    """A client closed on exit."""
    class _Ctx:
        async def __aenter__(self):
            self.client = Client(**kw)
            return self.client

        async def __aexit__(self, *exc):
            await self.client.aclose()
    return _Ctx()


def test_content_length_and_keep_alive_reuse(upstream):
    async def main():
        client = Client()
        try:
            answers = [await client.request("GET", upstream.url("/hello")) for _ in range(3)]
            answers.append(await client.request("POST", upstream.url("/echo"), body=b"data",
                                                headers={"X-Test": "1"}))
            return answers, client.connections_opened
        finally:
            await client.aclose()

    answers, opened = run(main())
    assert [a.status for a in answers] == [200] * 4 and answers[0].body == b"hello"
    echo = json.loads(answers[3].body)
    assert echo["body"] == "data" and echo["headers"]["X-Test"] == "1"
    assert echo["headers"]["Host"] == f"127.0.0.1:{upstream.server_address[1]}"
    assert answers[3].headers.get("content-type") == "application/json"
    assert opened == 1 and upstream.connections == 1  # one connection for all four


def test_params_are_url_encoded(upstream):
    async def main():
        async with with_client() as client:
            return await client.request("GET", upstream.url("/echo"), params={"labelSelector": "a=b,c in (x)"})

    echo = json.loads(run(main()).body)
    assert echo["path"] == "/echo?labelSelector=a%3Db%2Cc+in+%28x%29"


def test_chunked_answer_is_streamed_as_it_arrives(upstream):
    async def main():
        async with with_client() as client:
            got = []
            async with client.stream("GET", upstream.url("/chunked")) as resp:
                assert resp.status == 200 and resp.headers.get("transfer-encoding") == "chunked"
                async for chunk in resp.chunks():
                    got.append(chunk)
                    if b"".join(got) == b'{"a": 1}\n{"b": 2}\n':
                        upstream.release.set()  # the last chunk is sent only now
            whole = await client.request("GET", upstream.url("/chunked"))  # reused after a full read
            return got, whole.body, client.connections_opened

    got, whole, opened = run(main())
    assert b"".join(got) == b'{"a": 1}\n{"b": 2}\n{"c":3}'
    assert whole == b'{"a": 1}\n{"b": 2}\n{"c":3}'
    assert opened == 1


def test_a_stream_left_early_closes_its_connection(upstream):
    async def main():
        async with with_client() as client:
            async with client.stream("GET", upstream.url("/chunked")) as resp:
                async for _ in resp.chunks():
                    break
            upstream.release.set()
            await client.request("GET", upstream.url("/hello"))
            return client.connections_opened

    assert run(main()) == 2  # the unfinished body's connection was not reused


@pytest.mark.parametrize("path", ["/truncated", "/truncated-chunked"])
def test_a_truncated_body_is_an_error_not_partial_data(upstream, path):
    async def main():
        async with with_client() as client:
            await client.request("GET", upstream.url(path))

    with pytest.raises(HTTPError) as err:
        run(main())
    assert "closed" in str(err.value) or "incomplete" in str(err.value)


def test_a_stale_kept_alive_connection_is_retried_for_idempotent_requests_only(upstream):
    # GET: the reused connection is dropped without an answer, the request goes again on a new one
    async def get_twice():
        async with with_client() as client:
            a = await client.request("GET", upstream.url("/drop-reused"))
            b = await client.request("GET", upstream.url("/drop-reused"))
            return a.body, b.body, client.connections_opened

    assert run(get_twice()) == (b"first", b"first", 2)
    assert upstream.requests == [("GET", "/drop-reused")] * 3  # the dropped one reached the server

    # POST: may have been processed - raised, not repeated
    async def post_after_get():
        async with with_client() as client:
            await client.request("GET", upstream.url("/drop-reused"))
            await client.request("POST", upstream.url("/drop-reused"))

    upstream.requests.clear()
    with pytest.raises(HTTPError, match="not idempotent"):
        run(post_after_get())
    assert upstream.requests == [("GET", "/drop-reused"), ("POST", "/drop-reused")]


def test_a_retry_after_a_stale_connection_takes_a_new_one_not_another_pooled_one(upstream):
    """Two kept-alive connections in the pool, both closed by the server: the retry opens a
    new connection instead of trying the other stale one (and failing the request)."""
    async def main():
        async with with_client() as client:
            await asyncio.gather(*(client.request("GET", upstream.url("/drop-reused")) for _ in range(2)))
            assert client.connections_opened == 2
            answer = await client.request("GET", upstream.url("/drop-reused"))
            return answer.body, client.connections_opened

    assert run(main()) == (b"first", 3)


def test_a_connection_the_server_closed_while_idle_is_not_reused(upstream):
    async def main():
        async with with_client() as client:
            await client.request("GET", upstream.url("/close-after"))
            await asyncio.sleep(0.2)  # the server's FIN arrives
            answer = await client.request("POST", upstream.url("/echo"), body=b"x")
            return answer.status, client.connections_opened

    assert run(main()) == (200, 2)  # a fresh connection: the POST needed no retry


def test_timeouts(upstream):
    async def read_timeout():
        async with with_client(read_timeout=0.3) as client:
            await client.request("GET", upstream.url("/slow"))

    async def total_timeout():
        async with with_client() as client:
            await client.request("GET", upstream.url("/slow"), timeout=0.3)

    for case in (read_timeout, total_timeout):
        started = time.monotonic()
        with pytest.raises(HTTPTimeout):
            run(case())
        assert time.monotonic() - started < 1.2


def test_header_injection_is_refused_before_anything_is_sent(upstream):
    async def main(**kw):
        async with with_client() as client:
            try:
                await client.request(kw.pop("method", "GET"), kw.pop("url", upstream.url("/echo")), **kw)
            finally:
                assert client.connections_opened == 0

    for kw in ({"headers": {"X-A": "a\r\nX-Injected: 1"}}, {"headers": {"X-A": "a\nb"}},
               {"headers": {"X-A\r\nX-B": "1"}}, {"headers": {"Bad Name": "1"}},
               {"url": upstream.url("/echo HTTP/1.1\r\nX-Injected: 1\r\n\r\nGET /")},
               {"method": "GET /x HTTP/1.1\r\n"}, {"url": "ftp://127.0.0.1/x"}):
        with pytest.raises(InvalidRequest):
            run(main(**kw))
    assert upstream.requests == [] and upstream.connections == 0


def test_max_body(upstream):
    async def main():
        async with with_client() as client:
            await client.request("GET", upstream.url("/big"), max_body=1000)

    with pytest.raises(HTTPError, match="larger than 1000"):
        run(main())


def test_head_and_status_without_body(upstream):
    async def main():
        async with with_client() as client:
            head = await client.request("HEAD", upstream.url("/big"))
            missing = await client.request("GET", upstream.url("/nothing"))
            return head, missing, client.connections_opened

    head, missing, opened = run(main())
    assert head.status == 200 and head.body == b"" and head.headers.get("content-length") == "100000"
    assert missing.status == 404 and missing.body == b"no"
    assert opened == 1


def test_redirects_only_when_asked_and_authorization_stays_on_its_host(upstream):
    async def main():
        async with with_client() as client:
            plain = await client.request("GET", upstream.url("/redirect"))
            followed = await client.request("GET", upstream.url("/redirect"), max_redirects=2,
                                            headers={"Authorization": "Bearer t"})
            upstream.redirect_to = upstream.url("/echo", host="localhost")
            other_host = await client.request("GET", upstream.url("/redirect"), max_redirects=2,
                                              headers={"Authorization": "Bearer t"})
            return plain, followed, other_host

    plain, followed, other_host = run(main())
    assert plain.status == 302 and followed.status == 200 and followed.body == b"hello"
    assert other_host.status == 200 and "Authorization" not in json.loads(other_host.body)["headers"]


def test_connection_refused_is_a_clear_error(upstream):
    port = upstream.server_address[1]
    upstream.close()

    async def main():
        async with with_client() as client:
            await client.request("GET", f"http://127.0.0.1:{port}/x")

    with pytest.raises(HTTPError, match="cannot connect"):
        run(main())


# ---------------------------------------------------------------------------- TLS

def _server_context(pki, require_client: bool = False) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(pki["server"].cert_path, pki["server"].key_path)
    if require_client:
        ctx.verify_mode = ssl.CERT_REQUIRED
        ctx.load_verify_locations(pki["ca"])
    return ctx


def test_tls_with_a_custom_ca_and_keep_alive(pki):
    server = Upstream(_server_context(pki))
    try:
        async def main():
            async with with_client(ssl_context=ssl.create_default_context(cafile=str(pki["ca"]))) as client:
                server.release.set()
                answers = [await client.request("GET", server.url(path)) for path in ("/hello", "/chunked")]
                answers.append(await client.request("GET", server.url("/hello", host="localhost")))
                return [a.body for a in answers], client.connections_opened

        bodies, opened = run(main())
        assert bodies == [b"hello", b'{"a": 1}\n{"b": 2}\n{"c":3}', b"hello"]
        assert opened == 2  # 127.0.0.1 twice on one connection, localhost (another origin) once
    finally:
        server.close()


def test_tls_with_the_wrong_ca_fails(pki):
    server = Upstream(_server_context(pki))
    try:
        async def main(context):
            async with with_client(ssl_context=context) as client:
                await client.request("GET", server.url("/hello"))

        with pytest.raises(HTTPError, match="CERTIFICATE_VERIFY_FAILED"):
            run(main(ssl.create_default_context(cafile=str(pki["other"]))))
        with pytest.raises(HTTPError, match="CERTIFICATE_VERIFY_FAILED"):
            run(main(None))  # the system trust store does not know the test CA either
        assert server.requests == []
    finally:
        server.close()


def test_tls_client_certificate(pki):
    server = Upstream(_server_context(pki, require_client=True))
    try:
        async def main(with_cert):
            context = ssl.create_default_context(cafile=str(pki["ca"]))
            if with_cert:
                context.load_cert_chain(pki["client"].cert_path, pki["client"].key_path)
            async with with_client(ssl_context=context) as client:
                return (await client.request("GET", server.url("/hello"))).body

        assert run(main(True)) == b"hello"
        with pytest.raises(HTTPError):
            run(main(False))
    finally:
        server.close()
