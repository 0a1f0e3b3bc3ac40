"""SidecarServices: the long-lived objects the addons share, built once per process.

Every addon is constructed with the one ``SidecarServices`` instance (``Addon(services)``) and
finds everything it needs there - nothing is global, so tests build a services object with just
the parts an addon touches (``SidecarServices(config=..., sources=...)``). The fields are
typed, so an addon reads ``services.recorder`` and checks for None rather than probing an
untyped object with ``getattr`` - mypy sees what each addon uses.

=================  ===========================================================================
field              what / who uses it
=================  ===========================================================================
config             the frozen :class:`~.config.SidecarConfig` (all addons)
sources            :class:`~.sources.Sources`; ``services.snapshot()`` is the current
                   :class:`~.sources.Snapshot` (connections, routes, compiled policies)
kube               the process's one :class:`~.kubeclient.KubeClient` (sources and approvals; None standalone)
oidc               :class:`~.oidc.OIDCVerifier` when an issuer is configured (Identify)
injectors          :class:`InjectorRegistry`: a ``CredentialInjector`` per connection
                   (InjectCredentials), rebuilt when a connection's spec changes
recorder           ``recording.Recorder`` or None when recording is off (Record, Approve)
approvals          ``approvals.ApprovalService`` or None (Approve: None means "cannot open an
                   ApprovalRequest", i.e. refuse require-approval flows - fail closed)
approval_backend   KubeApprovalBackend / LocalApprovalStore under ``approvals``
grants             grant cache (Redis when ``CHAPERONE_REDIS_URL``, else memory)
rate_limiter       policy rate limits (Redis when configured, else memory) (Enforce)
redis              the ``redis.asyncio`` client, if any
tracer, meter      OpenTelemetry API objects (Telemetry; no-ops until a provider is set)
histograms         :class:`~.metric_histograms.FlowHistograms`: the per-flow histograms the
                   metric readers collect (None without a meter provider)
tool_uses          :class:`~.tool_use_ledger.ToolUseLedger`: the model's recent tool_use blocks
                   per pod (ToolUse: written on LLM answers, read to link later actions)
ocsf               :class:`~.recording.ocsf_export.OcsfExporter` or None (Record submits each
                   flow's recorded events; exported as OCSF API Activity off the loop)
=================  ===========================================================================

:func:`build_services` makes them in dependency order and :meth:`SidecarServices.aclose` takes
them down in reverse (recorder first, so the session is closed and flushed while everything it
may need still works). A configured backend that cannot be built fails the start: an operator
who set ``CHAPERONE_REDIS_URL`` must not silently get per-sidecar memory grants.
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from opentelemetry.metrics import Meter
from opentelemetry.trace import Tracer

from . import contract as c
from .approvals.grants import MemoryGrants, RedisGrants
from .approvals.ratelimit import MemoryRateLimiter, RedisRateLimiter
from .approvals.service import ApprovalService, Backend
from .config import SidecarConfig
from .kubeclient import KubeClient
from .oidc import OIDCVerifier
from .recording import Recorder
from .routing import Connection
from .snapshot import Snapshot
from .sources import FileSources, KubeSources, Sources
from .tool_use_ledger import ToolUseLedger

if TYPE_CHECKING:  # the SDK's metrics package stays out of a process without telemetry
    from .metric_histograms import FlowHistograms
    from .recording.ocsf_export import OcsfExporter  # the OCSF mapping only with a sink (_make_ocsf)

__all__ = ["SidecarServices", "InjectorRegistry", "build_services", "OCSF_SINKS"]

# The variables that each configure an OCSF sink (recording/ocsf_export.exporter_from_env).
OCSF_SINKS = (c.ENV_OCSF_FILE, c.ENV_OCSF_S3_PREFIX, c.ENV_OCSF_OTLP_ENDPOINT)

log = logging.getLogger("chaperone.services")


class InjectorRegistry:
    """One ``CredentialInjector`` per connection, kept in step with the snapshot.

    ``get(name)`` returns the injector or raises ``CredentialsUnavailable`` saying why (no
    credentials mounted, a spec the injector cannot use). An injector is rebuilt only when its
    connection's spec or mount changed; web-identity injectors are started (first STS exchange,
    refresh task) in the background and closed when replaced.
    """

    def __init__(self, config: SidecarConfig):
        self.config = config
        self._entries: dict[str, tuple[Any, Any]] = {}  # name -> (fingerprint, injector | error)
        self._tasks: set[asyncio.Task] = set()

    @staticmethod
    def _fingerprint(conn: Connection) -> Any:
        import json

        return (json.dumps(conn.spec, sort_keys=True, default=str), conn.credentials_dir,
                conn.web_identity_token_file)

    def update(self, snapshot: Snapshot) -> None:
        from .credentials import CredentialInjector

        current = snapshot.connections
        for name in list(self._entries):
            if name not in current:
                self._retire(self._entries.pop(name)[1])
        for name, conn in current.items():
            fp = self._fingerprint(conn)
            old = self._entries.get(name)
            if old is not None and old[0] == fp:
                continue
            try:
                injector: Any = CredentialInjector.for_connection(
                    dict(conn.spec), conn.credentials_dir, token_file=conn.web_identity_token_file,
                    pod_name=self.config.pod_name or None)
            except Exception as exc:  # a spec the injector cannot use: refuse that connection
                injector = exc
                log.error("connection %s: credentials cannot be set up: %s", name, exc)
            else:
                self._spawn(injector.start(), f"start credentials {name}")
            if old is not None:
                self._retire(old[1])
            self._entries[name] = (fp, injector)

    def get(self, name: str) -> Any:
        entry = self._entries.get(name)
        if entry is not None and not isinstance(entry[1], Exception):
            return entry[1]  # per flow: no import statement on this path (issue 16)
        from .credentials.credential_sources import CredentialsUnavailable

        if entry is None:
            raise CredentialsUnavailable(f"no credentials are set up for connection {name!r}")
        if isinstance(entry[1], Exception):
            raise CredentialsUnavailable(f"credentials of connection {name!r} cannot be used: {entry[1]}")
        return entry[1]

    def _retire(self, injector: Any) -> None:
        if not isinstance(injector, Exception):
            self._spawn(injector.aclose(), "close credentials")

    def _spawn(self, coro: Awaitable[Any], what: str) -> None:
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:  # built outside a loop (unit tests): nothing refreshable to start
            coro.close()  # type: ignore[attr-defined]
            return

        async def run() -> None:
            try:
                await coro
            except Exception as exc:
                log.error("%s failed: %s", what, exc)

        task = loop.create_task(run())
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def aclose(self) -> None:
        for _, injector in self._entries.values():
            if not isinstance(injector, Exception):
                try:
                    await injector.aclose()
                except Exception:
                    pass
        self._entries.clear()
        for task in list(self._tasks):
            task.cancel()


@dataclass
class SidecarServices:
    config: SidecarConfig
    sources: Sources
    kube: KubeClient | None = None
    oidc: OIDCVerifier | None = None
    injectors: InjectorRegistry | None = None
    recorder: Recorder | None = None
    approvals: ApprovalService | None = None
    approval_backend: Backend | None = None
    grants: MemoryGrants | RedisGrants | None = None
    rate_limiter: MemoryRateLimiter | RedisRateLimiter | None = None
    redis: Any = None  # redis.asyncio.Redis (imported only when CHAPERONE_REDIS_URL is set)
    tracer: Tracer | None = None
    meter: Meter | None = None
    histograms: FlowHistograms | None = None
    # the model's recent tool_use blocks per pod (ToolUse addon: written on LLM answers, read
    # to link the pod's later actions; in memory, bounded)
    tool_uses: ToolUseLedger = field(default_factory=ToolUseLedger)
    # OCSF export of the recorded flows (recording/ocsf_export.py; None unless configured)
    ocsf: OcsfExporter | None = None
    closers: list[Callable[[], Awaitable[Any]]] = field(default_factory=list, repr=False)

    def snapshot(self) -> Snapshot:
        """The current snapshot; read it once per hook and use that value throughout."""
        return self.sources.current

    async def aclose(self, reason: str = "shutdown") -> None:
        """Close everything in reverse order of creation; never raises."""
        if self.recorder is not None:
            try:
                await self.recorder.close(reason)
            except Exception:
                log.exception("closing the recorder failed")
        for closer in reversed(self.closers):
            try:
                await closer()
            except Exception:
                log.exception("closing a service failed")
        self.closers.clear()


def _secret(config: SidecarConfig, key: str) -> str | None:
    if config.sidecar_secret_dir is None:
        return None
    try:
        return (config.sidecar_secret_dir / key).read_text().strip() or None
    except OSError:
        return None


async def build_services(config: SidecarConfig, *, sources: Sources | None = None,
                         recorder: bool = True) -> SidecarServices:
    """Build every service for ``config`` (call inside the event loop). ``sources`` and
    ``recorder=False`` are for tests that bring their own."""
    kube = None
    if sources is None:
        if config.standalone:
            sources = FileSources(config)
        else:
            kube = KubeClient(config.api_server, config.token_file, config.api_ca_file)
            sources = KubeSources(config, kube)
    elif isinstance(sources, KubeSources):
        kube = sources.client
    services = SidecarServices(config=config, sources=sources, kube=kube)
    services.closers.append(sources.aclose)

    if config.oidc is not None:
        services.oidc = OIDCVerifier(config.oidc)
        services.closers.append(services.oidc.aclose)

    services.injectors = InjectorRegistry(config)
    sources.subscribe(services.injectors.update)
    services.closers.append(services.injectors.aclose)

    await _make_backends(config, services)
    _make_telemetry(config, services)
    if recorder:
        services.recorder = _make_recorder(config)
    _make_ocsf(config, services)
    return services


async def _make_backends(config: SidecarConfig, services: SidecarServices) -> None:
    from .approvals.kube import KubeApprovalBackend
    from .approvals.local import LocalApprovalStore

    if config.redis_url:
        import redis.asyncio as aioredis

        # The password: the injected secretKeyRef variable, else (older installs) the
        # sidecar Secret's REDIS_PASSWORD file. A password in the URL itself wins (redis-py).
        options: dict[str, Any] = {
            "password": config.redis_password or _secret(config, "REDIS_PASSWORD")}
        if config.redis_ca_cert and config.redis_url.startswith("rediss://"):
            options["ssl_ca_data"] = config.redis_ca_cert
        services.redis = aioredis.from_url(config.redis_url, **options)
        services.closers.append(services.redis.aclose)
        services.grants = RedisGrants(services.redis)
        services.rate_limiter = RedisRateLimiter(services.redis)
    else:
        services.grants = MemoryGrants()
        services.rate_limiter = MemoryRateLimiter()
    services.closers.append(services.grants.close)
    services.closers.append(services.rate_limiter.close)

    if config.standalone:
        assert config.approvals_dir is not None
        backend: Any = LocalApprovalStore(config.approvals_dir, namespace=config.pod_namespace)
    else:
        if services.kube is None:  # sources brought by a test: still one client for the rest
            services.kube = KubeClient(config.api_server, config.token_file, config.api_ca_file)
            services.closers.append(services.kube.aclose)
        backend = KubeApprovalBackend(services.kube, config.pod_namespace)
    services.approval_backend = backend
    services.closers.append(backend.close)
    services.approvals = ApprovalService(backend, services.grants)
    close = getattr(services.approvals, "close", None)
    if close is not None:
        services.closers.append(close)


def _make_telemetry(config: SidecarConfig, services: SidecarServices) -> None:
    """Providers from the standard ``OTEL_*`` variables (:mod:`.telemetry_setup`)."""
    from .telemetry_setup import setup_telemetry

    attributes = {"k8s.namespace.name": config.pod_namespace, "k8s.pod.name": config.pod_name,
                  "k8s.pod.uid": config.pod_uid, "k8s.node.name": config.node_name}
    setup = setup_telemetry(attributes=attributes)
    services.tracer = setup.tracer()
    services.meter = setup.meter()
    services.histograms = setup.histograms

    async def shutdown() -> None:
        await asyncio.to_thread(setup.shutdown)  # flushes exporters: never on the loop

    services.closers.append(shutdown)


def _make_ocsf(config: SidecarConfig, services: SidecarServices) -> None:
    """OCSF export of the recorded flows when a ``CHAPERONE_OCSF_*`` sink is set
    (recording/ocsf_export.py). The S3 sink gets a store of its own (same bucket, endpoint and
    credentials as the recording): it runs on the exporter thread's loop, not the proxy's.
    Without a sink variable the OCSF mapping and exporter modules are not imported (idle RSS,
    issue 16)."""
    if not any(os.environ.get(name, "").strip() for name in OCSF_SINKS):
        return
    from .recording.ocsf_export import ENV_S3_PREFIX, exporter_from_env

    store = None
    if os.environ.get(ENV_S3_PREFIX) and config.s3_bucket and not config.standalone:
        store = _s3_store(config)
    session = services.recorder.session_id if services.recorder is not None else ""
    exporter = exporter_from_env(
        os.environ, s3_store=store, namespace=config.pod_namespace, pod=config.pod_name,
        session=session, resource={"k8s.namespace.name": config.pod_namespace,
                                   "k8s.pod.name": config.pod_name})
    if exporter is None:
        return
    exporter.start()
    services.ocsf = exporter
    services.closers.append(exporter.aclose)


def _s3_store(config: SidecarConfig) -> Any:
    from .recording.s3http import AioS3Store, credential_chain

    credentials = None
    try:
        credentials = credential_chain(secret_dir=config.sidecar_secret_dir, region=config.s3_region)
    except Exception as exc:  # retried at each upload; the shipper reports it
        log.error("recording bucket %s: %s", config.s3_bucket, exc)
    return AioS3Store(config.s3_bucket, prefix=config.s3_prefix,
                      endpoint_url=config.s3_endpoint or None,
                      region_name=config.s3_region or None, credentials=credentials)


def _make_recorder(config: SidecarConfig) -> Recorder:
    """The session recorder: spool in ``spool_dir``; shipped to S3 (injected, when a bucket is
    configured) or to ``recordings_dir`` (standalone). Manifest key: the sidecar Secret's
    ``MANIFEST_KEY`` (injected) or ``<config>/manifest.key`` (standalone), when present."""
    from .recording.events import SessionIdentity
    from .recording.manifest import load_key
    from .recording.s3http import AioS3Store, credential_chain
    from .recording.shipper import DirStore
    from .recording.spool import SpoolConfig

    store: Any = None
    key = None
    if config.standalone:
        assert config.recordings_dir is not None and config.config_dir is not None
        store = DirStore(config.recordings_dir)
        key_file: Path | None = config.config_dir / "manifest.key"
    else:
        key_file = (config.sidecar_secret_dir / "MANIFEST_KEY") if config.sidecar_secret_dir else None
        if config.s3_bucket:
            # http11 + SigV4, no boto3 (~20 MB); credentials: the sidecar Secret's keys
            # (re-read when rotated), else the environment, else web identity (recording/s3http)
            credentials = None
            try:
                credentials = credential_chain(secret_dir=config.sidecar_secret_dir,
                                               region=config.s3_region)
            except Exception as exc:  # retried at each upload; the shipper reports it
                log.error("recording bucket %s: %s", config.s3_bucket, exc)
            store = AioS3Store(config.s3_bucket, prefix=config.s3_prefix,
                               endpoint_url=config.s3_endpoint or None,
                               region_name=config.s3_region or None, credentials=credentials)
    if key_file is not None and Path(key_file).is_file():
        key = load_key(key_file)
    limit = int(config.spool_limit_bytes * 0.9) if config.spool_limit_bytes else None
    identity = SessionIdentity(namespace=config.pod_namespace, pod=config.pod_name or "local",
                           pod_uid=config.pod_uid, service_account=config.service_account,
                           creator=config.creator)
    return Recorder(SpoolConfig(Path(config.spool_dir), max_spool_bytes=limit),
                    namespace=config.pod_namespace, pod=config.pod_name or "local",
                    identity=identity, store=store, key=key)
