"""S3 downloads through a masking sidecar, with the agent's real SDK (boto3 in a subprocess, the
injected pod's environment), the sidecar re-signing for moto **with signature checking on**.

* ``aws s3 cp`` of a large object: boto3's ``download_file`` (s3transfer: 8 MiB ranged GETs,
  several at once) with access keys straddling the part boundaries. Before session 12 each part
  was masked on its own, so each held half a key no detector matched and the downloaded file had
  the whole key back. The widened Range is covered by the signature the sidecar makes (or moto
  refuses it); the file is the object masked in place: same length, every other byte unchanged.
* A whole object stored with a checksum: boto3 asks for it and checks the body against it, so a
  masked body raised FlexibleChecksumError (session 12) - the digests are dropped when masking.
* A UTF-16 object (a PowerShell 5 file, with its byte order mark): binary to the masker until
  session 13, its key reached the agent; now masked and still UTF-16.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
import uuid

import pytest

from chaperone_operator.injection.settings import InjectionSettings

from .pod import InjectedPod, connection, free_port, policy, setup_namespace

REGION = "us-east-1"
KEY_ID = b"AKIAIOSFODNN7EXAMPLE"
PART = 8 * 1024 * 1024


@pytest.fixture(scope="module")
def pod(control_plane, crds_installed, moto_auth, tmp_path_factory):
    root = tmp_path_factory.mktemp("ranges")
    ns = f"ranges-{uuid.uuid4().hex[:8]}"
    conns = [connection("aws", {"type": "aws", "aws": {"region": REGION, "endpointURL": moto_auth.endpoint_url},
                                "credentials": {"source": "secret", "secretRef": {"name": "aws-creds"}}})]
    policies = [policy("aws", {"connections": ["aws"], "defaultEffect": "allow", "rules": [
        {"name": "reads", "match": {"methods": ["GET", "HEAD"]}, "allow": {}}],
        "masking": {"detectors": ["aws-access-key-id"]}})]
    setup_namespace(control_plane, ns, conns + policies)
    settings = InjectionSettings(proxy_port=free_port(), health_port=free_port())
    sidecar = InjectedPod(
        control_plane, ns, root, connections=conns, settings=settings, mode="explicit",
        secrets={"aws-creds": {"AWS_ACCESS_KEY_ID": moto_auth.access_key,
                               "AWS_SECRET_ACCESS_KEY": moto_auth.secret_key}})
    sidecar.start()
    try:
        sidecar.wait_ready()
        yield sidecar
    finally:
        code = sidecar.stop()
    assert code == 0, sidecar.logs()


DOWNLOAD = textwrap.dedent("""
    import json, sys, boto3
    from boto3.s3.transfer import TransferConfig
    bucket, key, path = sys.argv[1:4]
    part = 8 * 1024 * 1024
    boto3.client("s3").download_file(bucket, key, path, Config=TransferConfig(
        multipart_threshold=part, multipart_chunksize=part, max_concurrency=3))
    print(json.dumps({"ok": True}))
""")


def test_a_multipart_download_has_no_key_at_its_part_boundaries(pod, moto_auth, tmp_path):
    sidecar = pod
    line = b"quarterly numbers, nothing secret in this line at all\n"
    data = bytearray(line * (3 * PART // len(line) + 1))
    spots = []
    for boundary in (PART, 2 * PART):
        at = boundary - len(KEY_ID) // 2  # half the key in each part
        data[at - 4 : at + len(KEY_ID)] = b"key=" + KEY_ID
        spots.append(at)
    data = bytes(data)
    bucket, key = f"ranges-{uuid.uuid4().hex[:10]}", "exports/ledger.txt"
    s3 = moto_auth.client("s3")
    s3.create_bucket(Bucket=bucket)
    s3.put_object(Bucket=bucket, Key=key, Body=data)
    path = tmp_path / "ledger.txt"
    out = subprocess.run([sys.executable, "-c", DOWNLOAD, bucket, key, str(path)], env=sidecar.agent_env(),
                         capture_output=True, text=True, timeout=180)
    assert out.returncode == 0, out.stderr + sidecar.logs()[-3000:]
    got = path.read_bytes()
    assert len(got) == len(data) and KEY_ID[:8] not in got and KEY_ID[8:] not in got
    for at in spots:
        assert got[at : at + len(KEY_ID)].startswith(b"[MASKED:aws-acc"), got[at - 10 : at + 30]
    outside = [(0, spots[0]), (spots[0] + len(KEY_ID), spots[1]), (spots[1] + len(KEY_ID), len(data))]
    assert all(got[a:b] == data[a:b] for a, b in outside)
    assert json.loads(out.stdout.strip().splitlines()[-1]) == {"ok": True}


GET_WHOLE = textwrap.dedent("""
    import json, sys, boto3
    bucket, key = sys.argv[1:3]
    body = boto3.client("s3").get_object(Bucket=bucket, Key=key)["Body"].read()
    print(json.dumps({"body": body.decode()}))
""")


def test_a_whole_object_with_a_checksum_reads_back_masked(pod, moto_auth):
    """boto3 asks for the object's checksum (x-amz-checksum-mode) and checks the body against it
    when S3 sends one: a masked body must still be readable by the agent's SDK."""
    sidecar = pod
    bucket, key = f"whole-{uuid.uuid4().hex[:10]}", "env/prod.env"
    s3 = moto_auth.client("s3")
    s3.create_bucket(Bucket=bucket)
    s3.put_object(Bucket=bucket, Key=key, Body=b"AWS_ACCESS_KEY_ID=" + KEY_ID + b"\n", ChecksumAlgorithm="CRC32")
    out = subprocess.run([sys.executable, "-c", GET_WHOLE, bucket, key], env=sidecar.agent_env(),
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr + sidecar.logs()[-3000:]
    assert json.loads(out.stdout.strip().splitlines()[-1]) == {"body": "AWS_ACCESS_KEY_ID=[MASKED:aws-access-key-id]\n"}



def test_a_utf16_object_reads_back_masked(pod, moto_auth):
    """A PowerShell 5 file (UTF-16LE with a byte order mark) was binary to the masker, whose
    printable runs never held the key (session 13): read with the agent's SDK, it comes back
    masked, still UTF-16. (The label attack - S3's ``response-content-type`` - is tested at the
    Mask addon, test_mask.py: moto, signature checking on, refuses boto3's own signature over
    an encoded query value and does not echo the type.)"""
    sidecar = pod
    text = "AWS_ACCESS_KEY_ID=" + KEY_ID.decode() + "\r\nREGION=us-east-1\r\n"
    bucket, key = f"utf16-{uuid.uuid4().hex[:10]}", "env/prod.env"
    s3 = moto_auth.client("s3")
    s3.create_bucket(Bucket=bucket)
    s3.put_object(Bucket=bucket, Key=key, Body=b"\xff\xfe" + text.encode("utf-16-le"))
    out = subprocess.run([sys.executable, "-c", GET_HEX, bucket, key], env=sidecar.agent_env(),
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr + sidecar.logs()[-3000:]
    body = bytes.fromhex(json.loads(out.stdout.strip().splitlines()[-1])["body"])
    assert body[:2] == b"\xff\xfe"
    assert body[2:].decode("utf-16-le") == text.replace(KEY_ID.decode(), "[MASKED:aws-access-key-id]")


GET_HEX = textwrap.dedent("""
    import json, sys, boto3
    bucket, key = sys.argv[1:3]
    print(json.dumps({"body": boto3.client("s3").get_object(Bucket=bucket, Key=key)["Body"].read().hex()}))
""")
