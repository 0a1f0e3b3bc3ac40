"""Redis and S3 test servers: real protocols, clean failures, same-port restarts."""

from __future__ import annotations

import uuid

import boto3
import pytest
import redis

from chaperone_testbed.services import ComponentUnavailable, RedisServer, StartupError


def test_redis_ping_set_get(redis_server):
    assert redis_server.address_url.startswith("redis://127.0.0.1:")
    assert redis_server.url == redis_server.address_url.replace(
        "redis://", f"redis://:{redis_server.password}@")
    r = redis.Redis.from_url(redis_server.url)
    assert r.ping()
    r.set("chaperone:testbed", "ok")
    assert r.get("chaperone:testbed") == b"ok"


def test_redis_restart_same_port():
    with RedisServer() as server:
        port = server.port
        redis.Redis.from_url(server.url).set("k", "v")
        server.restart()
        assert server.port == port
        r = redis.Redis.from_url(server.url)
        assert r.ping()
        assert r.get("k") is None  # no persistence, by design


def test_s3_put_get_and_restart_same_port(s3_server):
    s3 = boto3.client("s3", **s3_server.client_kwargs())
    bucket = f"tb-{uuid.uuid4().hex[:8]}"
    s3.create_bucket(Bucket=bucket)
    s3.put_object(Bucket=bucket, Key="rec/1.json", Body=b'{"ok": true}')
    assert s3.get_object(Bucket=bucket, Key="rec/1.json")["Body"].read() == b'{"ok": true}'

    port = s3_server.port
    s3_server.stop()
    assert not s3_server.running
    s3_server.start()
    assert s3_server.port == port
    # moto is in-memory: the server answers again, the data is gone.
    names = [b["Name"] for b in boto3.client("s3", **s3_server.client_kwargs())
             .list_buckets()["Buckets"]]
    assert bucket not in names
    s3_server.restart()
    assert s3_server.port == port and s3_server.running


def test_missing_binary_is_named(monkeypatch):
    monkeypatch.setenv("PATH", "/nonexistent")
    with pytest.raises(ComponentUnavailable, match="redis-server"):
        RedisServer().start()


def test_startup_failure_carries_log_tail():
    server = RedisServer(binary="/bin/false", startup_timeout=5)
    with pytest.raises(StartupError) as exc:
        server.start()
    server.close()
    assert "exited" in str(exc.value) and "/bin/false --port" in str(exc.value)
