"""Local backing services for the test bed (Redis, S3) and the process plumbing they share.

Why: Chaperone's sidecar and operator talk to Redis (approvals, rate state) and to an
S3-compatible store (recordings). Tests must exercise the real protocols, so these run as real
servers: Debian's `redis-server` and moto's S3 server, each a child process on a free loopback
port. They are separate processes (not in-process threads) so fault tests can stop one
mid-session and bring it back on the *same* port, which is what a client reconnect sees in
production.

`ManagedProcess` is also what `controlplane` uses for etcd and kube-apiserver: each process's
output goes to a log file, and any startup failure raises with the tail of that log so a CI
failure is diagnosable from the test report alone.
"""

from __future__ import annotations

import importlib.util
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

__all__ = [
    "TestbedError",
    "ComponentUnavailable",
    "StartupError",
    "ManagedProcess",
    "RedisServer",
    "S3Server",
    "free_port",
    "keep_artifacts",
]

LOOPBACK = "127.0.0.1"


class TestbedError(RuntimeError):
    """Base class for everything the test bed raises on purpose."""

    __test__ = False  # not a pytest test class, despite the name


class ComponentUnavailable(TestbedError):
    """A binary or package the test bed needs is not installed."""


class StartupError(TestbedError):
    """A component was installed but did not come up (the message carries its log tail)."""


def free_port() -> int:
    """A currently free loopback TCP port (the kernel picks it; a small race is accepted)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((LOOPBACK, 0))
        return s.getsockname()[1]


def keep_artifacts() -> bool:
    """CHAPERONE_TESTBED_KEEP=1 keeps temp dirs (logs, certs, data) for post-mortems."""
    return os.environ.get("CHAPERONE_TESTBED_KEEP", "").lower() in ("1", "true", "yes")


def locate_built(env_var: str, build_script: Path, complete: Callable[[Path], bool], what: str,
                 script: Path | str | None = None) -> Path:
    """A directory of binaries a ``hack/`` script builds and caches (control plane, node).

    ``env_var`` wins when it names a directory that is ``complete``; otherwise the build script
    runs (it returns at once when its cache is warm) and the last line it prints is the
    directory. ``build_script`` is relative to the repository, found from this package (source
    tree, editable install) or from the working directory (site-packages with the repo as cwd).
    A missing script or a failed build is :class:`ComponentUnavailable`.
    """
    env_dir = os.environ.get(env_var)
    if env_dir and complete(Path(env_dir)):
        return Path(env_dir)
    found = Path(script) if script else _find_in_repo(build_script)
    if found is None or not found.is_file():
        raise ComponentUnavailable(
            f"{what} not found: set {env_var} to a directory holding them, or run from the "
            f"repository so {build_script} can build them (needs Go)")
    # stderr is inherited: a cold build takes minutes and its progress should be visible.
    res = subprocess.run(["bash", str(found)], stdout=subprocess.PIPE, text=True)
    lines = [ln.strip() for ln in res.stdout.splitlines() if ln.strip()]
    if res.returncode != 0 or not lines or not complete(Path(lines[-1])):
        raise ComponentUnavailable(
            f"{found} failed (exit {res.returncode}) to provide {what}; stdout: {res.stdout[-2000:]!r}")
    return Path(lines[-1])


def _find_in_repo(relative: Path) -> Path | None:
    for start in (Path(__file__).resolve(), Path.cwd().resolve()):
        for d in (start, *start.parents):
            if (d / relative).is_file():
                return d / relative
    return None


def require_binary(name: str, hint: str) -> str:
    path = shutil.which(name)
    if path is None:
        raise ComponentUnavailable(f"`{name}` not found on PATH; install {hint}")
    return path


class ManagedProcess:
    """One child process with its output in a log file and a clean, bounded shutdown."""

    def __init__(
        self,
        name: str,
        argv: Sequence[str | os.PathLike[str]],
        log_path: Path,
        *,
        env: Mapping[str, str] | None = None,
        cwd: Path | None = None,
    ) -> None:
        self.name = name
        self.argv = [str(a) for a in argv]
        self.log_path = Path(log_path)
        self.env = dict(env) if env is not None else None
        self.cwd = cwd
        self.proc: subprocess.Popen | None = None

    def start(self) -> None:
        if self.running:
            return
        # Append, so a restarted process keeps the earlier run's output for the post-mortem.
        with open(self.log_path, "ab") as log:
            log.write(f"\n=== {time.strftime('%H:%M:%S')} start: {' '.join(self.argv)}\n".encode())
            log.flush()
            # Own session: a Ctrl-C in the terminal reaches us, not the children directly, so
            # shutdown order (apiserver before etcd) stays under our control.
            self.proc = subprocess.Popen(
                self.argv, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                env=self.env, cwd=self.cwd, start_new_session=True,
            )

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc else None

    def wait_ready(self, probe: Callable[[], bool], timeout: float, what: str = "ready") -> None:
        """Poll `probe` until it returns True; raise StartupError (with log tail) otherwise."""
        deadline = time.monotonic() + timeout
        delay = 0.05
        while True:
            if self.proc is None or self.proc.poll() is not None:
                code = None if self.proc is None else self.proc.returncode
                raise StartupError(
                    f"{self.name} exited (code {code}) before becoming {what}\n{self.log_tail()}"
                )
            try:
                if probe():
                    return
            except Exception:  # noqa: BLE001 - any probe failure just means "not yet"
                pass
            if time.monotonic() > deadline:
                self.stop()
                raise StartupError(
                    f"{self.name} not {what} after {timeout:.0f}s\n{self.log_tail()}"
                )
            time.sleep(delay)
            delay = min(delay * 1.5, 0.5)

    def stop(self, timeout: float = 10.0) -> None:
        """SIGTERM, then SIGKILL after `timeout`; only ever signals our own child's group."""
        proc, self.proc = self.proc, None
        if proc is None or proc.poll() is not None:
            return
        try:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=5)
        except ProcessLookupError:
            proc.wait(timeout=5)

    def log_tail(self, lines: int = 40) -> str:
        try:
            text = self.log_path.read_text(errors="replace").splitlines()
        except OSError:
            return f"--- {self.name}: no log at {self.log_path}"
        return f"--- last {lines} lines of {self.log_path}:\n" + "\n".join(text[-lines:])


class _Service:
    """A single-process service on a fixed loopback port that survives stop/start cycles."""

    name = "service"

    def __init__(self, *, port: int | None = None, startup_timeout: float = 30.0) -> None:
        self.port = port
        self.startup_timeout = startup_timeout
        self.workdir: Path | None = None
        self._process: ManagedProcess | None = None

    # subclasses fill these in
    def _argv(self) -> list[str]:
        raise NotImplementedError

    def _probe(self) -> bool:
        raise NotImplementedError

    def _check_installed(self) -> None:
        pass

    @property
    def running(self) -> bool:
        return self._process is not None and self._process.running

    @property
    def log_path(self) -> Path | None:
        return self._process.log_path if self._process else None

    def start(self) -> _Service:
        if self.running:
            return self
        self._check_installed()
        if self.workdir is None:
            self.workdir = Path(tempfile.mkdtemp(prefix=f"chaperone-{self.name}-"))
        last: StartupError | None = None
        # A port chosen by the caller or kept from an earlier run is never changed: restarts
        # rely on it. A port we picked ourselves can be taken before the server binds it, so a
        # failed first start moves to a fresh one.
        pinned = self.port is not None
        for attempt in range(3):
            if self.port is None or (attempt and not pinned):
                self.port = free_port()
            proc = ManagedProcess(self.name, self._argv(), self.workdir / f"{self.name}.log")
            proc.start()
            try:
                proc.wait_ready(self._probe, self.startup_timeout)
            except StartupError as exc:
                proc.stop()
                last = exc
                time.sleep(0.3)
                continue
            self._process = proc
            return self
        assert last is not None
        raise last

    def stop(self) -> None:
        """Stop the process but keep port and workdir, so start() comes back on the same port."""
        if self._process is not None:
            self._process.stop()

    def restart(self) -> _Service:
        self.stop()
        return self.start()

    def close(self) -> None:
        """Stop and remove the working directory (unless CHAPERONE_TESTBED_KEEP is set)."""
        self.stop()
        if self.workdir is not None and not keep_artifacts():
            shutil.rmtree(self.workdir, ignore_errors=True)
            self.workdir = None

    def __enter__(self):
        try:
            return self.start()
        except BaseException:
            self.close()
            raise

    def __exit__(self, *exc_info) -> None:
        self.close()


class RedisServer(_Service):
    """`redis-server` without persistence, with AUTH like the chart's Redis.

    `url` (redis://:PASSWORD@127.0.0.1:PORT/0) is what every client of the test bed uses, so
    they all pass the password; `address_url` is the same without it - what an agent knows (the
    pod's network reaches the port, the password is only in the sidecar) - and `password` is
    what the sidecar gets from its Secret. A fresh random password per server.
    """

    name = "redis"

    def __init__(self, *, port: int | None = None, binary: str | None = None,
                 startup_timeout: float = 30.0, password: str | None = None) -> None:
        super().__init__(port=port, startup_timeout=startup_timeout)
        self.binary = binary
        self.password = password if password is not None else secrets.token_hex(16)

    @property
    def address_url(self) -> str:
        return f"redis://{LOOPBACK}:{self.port}/0"

    @property
    def url(self) -> str:
        return f"redis://:{self.password}@{LOOPBACK}:{self.port}/0"

    def _check_installed(self) -> None:
        if self.binary is None:
            self.binary = require_binary(
                "redis-server", "the Debian package `redis-server` (apt-get install redis-server)"
            )

    def _argv(self) -> list[str]:
        assert self.binary and self.workdir
        return [
            self.binary, "--port", str(self.port), "--bind", LOOPBACK,
            # In-memory only: tests must not depend on (or leak) state across runs.
            "--save", "", "--appendonly", "no", "--dir", str(self.workdir),
            "--daemonize", "no", "--protected-mode", "no", "--loglevel", "notice",
            "--requirepass", self.password,
        ]

    def _probe(self) -> bool:
        # Raw RESP, so the readiness check itself does not depend on the redis client package.
        password = self.password.encode()
        with socket.create_connection((LOOPBACK, self.port), timeout=1) as s:
            s.sendall(b"*2\r\n$4\r\nAUTH\r\n$%d\r\n%s\r\n*1\r\n$4\r\nPING\r\n"
                      % (len(password), password))
            reply = b""
            while reply.count(b"\r\n") < 2:
                chunk = s.recv(64)
                if not chunk:
                    break
                reply += chunk
            return reply == b"+OK\r\n+PONG\r\n"


class S3Server(_Service):
    """moto's S3-compatible server in a subprocess (in-memory: a restart loses all objects)."""

    name = "s3"
    access_key = "testing"
    secret_key = "testing"
    region = "us-east-1"

    def __init__(self, *, port: int | None = None, python: str | None = None,
                 startup_timeout: float = 60.0) -> None:
        super().__init__(port=port, startup_timeout=startup_timeout)
        # moto runs under the same interpreter as the tests unless told otherwise.
        self.python = python or sys.executable

    @property
    def endpoint_url(self) -> str:
        return f"http://{LOOPBACK}:{self.port}"

    def client_kwargs(self) -> dict[str, str]:
        """Keyword arguments for boto3.client("s3", **kwargs)."""
        return {
            "endpoint_url": self.endpoint_url,
            "aws_access_key_id": self.access_key,
            "aws_secret_access_key": self.secret_key,
            "region_name": self.region,
        }

    def env(self) -> dict[str, str]:
        """Environment for a process that should use this server through the AWS SDK."""
        return {
            "AWS_ENDPOINT_URL_S3": self.endpoint_url,
            "AWS_ACCESS_KEY_ID": self.access_key,
            "AWS_SECRET_ACCESS_KEY": self.secret_key,
            "AWS_DEFAULT_REGION": self.region,
        }

    def _check_installed(self) -> None:
        if self.python == sys.executable and (
            importlib.util.find_spec("moto") is None or importlib.util.find_spec("flask") is None
        ):
            raise ComponentUnavailable(
                "moto's S3 server is not installed in this Python; pip install 'moto[server]'"
            )

    def _argv(self) -> list[str]:
        return [self.python, "-m", "moto.server", "-H", LOOPBACK, "-p", str(self.port)]

    def _probe(self) -> bool:
        try:
            with urllib.request.urlopen(self.endpoint_url + "/", timeout=2) as resp:
                return resp.status < 500
        except urllib.error.HTTPError as exc:  # an HTTP answer of any kind means it is serving
            return exc.code < 500
