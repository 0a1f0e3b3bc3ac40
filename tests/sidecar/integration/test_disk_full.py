"""Disk full while S3 is down (issue 11, item 10): the sidecar heals by itself, losing nothing.

The pod's spool emptyDir is a REAL 2 MiB tmpfs mounted by the test (we run as root; mounting
refused is a failure, never a skip). The sidecar process ships to a moto S3 server of its own
that is stopped before the sidecar starts (connections refused, as an S3 outage looks) and
restarted later with its state replayed. The agent (``requests`` through the proxy) calls an
upstream until the spool device is full: strict recording answers 503 with Chaperone's JSON
refusal ``chaperone_recording_unavailable``. Then S3 comes back, and without any restart the
recorder must ship the backlog, free the spool and let traffic through again. After a clean
stop, ``chaperone sessions verify`` checks chain, digests and signature, and every call the
agent saw answered 200 is in the recording.

Before the fix the recorder deadlocked here: confirming the first shipped chunk appended to
``shipped.jsonl`` before deleting the segment, the append failed with ENOSPC, nothing was ever
freed and every request was refused until the container restarted.
"""

from __future__ import annotations

import json
import subprocess
import time
import urllib.request
import uuid

import boto3
import pytest
import requests

from chaperone_operator.injection.settings import InjectionSettings
from chaperone_sidecar.recording.reader import SessionRef, load_session
from chaperone_sidecar.recording.shipper import S3Store
from chaperone_testbed.services import S3Server, TestbedError

from .pod import (
    HTTPSUpstream,
    InjectedPod,
    connection,
    free_port,
    policy,
    sessions_cli,
    setup_namespace,
    wait_for,
)

HOST = "127.0.0.3"
TOKEN = "disk-full-token-31"
MANIFEST_KEY = "disk-full-manifest-hmac-key-0123456789abcdef"
BIG = {"blob": "b" * 60_000}  # a fat response: fills the 2 MiB spool in a few dozen calls


@pytest.fixture
def durable_s3(tmp_path, monkeypatch):
    """A moto server of our own whose state survives a restart (moto's request recorder is
    replayed after the restart), so stopping it is a real outage without losing the bucket."""
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


@pytest.fixture
def tmpfs_mounts():
    """``mount(path, size)``: a real tmpfs there, unmounted after the test whatever happens."""
    mounted = []

    def mount(path, size: str) -> None:
        path.mkdir(parents=True, exist_ok=True)
        out = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size},mode=0755", "tmpfs",
                              str(path)], capture_output=True, text=True, timeout=30)
        if out.returncode != 0:  # CI runs as root; elsewhere: unshare -rm pytest ...
            pytest.fail(f"cannot mount a tmpfs on {path} (needs root or CAP_SYS_ADMIN): "
                        f"{out.stderr.strip()}", pytrace=False)
        mounted.append(path)

    yield mount
    for path in mounted:
        subprocess.run(["umount", "-l", str(path)], capture_output=True, timeout=30)


def test_full_spool_with_s3_down_heals_without_restart(control_plane, crds_installed, durable_s3,
                                                       tmpfs_mounts, tmp_path):
    s3_server = durable_s3
    s3 = boto3.client("s3", **s3_server.client_kwargs())
    bucket = f"recordings-{uuid.uuid4().hex[:8]}"
    s3.create_bucket(Bucket=bucket)
    upstream = HTTPSUpstream(tmp_path / "upstream", host=HOST, ips=(HOST,),
                             routes={("GET", "/big"): (200, BIG)})
    ns = f"diskfull-{uuid.uuid4().hex[:8]}"
    conns = [connection("tickets", {"type": "http", "hosts": [HOST],
                                    "credentials": {"source": "secret", "secretRef": {"name": "tok"}},
                                    "upstreamCA": {"kind": "ConfigMap", "name": "up-ca", "key": "ca.crt"}})]
    setup_namespace(control_plane, ns, conns + [policy("reads", {"rules": [
        {"name": "reads", "match": {"methods": ["GET"]}, "allow": {}}]})])
    settings = InjectionSettings(proxy_port=free_port(), health_port=free_port(), s3_bucket=bucket,
                                 s3_endpoint=s3_server.endpoint_url, s3_region=s3_server.region,
                                 sidecar_secret="chaperone-sidecar")
    pod = InjectedPod(control_plane, ns, tmp_path / "pod", connections=conns, settings=settings,
                      secrets={"tok": {"token": TOKEN},
                               "chaperone-sidecar": {"AWS_ACCESS_KEY_ID": s3_server.access_key,
                                                     "AWS_SECRET_ACCESS_KEY": s3_server.secret_key,
                                                     "MANIFEST_KEY": MANIFEST_KEY}},
                      configmaps={"up-ca": {"ca.crt": upstream.ca_file.read_bytes()}})
    key_file = pod.volume_dir("chaperone-sidecar-secret") / "MANIFEST_KEY"
    s3_env = {"AWS_ACCESS_KEY_ID": s3_server.access_key, "AWS_SECRET_ACCESS_KEY": s3_server.secret_key,
              "AWS_DEFAULT_REGION": s3_server.region}
    source = ["--s3-bucket", bucket, "--s3-endpoint", s3_server.endpoint_url]
    env = pod.agent_env()
    proxies = {"https": env["HTTPS_PROXY"]}
    verify = env["REQUESTS_CA_BUNDLE"]
    base = f"https://{HOST}:{upstream.port}"
    tmpfs_mounts(pod.spool_dir, "2m")
    answered: list[str] = []  # paths the agent got a 200 for: each must be in the recording
    refusals: list[requests.Response] = []
    n = 0

    def call(path: str) -> requests.Response:
        nonlocal n
        n += 1
        r = requests.get(f"{base}{path}?n={n}", proxies=proxies, verify=verify, timeout=30)
        if r.status_code == 200:
            answered.append(f"{path}?n={n}")
        else:
            refusals.append(r)
        return r

    def objects() -> list[str]:
        return [o["Key"] for o in s3.list_objects_v2(Bucket=bucket).get("Contents", [])]

    try:
        s3_server.stop()  # S3 outage from the start: nothing leaves the spool
        pod.start()
        pod.wait_ready()
        session = [p.name for p in pod.spool_dir.iterdir() if p.is_dir()][0]
        # ---- fill the spool device: fat calls, then small ones until every page is taken
        for path, streak_needed in (("/big", 3), ("/small", 10)):
            streak = 0
            while streak < streak_needed:
                r = call(path)
                streak = streak + 1 if r.status_code == 503 else 0
                assert n < 3000, "the spool never filled"
        # what strict mode answers the agent while the disk is full: Chaperone's JSON refusal
        for refusal in refusals:
            assert refusal.status_code == 503
            assert refusal.headers["Content-Type"] == "application/json"
            body = refusal.json()
            assert body["error"] == "chaperone_recording_unavailable", body
            assert "recording" in body["message"] and body["how_to_get_access"], body
            if "Retry-After" in refusal.headers:  # refused before forwarding: safe to retry
                assert refusal.headers["Retry-After"] == "5" and body["retry_after_seconds"] == 5
            else:  # forwarded, but the response could not be recorded: withheld
                assert "was forwarded" in body["message"], body
        assert any("Retry-After" in r.headers for r in refusals)
        time.sleep(1)
        assert call("/still-full").status_code == 503  # nothing heals while S3 is down

        # ---- S3 is back: the recorder frees the spool and strict mode lets traffic through
        restart_with_state(s3_server)
        back_at = time.monotonic()
        deadline = back_at + 120
        while call("/retry").status_code != 200:
            assert time.monotonic() < deadline, (
                "strict mode still refuses 120 s after S3 came back (no restart); the sidecar "
                "says:\n" + "\n".join(line for line in pod.logs(40_000).splitlines()
                                        if "upload" in line or "spool" in line)[-3000:])
            time.sleep(0.2)
        healed_after = time.monotonic() - back_at
        for i in range(20):  # and it stays healed
            assert call("/after").status_code == 200
        assert pod.proc.poll() is None  # the same process all along
    finally:
        code = pod.stop()
        upstream.close()
    assert code == 0, pod.logs()
    wait_for(lambda: f"sessions/{ns}/agent-0/{session}/manifest.json" in objects(), 60,
             "the session's manifest in S3")
    wait_for(lambda: not any(pod.spool_dir.iterdir()), 30, "the spool to be empty")

    out = sessions_cli("verify", session, *source, "--key", str(key_file), env=s3_env)
    assert out.returncode == 0 and out.stdout.startswith("OK"), out.stdout + out.stderr
    assert "signature valid" in out.stdout
    out = sessions_cli("show", session, *source, "--json", env=s3_env)
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout)["manifest"]["endReason"] == "sidecar stopped"
    store = S3Store(bucket, **s3_server.client_kwargs())
    events = load_session(store, SessionRef(ns, "agent-0", session)).events
    urls = {e["flow"]: e["data"]["url"] for e in events if e["type"] == "request"}
    recorded = sorted(urls[e["flow"]].split(str(upstream.port), 1)[1]
                      for e in events if e["type"] == "response" and e["data"]["status"] == 200)
    assert recorded == sorted(answered)  # every call the agent saw answered is on record
    gaps = [e for e in events if e["type"] == "error" and e["data"].get("kind") == "spool-unavailable"]
    assert gaps and all(g["data"]["droppedEvents"] > 0 for g in gaps)
    print(f"healed {healed_after:.1f}s after S3 came back; {len(refusals)} refusals, "
          f"{len(answered)} answered")
