"""Path spellings and method overrides against a real sidecar process and a real CPython server.

Issue 11, items 7 and 8. The upstream is CPython's own ``http.server`` (``SimpleHTTPRequestHandler``
serving a directory that holds a file ``admin``), which - like nginx - serves ``//admin``,
``/x/../admin`` and ``/%2e%2e/%61dmin`` as ``/admin``; its ``do_POST`` honours
``X-HTTP-Method-Override``/``X-HTTP-Method``/``X-Method-Override``/``_method`` the way Rails,
Laravel or Express' method-override do. The sidecar is the real ``chaperone proxy`` process
(standalone: its connections and policies from files), the client a raw socket, so every byte
of the request line is the test's (no client library normalises the path first).

The policy allows everything but ``/admin`` and ``DELETE``. Every spelling is either refused
(400 ``invalid_request``) or judged as ``/admin`` (403 ``blocked``); none ever reaches the file.
The controls show each spelling *does* reach ``/admin`` when sent to the upstream directly.
"""

from __future__ import annotations

import json
import socket
import threading
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qsl, urlsplit

import pytest
import yaml

from .pod import API, standalone_proxy

SECRET = b"the admin console: TOP SECRET"

# Spellings the upstream itself serves as /admin (checked by test_the_controls_reach_admin).
SAME_AS_ADMIN = ["/admin", "//admin", "///admin", "/./admin", "/x/../admin", "/%2e%2e/admin",
                 "/%2E%2E/%61dmin", "/%61dmin", "/x/%2e%2e/admin", "/x%2F..%2Fadmin",
                 "/%2Fadmin", "/x/..%2Fadmin", "/.%2e/admin"]
# Ambiguous between servers: the sidecar refuses them whatever this upstream would do.
AMBIGUOUS = ["/admin;x=1", "/x/..;/admin", "/%252Fadmin", "/admin.", "/admin%20", "/admin%2e",
             "/admin\\", "/x\\..\\admin", "/x%5C..%5Cadmin", "/admin%00", "/admin%0d%0aX:%20y",
             "/adm%in", "/%25%36%31dmin", "/admin#/../public"]
CASE = ["/ADMIN", "/Admin", "/aDmIn"]


class Upstream:
    """CPython's ``http.server`` serving ``root``; records what each request resolved to."""

    def __init__(self, root: Path):
        root.mkdir(parents=True, exist_ok=True)
        (root / "admin").write_bytes(SECRET)
        (root / "public").write_bytes(b"public page")
        self.admin = str(root / "admin")
        self.served: list[tuple[str, str, str]] = []  # (effective method, raw path, file)
        upstream = self

        class Handler(SimpleHTTPRequestHandler):
            def __init__(self, *args, **kwargs):
                super().__init__(*args, directory=str(root), **kwargs)

            def send_head(self):
                upstream.served.append((self.command, self.path, self.translate_path(self.path)))
                return super().send_head()

            def do_POST(self):
                # What method-override middleware does: the override decides the method.
                query = dict(parse_qsl(urlsplit(self.path).query))
                length = int(self.headers.get("Content-Length") or 0)
                form = dict(parse_qsl(self.rfile.read(length).decode()))  # Rails reads the form first
                override = (form.get("_method") or self.headers.get("X-HTTP-Method-Override")
                            or self.headers.get("X-HTTP-Method") or self.headers.get("X-Method-Override")
                            or query.get("_method") or "POST")
                self.command = override.upper()
                upstream.served.append((self.command, self.path, self.translate_path(self.path)))
                body = json.dumps({"method": self.command}).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.port = self.server.server_address[1]
        threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.05},
                         daemon=True).start()

    def admin_hits(self, since: int = 0) -> list[tuple[str, str, str]]:
        return [s for s in self.served[since:] if s[2] == self.admin]

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def raw_request(port: int, target: str, method: str = "GET", host: str = "",
                headers: tuple[tuple[str, str], ...] = (), body: bytes = b"") -> tuple[int, bytes]:
    """One HTTP/1.1 request, the request line exactly as given, to ``127.0.0.1:port``."""
    lines = [f"{method} {target} HTTP/1.1", f"Host: {host or urlsplit(target).netloc}",
             "Connection: close", f"Content-Length: {len(body)}"]
    lines += [f"{k}: {v}" for k, v in headers]
    data = ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body
    with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
        sock.sendall(data)
        chunks = []
        while chunk := sock.recv(65536):
            chunks.append(chunk)
    response = b"".join(chunks)
    head, _, content = response.partition(b"\r\n\r\n")
    return int(head.split(b" ", 2)[1]), content


@pytest.fixture(scope="module")
def proxy(tmp_path_factory):
    root = tmp_path_factory.mktemp("canonical")
    upstream = Upstream(root / "www")
    conf = root / "conf"
    for sub in ("connections", "policies"):
        (conf / sub).mkdir(parents=True)
    (conf / "chaperone.yaml").write_text(yaml.safe_dump({"namespace": "laptop", "user": "dana"}))
    connections = {
        # the default: paths canonical, ambiguity refused, overrides stripped
        "site": {"type": "http", "hosts": ["127.0.0.1"], "credentials": {"source": "none"}},
        # the same server by another name, declared case-insensitive and honouring overrides
        "legacy": {"type": "http", "hosts": ["localhost"], "credentials": {"source": "none"},
                   "methodOverride": "honor", "pathNormalization": {"caseInsensitive": True}},
    }
    for name, spec in connections.items():
        (conf / "connections" / f"{name}.yaml").write_text(yaml.safe_dump(
            {"apiVersion": API, "kind": "ClaudeConnection", "metadata": {"name": name}, "spec": spec}))
    (conf / "policies" / "p.yaml").write_text(yaml.safe_dump(
        {"apiVersion": API, "kind": "AccessPolicy", "metadata": {"name": "guard"},
         "spec": {"defaultEffect": "allow", "rules": [
             {"name": "no-admin", "match": {"paths": ["/admin", "/admin/*"]},
              "block": {"message": "the admin console is off limits"}},
             {"name": "no-deletes", "match": {"methods": ["DELETE"]},
              "block": {"message": "agents never delete"}}]}}))
    try:
        with standalone_proxy(conf, root / "proxy.log") as proxy:
            port = proxy.port
            yield port, upstream
    finally:
        upstream.close()


def _refusal(status: int, content: bytes) -> dict:
    body = json.loads(content)
    assert body["error"].startswith("chaperone_"), body
    return body


def test_the_controls_reach_admin(proxy):
    """Straight to the upstream, every spelling serves the admin file: they are real bypasses."""
    _, upstream = proxy
    for path in SAME_AS_ADMIN:
        status, content = raw_request(upstream.port, path, host=f"127.0.0.1:{upstream.port}")
        assert (status, content) == (200, SECRET), path
    status, _ = raw_request(upstream.port, "/public", host=f"127.0.0.1:{upstream.port}")
    assert status == 200


def test_no_spelling_of_admin_gets_through(proxy):
    port, upstream = proxy
    base = f"http://127.0.0.1:{upstream.port}"
    before = len(upstream.served)
    outcomes = {}
    for path in SAME_AS_ADMIN + AMBIGUOUS + CASE:
        status, content = raw_request(port, base + path)
        assert content != SECRET, path
        outcomes[path] = status
        if status == 403:
            body = _refusal(status, content)
            assert body["error"] == "chaperone_blocked" and body["rule"]["name"] == "no-admin", body
        elif status == 400:
            body = _refusal(status, content) if content.startswith(b"{") else {}
            if body:
                assert body["error"] == "chaperone_invalid_request", body
                assert "ambiguous" in body["message"], body
    assert upstream.admin_hits(before) == [], upstream.admin_hits(before)
    # The canonical spellings are judged as /admin; the ambiguous ones never leave the sidecar.
    for path in SAME_AS_ADMIN:
        assert outcomes[path] in (400, 403), (path, outcomes[path])
        if "%2F" not in path:
            assert outcomes[path] == 403, (path, outcomes[path])
    for path in AMBIGUOUS:
        assert outcomes[path] == 400, (path, outcomes[path])
    # What reached the upstream at all: only the case variants (a case-sensitive connection),
    # which this server answers with 404 - a different file, not the admin console.
    reached = {s[1] for s in upstream.served[before:]}
    assert reached <= set(CASE), reached
    assert {outcomes[p] for p in CASE} == {404}


def test_the_canonical_path_is_what_the_upstream_receives(proxy):
    port, upstream = proxy
    before = len(upstream.served)
    status, content = raw_request(port, f"http://127.0.0.1:{upstream.port}//x/../%70ublic?a=1")
    assert (status, content) == (200, b"public page")
    assert [s[1] for s in upstream.served[before:]] == ["/public?a=1"]


def test_case_insensitive_connection_judges_every_case_as_admin(proxy):
    port, upstream = proxy
    before = len(upstream.served)
    for path in CASE:
        status, content = raw_request(port, f"http://localhost:{upstream.port}{path}")
        assert status == 403 and _refusal(status, content)["rule"]["name"] == "no-admin", path
    assert upstream.served[before:] == []


@pytest.mark.parametrize("override", [
    {"headers": (("X-HTTP-Method-Override", "DELETE"),)},
    {"headers": (("X-HTTP-Method", "delete"),)},
    {"headers": (("X-Method-Override", "DELETE"),)},
    {"query": "?_method=DELETE"},
    {"query": "?a=1&%5Fmethod=DELETE"},
    {"headers": (("x-http-method-override", "DELETE"), ("X-HTTP-Method-Override", "DELETE"))},
    {"query": "?a=1;_method=DELETE"},
    {"form": b"a=1&_method=DELETE"},
], ids=["x-http-method-override", "x-http-method", "x-method-override", "_method", "encoded-_method",
        "repeated", "semicolon-_method", "form-_method"])
def test_no_override_turns_an_allowed_post_into_a_delete(proxy, override):
    port, upstream = proxy
    path = "/public" + override.get("query", "")
    headers = override.get("headers", ())
    body = override.get("form", b"{}")
    if "form" in override:
        headers = (("Content-Type", "application/x-www-form-urlencoded"),)
    # Control: the upstream honours the override.
    status, content = raw_request(upstream.port, path, "POST", f"127.0.0.1:{upstream.port}", headers, body)
    if ";" not in override.get("query", ""):  # this server splits on "&" only (Rack 2 also on ";")
        assert status == 200 and json.loads(content) == {"method": "DELETE"}
    before = len(upstream.served)
    # Default connection: the overrides are stripped, the upstream executes the judged POST.
    status, content = raw_request(port, f"http://127.0.0.1:{upstream.port}{path}", "POST", "", headers, body)
    assert status == 200 and json.loads(content) == {"method": "POST"}, content
    # Honouring connection: judged as the DELETE it is, and blocked.
    status, content = raw_request(port, f"http://localhost:{upstream.port}{path}", "POST", "", headers, body)
    assert status == 403 and _refusal(status, content)["rule"]["name"] == "no-deletes", content
    assert [s[0] for s in upstream.served[before:]] == ["POST"]
