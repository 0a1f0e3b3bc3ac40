"""The sidecar's Redis client with AUTH and TLS as the chart configures them: the URL
(rediss://, no password), the password and the CA from the secretKeyRef variables. Against the
real redis-server (Debian's, TLS-capable) listening with TLS only and --requirepass."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import shutil
import subprocess
import time

import pytest
import redis
import redis.asyncio as aioredis

from chaperone_operator.injection.settings import InjectionSettings
from chaperone_operator.injection.sidecar import sidecar_container
from chaperone_sidecar.config import SidecarConfig
from chaperone_sidecar.services import build_services
from chaperone_testbed.pki import CertAuthority
from chaperone_testbed.services import free_port

PASSWORD = "s3cret with spaces & $signs"


@pytest.fixture(scope="module")
def tls_redis(tmp_path_factory):
    binary = shutil.which("redis-server")
    assert binary, "redis-server (Debian package) is required"
    workdir = tmp_path_factory.mktemp("redis-tls")
    ca = CertAuthority("chaperone-redis-test-ca")
    pair = ca.write_server_cert(workdir, "redis", dns_names=("localhost",), ip_addresses=("127.0.0.1",))
    ca_file = ca.write_cert(workdir / "ca.crt")
    port = free_port()
    proc = subprocess.Popen([binary, "--port", "0", "--tls-port", str(port), "--bind", "127.0.0.1",
                             "--tls-cert-file", str(pair.cert_path), "--tls-key-file", str(pair.key_path),
                             "--tls-ca-cert-file", str(ca_file), "--tls-auth-clients", "no",
                             "--requirepass", PASSWORD, "--save", "", "--appendonly", "no",
                             "--dir", str(workdir)],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    admin = redis.Redis(host="localhost", port=port, password=PASSWORD, ssl=True,
                        ssl_ca_certs=str(ca_file), socket_timeout=2)
    try:
        for _ in range(100):
            try:
                admin.ping()
                break
            except redis.ConnectionError:
                if proc.poll() is not None:
                    pytest.fail(proc.stdout.read().decode(), pytrace=False)
                time.sleep(0.1)
        yield {"port": port, "ca_pem": ca.cert_pem.decode(), "admin": admin}
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def test_the_injected_variables_reach_the_config_but_not_its_repr():
    container = sidecar_container(
        InjectionSettings(redis_url="rediss://chaperone-redis.chaperone-system.svc:6379/0",
                          redis_secret="chaperone-redis", redis_tls_ca=True),
        "explicit", "hold", [], json.dumps({"username": "alice"}))
    env = {e["name"]: e.get("value") for e in container["env"] if "value" in e}
    refs = {e["name"]: e["valueFrom"]["secretKeyRef"]["key"] for e in container["env"]
            if "secretKeyRef" in e.get("valueFrom", {})}
    assert refs == {"CHAPERONE_REDIS_PASSWORD": "password", "CHAPERONE_REDIS_CA_CERT": "ca.crt"}
    # What the kubelet resolves them to:
    env.update({"CHAPERONE_REDIS_PASSWORD": PASSWORD, "CHAPERONE_REDIS_CA_CERT": "-----BEGIN CERTIFICATE-----x",
                "CHAPERONE_POD_NAMESPACE": "agents", "CHAPERONE_POD_NAME": "p",
                "KUBERNETES_SERVICE_HOST": "10.0.0.1", "KUBERNETES_SERVICE_PORT": "443"})
    config = SidecarConfig.from_env(env, container["args"][1:])
    assert config.redis_password == PASSWORD and config.redis_ca_cert.startswith("-----BEGIN")
    assert PASSWORD not in repr(config) and "BEGIN CERTIFICATE" not in repr(config)


def _config(tmp_path, port: int, **changes) -> SidecarConfig:
    base = SidecarConfig.from_files(tmp_path, env={})
    return dataclasses.replace(base, redis_url=f"rediss://localhost:{port}/0", **changes)


def test_sidecar_talks_tls_with_the_password_and_verifies_the_server(tls_redis, tmp_path):
    async def go(config, key):
        services = await build_services(config, recorder=False)
        try:
            assert type(services.grants).__name__ == "RedisGrants"
            await services.redis.set(key, "1")
            return await services.redis.get(key)
        finally:
            await services.aclose()

    ok = _config(tmp_path, tls_redis["port"], redis_password=PASSWORD, redis_ca_cert=tls_redis["ca_pem"])
    assert asyncio.run(go(ok, "chaperone:test:tls")) == b"1"
    assert tls_redis["admin"].get("chaperone:test:tls") == b"1"

    no_password = _config(tmp_path, tls_redis["port"], redis_ca_cert=tls_redis["ca_pem"])
    with pytest.raises(aioredis.AuthenticationError):
        asyncio.run(go(no_password, "chaperone:test:nopass"))
    other_ca = CertAuthority("someone-else").cert_pem.decode()
    untrusted = _config(tmp_path, tls_redis["port"], redis_password=PASSWORD, redis_ca_cert=other_ca)
    with pytest.raises(aioredis.ConnectionError, match="certificate verify failed"):
        asyncio.run(go(untrusted, "chaperone:test:mitm"))
    assert tls_redis["admin"].exists("chaperone:test:nopass", "chaperone:test:mitm") == 0
