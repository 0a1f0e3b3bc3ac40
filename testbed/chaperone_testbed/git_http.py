"""A real git smart-HTTP server for tests: ``git http-backend`` (CGI) behind a small HTTPS server.

Each request runs Debian's ``git http-backend`` as a CGI program (``GIT_PROJECT_ROOT`` = the
server's root, ``GIT_HTTP_EXPORT_ALL``, ``http.receivepack`` on and ``REMOTE_USER`` set, so
pushes are accepted), with the request body - ``Transfer-Encoding: chunked`` de-chunked, any
``Content-Encoding`` passed on for http-backend to inflate as it does behind Apache - on its
stdin; its CGI headers (``Status:``) become the HTTP response. Every request is remembered
(method, path, body size) so tests can tell what reached the server and what did not.

Also :func:`git_env` (an environment for the real ``git`` client: no system or user config, no
prompts, a proxy and a CA bundle) and :func:`bare_repo`.
"""

from __future__ import annotations

import os
import shutil
import ssl
import subprocess
import sys
import threading
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from .pki import CertAuthority

__all__ = ["GitHTTPServer", "Seen", "git_bin", "git_env", "bare_repo", "run_git"]


def git_bin() -> str:
    """The ``git`` binary; a missing one is an error (Debian package ``git``, Makefile)."""
    found = shutil.which("git")
    if not found:
        raise RuntimeError("git is not installed (Debian package git, in the Makefile's APT_PACKAGES)")
    return found


@dataclass(frozen=True)
class Seen:
    method: str
    path: str
    body_bytes: int
    headers: dict[str, str]


class _Server(ThreadingHTTPServer):
    daemon_threads = True

    def handle_error(self, request: Any, client_address: Any) -> None:
        if isinstance(sys.exc_info()[1], (ConnectionError, ssl.SSLError, TimeoutError)):
            return
        super().handle_error(request, client_address)


class GitHTTPServer:
    """``git http-backend`` over HTTPS (its own CA, ``ca_file``) on ``host:port``.

    ``host``: another loopback address (127.0.0.2) keeps it out of an agent's ``NO_PROXY``
    (localhost, 127.0.0.1), so the agent's git goes through the sidecar.
    """

    def __init__(self, root: Path, certs: Path, *, names: tuple[str, ...] = ("localhost",),
                 host: str = "127.0.0.1"):
        self.host = host
        self.root = root
        root.mkdir(parents=True, exist_ok=True)
        certs.mkdir(parents=True, exist_ok=True)
        self.ca = CertAuthority("chaperone-git-upstream")
        self.ca_file = self.ca.write_cert(certs / "git-ca.crt")
        pair = self.ca.write_server_cert(certs, "git", dns_names=names, ip_addresses=(host,))
        self.seen: list[Seen] = []
        git = git_bin()
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def _body(self) -> bytes:
                if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
                    out = bytearray()
                    while True:
                        size = int(self.rfile.readline().split(b";")[0].strip(), 16)
                        if size == 0:
                            while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                                pass
                            return bytes(out)
                        out += self.rfile.read(size)
                        self.rfile.readline()
                length = int(self.headers.get("Content-Length") or 0)
                return self.rfile.read(length) if length else b""

            def _serve(self) -> None:
                body = self._body()
                path, _, query = self.path.partition("?")
                server.seen.append(Seen(self.command, path, len(body),
                                        {k.lower(): v for k, v in self.headers.items()}))
                env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"),
                       "GIT_PROJECT_ROOT": str(server.root), "GIT_HTTP_EXPORT_ALL": "1",
                       "GIT_CONFIG_NOSYSTEM": "1", "HOME": str(server.root),
                       "GIT_CONFIG_COUNT": "1", "GIT_CONFIG_KEY_0": "http.receivepack",
                       "GIT_CONFIG_VALUE_0": "true",
                       "REQUEST_METHOD": self.command, "PATH_INFO": path, "QUERY_STRING": query,
                       "CONTENT_TYPE": self.headers.get("Content-Type", ""),
                       "CONTENT_LENGTH": str(len(body)), "REMOTE_USER": "agent",
                       "REMOTE_ADDR": self.client_address[0], "GATEWAY_INTERFACE": "CGI/1.1",
                       "SERVER_PROTOCOL": "HTTP/1.1"}
                for name in ("Content-Encoding", "Git-Protocol"):
                    if name in self.headers:
                        env["HTTP_" + name.upper().replace("-", "_")] = self.headers[name]
                proc = subprocess.run([git, "http-backend"], input=body, env=env,
                                      capture_output=True, timeout=60, check=False)
                head, sep, content = proc.stdout.partition(b"\r\n\r\n")
                if not sep:
                    head, sep, content = proc.stdout.partition(b"\n\n")
                status, headers = 200, []
                for line in head.decode("latin-1").splitlines():
                    key, _, value = line.partition(":")
                    if key.lower() == "status":
                        status = int(value.split()[0])
                    elif key:
                        headers.append((key, value.strip()))
                if proc.returncode and not sep:
                    status, content = 500, proc.stderr
                self.send_response(status)
                for key, value in headers:
                    self.send_header(key, value)
                self.send_header("Content-Length", str(len(content)))
                self.end_headers()
                self.wfile.write(content)

            do_GET = do_POST = _serve

            def log_message(self, *args: Any) -> None:
                pass

        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(pair.cert_path, pair.key_path)
        self.server = _Server((host, 0), Handler)
        self.server.socket = context.wrap_socket(self.server.socket, server_side=True)
        self.port = self.server.socket.getsockname()[1]
        threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.05},
                         daemon=True).start()

    def url(self, repo: str, host: str = "localhost") -> str:
        return f"https://{host}:{self.port}/{repo}"

    def posts(self, suffix: str = "/git-receive-pack", since: int = 0) -> list[Seen]:
        """POSTs to ``...suffix`` that reached the server (since the ``since``-th request)."""
        return [s for s in self.seen[since:] if s.method == "POST" and s.path.endswith(suffix)]

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def git_env(home: Path, *, proxy: str = "", ca_file: str | Path = "") -> dict[str, str]:
    """The real git client's environment: a fresh HOME, no system config, no prompts."""
    home.mkdir(parents=True, exist_ok=True)
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": str(home),
           "GIT_CONFIG_NOSYSTEM": "1", "GIT_TERMINAL_PROMPT": "0", "LANG": "C", "LC_ALL": "C",
           "GIT_AUTHOR_NAME": "Agent", "GIT_AUTHOR_EMAIL": "agent@example.com",
           "GIT_COMMITTER_NAME": "Agent", "GIT_COMMITTER_EMAIL": "agent@example.com"}
    if proxy:
        env["https_proxy"] = env["HTTPS_PROXY"] = proxy
    if ca_file:
        env["GIT_SSL_CAINFO"] = str(ca_file)
    return env


def run_git(args: list[str], env: dict[str, str], cwd: Path | None = None,
            timeout: float = 120) -> subprocess.CompletedProcess:
    """``git ARGS`` (never raises on a git failure: tests read returncode and stderr)."""
    return subprocess.run([git_bin(), *args], env=env, cwd=cwd, capture_output=True, text=True,
                          timeout=timeout, check=False)


def bare_repo(root: Path, name: str, env: dict[str, str], *, branch: str = "main") -> Path:
    """An empty bare repository ``root/name`` whose HEAD is ``branch``."""
    path = root / name
    out = run_git(["init", "--bare", "-q", "-b", branch, str(path)], env)
    if out.returncode:
        raise RuntimeError(out.stderr)
    return path
