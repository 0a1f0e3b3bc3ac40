"""Real clients through the sidecar process, configured only by the pod's environment.

One pod is injected by the operator's ``inject()`` (explicit mode) with two connections:

* ``tickets`` (http): a local HTTPS API (its own CA, trusted through ``upstreamCA``) that
  answers 401 without the bearer token only the sidecar holds;
* ``aws`` (aws): every ``*.amazonaws.com`` call is re-signed with the sidecar's credentials and
  sent to the moto server **with signature validation on** (``aws.endpointURL``).

The clients - ``curl``, Python ``requests``, ``boto3``, the AWS CLI and Node's ``https`` - run as
processes with nothing but the agent container's environment as the webhook wrote it
(``HTTPS_PROXY``, ``NO_PROXY``, ``SSL_CERT_FILE``/``CURL_CA_BUNDLE``/``REQUESTS_CA_BUNDLE``/
``NODE_EXTRA_CA_CERTS``/``AWS_CA_BUNDLE`` pointing at the trust bundle, the AWS placeholder
keys and region); only the paths are remapped. Node 20's ``https`` does not read proxy
variables itself, so its script opens the CONNECT tunnel to ``HTTPS_PROXY`` the way proxy
agents do, and trusts the interception CA only through ``NODE_EXTRA_CA_CERTS``.

Why the upstream is ``127.0.0.2``: the webhook always appends ``localhost,127.0.0.1,::1`` to
``NO_PROXY``, so a target on those names would (correctly) bypass the proxy; 127.0.0.2 is
loopback too but not exempted.

The AWS CLI is used when an ``aws`` executable exists next to the test interpreter or on
``PATH`` (it is not part of the ``test`` extra); otherwise that case is not generated.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import textwrap
import uuid
from pathlib import Path

import pytest

from chaperone_operator.injection.settings import InjectionSettings

from .pod import (HTTPSUpstream, InjectedPod, base_env, connection, free_port, policy,
                  setup_namespace)

TOKEN = "tickets-sidecar-token-5b0e"
REGION = "us-east-1"
HOST = "127.0.0.2"


def _aws_cli() -> str | None:
    beside = Path(sys.executable).with_name("aws")
    if beside.is_file():
        return str(beside)
    return shutil.which("aws")


AWS_CLI = _aws_cli()


@pytest.fixture(scope="module")
def pod(control_plane, crds_installed, moto_auth, tmp_path_factory):
    root = tmp_path_factory.mktemp("clients")
    upstream = HTTPSUpstream(root / "upstream", host=HOST, names=("tickets.internal",), ips=(HOST,),
                             require_header=("Authorization", f"Bearer {TOKEN}"))
    ns = f"clients-{uuid.uuid4().hex[:8]}"
    conns = [
        connection("tickets", {"type": "http", "hosts": [HOST],
                               "credentials": {"source": "secret",
                                               "secretRef": {"name": "tickets-token", "tokenKey": "token"}},
                               "upstreamCA": {"kind": "ConfigMap", "name": "tickets-ca", "key": "ca.crt"}}),
        connection("aws", {"type": "aws", "aws": {"region": REGION, "endpointURL": moto_auth.endpoint_url},
                           "credentials": {"source": "secret", "secretRef": {"name": "aws-creds"}}}),
    ]
    policies = [
        policy("tickets", {"connections": ["tickets"], "rules": [
            {"name": "reads", "match": {"methods": ["GET"]}, "allow": {}},
            {"name": "no-writes", "match": {"methods": ["POST", "PUT", "PATCH", "DELETE"]},
             "block": {"message": "tickets are read-only for agents"}}]}),
        policy("aws", {"connections": ["aws"], "defaultEffect": "allow", "rules": [
            {"name": "no-bucket-deletion", "match": {"aws": {"actions": ["s3:DeleteBucket"]}},
             "block": {"message": "agents never delete buckets"}}]}),
    ]
    setup_namespace(control_plane, ns, conns + policies)
    settings = InjectionSettings(proxy_port=free_port(), health_port=free_port())
    sidecar = InjectedPod(
        control_plane, ns, root, connections=conns, settings=settings, mode="explicit",
        secrets={"tickets-token": {"token": TOKEN},
                 "aws-creds": {"AWS_ACCESS_KEY_ID": moto_auth.access_key,
                               "AWS_SECRET_ACCESS_KEY": moto_auth.secret_key}},
        configmaps={"tickets-ca": {"ca.crt": upstream.ca_file.read_bytes()}})
    sidecar.start()
    try:
        sidecar.wait_ready()
        yield sidecar, upstream
    finally:
        code = sidecar.stop()
        upstream.close()
    assert code == 0, sidecar.logs()
    assert not [r for r in sidecar.log_records() if r.get("level") == "critical"], sidecar.logs()


def run(argv, env, timeout=60) -> subprocess.CompletedProcess:
    return subprocess.run(argv, env=env, capture_output=True, text=True, timeout=timeout)


def test_the_agent_env_is_what_the_webhook_writes(pod):
    sidecar, _ = pod
    env = sidecar.agent_env()
    assert env["HTTPS_PROXY"] == env["https_proxy"] == sidecar.proxy_url
    for var in ("SSL_CERT_FILE", "REQUESTS_CA_BUNDLE", "NODE_EXTRA_CA_CERTS", "AWS_CA_BUNDLE",
                "CURL_CA_BUNDLE"):
        assert env[var] == str(sidecar.trust_file)
    assert sidecar.trust_file.read_bytes() == sidecar.interception_ca_pem
    assert env["AWS_ACCESS_KEY_ID"] == env["AWS_SECRET_ACCESS_KEY"] == "chaperone-placeholder"
    assert env["AWS_REGION"] == REGION
    assert HOST not in env["NO_PROXY"].split(",")


# ---------------------------------------------------------------------------- curl

def curl(env, *args):
    out = run(["curl", "-sS", "-w", "\n%{http_code}", *args], env)
    assert out.returncode == 0, out.stderr
    body, _, status = out.stdout.rpartition("\n")
    return int(status), body


def test_curl(pod):
    sidecar, upstream = pod
    env = sidecar.agent_env()
    url = f"https://{HOST}:{upstream.port}/tickets/7?expand=1"
    # The control: straight to the upstream (trusting its real CA) the agent has no token.
    status, body = curl({**base_env()}, "--cacert", str(upstream.ca_file), url)
    assert status == 401, body
    before = len(upstream.seen)
    status, body = curl(env, "-H", "Authorization: Bearer agent-made-this-up", url)
    assert status == 200, body
    assert json.loads(body)["path"] == "/tickets/7?expand=1"
    seen = upstream.seen[before:]
    assert len(seen) == 1 and seen[0]["headers"]["authorization"] == f"Bearer {TOKEN}"
    status, body = curl(env, "-X", "DELETE", f"https://{HOST}:{upstream.port}/tickets/7")
    refusal = json.loads(body)
    assert status == 403 and refusal["error"] == "chaperone_blocked", body
    assert refusal["message"] == "tickets are read-only for agents"
    assert refusal["rule"]["name"] == "no-writes"
    assert len(upstream.seen) == before + 1  # the DELETE never left the sidecar


# ---------------------------------------------------------------------------- requests

REQUESTS_SCRIPT = textwrap.dedent("""
    import json, sys, requests
    url = sys.argv[1]
    out = []
    for method in ("GET", "POST"):
        r = requests.request(method, url, json={"note": "hi"}, timeout=30)
        out.append({"status": r.status_code, "body": r.json()})
    print(json.dumps(out))
""")


def test_python_requests(pod):
    sidecar, upstream = pod
    before = len(upstream.seen)
    out = run([sys.executable, "-c", REQUESTS_SCRIPT, f"https://{HOST}:{upstream.port}/py/1"],
              sidecar.agent_env())
    assert out.returncode == 0, out.stderr
    got, refused = json.loads(out.stdout)
    assert got["status"] == 200 and got["body"]["path"] == "/py/1"
    assert refused["status"] == 403 and refused["body"]["error"] == "chaperone_blocked"
    assert [s["method"] for s in upstream.seen[before:]] == ["GET"]
    assert upstream.seen[-1]["headers"]["authorization"] == f"Bearer {TOKEN}"


# ---------------------------------------------------------------------------- node

NODE_SCRIPT = textwrap.dedent("""
    // Node's https does not read HTTPS_PROXY: open the CONNECT tunnel like a proxy agent does.
    const http = require('http'), https = require('https'), tls = require('tls'), net = require('net');
    const [method, target] = process.argv.slice(2);
    const url = new URL(target);
    const proxy = new URL(process.env.HTTPS_PROXY || process.env.https_proxy);
    const authority = `${url.hostname}:${url.port || 443}`;
    const connect = http.request({host: proxy.hostname, port: proxy.port, method: 'CONNECT',
                                  path: authority, headers: {host: authority}});
    connect.on('connect', (res, socket) => {
      if (res.statusCode !== 200) { console.error('CONNECT answered ' + res.statusCode); process.exit(2); }
      const options = {socket, host: url.hostname};
      if (!net.isIP(url.hostname)) options.servername = url.hostname;
      const req = https.request({method, host: url.hostname, port: url.port, path: url.pathname + url.search,
                                 createConnection: () => tls.connect(options)}, (resp) => {
        let body = '';
        resp.on('data', (d) => body += d);
        resp.on('end', () => { console.log(JSON.stringify({status: resp.statusCode, body: JSON.parse(body)})); socket.destroy(); });
      });
      req.on('error', (e) => { console.error('TLS/HTTP error: ' + e.message); process.exit(3); });
      req.end();
    });
    connect.on('error', (e) => { console.error('proxy error: ' + e.message); process.exit(4); });
    connect.end();
""")


def test_node_https_with_node_extra_ca_certs(pod, tmp_path):
    sidecar, upstream = pod
    script = tmp_path / "client.js"
    script.write_text(NODE_SCRIPT)
    env = sidecar.agent_env()
    url = f"https://{HOST}:{upstream.port}/node/1"
    before = len(upstream.seen)
    out = run(["node", str(script), "GET", url], env)
    assert out.returncode == 0, out.stderr
    got = json.loads(out.stdout)
    assert got["status"] == 200 and got["body"]["path"] == "/node/1"
    assert upstream.seen[-1]["headers"]["authorization"] == f"Bearer {TOKEN}"
    out = run(["node", str(script), "DELETE", url], env)
    assert out.returncode == 0, out.stderr
    refused = json.loads(out.stdout)
    assert refused["status"] == 403 and refused["body"]["error"] == "chaperone_blocked"
    assert len(upstream.seen) == before + 1
    # The control: without NODE_EXTRA_CA_CERTS Node does not trust the interception CA.
    no_ca = {k: v for k, v in env.items() if k != "NODE_EXTRA_CA_CERTS"}
    out = run(["node", str(script), "GET", url], no_ca)
    assert out.returncode == 3 and "certificate" in out.stderr, (out.stdout, out.stderr)


# ---------------------------------------------------------------------------- boto3

BOTO3_SCRIPT = textwrap.dedent("""
    import hashlib, json, sys, boto3, botocore.exceptions
    bucket = sys.argv[1]
    out = {}
    try:
        out["arn"] = boto3.client("sts").get_caller_identity()["Arn"]
    except botocore.exceptions.ClientError as exc:
        print(json.dumps({"error": exc.response["Error"]["Code"], "status": exc.response["ResponseMetadata"]["HTTPStatusCode"]}))
        sys.exit(0)
    s3 = boto3.client("s3")
    s3.create_bucket(Bucket=bucket)
    s3.put_object(Bucket=bucket, Key="notes/a.txt", Body=b"hello from the agent")
    out["get"] = s3.get_object(Bucket=bucket, Key="notes/a.txt")["Body"].read().decode()
    out["list"] = [o["Key"] for o in s3.list_objects_v2(Bucket=bucket, Prefix="notes")["Contents"]]
    # 3 MiB: above the proxy's stream_large_bodies, so the aws-chunked upload streams through it
    big = hashlib.sha256(b"seed").digest() * (3 * 1024 * 1024 // 32)
    s3.put_object(Bucket=bucket, Key="big.bin", Body=big)
    back = s3.get_object(Bucket=bucket, Key="big.bin")["Body"].read()
    out["big"] = [len(back), hashlib.sha256(back).hexdigest() == hashlib.sha256(big).hexdigest()]
    try:
        s3.delete_bucket(Bucket=bucket)
        out["delete"] = "deleted"
    except botocore.exceptions.ClientError as exc:
        meta = exc.response["ResponseMetadata"]
        out["delete"] = {"status": meta["HTTPStatusCode"],
                         "refused": meta["HTTPHeaders"].get("x-chaperone-refused")}
    print(json.dumps(out))
""")


def test_boto3_is_resigned_against_signature_checking_moto(pod, moto_auth):
    sidecar, _ = pod
    bucket = f"agent-{uuid.uuid4().hex[:10]}"
    # The control: the agent's placeholder keys, straight to moto, are refused by signature check.
    direct = {**base_env(), "AWS_ACCESS_KEY_ID": "chaperone-placeholder",
              "AWS_SECRET_ACCESS_KEY": "chaperone-placeholder", "AWS_DEFAULT_REGION": REGION,
              "AWS_ENDPOINT_URL": moto_auth.endpoint_url, "PYTHONPATH": ""}
    out = run([sys.executable, "-c", BOTO3_SCRIPT, bucket], direct)
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout)["status"] == 403, out.stdout
    # Through the sidecar, with exactly the agent's env: the same keys work, as the sidecar.
    out = run([sys.executable, "-c", BOTO3_SCRIPT, bucket], sidecar.agent_env())
    assert out.returncode == 0, out.stderr + sidecar.logs()
    got = json.loads(out.stdout)
    assert got["arn"].endswith(":user/chaperone-sidecar"), got
    assert got["get"] == "hello from the agent" and got["list"] == ["notes/a.txt"]
    assert got["big"] == [3 * 1024 * 1024, True], got
    assert got["delete"] == {"status": 403, "refused": "blocked"}, got
    # The bucket exists in moto: the writes really happened there.
    assert moto_auth.client("s3").get_object(Bucket=bucket, Key="notes/a.txt")["Body"].read() == b"hello from the agent"


# ---------------------------------------------------------------------------- AWS CLI

def test_aws_cli(pod, moto_auth, tmp_path):
    # awscli is in the test extra: a missing CLI fails here rather than skipping.
    assert AWS_CLI, "the AWS CLI (awscli, test extra) is not installed"
    sidecar, _ = pod
    aws = AWS_CLI
    env = sidecar.agent_env({"AWS_CONFIG_FILE": str(tmp_path / "none"),
                             "AWS_SHARED_CREDENTIALS_FILE": str(tmp_path / "none")})
    direct = run([aws, "sts", "get-caller-identity", "--endpoint-url", moto_auth.endpoint_url],
                 {k: v for k, v in env.items() if k.lower() not in ("https_proxy", "http_proxy")})
    assert direct.returncode != 0 and "InvalidClientTokenId" in direct.stderr + direct.stdout, direct
    out = run([aws, "sts", "get-caller-identity", "--output", "json"], env)
    assert out.returncode == 0, out.stderr + sidecar.logs()
    assert json.loads(out.stdout)["Arn"].endswith(":user/chaperone-sidecar")
    bucket = f"cli-{uuid.uuid4().hex[:10]}"
    src = tmp_path / "report.txt"
    src.write_text("quarterly numbers\n" * 100)
    for argv in (["s3api", "create-bucket", "--bucket", bucket],
                 ["s3", "cp", str(src), f"s3://{bucket}/reports/q1.txt"],
                 ["s3", "cp", f"s3://{bucket}/reports/q1.txt", str(tmp_path / "back.txt")]):
        out = run([aws, *argv], env)
        assert out.returncode == 0, (argv, out.stderr, sidecar.logs())
    assert (tmp_path / "back.txt").read_text() == src.read_text()
    out = run([aws, "s3api", "delete-bucket", "--bucket", bucket], env)
    assert out.returncode != 0 and "403" in out.stderr, out.stderr

