"""Crash safety of the recording with the sidecar as a real process and a real S3 server.

The pod is injected by the operator's ``inject()`` with recording to S3 (moto's S3 server from
the test bed) and an HMAC manifest key in the sidecar Secret. An agent makes calls - one of
them still waiting for a slow upstream - and the sidecar is killed with SIGKILL: no
``session-end``, no manifest, an open segment in the spool (the pod's emptyDir). The container
restarts on the same spool directory, as the kubelet restarts a crashed container: the new
process adopts the leftover session, closes it (``unclean-shutdown`` error event, ``session-end``
with reason ``recovered``), ships it with a signed manifest and removes it from the spool.
``chaperone sessions verify`` then checks chain, chunk digests and signature of both the
recovered and the new session.
"""

from __future__ import annotations

import json
import threading
import uuid

import boto3
import requests

from chaperone_operator.injection.settings import InjectionSettings

from .pod import (HTTPSUpstream, InjectedPod, connection, free_port, policy, sessions_cli,
                  setup_namespace, wait_for)

HOST = "127.0.0.2"
TOKEN = "faults-token-77"
MANIFEST_KEY = "faults-manifest-hmac-key-0123456789abcdef"


def test_sigkill_mid_session_then_restart_ships_the_spool(control_plane, crds_installed, s3_server,
                                                          tmp_path):
    s3 = boto3.client("s3", **s3_server.client_kwargs())
    bucket = f"recordings-{uuid.uuid4().hex[:8]}"
    s3.create_bucket(Bucket=bucket)
    upstream = HTTPSUpstream(tmp_path / "upstream", host=HOST, ips=(HOST,),
                             routes={("GET", "/slow"): (200, {"slow": True}, 30)})
    ns = f"faults-{uuid.uuid4().hex[:8]}"
    conns = [connection("tickets", {"type": "http", "hosts": [HOST],
                                    "credentials": {"source": "secret", "secretRef": {"name": "tok"}},
                                    "upstreamCA": {"kind": "ConfigMap", "name": "up-ca", "key": "ca.crt"}})]
    setup_namespace(control_plane, ns, conns + [policy("reads", {"rules": [
        {"name": "reads", "match": {"methods": ["GET"]}, "allow": {}},
        {"name": "no-deletes", "match": {"methods": ["DELETE"]}, "block": {"message": "no"}}]})])
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
    assert key_file.read_text() == MANIFEST_KEY
    s3_env = {"AWS_ACCESS_KEY_ID": s3_server.access_key, "AWS_SECRET_ACCESS_KEY": s3_server.secret_key,
              "AWS_DEFAULT_REGION": s3_server.region}
    source = ["--s3-bucket", bucket, "--s3-endpoint", s3_server.endpoint_url]
    env = pod.agent_env()
    proxies = {"https": env["HTTPS_PROXY"]}
    verify = env["REQUESTS_CA_BUNDLE"]
    base = f"https://{HOST}:{upstream.port}"

    def objects() -> list[str]:
        return [o["Key"] for o in s3.list_objects_v2(Bucket=bucket).get("Contents", [])]

    try:
        # ---- first life: some calls, one of them in flight, then SIGKILL
        pod.start()
        pod.wait_ready()
        sessions = [p.name for p in pod.spool_dir.iterdir() if p.is_dir()]
        assert len(sessions) == 1, sessions
        crashed = sessions[0]
        for i in range(4):
            r = requests.get(f"{base}/tickets/{i}", proxies=proxies, verify=verify, timeout=30)
            assert r.status_code == 200, r.text
        r = requests.delete(f"{base}/tickets/0", proxies=proxies, verify=verify, timeout=30)
        assert r.status_code == 403 and r.json()["error"] == "chaperone_blocked"
        in_flight: dict = {}

        def slow() -> None:
            try:
                requests.get(f"{base}/slow", proxies=proxies, verify=verify, timeout=60)
            except requests.RequestException as exc:
                in_flight["error"] = exc

        thread = threading.Thread(target=slow, daemon=True)
        thread.start()
        wait_for(lambda: upstream.requests("GET", "/slow"), 20, "the slow call to reach the upstream")
        pod.kill()
        thread.join(30)
        assert "error" in in_flight  # the agent saw its connection die with the sidecar
        leftover = pod.spool_dir / crashed
        files = sorted(p.name for p in leftover.iterdir())
        assert "ended.json" not in files and any(f.endswith(".open") for f in files), files
        assert not [k for k in objects() if k.endswith(f"{crashed}/manifest.json")]

        # ---- the container restarts on the same spool (emptyDir survives a container restart)
        pod.start()
        pod.wait_ready()
        manifest_key = f"sessions/{ns}/agent-0/{crashed}/manifest.json"
        wait_for(lambda: manifest_key in objects(), 60, "the recovered session's manifest in S3")
        wait_for(lambda: not leftover.exists(), 30, "the leftover spool to be removed after shipping")

        out = sessions_cli("verify", crashed, *source, "--key", str(key_file), env=s3_env)
        assert out.returncode == 0 and out.stdout.startswith("OK"), out.stdout + out.stderr
        assert "signature valid" in out.stdout
        out = sessions_cli("show", crashed, *source, "--json", env=s3_env)
        assert out.returncode == 0, out.stderr
        shown = json.loads(out.stdout)
        assert shown["manifest"]["endReason"] == "recovered"
        assert shown["byType"]["request"] == 6  # 4 GETs, the DELETE, the call in flight
        assert shown["byType"]["response"] == 5  # the one in flight never got an answer
        out = sessions_cli("replay", crashed, *source, "--json", "--events", env=s3_env)
        assert out.returncode == 0, out.stderr
        rows = json.loads(out.stdout)["timeline"]
        whats = [r["what"] for r in rows]
        for i in range(4):
            assert any(f"/tickets/{i}" in w for w in whats), whats
        assert any("/slow" in w for w in whats), whats
        assert any(w.startswith("error unclean-shutdown") for w in whats), whats
        assert "session-end" in whats[-1] and "recovered" in whats[-1], whats[-1]
        assert sum(1 for r in rows if r.get("decision") == "block") == 1

        # ---- the second life records too, and closes cleanly
        r = requests.get(f"{base}/after-restart", proxies=proxies, verify=verify, timeout=30)
        assert r.status_code == 200
        current = [p.name for p in pod.spool_dir.iterdir() if p.is_dir()]
        assert len(current) == 1 and current[0] != crashed
    finally:
        code = pod.stop()
        upstream.close()
    assert code == 0, pod.logs()
    second = current[0]
    wait_for(lambda: f"sessions/{ns}/agent-0/{second}/manifest.json" in objects(), 30, "the new session's manifest")
    out = sessions_cli("verify", "--all", *source, "--key", str(key_file), env=s3_env)
    assert out.returncode == 0, out.stdout + out.stderr
    assert out.stdout.count("OK") == 2 and crashed in out.stdout and second in out.stdout
    out = sessions_cli("replay", second, *source, env=s3_env)
    assert out.returncode == 0 and "/after-restart" in out.stdout, out.stdout
    # credentials never reach the recording
    for key in objects():
        assert TOKEN.encode() not in s3.get_object(Bucket=bucket, Key=key)["Body"].read()
