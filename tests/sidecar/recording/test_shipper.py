"""Shipping to a real S3 server (moto, from the test bed): Object Lock on and off, an S3 outage
in the middle of a session, and a SIGKILLed writer whose spool a new recorder ships."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
import urllib.request
import uuid
from datetime import datetime, timedelta, timezone
from pathlib import Path

import boto3
import pytest
from botocore.exceptions import ClientError

from chaperone_sidecar.recording import Recorder
from chaperone_sidecar.recording.manifest import key_from_bytes
from chaperone_sidecar.recording.reader import SessionRef, list_sessions, load_session, verify_session
from chaperone_sidecar.recording.shipper import DirStore, S3Store, ShipperConfig
from chaperone_sidecar.recording.spool import SpoolConfig, SpoolUnavailable
from chaperone_testbed.services import S3Server, TestbedError

REPO = Path(__file__).resolve().parents[3]
KEY = key_from_bytes(b"recording-test-hmac-secret-0123456789")
FAST = ShipperConfig(backoff_base=0.05, backoff_max=0.5, poll_interval=0.05)


def new_bucket(s3_server, **kwargs) -> str:
    name = f"rec-{uuid.uuid4().hex[:12]}"
    boto3.client("s3", **s3_server.client_kwargs()).create_bucket(Bucket=name, **kwargs)
    return name


def make_recorder(tmp_path: Path, store, *, session: str = "s1", pod: str = "pod-1",
                  shipping: ShipperConfig = FAST, **spool) -> Recorder:
    spool.setdefault("segment_bytes", 4000)
    spool.setdefault("segment_max_age", 0.2)
    return Recorder(SpoolConfig(tmp_path / "spool", **spool), namespace="ns", pod=pod,
                    identity={"namespace": "ns", "pod": pod, "creator": "alice"}, session=session,
                    store=store, shipping=shipping, key=KEY)


def spool_is_empty(tmp_path: Path) -> bool:
    return not any((tmp_path / "spool").iterdir())


def requests_in(store, ref: SessionRef) -> list:
    return [e["data"]["i"] for e in load_session(store, ref).events if e["type"] == "request"]


@pytest.mark.parametrize("lock", [None, "COMPLIANCE", "GOVERNANCE"])
def test_ships_chunks_and_manifest_with_object_lock_when_the_bucket_has_it(tmp_path, s3_server, lock):
    bucket = new_bucket(s3_server, **({"ObjectLockEnabledForBucket": True} if lock else {}))
    store = S3Store(bucket, **s3_server.client_kwargs())
    shipping = ShipperConfig(object_lock_mode=lock or "COMPLIANCE", retention_days=7,
                             backoff_base=0.05, poll_interval=0.05)

    async def main():
        rec = make_recorder(tmp_path, store, shipping=shipping)
        await rec.start({"mode": "explicit"})
        for i in range(120):
            await rec.record("request", flow=f"f{i}", data={"i": i, "pad": "x" * 60})
        return rec, await rec.close()

    started = datetime.now(timezone.utc)
    rec, shipped = asyncio.run(main())
    assert shipped and spool_is_empty(tmp_path)
    ref = SessionRef("ns", "pod-1", "s1")
    keys = sorted(store.list(ref.prefix))
    assert keys[-1] == "sessions/ns/pod-1/s1/manifest.json" and len(keys) >= 4
    assert keys[0] == "sessions/ns/pod-1/s1/chunk-00000000.jsonl"
    assert rec.metrics.uploads == len(keys) and rec.metrics.manifests == 1
    assert rec.metrics.backlog_segments == 0 and rec.metrics.upload_failures == 0
    client = store.client
    for key in keys:
        head = client.head_object(Bucket=bucket, Key=key)
        if lock is None:
            assert "ObjectLockMode" not in head and "ObjectLockRetainUntilDate" not in head
        else:
            assert head["ObjectLockMode"] == lock
            until = head["ObjectLockRetainUntilDate"]
            assert started + timedelta(days=7, minutes=-1) < until < started + timedelta(days=7, minutes=2)
    if lock == "COMPLIANCE":  # the server enforces it: the recording cannot be deleted
        version = client.head_object(Bucket=bucket, Key=keys[0])["VersionId"]
        with pytest.raises(ClientError):
            client.delete_object(Bucket=bucket, Key=keys[0], VersionId=version)
    report = verify_session(store, ref, KEY)
    assert report.ok, report.problems
    assert report.events == 122 and report.signature == "valid"
    assert requests_in(store, ref) == list(range(120))


def test_ships_to_a_local_directory_read_only(tmp_path):
    store = DirStore(tmp_path / "recordings")

    async def main():
        rec = make_recorder(tmp_path, store)
        await rec.start()
        await rec.record("request", data={"i": 0})
        return await rec.close()

    assert asyncio.run(main())
    ref = list_sessions(store)[0].ref
    assert verify_session(store, ref, KEY).ok
    chunk = tmp_path / "recordings" / "sessions/ns/pod-1/s1/chunk-00000000.jsonl"
    assert oct(chunk.stat().st_mode & 0o777) == "0o444"


class CorruptingStore(DirStore):
    """Stores something other than what it was given (a broken proxy or disk on the way)."""

    def put(self, key, data, **kwargs):
        return super().put(key, data[:-2] + b"?\n", **kwargs)


def test_a_segment_is_kept_until_its_upload_is_confirmed(tmp_path):
    async def first():
        rec = make_recorder(tmp_path, CorruptingStore(tmp_path / "bad"))
        await rec.start()
        for i in range(30):
            await rec.record("request", data={"i": i, "pad": "x" * 200})
        return rec, await rec.close(timeout=1.0)

    rec, shipped = asyncio.run(first())
    assert not shipped and rec.metrics.upload_failures >= 1 and rec.metrics.uploads == 0
    assert "HEAD does not match" in rec.upload_error
    assert len(list((tmp_path / "spool" / "s1").glob("seg-*.jsonl"))) >= 2  # nothing deleted

    good = DirStore(tmp_path / "good")

    async def second():  # the next start ships the leftover (already ended: no recovery events)
        rec = make_recorder(tmp_path, good, session="s2")
        await rec.start()
        return await rec.close()

    assert asyncio.run(second()) and spool_is_empty(tmp_path)
    report = verify_session(good, SessionRef("ns", "pod-1", "s1"), KEY)
    assert report.ok and report.events == 32


def test_backoff_grows_with_jitter():
    config = ShipperConfig(backoff_base=1.0, backoff_max=8.0)
    for attempt, ceiling in ((0, 1.0), (1, 2.0), (2, 4.0), (3, 8.0), (10, 8.0)):
        delays = {config.backoff(attempt) for _ in range(50)}
        assert all(ceiling / 2 <= d <= ceiling for d in delays) and len(delays) > 1


# ---- fault: the S3 server goes away mid-session --------------------------------------------------

@pytest.fixture
def durable_s3(tmp_path, monkeypatch):
    """A moto S3 server of our own whose state survives a restart.

    moto keeps everything in memory, so a plain restart loses the objects shipped before the
    outage - which real S3 would keep. moto's request recorder (MOTO_ENABLE_RECORDING) logs every
    request to a file; after the restart we replay that file (``/moto-api/recorder/replay-recording``)
    to bring the bucket back exactly as it was. A dedicated server (not the session-wide
    ``s3_server``) so the restart cannot pull state from under other tests.
    """
    monkeypatch.setenv("MOTO_ENABLE_RECORDING", "1")
    monkeypatch.setenv("MOTO_RECORDER_FILEPATH", str(tmp_path / "moto-requests.jsonl"))
    server = S3Server()
    try:
        server.start()
    except TestbedError as exc:
        server.close()
        pytest.fail(f"test bed: S3 (moto) server could not start:\n{exc}", pytrace=False)
    yield server
    server.close()


def restart_with_state(server: S3Server) -> None:
    server.start()  # same port
    request = urllib.request.Request(server.endpoint_url + "/moto-api/recorder/replay-recording",
                                     method="POST")
    with urllib.request.urlopen(request, timeout=60) as response:
        assert response.status == 200


def test_s3_outage_mid_session_loses_no_event(tmp_path, durable_s3):
    bucket = new_bucket(durable_s3, ObjectLockEnabledForBucket=True)
    store = S3Store(bucket, **durable_s3.client_kwargs())

    async def main():
        rec = make_recorder(tmp_path, store)
        await rec.start()
        i = 0

        async def burst(n):
            nonlocal i
            for _ in range(n):
                await rec.record("request", flow=f"f{i}", data={"i": i, "pad": "x" * 80})
                i += 1
                await asyncio.sleep(0.002)

        await burst(150)
        deadline = time.monotonic() + 20
        while rec.metrics.uploads < 2 and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        assert rec.metrics.uploads >= 2

        durable_s3.stop()
        await asyncio.sleep(0.1)  # an upload confirmed just before the server died settles
        uploads_before = rec.metrics.uploads
        await burst(400)  # traffic while S3 is unreachable...
        deadline = time.monotonic() + 20
        while rec.metrics.upload_failures < 2 and time.monotonic() < deadline:
            await burst(10)  # ...until the shipper has failed (and backed off) at least twice
        down = rec.metrics.snapshot()

        await asyncio.to_thread(restart_with_state, durable_s3)
        await burst(100)
        shipped = await rec.close(timeout=60)
        return rec, uploads_before, down, shipped, i

    rec, uploads_before, down, shipped, total = asyncio.run(main())
    assert down["upload_failures"] >= 1 and down["backlog_segments"] >= 3
    assert down["uploads"] == uploads_before  # nothing went anywhere while down
    assert shipped and spool_is_empty(tmp_path) and rec.metrics.backlog_segments == 0
    ref = SessionRef("ns", "pod-1", "s1")
    report = verify_session(store, ref, KEY)
    assert report.ok, [str(p) for p in report.problems]
    assert report.events == total + 2
    assert requests_in(store, ref) == list(range(total))  # every event, in order
    head = store.client.head_object(Bucket=bucket, Key="sessions/ns/pod-1/s1/manifest.json")
    assert head["ObjectLockMode"] == "COMPLIANCE"


def test_spool_cap_with_s3_down_refuses_then_recovers(tmp_path, durable_s3):
    """The realistic disk-full: S3 is down, the backlog reaches the spool cap, strict mode
    refuses; once S3 is back the backlog drains and appends succeed, the gap on record."""
    bucket = new_bucket(durable_s3)
    store = S3Store(bucket, **durable_s3.client_kwargs())

    async def main():
        rec = make_recorder(tmp_path, store, max_spool_bytes=12_000, segment_bytes=2000)
        await rec.start()
        durable_s3.stop()
        outcomes = []
        for i in range(150):
            try:
                await rec.record("request", data={"i": i, "pad": "x" * 100})
                outcomes.append(True)
            except SpoolUnavailable:
                outcomes.append(False)
        await asyncio.to_thread(restart_with_state, durable_s3)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                await rec.record("request", data={"i": "back"})
                break
            except SpoolUnavailable:
                await asyncio.sleep(0.1)
        return rec, outcomes, await rec.close(timeout=60)

    rec, outcomes, shipped = asyncio.run(main())
    assert outcomes[0] and not outcomes[-1] and shipped
    ref = SessionRef("ns", "pod-1", "s1")
    report = verify_session(store, ref, KEY)
    assert report.ok, [str(p) for p in report.problems]
    events = load_session(store, ref).events
    gaps = [e for e in events if e["type"] == "error"]
    assert gaps and sum(g["data"]["droppedEvents"] for g in gaps) == rec.metrics.events_dropped
    assert requests_in(store, ref)[-1] == "back"


# ---- crash: SIGKILL the writer, a new recorder ships its spool ------------------------------------

CRASHING_WRITER = textwrap.dedent('''
    import asyncio, json, sys
    from chaperone_sidecar.recording import Recorder
    from chaperone_sidecar.recording.manifest import key_from_bytes
    from chaperone_sidecar.recording.shipper import S3Store, ShipperConfig
    from chaperone_sidecar.recording.spool import SpoolConfig
    cfg = json.loads(sys.argv[1])

    async def main():
        rec = Recorder(SpoolConfig(cfg["spool"], segment_bytes=3000, fsync_every=16),
                       namespace="ns", pod="crashy", session="doomed",
                       store=S3Store(cfg["bucket"], **cfg["client"]), key=key_from_bytes(cfg["key"].encode()),
                       shipping=ShipperConfig(poll_interval=0.05, backoff_base=0.05))
        await rec.start()
        i = 0
        while True:  # until SIGKILL
            await rec.record("request", flow=f"f{i}", data={"i": i, "pad": "x" * 50})
            print(i, flush=True)
            i += 1
            if i % 20 == 0:
                await asyncio.sleep(0.005)

    asyncio.run(main())
''')


def test_sigkilled_writer_spool_is_shipped_by_the_next_recorder(tmp_path, s3_server):
    bucket = new_bucket(s3_server)
    store = S3Store(bucket, **s3_server.client_kwargs())
    ref = SessionRef("ns", "crashy", "doomed")
    cfg = {"spool": str(tmp_path / "spool"), "bucket": bucket, "client": s3_server.client_kwargs(),
           "key": "recording-test-hmac-secret-0123456789"}
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(str(REPO / d) for d in ("sidecar", "testbed")))
    proc = subprocess.Popen([sys.executable, "-c", CRASHING_WRITER, json.dumps(cfg)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    last = -1
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            line = proc.stdout.readline()
            assert line, proc.stderr.read()
            last = int(line)
            if last >= 600 and len(list(store.list(ref.prefix))) >= 2:
                break
        os.kill(proc.pid, signal.SIGKILL)  # mid-stream: appends, fsyncs and uploads in flight
    finally:
        proc.kill()
        proc.wait(timeout=10)
    assert proc.returncode == -signal.SIGKILL and last >= 600
    shipped_before = len(list(store.list(ref.prefix)))

    segments = sorted((tmp_path / "spool" / "doomed").glob("seg-*"), key=lambda p: int(p.name[4:12]))
    torn = b'{"data":{"i":' + str(last + 1).encode()  # a write the kill interrupted
    with open(segments[-1], "ab") as f:
        f.write(torn)

    async def restart():
        rec = make_recorder(tmp_path, store, session="survivor", pod="crashy")
        await rec.start()
        await rec.record("request", data={"i": 0})
        return rec, await rec.close(timeout=60)

    rec, shipped = asyncio.run(restart())
    assert shipped and spool_is_empty(tmp_path)
    assert rec.metrics.torn_tails == 1
    report = verify_session(store, ref, KEY)
    assert report.ok, [str(p) for p in report.problems]
    events = load_session(store, ref).events
    numbers = [e["data"]["i"] for e in events if e["type"] == "request"]
    assert numbers == list(range(len(numbers))) and len(numbers) >= last + 1  # every acked event
    error, end = events[-2:]
    assert error["type"] == "error" and error["data"]["kind"] == "unclean-shutdown"
    assert error["data"]["tornBytes"] >= len(torn) and error["data"]["problems"] == []
    assert end["type"] == "session-end" and end["data"]["reason"] == "recovered"
    manifest = load_session(store, ref).manifest
    assert manifest["endReason"] == "recovered" and len(manifest["chunks"]) > shipped_before - 0
    assert verify_session(store, SessionRef("ns", "crashy", "survivor"), KEY).ok


def test_key_prefix_goes_in_front_of_the_layout(tmp_path, s3_server, capsys, monkeypatch):
    from chaperone_sidecar.recording.sessions_cli import main

    bucket = new_bucket(s3_server)
    store = S3Store(bucket, prefix="/env/prod/", **s3_server.client_kwargs())

    async def record():
        rec = make_recorder(tmp_path, store)
        await rec.start()
        await rec.record("request", data={"i": 0})
        return await rec.close()

    assert asyncio.run(record())
    raw = [o["Key"] for o in store.client.list_objects_v2(Bucket=bucket)["Contents"]]
    assert raw and all(k.startswith("env/prod/sessions/ns/pod-1/s1/") for k in raw)
    manifest = json.loads(store.get("sessions/ns/pod-1/s1/manifest.json"))
    assert manifest["chunks"][0]["key"] == "sessions/ns/pod-1/s1/chunk-00000000.jsonl"  # store-relative
    for name, value in s3_server.env().items():
        monkeypatch.setenv(name, value)
    assert main(["sessions", "verify", "s1", "--s3-bucket", bucket, "--s3-prefix", "env/prod",
                 "--s3-endpoint", s3_server.endpoint_url, "--skip-signature"]) == 0
    assert capsys.readouterr().out.startswith("OK      ns/pod-1/s1: 3 events")
