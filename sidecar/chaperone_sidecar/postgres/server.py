"""The postgres listeners: one local port per ClaudeConnection of type postgres, on the proxy's loop.

Started by ``ProxyRuntime`` (``proxy.py``) next to mitmproxy's listeners and kept in step with
the snapshot: a connection added, removed or moved to another port opens, closes or moves its
listener; sessions already open keep the settings they started with (a connection's new spec
applies to the next session).

Port. ``spec.postgres.listenPort``, else **5432 + the connection's index** among the pod's
postgres connections sorted by name (``db-a`` 5432, ``db-b`` 5433). Two connections on one
port: the first by name gets it, the other is reported and not served. Address: 127.0.0.1
(``CHAPERONE_POSTGRES_HOST`` moves it, e.g. for a test bed on another interface); the agent
shares the pod's network namespace, so loopback is where it connects (``PGHOST=127.0.0.1``).

Identity: the pod's (``addons.identify.base_identity``): on loopback inside the pod every
connection is the agent's.

**Loading point** (issue 16): serving postgres needs the SQL parser (``pglast``, libpg_query)
and SCRAM (``scramp`` with ``asn1crypto``) - ~5 MB of RSS. They are imported with
:mod:`.engine` when the snapshot first holds a postgres connection (:meth:`PostgresListeners.update`
opening the first listener), not when the proxy starts: this module and what it imports stay
light, so a pod without postgres connections never loads them (measured in docs/benchmarks.md,
asserted by ``tests/sidecar/integration/test_idle_modules.py``). Once loaded, the engine stays
for the life of the process.
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

from ..contract import POSTGRES_PORT_BASE
from ..routing import Connection
from ..services import SidecarServices
from ..snapshot import Snapshot

if TYPE_CHECKING:
    from .engine import PostgresEngine

__all__ = ["PostgresListeners", "listen_ports", "DEFAULT_PORT", "HOST_ENV"]

log = logging.getLogger("chaperone.postgres")

DEFAULT_PORT = POSTGRES_PORT_BASE  # the webhook's PGPORT follows the same rule
HOST_ENV = "CHAPERONE_POSTGRES_HOST"


def listen_ports(connections: Iterable[Connection]) -> dict[str, int]:
    """connection name -> local port (see the module docstring); clashes left out."""
    pg = sorted((c for c in connections if c.type == "postgres"), key=lambda c: c.name)
    out: dict[str, int] = {}
    taken: set[int] = set()
    for index, conn in enumerate(pg):
        settings = conn.spec.get("postgres") or {}
        port = settings.get("listenPort") or DEFAULT_PORT + index
        if port in taken:
            log.error("postgres connection %s: port %s is taken by another connection; not served",
                      conn.name, port)
            continue
        taken.add(port)
        out[conn.name] = int(port)
    return out


class PostgresListeners:
    """Every postgres listener of this sidecar."""

    def __init__(self, services: SidecarServices, host: str | None = None) -> None:
        self.services = services
        self.host = host or os.environ.get(HOST_ENV) or "127.0.0.1"
        self.engine: PostgresEngine | None = None  # loaded with the first postgres connection
        self._servers: dict[str, tuple[int, asyncio.AbstractServer]] = {}
        self._sessions: set[asyncio.Task] = set()
        self._lock = asyncio.Lock()

    @property
    def ports(self) -> dict[str, int]:
        return {name: port for name, (port, _) in self._servers.items()}

    def _engine(self) -> PostgresEngine:
        if self.engine is None:
            # Imported here, not at the top, for memory only: pglast and scramp are loaded when
            # the first postgres connection needs a listener (module docstring).
            from .engine import PostgresEngine

            self.engine = PostgresEngine(self.services)
        return self.engine

    async def update(self, snapshot: Snapshot) -> None:
        """Open, move and close listeners to match ``snapshot``."""
        async with self._lock:
            wanted = listen_ports(snapshot.connections.values())
            for name in list(self._servers):
                port, server = self._servers[name]
                if wanted.get(name) != port:
                    server.close()
                    del self._servers[name]
                    log.info("postgres %s: listener on %s closed", name, port)
            for name, port in wanted.items():
                if name in self._servers:
                    continue
                engine = self._engine()
                try:
                    server = await asyncio.start_server(self._handler(engine, name), self.host, port)
                except OSError as exc:
                    log.error("postgres %s: cannot listen on %s:%s: %s", name, self.host, port, exc)
                    continue
                self._servers[name] = (port, server)
                log.info("postgres %s: listening on %s:%s", name, self.host, port)

    def changed(self, snapshot: Snapshot) -> None:
        """A ``Sources.subscribe`` callback: applies the snapshot on the loop."""
        task = asyncio.get_running_loop().create_task(self.update(snapshot))
        self._sessions.add(task)
        task.add_done_callback(self._sessions.discard)

    def _handler(self, engine: PostgresEngine, name: str) -> Any:
        async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            task = asyncio.current_task()
            if task is not None:
                self._sessions.add(task)
            try:
                await engine.serve(name, reader, writer)
            finally:
                if task is not None:
                    self._sessions.discard(task)
        return handle

    async def aclose(self) -> None:
        for _, server in self._servers.values():
            server.close()
        for _, server in self._servers.values():
            try:
                await asyncio.wait_for(server.wait_closed(), 1.0)
            except (TimeoutError, Exception):  # noqa: BLE001 - sessions are cancelled below
                pass
        self._servers.clear()
        for task in list(self._sessions):
            task.cancel()
        await asyncio.gather(*self._sessions, return_exceptions=True)
