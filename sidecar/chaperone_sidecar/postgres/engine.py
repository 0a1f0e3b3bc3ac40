"""What serving a postgres connection needs, loaded when the first one exists (issue 16).

:class:`~.server.PostgresListeners` imports this module when the snapshot first holds a
postgres connection; with it come the session (``session.py``: the protocol, the policy
decision per statement with the SQL parser ``pglast``), SCRAM towards the server
(``upstream.py``: ``scramp``, ``asn1crypto``) and the agent-side TLS (``tls.py``). A pod
without postgres connections never imports them: ~5 MB of idle RSS (docs/benchmarks.md).

One :class:`PostgresEngine` per process: the cancel-key registry shared by every session
(a ``CancelRequest`` arrives on a new connection) and the agent-side TLS context, made once.
"""

from __future__ import annotations

import asyncio
import logging
import ssl
from pathlib import Path
from typing import Any

from ..addons.identify import base_identity
from ..credentials.credential_sources import CredentialError, TokenSource
from ..flowctx import RecordingSettings
from ..routing import Connection
from ..services import SidecarServices
from .session import Session, SessionSettings
from .tls import server_context
from .upstream import CancelRegistry, UpstreamSettings

__all__ = ["PostgresEngine", "session_settings"]

log = logging.getLogger("chaperone.postgres")


def _password(conn: Connection) -> Any:
    creds = conn.spec.get("credentials") or {}
    key = (creds.get("secretRef") or {}).get("passwordKey", "password")

    def read() -> str | None:
        if creds.get("source", "none") == "none" or not conn.credentials_dir:
            return None
        try:
            return TokenSource(conn.credentials_dir, key).value().reveal()
        except CredentialError:
            return None
    return read


def session_settings(conn: Connection, client_tls: ssl.SSLContext | None) -> SessionSettings:
    pg = conn.spec.get("postgres") or {}
    upstream = UpstreamSettings(
        host=pg.get("host", ""), port=int(pg.get("port") or 5432), database=pg.get("database", ""),
        user=pg.get("user", ""), password=_password(conn), sslmode=pg.get("sslmode", "verify-full"),
        ca_file=conn.upstream_ca_file,
        allowed_auth=tuple(pg.get("allowedAuth") or ("scram-sha-256",)))
    return SessionSettings(
        connection=conn.name, upstream=upstream,
        recording=RecordingSettings.from_spec(conn.spec.get("recording")),
        sample_rows=int(pg.get("maxRecordedRows", 10)),
        client_tls=client_tls if pg.get("clientTLS") else None)


class PostgresEngine:
    """Runs the sessions of every postgres listener of this process."""

    def __init__(self, services: SidecarServices) -> None:
        self.services = services
        self.cancels = CancelRegistry()
        self._tls: ssl.SSLContext | None = None
        self._tls_failed = False

    async def _client_tls(self) -> ssl.SSLContext | None:
        if self._tls is None and not self._tls_failed:
            ca = Path(self.services.config.ca_dir) / "mitmproxy-ca.pem"
            try:
                self._tls = await server_context(ca)
            except (OSError, ValueError) as exc:
                self._tls_failed = True
                log.error("postgres: no TLS for agents, the CA %s is unusable: %s", ca, exc)
        return self._tls

    async def serve(self, name: str, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """One agent connection to the listener of connection ``name``."""
        conn = self.services.snapshot().connection(name)
        if conn is None or conn.type != "postgres":
            writer.close()
            return
        pg = conn.spec.get("postgres") or {}
        tls = await self._client_tls() if pg.get("clientTLS") else None
        session = Session(self.services, session_settings(conn, tls),
                          base_identity(self.services.config), reader, writer, cancels=self.cancels)
        await session.run()
