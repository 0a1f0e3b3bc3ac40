"""The story, part 1: a Claude pod created by dave, and the agent using the real AWS CLI.

Steps 1-4 of issue 6. The operator runs with the chart's configuration (``installation``), the
pod is created as dave and read back mutated, the sidecar runs with exactly what the webhook
injected (``story``; see conftest.py and story.py). The agent is the AWS CLI v1 with nothing
but the agent container's injected environment: the proxy, the trust bundle, placeholder
credentials. AWS is moto *with signature checks*, so every call that succeeds was re-signed by
the sidecar with the real key held in the connection's Secret.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from botocore.exceptions import ClientError

import story as st

TRUST = "/etc/chaperone/trust/ca.crt"
TRUST_POLICY = json.dumps({"Version": "2012-10-17", "Statement": [
    {"Effect": "Allow", "Principal": {"Service": "ec2.amazonaws.com"}, "Action": "sts:AssumeRole"}]})
APPROVE = json.dumps({"spec": {"decision": "Approved"}})


def _containers(pod: dict) -> dict[str, dict]:
    spec = pod["spec"]
    return {c["name"]: c for c in spec.get("initContainers", []) + spec["containers"]}


def test_the_pod_is_injected_and_dave_is_its_creator(story):
    # dave's own `kubectl create` already got the mutated pod back; the test reads it again.
    assert "chaperone.dev/status" in story.steps["created-as-dave"]["metadata"]["annotations"]
    pod = story.pod
    annotations = pod["metadata"]["annotations"]
    creator = json.loads(annotations["chaperone.dev/creator"])
    assert creator["username"] == "dave" and "developers" in creator["groups"]
    status = json.loads(annotations["chaperone.dev/status"])
    assert status["connections"] == ["aws-moto", "cluster-api"]
    assert status["agentContainers"] == ["claude"] and status["denyAll"] is False
    assert status["proxyPort"] == story.installation.proxy_port  # the chart value reached the pod

    containers = _containers(pod)
    sidecar, agent = containers["chaperone-sidecar"], containers["claude"]
    assert sidecar["restartPolicy"] == "Always"  # native sidecar
    assert pod["spec"]["automountServiceAccountToken"] is False
    env = {e["name"]: e.get("value") for e in agent["env"]}
    assert env["HTTPS_PROXY"] == f"http://127.0.0.1:{story.installation.proxy_port}"
    assert env["AWS_CA_BUNDLE"] == env["SSL_CERT_FILE"] == TRUST
    assert env["AWS_ACCESS_KEY_ID"] == env["AWS_SECRET_ACCESS_KEY"] == "chaperone-placeholder"
    # The agent mounts the trust bundle and nothing else: no API token, no credentials.
    assert [m["mountPath"] for m in agent["volumeMounts"]] == ["/etc/chaperone/trust"]
    assert story.sidecar.env["CHAPERONE_CREATOR"] == annotations["chaperone.dev/creator"]
    # The credentials really are in the sidecar's (materialised) mounts, and only there.
    creds = json.loads(story.sidecar.env["CHAPERONE_CONNECTIONS"])
    aws_dir = next(c["credentialsDir"] for c in creds if c["name"] == "aws-moto")
    assert (Path(aws_dir) / "AWS_ACCESS_KEY_ID").read_text() == story.aws_access_key
    assert story.aws_access_key not in json.dumps(story.agent.env)


def test_aws_s3_ls_is_resigned_by_the_sidecar(story):
    res = story.aws("s3", "ls")
    assert res.returncode == 0, st.describe(res) + "\n" + story.sidecar_log(20)
    assert story.bucket in res.stdout

    # Control: the same command with the agent's own (dummy) credentials, straight to the
    # server without the proxy, is refused by moto - the signature check is real.
    env = {k: v for k, v in story.agent_env().items() if "proxy" not in k.lower()}
    direct = st.run(st.aws_argv("--endpoint-url", story.moto.endpoint_url, "s3", "ls"), env)
    assert direct.returncode != 0, st.describe(direct)
    assert "InvalidAccessKeyId" in direct.stderr, st.describe(direct)


def test_aws_delete_bucket_is_refused_with_the_reason(story):
    res = story.aws("s3api", "delete-bucket", "--bucket", story.bucket, debug=True)
    assert res.returncode != 0, st.describe(res)
    # Without --debug the AWS CLI only prints "(403) ... Forbidden": S3 errors are XML and the
    # refusal is JSON. The body the agent received is in the debug log.
    refusal = st.refusal_in(res.stderr)
    assert refusal is not None, st.describe(res)
    assert refusal["error"] == "chaperone_blocked"
    assert refusal["rule"] == {"policy": f"{story.ns}/aws-guardrails", "name": "no-bucket-deletion"}
    assert refusal["action"]["name"] == "s3:DeleteBucket"
    assert "Bucket deletion is not allowed for agents" in refusal["message"]
    assert "403" in res.stderr and "no-bucket-deletion" in res.stderr
    story.moto_client("s3").head_bucket(Bucket=story.bucket)  # still there


def test_aws_get_secret_value_returns_the_masked_value(story):
    res = story.aws("secretsmanager", "get-secret-value", "--secret-id", story.secret_id)
    assert res.returncode == 0, st.describe(res) + "\n" + story.sidecar_log(20)
    out = json.loads(res.stdout)
    assert out["Name"] == story.secret_id
    assert out["SecretString"].startswith("[MASKED:"), out
    assert story.secret_value not in res.stdout + res.stderr
    # Control: the secret is really there (the platform's own credentials read it in clear).
    real = story.moto_client("secretsmanager").get_secret_value(SecretId=story.secret_id)
    assert real["SecretString"] == story.secret_value


def _role_exists(story, name: str) -> bool:
    try:
        story.moto_client("iam").get_role(RoleName=name)
    except ClientError as exc:
        if exc.response["Error"]["Code"] == "NoSuchEntity":
            return False
        raise
    return True


def _finish(proc, timeout: float = 60) -> tuple[int, str, str]:
    try:
        out, err = proc.communicate(timeout=timeout)
    except Exception:
        proc.kill()
        out, err = proc.communicate()
        raise AssertionError(f"the held AWS CLI command did not finish:\n{out}\n{err}")
    return proc.returncode, out, err


def _held(story, role: str):
    """Start ``aws iam create-role`` in the background; return it and its ApprovalRequest."""
    assert not _role_exists(story, role)
    proc = story.aws_background("iam", "create-role", "--role-name", role,
                                "--assume-role-policy-document", TRUST_POLICY)
    try:
        ar = story.wait_for_request(role)
    except AssertionError:
        proc.kill()
        raise AssertionError(f"no ApprovalRequest appeared; agent said: {proc.communicate()}")
    time.sleep(0.5)
    assert proc.poll() is None, f"create-role did not wait for approval: {proc.communicate()}"
    assert not _role_exists(story, role)  # nothing reached AWS yet
    return proc, ar


def test_aws_iam_create_role_waits_for_a_platform_approver(story):
    role = "story-deployer"
    proc, ar = _held(story, role)
    name, spec = ar["metadata"]["name"], ar["spec"]
    try:
        assert spec["requester"]["serviceAccount"] == f"system:serviceaccount:{story.ns}:claude-agent"
        assert spec["requester"]["pod"]["name"] == "claude-1"
        assert spec["requester"]["creator"] == "dave"  # stamped by admission from the pod
        assert spec["rule"] == {"policy": f"{story.ns}/aws-guardrails", "name": "new-roles-need-approval"}
        assert spec["approvers"]["groups"] == ["platform-approvers"]

        # The approver's view: the request is listed by `kubectl get ar`.
        listed = story.cp.kubectl("get", "ar", "-n", story.ns, user="approver")
        assert name in listed.stdout, listed.stdout

        # The agent's own identity (its pod's service-account token) cannot decide it.
        token = story.sidecar.path("/var/run/secrets/kubernetes.io/serviceaccount/token").read_text()
        agent_ref = story.token_kubeconfig(token, "agent-sa")
        res = story.cp.kubectl("patch", "ar", name, "-n", story.ns, "--type=merge", "-p", APPROVE,
                               user=agent_ref, check=False)
        # (RBAC: the chart's chaperone-sidecar role cannot patch; admission would refuse the
        # requester's own service account as self-approval too.)
        assert res.returncode != 0 and 'cannot patch resource "approvalrequests"' in res.stderr, res
        # dave may patch requests (RBAC) but created the pod: admission refuses self-approval.
        res = story.cp.kubectl("patch", "ar", name, "-n", story.ns, "--type=merge", "-p", APPROVE,
                               user="developer", check=False)
        assert res.returncode != 0, res
        assert "self-approval" in res.stderr and "dave created the requesting pod" in res.stderr, res.stderr
        assert proc.poll() is None and not _role_exists(story, role)
        undecided = story.cp.kubectl("get", "ar", name, "-n", story.ns, "-o", "json")
        assert "decision" not in json.loads(undecided.stdout)["spec"]

        # alice, a platform approver, approves with the documented command.
        res = story.cp.kubectl("patch", "ar", name, "-n", story.ns, "--type=merge", "-p", APPROVE,
                               user="approver", check=False)
        assert res.returncode == 0, res.stderr
    finally:
        code, out, err = _finish(proc)
    assert code == 0, f"{out}\n{err}\n{story.sidecar_log(30)}"
    assert json.loads(out)["Role"]["RoleName"] == role
    assert _role_exists(story, role)  # checked with the real credentials, straight on moto
    decided = json.loads(story.cp.kubectl("get", "ar", name, "-n", story.ns, "-o", "json").stdout)
    assert decided["spec"]["decision"] == "Approved" and decided["spec"]["decidedBy"] == "alice"
    story.steps["approval-patch"] = {"role": role, "request": name, "approver": "alice"}


def test_a_second_role_is_approved_with_kubectl_chaperone(story):
    role = "story-auditor"
    proc, ar = _held(story, role)
    name = ar["metadata"]["name"]
    assert name != story.steps.get("approval-patch", {}).get("request")
    try:
        res = story.kubectl_chaperone("approve", name, "-n", story.ns, user="approver2")
        assert res.returncode == 0, st.describe(res)
    finally:
        code, out, err = _finish(proc)
    assert code == 0, f"{out}\n{err}\n{story.sidecar_log(30)}"
    assert json.loads(out)["Role"]["RoleName"] == role and _role_exists(story, role)
    decided = json.loads(story.cp.kubectl("get", "ar", name, "-n", story.ns, "-o", "json").stdout)
    assert decided["spec"]["decidedBy"] == "bob"
    story.steps["approval-plugin"] = {"role": role, "request": name, "approver": "bob"}
