"""Logging in upstream: which challenges are answered, what the agent's startup may carry.

A scripted server on loopback (this is a unit test: the real server's SCRAM path is covered by
tests/sidecar/integration/test_postgres.py) asks for md5, cleartext, SASL with only the
channel-binding mechanism, or nothing, and records what the sidecar sent.
"""

from __future__ import annotations

import asyncio
import hashlib
import struct

import pytest

from chaperone_sidecar.postgres.protocol import message, parameter_status, read_message, read_startup, ready_for_query
from chaperone_sidecar.postgres.upstream import UpstreamError, UpstreamSettings, connect


def auth(code: int, data: bytes = b"") -> bytes:
    return message(b"R", struct.pack("!I", code) + data)


async def scripted(challenge: bytes | None, seen: dict):
    async def handle(reader, writer):
        startup = await read_startup(reader)
        seen["params"] = dict(startup.params)
        if challenge is not None:
            writer.write(challenge)
            await writer.drain()
            try:
                seen["answer"] = await asyncio.wait_for(read_message(reader), 5)
            except (asyncio.IncompleteReadError, TimeoutError):
                writer.close()
                return
        writer.write(auth(0) + parameter_status("server_version", "15") + message(b"K", b"\0\0\0\7secr")
                     + ready_for_query(b"I"))
        await writer.drain()
        await asyncio.sleep(0.2)
        writer.close()
    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    return server, server.sockets[0].getsockname()[1]


def settings(port: int, **kw) -> UpstreamSettings:
    return UpstreamSettings(host="127.0.0.1", port=port, database="shop", user="agent",
                            password=lambda: "s3cret", sslmode="disable", **kw)


def run(challenge, agent_params=None, **kw):
    async def main():
        seen: dict = {}
        server, port = await scripted(challenge, seen)
        try:
            up = await connect(settings(port, **kw), agent_params or {})
            up.close()
            return up, seen
        finally:
            server.close()
    return asyncio.run(main())


def test_md5_is_answered_only_when_the_connection_allows_it():
    salt = b"\x01\x02\x03\x04"
    up, seen = run(auth(5, salt), allowed_auth=("scram-sha-256", "md5"))
    inner = hashlib.md5(b"s3cretagent").hexdigest()
    assert seen["answer"].payload == b"md5" + hashlib.md5(inner.encode() + salt).hexdigest().encode() + b"\0"
    assert up.auth == "md5" and up.parameters == {"server_version": "15"} and up.status == b"I"
    with pytest.raises(UpstreamError, match="md5 authentication, which this connection does not allow"):
        run(auth(5, salt))


def test_cleartext_is_never_sent_without_tls():
    with pytest.raises(UpstreamError, match="cleartext password") as info:
        run(auth(3), allowed_auth=("password",))
    assert info.value.fields["C"] == "28000" and "s3cret" not in str(info.value.fields)


def test_channel_binding_only_and_unknown_methods_are_refused():
    with pytest.raises(UpstreamError, match="offers only SCRAM-SHA-256-PLUS"):
        run(auth(10, b"SCRAM-SHA-256-PLUS\0\0"))
    with pytest.raises(UpstreamError, match="authentication method 7"):
        run(auth(7))  # GSSAPI


def test_trust_logs_in_and_only_allowed_startup_parameters_pass():
    up, seen = run(None, {"application_name": "psql", "options": "-c role=postgres", "replication": "true",
                          "user": "root", "database": "postgres", "client_encoding": "LATIN1",
                          "DateStyle": "ISO"})
    assert up.auth == "trust"
    assert seen["params"] == {"user": "agent", "database": "shop", "client_encoding": "UTF8",
                              "application_name": "psql", "DateStyle": "ISO"}


def test_an_unreachable_server_is_a_clear_error():
    async def main():
        server = await asyncio.start_server(lambda r, w: None, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        server.close()
        await server.wait_closed()
        return await connect(settings(port), {})
    with pytest.raises(UpstreamError, match="cannot reach the database server"):
        asyncio.run(main())


def test_no_password_mounted_is_a_clear_error():
    async def main():
        seen: dict = {}
        server, port = await scripted(auth(5, b"salt"), seen)
        try:
            s = UpstreamSettings(host="127.0.0.1", port=port, database="d", user="u", password=lambda: None,
                                 sslmode="disable", allowed_auth=("md5",))
            return await connect(s, {})
        finally:
            server.close()
    with pytest.raises(UpstreamError, match="holds no password"):
        asyncio.run(main())
