"""Fixtures shared by the sidecar tests: a moto server that *checks signatures*.

moto only validates SigV4 once ``INITIAL_NO_AUTH_ACTION_COUNT`` actions have been served; from
then on every request must be signed by an access key that exists in moto's IAM (or by
credentials moto's STS handed out) and the signature must match, else 403. So the server is
started with the count set to exactly the number of bootstrap calls (create a user with an
allow-all policy and an access key; a role with an allow-all policy for the web-identity
tests); ``moto_auth`` then proves that a wrong secret is refused before any test relies on it.

Used by the credential injector's tests (``credentials/``) and by the InjectCredentials addon's
(``addons/``); one server per session.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import boto3
import pytest

from chaperone_testbed.services import ManagedProcess, free_port

ALLOW_ALL = json.dumps({"Version": "2012-10-17",
                        "Statement": [{"Effect": "Allow", "Action": "*", "Resource": "*"}]})
TRUST_ANY = json.dumps({"Version": "2012-10-17", "Statement": [
    {"Effect": "Allow", "Principal": {"Federated": "*"},
     "Action": "sts:AssumeRoleWithWebIdentity"},
    {"Effect": "Allow", "Principal": {"AWS": "*"}, "Action": "sts:AssumeRole"}]})
BOOTSTRAP_ACTIONS = 5  # CreateUser, PutUserPolicy, CreateAccessKey, CreateRole, PutRolePolicy
MOTO_REGION = "us-east-1"


@dataclass
class MotoAuthServer:
    endpoint_url: str
    access_key: str
    secret_key: str
    role_arn: str
    process: ManagedProcess

    def allow_unauthenticated(self, actions: int) -> None:
        """Let the next `actions` calls through unsigned (moto's /moto-api/reset-auth)."""
        req = urllib.request.Request(self.endpoint_url + "/moto-api/reset-auth",
                                     data=str(actions).encode(), method="POST",
                                     # not form-encoded, or Flask consumes the body as a form
                                     headers={"Content-Type": "text/plain"})
        urllib.request.urlopen(req, timeout=10).read()

    def client(self, service: str, *, secret: str | None = None):
        return boto3.client(service, endpoint_url=self.endpoint_url, region_name=MOTO_REGION,
                            aws_access_key_id=self.access_key,
                            aws_secret_access_key=secret or self.secret_key)


@pytest.fixture(scope="session")
def moto_auth():
    workdir = Path(tempfile.mkdtemp(prefix="chaperone-moto-auth-"))
    port = free_port()
    endpoint = f"http://127.0.0.1:{port}"
    env = dict(os.environ, INITIAL_NO_AUTH_ACTION_COUNT=str(BOOTSTRAP_ACTIONS))
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN"):
        env.pop(name, None)
    proc = ManagedProcess("moto-auth", [sys.executable, "-m", "moto.server", "-H", "127.0.0.1",
                                        "-p", str(port)], workdir / "moto.log", env=env)
    proc.start()

    def probe() -> bool:
        with urllib.request.urlopen(endpoint + "/moto-api/", timeout=2) as resp:
            return resp.status == 200

    try:
        proc.wait_ready(probe, 60, "serving")
    except Exception as exc:  # the test bed rule: a missing server fails, never skips
        pytest.fail(f"moto server with IAM auth did not start: {exc}", pytrace=False)
    boot = dict(endpoint_url=endpoint, region_name=MOTO_REGION, aws_access_key_id="bootstrap",
                aws_secret_access_key="bootstrap")
    iam = boto3.client("iam", **boot)
    iam.create_user(UserName="chaperone-sidecar")
    iam.put_user_policy(UserName="chaperone-sidecar", PolicyName="all", PolicyDocument=ALLOW_ALL)
    key = iam.create_access_key(UserName="chaperone-sidecar")["AccessKey"]
    role = iam.create_role(RoleName="agent-role", AssumeRolePolicyDocument=TRUST_ANY)["Role"]
    iam.put_role_policy(RoleName="agent-role", PolicyName="all", PolicyDocument=ALLOW_ALL)
    server = MotoAuthServer(endpoint, key["AccessKeyId"], key["SecretAccessKey"], role["Arn"],
                            proc)
    # The control that makes every other test meaningful: signature checking is on.
    sts_ok = server.client("sts").get_caller_identity()
    assert sts_ok["Arn"].endswith(":user/chaperone-sidecar")
    with pytest.raises(Exception, match="SignatureDoesNotMatch"):
        server.client("sts", secret="wrong-secret").get_caller_identity()
    yield server
    proc.stop()
