"""Run the sidecar: a lean mitmproxy master with Chaperone's addons, built programmatically.

Start-up, in order (``ProxyRuntime.run``):

1. JSON logging at ``CHAPERONE_LOG_LEVEL``; the health server on ``--health-port`` answers
   ``GET /ready`` with 503 from the first moment (the kubelet's startup probe is waiting), and
   ``GET /metrics`` with the Prometheus exposition (:mod:`.telemetry_setup`).
2. Services (:func:`~.services.build_services`): sources are started and the first snapshot
   awaited - listeners come up only once the connections and policies are known, otherwise the
   first agent requests would be refused as "no connection". (The Record addon starts the
   recorder in mitmproxy's ``running`` hook and closes it in ``done``.)
3. The mitmproxy master with the lean core addons below plus Chaperone's (``build_addons``),
   options set from the config; ``/ready`` turns 200 once every listener accepts connections.
4. SIGTERM/SIGINT: the master stops (its ``done`` hook: Record closes the session - ``session-end``,
   last chunk, manifest), then the services close in reverse order.

Listeners (mitmproxy modes; loopback only, as docs/injection.md 5.1 requires - another pod
reaching them would use this pod's credentials):

* ``--mode explicit``: ``regular@127.0.0.1:PORT`` (and ``[::1]`` when the host has IPv6 loopback)
* ``--mode transparent``: ``transparent@127.0.0.1:PORT`` (and ``::1``); the iptables REDIRECT of
  the init container rewrites destinations to exactly these addresses - for *every* outbound
  TCP connection of the agents, any port, any address. Route judges those that carry HTTP(S)
  on their original port; the ``Egress`` addon records those that never do (nothing of them
  is forwarded).
* per connection with ``baseURL`` and a reverse port: ``reverse:<scheme://host:port>@127.0.0.1:RPORT``.
  Reverse listeners follow the snapshot: a changed ``baseURL`` re-targets its listener.

The lean master - ``mitmproxy.addons.default_addons()`` brings ~30 addons for an interactive
tool (playback, scripts, map-local, save, browser, onboarding...), each of which adds options,
commands or hooks on every flow. The sidecar loads only what proxying needs:

===================  ========================================================================
core.Core            option validation and the core commands other addons rely on
proxyserver          the listeners (``mode``) and upstream connections
next_layer           protocol detection (TLS, HTTP/1, HTTP/2, reverse/explicit/transparent)
tlsconfig            interception certificates from ``confdir`` and upstream verification
disable_h2c          strips ``Upgrade: h2c``: cleartext HTTP/2 upgrades would leave the HTTP
                     layer (and so every policy hook)
===================  ========================================================================

Not loaded, on purpose: ``dns_resolver``/``strip_dns_https_records`` (no DNS mode),
``keepserving`` and ``readfile`` (no flow files), ``errorcheck`` (it ``sys.exit``s on any
error log line; readiness is checked explicitly instead), ``termlog``/``dumper`` (JSON logging
instead), ``block`` (listeners are loopback-only), ``update_alt_svc`` (Route removes
``Alt-Svc`` altogether so clients never learn a QUIC route around the proxy).

Options: ``connection_strategy=lazy`` (no upstream contact before the policy decided),
``upstream_cert=False`` (leaf certificates from SNI/host alone, for the same reason),
``rawtcp=False`` (unknown protocols go to the HTTP layer and fail there; Route also kills
raw TCP/UDP/DNS flows), ``stream_large_bodies`` = the larger of ``READ_LIMIT`` (64 MiB) and
the config's streaming size: Chaperone streams bodies above its own size (1 MiB) itself
(Route, ``addons/streaming.py``), so mitmproxy never streams a body an addon chose to read and
judge first; ``confdir`` = the CA directory
(``mitmproxy-ca.pem``; generated there on first run in standalone mode), and
``ssl_verify_upstream_trusted_ca`` = a bundle of certifi's and the system's CAs plus every
connection's ``upstreamCA`` file, rewritten under a new name when any of them changes.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import signal
import socket
import ssl
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from . import helper_threads, http11_server, startup_memory
from .config import SidecarConfig
from .log_setup import configure_logging
from .postgres.server import PostgresListeners
from .routing import base_url_parts
from .services import SidecarServices, build_services
from .snapshot import Snapshot
from .telemetry_setup import prometheus_exposition

__all__ = ["ProxyRuntime", "lean_core_addons", "listen_modes", "build_trust_bundle", "run",
           "event_loop_factory"]

log = logging.getLogger("chaperone.proxy")

READY_PATH = "/ready"
METRICS_PATH = "/metrics"
_JSON = "application/json; charset=utf-8"


def lean_core_addons() -> list[Any]:
    """The mitmproxy core addons the sidecar runs (see the module docstring for why)."""
    from mitmproxy.addons import core, disable_h2c, next_layer, proxyserver, tlsconfig

    return [core.Core(), proxyserver.Proxyserver(), next_layer.NextLayer(), tlsconfig.TlsConfig(),
            disable_h2c.DisableH2C()]


def _ipv6_loopback() -> bool:
    if not socket.has_ipv6:
        return False
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as sock:
            sock.bind(("::1", 0))
    except OSError:
        return False
    return True


def listen_modes(config: SidecarConfig, snapshot: Snapshot, *, ipv6: bool | None = None) -> list[str]:
    """mitmproxy ``mode`` specs for the config and the snapshot's reverse-mode connections."""
    kind = "regular" if config.mode == "explicit" else "transparent"
    hosts = [config.listen_host]
    if config.listen_host == "127.0.0.1" and (_ipv6_loopback() if ipv6 is None else ipv6):
        hosts.append("::1")
    modes = [f"{kind}@{host}:{config.proxy_port}" for host in hosts]
    for port, conn in sorted(snapshot.routes.reverse.items()):
        scheme, host, upstream_port, _ = base_url_parts(conn.base_url or "")
        if not host:
            continue
        netloc = f"[{host}]" if ":" in host else host
        modes.append(f"reverse:{scheme}://{netloc}:{upstream_port}@127.0.0.1:{port}")
    return modes


def _system_ca_files() -> list[Path]:
    files = []
    try:
        import certifi

        files.append(Path(certifi.where()))
    except ImportError:
        pass
    default = ssl.get_default_verify_paths().cafile
    for candidate in (default, "/etc/ssl/certs/ca-certificates.crt", "/etc/pki/tls/certs/ca-bundle.crt"):
        if candidate and Path(candidate).is_file() and Path(candidate) not in files:
            files.append(Path(candidate))
            break
    return files


def build_trust_bundle(work_dir: Path, extra: Iterable[tuple[str, str]]) -> Path:
    """Write certifi + system CAs + ``extra`` ((label, PEM file) pairs) into one file.

    The file name carries a digest of the content, so a changed bundle gets a new path and
    mitmproxy (which caches TLS contexts by path) picks it up. Unreadable or non-PEM extra
    files are left out with an error log: one bad upstreamCA must not break every connection.
    """
    from cryptography import x509

    parts: list[bytes] = []
    for path in _system_ca_files():
        try:
            parts.append(path.read_bytes())
        except OSError as exc:
            log.warning("cannot read system CA file %s: %s", path, exc)
    for label, file in sorted(set(extra)):
        try:
            data = Path(file).read_bytes()
            if not x509.load_pem_x509_certificates(data):
                raise ValueError("no certificate")
        except (OSError, ValueError) as exc:
            log.error("upstreamCA of connection %s (%s) is not usable and is ignored: %s", label, file, exc)
            continue
        parts.append(b"\n# upstreamCA of " + label.encode() + b"\n" + data)
    content = b"\n".join(p.rstrip() + b"\n" for p in parts)
    digest = hashlib.sha256(content).hexdigest()[:16]
    work_dir.mkdir(parents=True, exist_ok=True)
    path = work_dir / f"chaperone-upstream-ca-{digest}.pem"
    if not path.exists():
        tmp = path.with_suffix(".tmp")
        tmp.write_bytes(content)
        tmp.replace(path)
    for old in work_dir.glob("chaperone-upstream-ca-*.pem"):
        if old != path:
            try:
                old.unlink()
            except OSError:
                pass
    return path


def _quiet_cancellations(loop: asyncio.AbstractEventLoop, context: dict) -> None:
    if isinstance(context.get("exception"), asyncio.CancelledError):
        return
    loop.default_exception_handler(context)


class _Lifecycle:
    """Internal addon: marks the runtime ready once every listener runs."""

    def __init__(self, runtime: ProxyRuntime):
        self.runtime = runtime

    def running(self) -> None:
        self.runtime._listeners_started()


class ProxyRuntime:
    """One sidecar (or standalone proxy) process: services, master, health server."""

    def __init__(self, config: SidecarConfig, services: SidecarServices | None = None, *,
                 startup_timeout: float | None = None):
        self.config = config
        self.services = services
        self.startup_timeout = startup_timeout
        self.master: Any = None
        self.ready = asyncio.Event()
        self.exit_code = 0
        self._health: http11_server.Server | None = None
        self._modes: list[str] = []
        self._trust: Path | None = None

    # ------------------------------------------------------------------ run
    async def run(self) -> int:
        await self._start_health()
        try:
            return await self._run()
        finally:
            if self._health is not None:
                await self._health.close()

    async def _run(self) -> int:
        ca_file = self.config.ca_dir / "mitmproxy-ca.pem"
        if not self.config.standalone and not ca_file.is_file():
            # Injected: the CA Secret is mounted read-only; mitmproxy must not try to create one.
            raise RuntimeError(f"the interception CA {ca_file} is missing (CHAPERONE_CA_DIR)")
        loop = asyncio.get_running_loop()
        stop = asyncio.Event()
        for sig in (signal.SIGTERM, signal.SIGINT):
            try:
                loop.add_signal_handler(sig, stop.set)  # until the master exists
            except (NotImplementedError, RuntimeError):
                pass
        if self.services is None:
            self.services = await build_services(self.config)
        services = self.services
        try:
            await services.sources.start()
            if not await self._wait_for_snapshot(stop):
                return 1 if not stop.is_set() else 0
            self._build_master(services)
            for sig in (signal.SIGTERM, signal.SIGINT):
                try:
                    loop.add_signal_handler(sig, self.shutdown)
                except (NotImplementedError, RuntimeError):
                    pass
            if stop.is_set():
                return 0
            services.sources.subscribe(self._snapshot_changed)
            refresh = loop.create_task(self._refresh_trust(), name="chaperone-upstream-trust")
            # postgres connections: asyncio listeners on this loop, next to mitmproxy's
            # (postgres/server.py); up before the proxy reports ready.
            postgres = PostgresListeners(services)
            await postgres.update(services.snapshot())
            services.sources.subscribe(postgres.changed)
            try:
                await self.master.run()
            finally:
                refresh.cancel()
                await postgres.aclose()
            # Client connections still open are cancelled when the loop ends; Python 3.11's
            # streams report each as an "unhandled" CancelledError. That is the shutdown
            # working, not an error.
            loop.set_exception_handler(_quiet_cancellations)
            return self.exit_code
        finally:
            self.ready.clear()
            await services.aclose("shutdown")

    async def _wait_for_snapshot(self, stop: asyncio.Event) -> bool:
        assert self.services is not None  # run() built them first
        sources = self.services.sources
        waited = 0.0
        while not sources.ready:
            if stop.is_set():
                return False
            if self.startup_timeout is not None and waited >= self.startup_timeout:
                log.error("no configuration after %.0fs; giving up", waited)
                return False
            if await sources.wait_ready(1.0):
                break
            waited += 1.0
            if waited % 10 == 0:
                log.warning("still waiting for connections and policies from %s",
                            self.config.api_server or self.config.config_dir)
        return True

    def _build_master(self, services: SidecarServices) -> None:
        # Imported here, not at the top: mitmproxy's modules load only after run() called
        # lean_imports.install() (see that module).
        from mitmproxy import master, options
        from mitmproxy.utils import human

        from .addons import build_addons
        from .addons.egress import Egress
        from .addons.pipeline import Pipeline
        from .addons.streaming import READ_LIMIT

        snap = services.snapshot()
        opts = options.Options()
        self.master = master.Master(opts, event_loop=asyncio.get_running_loop())
        self.master.addons.add(*lean_core_addons())
        self.master.addons.add(Pipeline(build_addons(services)))
        if self.config.mode == "transparent":
            # Every agent TCP connection arrives here; those that never carry an HTTP
            # request are recorded as refused attempts (addons/egress.py).
            self.master.addons.add(Egress(services))
        self.master.addons.add(_Lifecycle(self))
        self._modes = listen_modes(self.config, snap)
        self._trust = self._trust_bundle(snap)
        if self.config.standalone:
            self.config.ca_dir.mkdir(parents=True, exist_ok=True)  # mitmproxy writes the CA here
        opts.update(
            mode=self._modes,
            confdir=str(self.config.ca_dir),
            ssl_verify_upstream_trusted_ca=str(self._trust),
            connection_strategy="lazy",
            # Chaperone streams above config.stream_large_bodies itself (Route); mitmproxy's
            # own threshold is the most a body is read to be judged (addons/streaming.py).
            stream_large_bodies=str(max(READ_LIMIT, human.parse_size(self.config.stream_large_bodies) or 0)),
        )
        # Hardening options; set where this mitmproxy version has them (11.x and 12.x do).
        optional = {"upstream_cert": False, "rawtcp": False}
        missing = [name for name in optional if name not in opts]
        if missing:
            log.warning("mitmproxy has no option %s; running without it", ", ".join(missing))
        opts.update(**{k: v for k, v in optional.items() if k in opts})
        log.info("proxy listeners: %s", ", ".join(self._modes), extra={"fields": {"modes": self._modes}})
        if self.config.standalone:
            log.info("standalone proxy: clients must trust %s", self.config.ca_dir / "mitmproxy-ca-cert.pem")

    def _trust_bundle(self, snap: Snapshot) -> Path:
        extra = [(c.name, c.upstream_ca_file) for c in snap.connections.values()
                 if c.upstream_ca_file and Path(c.upstream_ca_file).is_file()]
        return build_trust_bundle(self.config.work_dir, extra)

    # ------------------------------------------------------------------ changes
    def _snapshot_changed(self, snap: Snapshot) -> None:
        if self.master is None:
            return
        updates: dict[str, Any] = {}
        modes = listen_modes(self.config, snap)
        if modes != self._modes:
            log.info("reverse listeners changed: %s", ", ".join(modes))
            self._modes = modes
            updates["mode"] = modes
        trust: Path | None
        try:
            trust = self._trust_bundle(snap)
        except OSError as exc:
            log.error("cannot write the upstream trust bundle: %s", exc)
            trust = self._trust
        if trust != self._trust:
            self._trust = trust
            updates["ssl_verify_upstream_trusted_ca"] = str(trust)
        if updates:
            try:
                self.master.options.update(**updates)
            except Exception:
                log.exception("applying the new configuration to the proxy failed")

    async def _refresh_trust(self, interval: float = 30.0) -> None:
        """upstreamCA files are ConfigMap/Secret mounts the kubelet updates in place: re-read
        them now and then, not only when a connection changes."""
        assert self.services is not None  # run() built them first
        while True:
            await asyncio.sleep(interval)
            self._snapshot_changed(self.services.snapshot())

    def _listeners_started(self) -> None:
        proxyserver = self.master.addons.get("proxyserver")
        failed = [str(s.mode.full_spec) for s in proxyserver.servers if not s.is_running]
        if failed or not len(proxyserver.servers):
            log.error("proxy listeners failed to start: %s", ", ".join(failed) or "none configured")
            self.exit_code = 1
            self.master.shutdown()
            return
        addrs = list(dict.fromkeys(f"{a[0]}:{a[1]}" for s in proxyserver.servers for a in s.listen_addrs))
        log.info("ready: listening on %s", ", ".join(addrs), extra={"fields": {"listen": addrs}})
        self.ready.set()
        # start-up's freed heap back to the kernel, its live objects out of later collections (issue 16)
        startup_memory.release()

    def shutdown(self) -> None:
        log.info("shutting down")
        self.ready.clear()
        if self.master is not None:
            self.master.shutdown()

    # ------------------------------------------------------------------ health
    async def _start_health(self) -> None:
        async def ready(_: http11_server.Request) -> http11_server.Answer:
            if self.ready.is_set():
                snap = self.services.snapshot() if self.services else None
                body = {"ready": True, "generation": snap.generation if snap else 0}
                return http11_server.Answer(200, json.dumps(body).encode(), _JSON)
            return http11_server.Answer(503, json.dumps({"ready": False}).encode(), _JSON)

        async def metrics(request: http11_server.Request) -> http11_server.Answer:
            # Collecting runs instrument callbacks and reads /proc: off the event loop.
            body, content_type = await asyncio.to_thread(prometheus_exposition,
                                                         request.headers.get("accept", ""))
            return http11_server.Answer(200, body, content_type)

        server = http11_server.Server({READY_PATH: ready, METRICS_PATH: metrics})
        await server.start(self.config.health_host or None, self.config.health_port)
        self._health = server


def event_loop_factory(choice: str) -> tuple[Any, str]:
    """(loop factory for ``asyncio.Runner``, the loop's name) for ``config.event_loop``.

    ``auto`` (the default) takes uvloop when it is installed - the image and ``pip install
    chaperone`` have it: libuv's loop costs ~8 % less CPU per proxied request and ~0.3 ms
    less latency than the standard one (docs/benchmarks.md). ``uvloop`` insists on it (an
    ImportError is a clear start-up failure); ``asyncio`` is the standard loop.
    """
    if choice == "asyncio":
        return _with_helpers(asyncio.new_event_loop), "asyncio"
    try:
        import uvloop
    except ImportError:
        if choice == "uvloop":
            raise RuntimeError("CHAPERONE_EVENT_LOOP=uvloop but uvloop is not installed") from None
        return _with_helpers(asyncio.new_event_loop), "asyncio"
    return _with_helpers(uvloop.new_event_loop), "uvloop"


def _with_helpers(new_loop: Callable[[], asyncio.AbstractEventLoop]) -> Callable[[], asyncio.AbstractEventLoop]:
    """``new_loop`` whose default executor (``asyncio.to_thread``: the shipper's disk work, ...)
    has threads that yield to the loop (helper_threads)."""
    def factory() -> asyncio.AbstractEventLoop:
        loop = new_loop()
        loop.set_default_executor(helper_threads.executor("chaperone-io"))
        return loop
    return factory


def run(config: SidecarConfig) -> int:
    """Blocking entry point for the CLI: configure logging and run until SIGTERM."""
    configure_logging(config.log_level)
    from . import lean_imports

    lean_imports.install()  # before mitmproxy.master is imported (docs in the module)

    async def main() -> int:
        return await ProxyRuntime(config).run()

    try:
        factory, name = event_loop_factory(config.event_loop)
        log.info("event loop: %s", name)
        with asyncio.Runner(loop_factory=factory) as runner:
            return runner.run(main())
    except Exception as exc:  # a clean, logged failure: the kubelet restarts the container
        log.critical("the sidecar failed: %s: %s", type(exc).__name__, exc, exc_info=True)
        return 1
