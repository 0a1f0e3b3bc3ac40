"""The sidecar's own connection to the PostgreSQL server: TLS, startup, authentication.

The agent never holds the database password: the sidecar reads it from the connection's
mounted Secret (``credentials.secretRef.passwordKey``, default ``password``; the same
``TokenSource`` the http types read their tokens with) and answers the server's challenge
itself.

Authentication. **SCRAM-SHA-256** (``scramp``; the PBKDF2 of 4096 rounds runs in a thread, not
on the event loop) is always allowed; ``md5`` and cleartext ``password`` only when the
connection names them in ``spec.postgres.allowedAuth``, and cleartext only over TLS. A server
that asks for anything else (``SCRAM-SHA-256-PLUS`` only, GSSAPI, SSPI) is refused: the sidecar
cannot prove channel binding for a stream it terminates, and it never downgrades on its own.
A server that accepts without asking (``trust``) is accepted.

TLS (``spec.postgres.sslmode``): ``disable`` never asks; ``require`` asks and refuses a server
that says no, without verifying the certificate; ``verify-full`` (the default) also verifies
the chain against the system CAs plus the connection's ``upstreamCA`` and the host name.

Startup parameters. The agent's own are passed on only from a short allow-list
(:data:`PASSED_PARAMETERS`: application name, date and time styles); ``user`` and
``database`` come from the connection, ``client_encoding`` is always UTF8 (what the sidecar's
parser reads), and ``options`` (``-c role=...``,
``-c default_transaction_read_only=off``) and ``replication`` (a replication connection speaks
another protocol) are dropped - they would change who the session is or what it speaks
without any policy seeing it.
"""

from __future__ import annotations

import asyncio
import hashlib
import ssl
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

from scramp import ScramClient

from .protocol import (
    CANCEL_REQUEST,
    SSL_REQUEST,
    Message,
    cstring,
    message,
    parse_fields,
    read_message,
    startup_message,
)

__all__ = ["UpstreamSettings", "Upstream", "UpstreamError", "connect", "PASSED_PARAMETERS", "CancelRegistry"]

PASSED_PARAMETERS = frozenset({
    "application_name", "datestyle", "timezone", "intervalstyle",
    "extra_float_digits", "lc_messages", "search_path", "statement_timeout",
})
CONNECT_TIMEOUT = 10.0


class UpstreamError(Exception):
    """The server could not be reached or refused the login; ``fields`` is what the agent is
    told (an ErrorResponse's fields, never the password)."""

    def __init__(self, message: str, code: str = "08006", detail: str = "") -> None:
        super().__init__(message)
        self.fields = {"S": "FATAL", "V": "FATAL", "C": code, "M": message, "D": detail}


@dataclass(frozen=True)
class UpstreamSettings:
    host: str
    port: int
    database: str
    user: str
    password: Callable[[], str | None]  # read when connecting (the Secret may rotate)
    sslmode: str = "verify-full"
    ca_file: str | None = None
    allowed_auth: tuple[str, ...] = ("scram-sha-256",)


@dataclass
class Upstream:
    reader: asyncio.StreamReader
    writer: asyncio.StreamWriter
    parameters: dict[str, str] = field(default_factory=dict)  # ParameterStatus as sent
    backend_key: bytes = b""  # BackendKeyData payload (pid, secret)
    status: bytes = b"I"
    tls: bool = False
    auth: str = ""  # what was answered: scram-sha-256 | md5 | password | trust

    def close(self) -> None:
        try:
            self.writer.close()
        except Exception:  # noqa: BLE001 - closing a broken transport
            pass


def _tls_context(settings: UpstreamSettings) -> ssl.SSLContext:
    if settings.sslmode == "verify-full":
        context = ssl.create_default_context()
        if settings.ca_file:
            context.load_verify_locations(cafile=settings.ca_file)
        return context
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    return context


async def _open(settings: UpstreamSettings) -> tuple[asyncio.StreamReader, asyncio.StreamWriter, bool]:
    try:
        reader, writer = await asyncio.wait_for(
            asyncio.open_connection(settings.host, settings.port), CONNECT_TIMEOUT)
    except (TimeoutError, OSError) as exc:
        raise UpstreamError(f"chaperone cannot reach the database server "
                            f"{settings.host}:{settings.port}: {exc or 'timeout'}") from None
    if settings.sslmode == "disable":
        return reader, writer, False
    writer.write(b"\x00\x00\x00\x08" + SSL_REQUEST.to_bytes(4, "big"))
    await writer.drain()
    answer = await reader.readexactly(1)
    if answer != b"S":
        writer.close()
        raise UpstreamError(f"the database server {settings.host}:{settings.port} does not offer "
                            f"TLS but the connection's sslmode is {settings.sslmode}")
    context = await asyncio.to_thread(_tls_context, settings)  # reads CA files
    try:
        await writer.start_tls(context, server_hostname=settings.host)
    except (ssl.SSLError, OSError) as exc:
        writer.close()
        raise UpstreamError(f"TLS to the database server {settings.host}:{settings.port} "
                            f"failed: {exc}") from None
    return reader, writer, True


def _md5(password: str, user: str, salt: bytes) -> bytes:
    inner = hashlib.md5((password + user).encode()).hexdigest()  # noqa: S324 - the protocol's
    return b"md5" + hashlib.md5(inner.encode() + salt).hexdigest().encode()  # noqa: S324


async def _authenticate(up: Upstream, settings: UpstreamSettings) -> None:
    scram: ScramClient | None = None
    while True:
        msg = await read_message(up.reader)
        if msg.type == b"E":
            fields = parse_fields(msg.payload)
            raise UpstreamError(f"the database server refused chaperone's login as "
                                f"{settings.user!r}: {fields.get('M', '')}", fields.get("C", "28000"))
        if msg.type != b"R":
            raise UpstreamError(f"unexpected {msg.type!r} message during authentication")
        code = int.from_bytes(msg.payload[:4], "big")
        data = msg.payload[4:]
        if code == 0:
            up.auth = up.auth or "trust"
            return
        password = await asyncio.to_thread(settings.password)
        if password is None:
            raise UpstreamError("chaperone holds no password for this connection (its Secret "
                                "is not mounted or has no such key)", "28P01")
        if code == 10:  # SASL
            mechanisms = [m.decode() for m in data.split(b"\0") if m]
            if "SCRAM-SHA-256" not in mechanisms:
                raise UpstreamError(f"the database server offers only {', '.join(mechanisms)}; "
                                    "chaperone answers SCRAM-SHA-256 only", "28000")
            scram = ScramClient(["SCRAM-SHA-256"], settings.user, password)
            first = scram.get_client_first().encode()
            up.writer.write(message(b"p", cstring("SCRAM-SHA-256") + len(first).to_bytes(4, "big") + first))
            up.auth = "scram-sha-256"
        elif code == 11 and scram is not None:  # SASLContinue
            scram.set_server_first(data.decode())
            final = await asyncio.to_thread(scram.get_client_final)  # PBKDF2: off the loop
            up.writer.write(message(b"p", final.encode()))
        elif code == 12 and scram is not None:  # SASLFinal: the server proves it knew the key
            try:
                scram.set_server_final(data.decode())
            except Exception as exc:  # noqa: BLE001 - scramp raises its own ScramException
                raise UpstreamError(f"the database server's SCRAM proof is wrong: {exc}") from None
        elif code == 5:  # MD5
            if "md5" not in settings.allowed_auth:
                raise UpstreamError("the database server asks for md5 authentication, which this "
                                    "connection does not allow (spec.postgres.allowedAuth)", "28000")
            up.writer.write(message(b"p", _md5(password, settings.user, data[:4]) + b"\0"))
            up.auth = "md5"
        elif code == 3:  # cleartext
            if "password" not in settings.allowed_auth or not up.tls:
                raise UpstreamError("the database server asks for a cleartext password, which this "
                                    "connection does not allow (spec.postgres.allowedAuth, and "
                                    "only over TLS)", "28000")
            up.writer.write(message(b"p", cstring(password)))
            up.auth = "password"
        else:
            raise UpstreamError(f"the database server asks for authentication method {code}, "
                                "which chaperone does not answer", "28000")
        await up.writer.drain()


async def connect(settings: UpstreamSettings, agent_params: Mapping[str, str]) -> Upstream:
    """Connect, log in and read up to the first ReadyForQuery. Raises :class:`UpstreamError`."""
    reader, writer, tls = await _open(settings)
    up = Upstream(reader, writer, tls=tls)
    try:
        # UTF8 always: the sidecar parses the SQL as UTF-8 (session.py: lexing hazards)
        params = {"user": settings.user, "database": settings.database, "client_encoding": "UTF8"}
        for key, value in agent_params.items():
            if key.lower() in PASSED_PARAMETERS:
                params[key] = value
        writer.write(startup_message(params))
        await writer.drain()
        await asyncio.wait_for(_authenticate(up, settings), CONNECT_TIMEOUT)
        while True:
            msg: Message = await asyncio.wait_for(read_message(reader), CONNECT_TIMEOUT)
            if msg.type == b"S":
                name, _, rest = msg.payload.partition(b"\0")
                up.parameters[name.decode()] = rest.rstrip(b"\0").decode("utf-8", "replace")
            elif msg.type == b"K":
                up.backend_key = msg.payload
            elif msg.type == b"Z":
                up.status = msg.payload[:1]
                return up
            elif msg.type == b"E":
                fields = parse_fields(msg.payload)
                raise UpstreamError(f"the database server refused the session: {fields.get('M', '')}",
                                    fields.get("C", "08006"))
            # NoticeResponse and anything else before the first ReadyForQuery: not for the agent
    except (TimeoutError, asyncio.IncompleteReadError, ConnectionError) as exc:
        up.close()
        raise UpstreamError(f"the database server closed the connection during login: "
                            f"{type(exc).__name__}") from None
    except BaseException:
        up.close()
        raise


class CancelRegistry:
    """The agent's BackendKeyData is the sidecar's own (the server's pid and secret stay in the
    sidecar); a CancelRequest with it is sent to the server with the real key. Entries go
    when their session ends (:meth:`forget`)."""

    def __init__(self) -> None:
        self._keys: dict[bytes, tuple[bytes, UpstreamSettings]] = {}

    def register(self, key: bytes, real: bytes, settings: UpstreamSettings) -> None:
        self._keys[key] = (real, settings)

    def forget(self, key: bytes) -> None:
        self._keys.pop(key, None)

    async def cancel(self, key: bytes) -> None:
        entry = self._keys.get(key)
        if entry is None:
            return
        real, settings = entry
        try:
            _, writer, _ = await _open(settings)
        except UpstreamError:
            return
        writer.write(b"\x00\x00\x00\x10" + CANCEL_REQUEST.to_bytes(4, "big") + real[:8])
        try:
            await writer.drain()
        finally:
            writer.close()
