"""TLS towards the agent: a localhost certificate issued by the sidecar's CA."""

from __future__ import annotations

import asyncio
import datetime as dt
import ssl

from chaperone_operator import ca as operator_ca
from chaperone_sidecar.postgres.tls import server_context


def test_the_listener_certificate_verifies_against_the_interception_ca(tmp_path):
    cert_pem, key_pem = operator_ca.new_ca("test CA", dt.datetime.now(dt.UTC))
    (tmp_path / "mitmproxy-ca.pem").write_bytes(key_pem + cert_pem)
    (tmp_path / "ca.crt").write_bytes(cert_pem)

    async def main():
        context = await server_context(tmp_path / "mitmproxy-ca.pem")
        server = await asyncio.start_server(lambda r, w: w.close(), "127.0.0.1", 0, ssl=context)
        port = server.sockets[0].getsockname()[1]
        client = ssl.create_default_context(cafile=str(tmp_path / "ca.crt"))
        for name in ("localhost", "127.0.0.1"):
            _, writer = await asyncio.open_connection("127.0.0.1", port, ssl=client, server_hostname=name)
            writer.close()
        server.close()
    asyncio.run(main())
