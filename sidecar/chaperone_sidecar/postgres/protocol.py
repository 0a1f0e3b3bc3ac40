"""The PostgreSQL v3 wire protocol: reading and building the messages the sidecar handles.

Only framing and the fields Chaperone reads or writes are decoded; every other message is
relayed as the bytes it arrived as (``Message.raw``), so what the sidecar does not understand
it does not change. References: PostgreSQL's "Frontend/Backend Protocol" chapter, message
formats section.

Bounds: a message longer than :data:`MAX_MESSAGE` (1 GiB, the server's own limit for a
frontend message) or a startup packet longer than 10 000 bytes (the server's limit) is a
protocol violation; the session answers with an ErrorResponse and closes.
"""

from __future__ import annotations

import asyncio
import struct
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

__all__ = [
    "ProtocolViolation", "Message", "Startup", "Column", "read_startup", "read_message",
    "message", "error_response", "ready_for_query", "parameter_status", "startup_message",
    "parse_fields", "parse_row_description", "row_description", "parse_data_row", "data_row",
    "parse_query", "parse_parse", "parse_bind", "parse_execute", "parse_close", "cstring",
    "command_complete", "MessageReader", "SSL_REQUEST", "GSSENC_REQUEST", "CANCEL_REQUEST", "PROTOCOL_3",
]

PROTOCOL_3 = 196608  # 3.0
SSL_REQUEST = 80877103
GSSENC_REQUEST = 80877104
CANCEL_REQUEST = 80877102
MAX_STARTUP = 10_000
MAX_MESSAGE = 1 << 30


class ProtocolViolation(Exception):
    """The peer sent something that is not the protocol; the session ends."""


@dataclass(frozen=True, slots=True)
class Message:
    """One typed message: its type byte, payload (without type and length) and raw bytes."""

    type: bytes
    payload: bytes

    @property
    def raw(self) -> bytes:
        return message(self.type, self.payload)


@dataclass(frozen=True, slots=True)
class Startup:
    """The first packet of a connection: a StartupMessage, SSLRequest, GSSENCRequest or
    CancelRequest (``code``), with the StartupMessage's parameters."""

    code: int
    params: Mapping[str, str]
    payload: bytes


@dataclass(frozen=True, slots=True)
class Column:
    """One RowDescription field."""

    name: str
    table_oid: int
    column: int
    type_oid: int
    size: int
    modifier: int
    format: int  # 0 text, 1 binary


async def read_startup(reader: asyncio.StreamReader) -> Startup:
    head = await reader.readexactly(4)
    (length,) = struct.unpack("!I", head)
    if not 8 <= length <= MAX_STARTUP:
        raise ProtocolViolation(f"invalid startup packet length {length}")
    body = await reader.readexactly(length - 4)
    (code,) = struct.unpack("!I", body[:4])
    params: dict[str, str] = {}
    if code == PROTOCOL_3:
        parts = body[4:].split(b"\0")
        for key, value in zip(parts[0::2], parts[1::2], strict=False):
            if not key:
                break
            params[key.decode("utf-8", "replace")] = value.decode("utf-8", "replace")
    return Startup(code, params, body)


async def read_message(reader: asyncio.StreamReader, limit: int = MAX_MESSAGE) -> Message:
    """One typed message; ``limit`` bounds its length (the agent's messages are held to less
    than the server's 1 GiB: the sidecar buffers a whole message to judge it)."""
    head = await reader.readexactly(5)
    kind, length = head[:1], struct.unpack("!I", head[1:])[0]
    if not 4 <= length <= limit:
        raise ProtocolViolation(f"invalid length {length} of a {kind!r} message")
    return Message(kind, await reader.readexactly(length - 4))


class MessageReader:
    """The server's messages in the batches they arrive in: one read, every complete message
    it completed. Consecutive DataRows are then masked together (results.py)."""

    def __init__(self, reader: asyncio.StreamReader, limit: int = MAX_MESSAGE) -> None:
        self.reader = reader
        self.limit = limit
        self._buffer = bytearray()

    def _split(self) -> list[Message]:
        out: list[Message] = []
        buf, pos = self._buffer, 0
        while len(buf) - pos >= 5:
            length = int.from_bytes(buf[pos + 1:pos + 5], "big")
            if not 4 <= length <= self.limit:
                raise ProtocolViolation(f"invalid length {length} of a {bytes(buf[pos:pos + 1])!r} message")
            if len(buf) - pos < 1 + length:
                break
            out.append(Message(bytes(buf[pos:pos + 1]), bytes(buf[pos + 5:pos + 1 + length])))
            pos += 1 + length
        del buf[:pos]
        return out

    async def batch(self) -> list[Message]:
        """At least one message; raises IncompleteReadError at the end of the stream."""
        while True:
            messages = self._split()
            if messages:
                return messages
            chunk = await self.reader.read(1 << 16)
            if not chunk:
                raise asyncio.IncompleteReadError(bytes(self._buffer), None)
            self._buffer += chunk


def message(kind: bytes, payload: bytes = b"") -> bytes:
    return kind + struct.pack("!I", len(payload) + 4) + payload


def cstring(text: str) -> bytes:
    return text.replace("\0", "").encode("utf-8") + b"\0"


def _cstr(data: bytes, pos: int) -> tuple[str, int]:
    """A NUL-terminated string; bytes that are not UTF-8 survive as lone surrogates
    (``surrogateescape``), so a caller can tell - the session refuses such SQL."""
    end = data.index(b"\0", pos)
    return data[pos:end].decode("utf-8", "surrogateescape"), end + 1


def startup_message(params: Mapping[str, str]) -> bytes:
    body = struct.pack("!I", PROTOCOL_3) + b"".join(cstring(k) + cstring(v) for k, v in params.items()) + b"\0"
    return struct.pack("!I", len(body) + 4) + body


# ---------------------------------------------------------------------------- backend messages

def error_response(fields: Mapping[str, str]) -> bytes:
    """An ErrorResponse (``E``); ``fields`` by code: S/V severity, C SQLSTATE, M message,
    D detail, H hint."""
    body = b"".join(code.encode()[:1] + cstring(value) for code, value in fields.items() if value)
    return message(b"E", body + b"\0")


def parse_fields(payload: bytes) -> dict[str, str]:
    """The fields of an ErrorResponse or NoticeResponse, by code."""
    out: dict[str, str] = {}
    pos = 0
    while pos < len(payload) and payload[pos] != 0:
        code = chr(payload[pos])
        value, pos = _cstr(payload, pos + 1)
        out[code] = value
    return out


def ready_for_query(status: bytes) -> bytes:
    return message(b"Z", status)


def parameter_status(name: str, value: str) -> bytes:
    return message(b"S", cstring(name) + cstring(value))


def command_complete(tag: str) -> bytes:
    return message(b"C", cstring(tag))


def parse_row_description(payload: bytes) -> list[Column]:
    (count,) = struct.unpack_from("!H", payload, 0)
    pos = 2
    out: list[Column] = []
    for _ in range(count):
        name, pos = _cstr(payload, pos)
        table, col, oid, size, mod, fmt = struct.unpack_from("!IhIhih", payload, pos)
        pos += 18
        out.append(Column(name, table, col, oid, size, mod, fmt))
    return out


def row_description(columns: Iterable[Column]) -> bytes:
    cols = list(columns)
    body = struct.pack("!H", len(cols)) + b"".join(
        cstring(c.name) + struct.pack("!IhIhih", c.table_oid, c.column, c.type_oid, c.size, c.modifier, c.format)
        for c in cols)
    return message(b"T", body)


def parse_data_row(payload: bytes) -> list[bytes | None]:
    (count,) = struct.unpack_from("!H", payload, 0)
    pos = 2
    out: list[bytes | None] = []
    for _ in range(count):
        (length,) = struct.unpack_from("!i", payload, pos)
        pos += 4
        if length < 0:
            out.append(None)
        else:
            out.append(payload[pos:pos + length])
            pos += length
    return out


def data_row(values: Iterable[bytes | None]) -> bytes:
    vals = list(values)
    parts = [struct.pack("!H", len(vals))]
    for v in vals:
        parts.append(struct.pack("!i", -1) if v is None else struct.pack("!i", len(v)) + v)
    return message(b"D", b"".join(parts))


# ---------------------------------------------------------------------------- frontend messages

def parse_query(payload: bytes) -> str:
    return _cstr(payload, 0)[0]


def parse_parse(payload: bytes) -> tuple[str, str, tuple[int, ...]]:
    """Parse (``P``): (statement name, query, parameter type OIDs)."""
    name, pos = _cstr(payload, 0)
    query, pos = _cstr(payload, pos)
    (count,) = struct.unpack_from("!H", payload, pos)
    oids = struct.unpack_from(f"!{count}I", payload, pos + 2)
    return name, query, tuple(oids)


def parse_bind(payload: bytes) -> tuple[str, str, tuple[int, ...], list[bytes | None]]:
    """Bind (``B``): (portal, statement, parameter format codes, parameter values)."""
    portal, pos = _cstr(payload, 0)
    statement, pos = _cstr(payload, pos)
    (nfmt,) = struct.unpack_from("!H", payload, pos)
    formats = struct.unpack_from(f"!{nfmt}H", payload, pos + 2)
    pos += 2 + 2 * nfmt
    (nparams,) = struct.unpack_from("!H", payload, pos)
    pos += 2
    params: list[bytes | None] = []
    for _ in range(nparams):
        (length,) = struct.unpack_from("!i", payload, pos)
        pos += 4
        if length < 0:
            params.append(None)
        else:
            params.append(payload[pos:pos + length])
            pos += length
    return portal, statement, tuple(formats), params


def parse_execute(payload: bytes) -> tuple[str, int]:
    portal, pos = _cstr(payload, 0)
    (max_rows,) = struct.unpack_from("!i", payload, pos)
    return portal, max_rows


def parse_close(payload: bytes) -> tuple[str, str]:
    """Close (``C``) or Describe (``D``): (``S`` statement / ``P`` portal, name)."""
    return chr(payload[0]), _cstr(payload, 1)[0]
