"""The paths a request can take to the upstream: start, wait until ready, stop.

=====================  ======================================================================
direct                 no proxy: the client talks to the upstream itself
mitmdump               bare mitmproxy, the venv's ``mitmdump`` (same version as Chaperone's),
                       no scripts: ``-q``, listen address, ``confdir`` (the shared interception
                       CA), the upstream CA, ``stream_large_bodies=1m`` (Chaperone's value,
                       so the 1 GiB download streams in both instead of being buffered whole)
chaperone-minimal      ``chaperone proxy``: allow-all policy, no recording, no masking
chaperone-full         50-rule policy, masking on, recording to S3, OpenTelemetry SDK on
\\*-asyncio             the same on the standard asyncio loop (``CHAPERONE_EVENT_LOOP=asyncio``);
                       without the suffix Chaperone runs as shipped: uvloop
chaperone-full-        the full profile minus one feature (``recording``, ``masking``,
without-F              ``telemetry``): the ablation that says what each feature costs
squid                  Debian's Squid 5.7 (``squid-openssl``) with ssl-bump, the C peer
=====================  ======================================================================

All proxies intercept TLS with one shared CA (:func:`interception_ca`; mitmproxy's format), so
the client trusts the same two files on every path. Each proxy runs pinned to ``Env.proxy_cpus``
(when the machine has a core to spare), the client and the upstream on the other cores: the
proxy's CPU is then what it costs, not what it wins from the load generator.

Squid needs (5.7): ``ssl_bump peek step1`` / ``stare step2`` / ``bump all`` so the minted
certificate mimics the upstream's (its IP SAN included: the client addresses 127.0.0.1 and
sends no SNI), a certificate DB made by ``security_file_certgen -c``, the upstream CA in
``tls_outgoing_options cafile=``, and ``sslproxy_cert_error allow`` limited to
``SQUID_X509_V_ERR_DOMAIN_MISMATCH`` (Squid matches an IP host against DNS names only).
"""

from __future__ import annotations

import os
import pwd
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from chaperone_testbed.services import free_port

from . import chaperone_config

__all__ = ["Env", "ProxyPath", "Direct", "Mitmdump", "Chaperone", "Squid", "make_path", "PATH_NAMES",
           "interception_ca", "SQUID", "CERTGEN"]

REPO = Path(__file__).resolve().parent.parent
SQUID = shutil.which("squid") or ("/usr/sbin/squid" if Path("/usr/sbin/squid").exists() else None)
CERTGEN = next((p for p in ("/usr/lib/squid/security_file_certgen", "/usr/lib64/squid/security_file_certgen")
                if Path(p).exists()), None)
MITMDUMP = Path(sys.executable).with_name("mitmdump")


def interception_ca(directory: Path) -> Path:
    """A CA in mitmproxy's confdir format (``mitmproxy-ca.pem`` = key + cert) under ``directory``."""
    from mitmproxy.certs import CertStore

    directory.mkdir(parents=True, exist_ok=True)
    CertStore.from_store(directory, "mitmproxy", 2048)
    return directory


@dataclass
class Env:
    """What every path of one run shares."""

    workdir: Path
    upstream: Any  # bench.upstream.Upstream
    ca_dir: Path  # interception CA (mitmproxy confdir layout)
    s3: Any = None  # chaperone_testbed.S3Server, for chaperone-full
    s3_bucket: str = "chaperone-bench"
    proxy_cpus: set[int] | None = None
    extra_env: dict[str, str] = field(default_factory=dict)

    @property
    def client_cafiles(self) -> list[Path]:
        return [self.upstream.ca_file, self.ca_dir / "mitmproxy-ca-cert.pem"]


def _port_open(port: int) -> bool:
    with socket.socket() as sock:
        sock.settimeout(0.3)
        return sock.connect_ex(("127.0.0.1", port)) == 0


class ProxyPath:
    """Base class: a named path; ``proxy`` is the URL clients use (None: direct)."""

    name = "?"
    label = "?"

    def __init__(self) -> None:
        self.proc: subprocess.Popen | None = None
        self.port = 0
        self.dir: Path | None = None
        self.log: Path | None = None

    @property
    def proxy(self) -> str | None:
        return f"http://127.0.0.1:{self.port}" if self.port else None

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc is not None else None

    def start(self, env: Env, timeout: float = 60.0) -> ProxyPath:
        raise NotImplementedError

    def _spawn(self, argv: list[str], env: Env, extra: dict[str, str] | None = None,
               cwd: Path | None = None) -> None:
        assert self.dir is not None
        self.log = self.dir / f"{self.name}.log"
        cpus = env.proxy_cpus
        child_env = {k: v for k, v in os.environ.items()
                     if k.lower() not in ("http_proxy", "https_proxy", "all_proxy", "no_proxy")}
        child_env.update(env.extra_env)
        child_env.update(extra or {})
        self.proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=self.log.open("wb"),
                                     env=child_env, cwd=str(cwd or self.dir), start_new_session=True,
                                     preexec_fn=(lambda: os.sched_setaffinity(0, cpus)) if cpus else None)

    def _wait(self, ready, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc is not None and self.proc.poll() is not None:
                break
            try:
                if ready():
                    return
            except OSError:
                pass
            time.sleep(0.05)
        tail = self.logs()
        self.stop()
        raise RuntimeError(f"{self.name} did not become ready within {timeout:.0f}s:\n{tail}")

    def logs(self) -> str:
        return self.log.read_text(errors="replace")[-4000:] if self.log and self.log.exists() else ""

    def stop(self, timeout: float = 20.0) -> int | None:
        """SIGTERM, then SIGKILL after ``timeout``; returns the exit code."""
        if self.proc is None:
            return None
        proc, self.proc = self.proc, None
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        self.port = 0
        return proc.returncode


class Direct(ProxyPath):
    name, label = "direct", "direct (no proxy)"

    def start(self, env: Env, timeout: float = 60.0) -> Direct:
        return self


class Mitmdump(ProxyPath):
    name, label = "mitmdump", "bare mitmproxy"

    def start(self, env: Env, timeout: float = 60.0) -> Mitmdump:
        self.dir = env.workdir / self.name
        shutil.rmtree(self.dir, ignore_errors=True)
        shutil.copytree(env.ca_dir, self.dir / "confdir")
        self.port = free_port()
        self._spawn([str(MITMDUMP), "-q", "--listen-host", "127.0.0.1", "--listen-port", str(self.port),
                     "--set", f"confdir={self.dir / 'confdir'}",
                     "--set", f"ssl_verify_upstream_trusted_ca={env.upstream.ca_file}",
                     "--set", "stream_large_bodies=1m"], env)
        self._wait(lambda: _port_open(self.port), timeout)
        return self


class Chaperone(ProxyPath):
    """``chaperone proxy`` through bench/chaperone_proc.py (``profile``: minimal | full)."""

    def __init__(self, profile: str, loop: str = "uvloop", without: tuple[str, ...] = (),
                 root: Path | None = None) -> None:
        super().__init__()
        self.profile, self.loop, self.without = profile, loop, tuple(without)
        # Another checkout's sidecar (bench/ab.py: "before" next to "after" in one run)
        self.root = Path(root) if root is not None else REPO
        self.name = f"chaperone-{profile}" + "".join(f"-without-{w}" for w in self.without) + (
            "-asyncio" if loop == "asyncio" else "")
        self.label = f"Chaperone {profile}" + "".join(f" without {w}" for w in self.without) + (
            " (asyncio loop)" if loop == "asyncio" else "")
        self.health_port = 0

    def start(self, env: Env, timeout: float = 60.0) -> Chaperone:
        self.dir = env.workdir / self.name
        shutil.rmtree(self.dir, ignore_errors=True)
        self.dir.mkdir(parents=True)
        conf = chaperone_config.write_config(self.dir / "config", self.profile, upstream_ca=env.upstream.ca_file,
                                             interception_ca_dir=env.ca_dir, without=self.without)
        self.port, self.health_port = free_port(), free_port()
        extra = {"PYTHONPATH": os.pathsep.join(str(self.root / p) for p in ("sidecar", "operator", "testbed", ""))}
        if self.profile == "full":
            if env.s3 is None:
                raise RuntimeError("chaperone-full records to S3: start the S3 test server first")
            extra.update(BENCH_S3_BUCKET=env.s3_bucket, BENCH_S3_PREFIX=f"{self.name}/",
                         BENCH_S3_ENDPOINT=env.s3.endpoint_url, BENCH_S3_REGION=env.s3.region,
                         BENCH_S3_ACCESS_KEY=env.s3.access_key, BENCH_S3_SECRET_KEY=env.s3.secret_key,
                         BENCH_OTLP_ENDPOINT=env.upstream.otlp_endpoint)
        self._spawn([sys.executable, str(self.root / "bench" / "chaperone_proc.py"), "--profile", self.profile,
                     "--loop", self.loop, "--config-dir", str(conf), "--port", str(self.port),
                     "--health-port", str(self.health_port)] + [f"--without={w}" for w in self.without], env, extra)

        def ready() -> bool:
            url = f"http://127.0.0.1:{self.health_port}/ready"
            with urllib.request.urlopen(url, timeout=1) as resp:
                return resp.status == 200

        self._wait(ready, timeout)
        return self


class Squid(ProxyPath):
    name, label = "squid", "Squid ssl-bump"

    def _config(self) -> str:
        assert self.dir is not None and CERTGEN is not None
        d = self.dir
        return f"""# generated by bench/paths.py
http_port 127.0.0.1:{self.port} ssl-bump tls-cert={d / 'ca-cert.pem'} tls-key={d / 'ca.pem'} generate-host-certificates=on dynamic_cert_mem_cache_size=16MB
sslcrtd_program {CERTGEN} -s {d / 'ssl_db'} -M 16MB
sslcrtd_children 4 startup=1 idle=1
acl step1 at_step SslBump1
acl step2 at_step SslBump2
ssl_bump peek step1
ssl_bump stare step2
ssl_bump bump all
tls_outgoing_options cafile={d / 'upstream-ca.crt'}
acl ip_host_names ssl_error SQUID_X509_V_ERR_DOMAIN_MISMATCH
sslproxy_cert_error allow ip_host_names
sslproxy_cert_error deny all
acl bench_clients src 127.0.0.1/32
http_access allow bench_clients
http_access deny all
cache deny all
cache_mem 0 MB
access_log none
cache_store_log none
cache_log {d / 'cache.log'}
pid_filename {d / 'squid.pid'}
coredump_dir {d}
pinger_enable off
workers 1
visible_hostname chaperone-bench
shutdown_lifetime 0 seconds
max_filedescriptors 4096
"""

    def start(self, env: Env, timeout: float = 60.0) -> Squid:
        if SQUID is None or CERTGEN is None:
            raise RuntimeError("squid is not installed (Debian: apt-get install squid-openssl)")
        # Its own directory outside the run's (0700) work dir: Squid and its helpers run as
        # the unprivileged cache_effective_user and must reach every file they use.
        self.dir = Path(tempfile.mkdtemp(prefix="chaperone-bench-squid-"))
        shutil.copy(env.ca_dir / "mitmproxy-ca-cert.pem", self.dir / "ca-cert.pem")
        shutil.copy(env.ca_dir / "mitmproxy-ca.pem", self.dir / "ca.pem")
        shutil.copy(env.upstream.ca_file, self.dir / "upstream-ca.crt")
        self.port = free_port()
        res = subprocess.run([CERTGEN, "-c", "-s", str(self.dir / "ssl_db"), "-M", "16MB"],
                             capture_output=True, text=True, timeout=60)
        if res.returncode != 0:
            raise RuntimeError(f"security_file_certgen -c failed: {res.stderr}")
        conf = self.dir / "squid.conf"
        conf.write_text(self._config())
        if os.geteuid() == 0:  # Squid drops root for its cache_effective_user (proxy)
            user = pwd.getpwnam("proxy")
            for path in [self.dir, *self.dir.rglob("*")]:
                os.chown(path, user.pw_uid, user.pw_gid)
        check = subprocess.run([SQUID, "-k", "parse", "-f", str(conf)], capture_output=True, text=True, timeout=60)
        if check.returncode != 0:
            raise RuntimeError(f"squid -k parse failed:\n{check.stderr[-3000:]}")
        self._spawn([SQUID, "-N", "-f", str(conf)], env)
        self._wait(lambda: _port_open(self.port), timeout)
        return self

    def logs(self) -> str:
        text = super().logs()
        cache_log = self.dir / "cache.log" if self.dir else None
        if cache_log and cache_log.exists():
            text += "\n--- cache.log\n" + cache_log.read_text(errors="replace")[-4000:]
        return text

    def stop(self, timeout: float = 20.0) -> int | None:
        code = super().stop(timeout)
        if self.dir is not None and self.dir.name.startswith("chaperone-bench-squid-"):
            shutil.rmtree(self.dir, ignore_errors=True)
        return code


PATH_NAMES = ("direct", "mitmdump", "chaperone-minimal", "chaperone-full", "chaperone-minimal-asyncio",
              "chaperone-full-asyncio", "squid")


def make_path(name: str) -> ProxyPath:
    """A fresh path object for one of :data:`PATH_NAMES`."""
    if name == "direct":
        return Direct()
    if name == "mitmdump":
        return Mitmdump()
    if name == "squid":
        return Squid()
    if name.startswith("chaperone-"):
        parts = name.split("-")
        loop = "asyncio" if parts[-1] == "asyncio" else "uvloop"
        without = tuple(parts[i + 1] for i, part in enumerate(parts) if part == "without")
        if parts[1] not in ("minimal", "full") or (without and parts[1] != "full") or \
                not set(without) <= set(chaperone_config.FEATURES):
            raise ValueError(f"unknown path {name!r}")
        return Chaperone(parts[1], loop, without)
    raise ValueError(f"unknown path {name!r}; known: {', '.join(PATH_NAMES)}")
