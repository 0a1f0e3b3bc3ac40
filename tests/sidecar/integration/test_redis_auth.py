"""Redis AUTH, end to end: the sidecar authenticates with the password the webhook gave it from
the namespace's Secret; the agent, from its position, is refused and writes nothing.

The agent's position: it shares the pod's network namespace with the sidecar, so it can open a
TCP connection to the Redis port (no NetworkPolicy can stop that), and it knows the Redis
address (the sidecar's CHAPERONE_REDIS_URL carries no password). It never gets the password:
the webhook puts it in a secretKeyRef variable of the sidecar container only. So the agent's
client is a plain connection to the address, with whatever it may guess.

Real components: the test bed's redis-server (with --requirepass), the real apiserver, the
sidecar run from its injected container spec (secretKeyRef resolved from the Secret as the
kubelet does), a local HTTPS upstream, Python requests and redis clients.
"""

from __future__ import annotations

import socket
import uuid

import pytest
import redis
import requests

from chaperone_operator.injection.settings import InjectionSettings

from .pod import HTTPSUpstream, InjectedPod, connection, free_port, policy, setup_namespace

HOST = "127.0.0.2"
GRANT_KEY = "chaperone:grant:forged"


@pytest.fixture
def pod(control_plane, crds_installed, redis_server, tmp_path):
    upstream = HTTPSUpstream(tmp_path / "upstream", host=HOST, names=("api.internal",), ips=(HOST,))
    ns = f"redis-auth-{uuid.uuid4().hex[:8]}"
    conns = [connection("api", {
        "type": "http", "hosts": [HOST],
        "upstreamCA": {"kind": "ConfigMap", "name": "api-ca", "key": "ca.crt"}})]
    policies = [policy("api", {"connections": ["api"], "defaultEffect": "allow", "rules": [
        {"name": "counted", "match": {"methods": ["GET"]},
         "rateLimit": {"requests": 1000, "periodSeconds": 60, "per": "pod"}}]})]
    setup_namespace(control_plane, ns, conns + policies)
    # The chart's wiring: the URL without the password, the password in the Secret.
    settings = InjectionSettings(proxy_port=free_port(), health_port=free_port(),
                                 redis_url=redis_server.address_url, redis_secret="chaperone-redis")
    sidecar = InjectedPod(control_plane, ns, tmp_path / "pod", connections=conns, settings=settings,
                          secrets={"chaperone-redis": {"password": redis_server.password}},
                          configmaps={"api-ca": {"ca.crt": upstream.ca_file.read_bytes()}})
    sidecar.start()
    try:
        sidecar.wait_ready()
        yield sidecar, upstream
    finally:
        sidecar.stop()
        upstream.close()
        control_plane.kubectl("delete", "namespace", ns, "--wait=false", check=False)


def _raw(port: int, payload: bytes) -> bytes:
    """What a hand-written client gets back from the Redis port (inline or RESP commands)."""
    with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
        s.sendall(payload)
        s.settimeout(2)
        data = b""
        try:
            while chunk := s.recv(4096):
                data += chunk
                if data.count(b"\r\n") >= payload.count(b"\r\n") and not payload.startswith(b"*"):
                    break
                if payload.startswith(b"*") and data.endswith(b"\r\n"):
                    break
        except socket.timeout:
            pass
        return data


def test_sidecar_authenticates_and_the_agent_is_refused(pod, redis_server):
    sidecar, upstream = pod
    admin = redis.Redis.from_url(redis_server.url)
    admin.delete(GRANT_KEY)

    # The sidecar uses Redis (its rate-limit window) with the password from the Secret.
    res = requests.get(f"https://{HOST}:{upstream.port}/items", proxies={"https": sidecar.proxy_url},
                       verify=str(sidecar.trust_file), timeout=30)
    assert res.status_code == 200, res.text
    assert admin.keys("chaperone:ratelimit:*"), "the sidecar wrote nothing to Redis"
    assert "CHAPERONE_REDIS_PASSWORD" not in str(sidecar.agent)  # the agent's container spec

    # The agent: the address it can learn, no password.
    agent = redis.Redis.from_url(redis_server.address_url, socket_timeout=5)
    # (redis-py 8 opens with HELLO 3, which Redis refuses before AUTH: "NOAUTH HELLO must be
    # called with the client already authenticated".)
    with pytest.raises(redis.AuthenticationError, match="authenticated"):
        agent.set(GRANT_KEY, "1")
    resp2 = redis.Redis.from_url(redis_server.address_url, protocol=2, socket_timeout=5)
    with pytest.raises(redis.AuthenticationError, match="Authentication required"):
        resp2.set(GRANT_KEY, "1")
    with pytest.raises(redis.AuthenticationError):
        resp2.keys("chaperone:*")  # cannot even read the real grants to copy them
    for guess in ("", "chaperone", "redis", "password"):
        with pytest.raises((redis.AuthenticationError, redis.ResponseError)):
            redis.Redis.from_url(redis_server.address_url, password=guess, socket_timeout=5).set(GRANT_KEY, "1")
    with pytest.raises(redis.AuthenticationError):  # the "default" user by name
        redis.Redis.from_url(redis_server.address_url, username="default", password="x").set(GRANT_KEY, "1")

    # Hand-written clients: inline commands, RESP, HELLO 3 without AUTH, a pipeline that tries
    # to sneak a write after a failed AUTH.
    port = redis_server.port
    assert _raw(port, f"SET {GRANT_KEY} 1\r\n".encode()).startswith(b"-NOAUTH")
    assert _raw(port, b"*3\r\n$3\r\nSET\r\n$%d\r\n%s\r\n$1\r\n1\r\n"
                % (len(GRANT_KEY), GRANT_KEY.encode())).startswith(b"-NOAUTH")
    assert b"NOAUTH" in _raw(port, b"HELLO 3\r\n")
    pipelined = _raw(port, f"AUTH wrong\r\nSET {GRANT_KEY} 1\r\n".encode())
    assert pipelined.startswith(b"-WRONGPASS") and b"-NOAUTH" in pipelined
    # ...and an HTTP-looking request is dropped (Redis' cross-protocol guard).
    assert b"+OK" not in _raw(port, f"POST / HTTP/1.1\r\nHost: x\r\n\r\nSET {GRANT_KEY} 1\r\n".encode())

    assert admin.exists(GRANT_KEY) == 0, "an unauthenticated client wrote a grant key"
