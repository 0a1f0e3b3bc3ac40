"""The v3 wire codec: what is built parses back, and what the peer must not send is refused."""

from __future__ import annotations

import asyncio
import struct

import pytest

from chaperone_sidecar.postgres.protocol import (
    PROTOCOL_3,
    SSL_REQUEST,
    Column,
    ProtocolViolation,
    cstring,
    data_row,
    error_response,
    message,
    parse_bind,
    parse_close,
    parse_data_row,
    parse_execute,
    parse_fields,
    parse_parse,
    parse_query,
    parse_row_description,
    read_message,
    read_startup,
    row_description,
    startup_message,
)


def read(fn, data: bytes):
    async def main():
        reader = asyncio.StreamReader()
        reader.feed_data(data)
        reader.feed_eof()
        return await fn(reader)
    return asyncio.run(main())


def test_startup_and_ssl_request_are_read():
    startup = read(read_startup, (startup_message({"user": "agent", "database": "shop"})))
    assert startup.code == PROTOCOL_3 and dict(startup.params) == {"user": "agent", "database": "shop"}
    ssl = read(read_startup, (struct.pack("!II", 8, SSL_REQUEST)))
    assert ssl.code == SSL_REQUEST and not ssl.params


@pytest.mark.parametrize("length", [4, 10_001, 0xFFFFFFFF])
def test_startup_packets_out_of_bounds_are_violations(length):
    with pytest.raises(ProtocolViolation):
        read(read_startup, (struct.pack("!I", length) + b"\0" * 8))


def test_messages_with_impossible_lengths_are_violations():
    with pytest.raises(ProtocolViolation):
        read(read_message, (b"Q" + struct.pack("!I", 3)))
    with pytest.raises(ProtocolViolation):
        read(read_message, (b"Q" + struct.pack("!I", (1 << 30) + 1)))


def test_a_message_roundtrips():
    msg = read(read_message, (message(b"Q", cstring("SELECT 1"))))
    assert msg.type == b"Q" and parse_query(msg.payload) == "SELECT 1" and msg.raw == message(b"Q", cstring("SELECT 1"))


def test_error_fields_roundtrip_and_empty_ones_are_left_out():
    raw = error_response({"S": "ERROR", "C": "42501", "M": "no", "D": "", "H": "ask alice"})
    assert raw[:1] == b"E"
    assert parse_fields(raw[5:]) == {"S": "ERROR", "C": "42501", "M": "no", "H": "ask alice"}


def test_row_description_and_data_rows_roundtrip():
    cols = [Column("id", 1, 1, 23, 4, -1, 0), Column("password", 1, 2, 25, -1, -1, 1)]
    assert parse_row_description(row_description(cols)[5:]) == cols
    assert parse_data_row(data_row([b"1", None, b""])[5:]) == [b"1", None, b""]


def test_extended_protocol_messages_are_read():
    parse = cstring("s1") + cstring("DELETE FROM t WHERE id = $1") + struct.pack("!HI", 1, 23)
    assert parse_parse(parse) == ("s1", "DELETE FROM t WHERE id = $1", (23,))
    bind = (cstring("p") + cstring("s1") + struct.pack("!HH", 1, 0) + struct.pack("!H", 2)
            + struct.pack("!i", 1) + b"7" + struct.pack("!i", -1) + struct.pack("!H", 0))
    assert parse_bind(bind) == ("p", "s1", (0,), [b"7", None])
    assert parse_execute(cstring("p") + struct.pack("!i", 0)) == ("p", 0)
    assert parse_close(b"S" + cstring("s1")) == ("S", "s1")


def test_the_server_reader_returns_what_one_read_completed_and_keeps_the_rest():
    from chaperone_sidecar.postgres.protocol import MessageReader

    async def main():
        reader = asyncio.StreamReader()
        stream = MessageReader(reader)
        rows = b"".join(data_row([str(i).encode()]) for i in range(3))
        reader.feed_data(rows + message(b"C", cstring("SELECT 3"))[:4])  # a message cut short
        first = await stream.batch()
        reader.feed_data(message(b"C", cstring("SELECT 3"))[4:] + message(b"Z", b"I"))
        second = await stream.batch()
        reader.feed_eof()
        try:
            await stream.batch()
        except asyncio.IncompleteReadError:
            return first, second, "eof"
        return first, second, None

    first, second, end = asyncio.run(main())
    assert [m.type for m in first] == [b"D", b"D", b"D"]
    assert [(m.type, m.payload) for m in second] == [(b"C", b"SELECT 3\0"), (b"Z", b"I")]
    assert end == "eof"
