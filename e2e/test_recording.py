"""The story, part 3: what the sidecar recorded, read back with ``chaperone sessions``.

Step 6 of issue 6. The sidecar is stopped the way the kubelet stops it (SIGTERM): the session
is closed (``session-end``, last chunk, signed manifest) and shipped to the test bed's S3
server under the chart's ``recording.s3`` settings. Everything is then read back with the real
CLI (``chaperone sessions list|show|replay|verify``) and with plain S3 reads:

* every step of the story is there, with its identity (dave as creator, the pod's
  ServiceAccount), decision, rule and approver;
* the masked secret is recorded masked, and no stored byte holds the secret or a credential;
* ``verify`` passes with the public half of the manifest key the sidecar signed with (the
  sidecar Secret's ``MANIFEST_KEY``), fails with another key, and - after one byte of one
  stored chunk is changed - fails naming the chunk, line and seq of the broken link.

These tests use what ``test_story_aws.py`` and ``test_story_kubernetes.py`` did (the files run
in story order, see conftest.py): run the whole ``e2e`` directory.
"""

from __future__ import annotations

import base64
import json

import boto3
import jsonschema
import pytest

import story as st

BEFORE = ("test_story_aws.py", "test_story_kubernetes.py")


def sessions(story, *args: str):
    """``chaperone sessions ARGS`` against the chart's recording bucket (the S3 credentials
    from the environment, as an auditor's would be)."""
    s3, values = story.installation.s3, story.installation.values
    env = st.clean_env({**s3.env(), "PYTHONPATH": str(st.REPO_ROOT / "sidecar")})
    argv = st.chaperone_argv("sessions", *args, "--s3-bucket", values["recording.s3.bucket"],
                             "--s3-endpoint", values["recording.s3.endpoint"],
                             "--s3-prefix", values["recording.s3.prefix"])
    return st.run(argv, env)


def _s3(story):
    return boto3.client("s3", **story.installation.s3.client_kwargs())


def _where(story) -> tuple[str, str]:
    """(bucket, key prefix) of the recordings: the chart's recording.s3 values."""
    values = story.installation.values
    return values["recording.s3.bucket"], values["recording.s3.prefix"]


@pytest.fixture(scope="module")
def recording(story):
    """Stop the sidecar, then find its (one) session; the story's steps must have run."""
    missing = [name for name in BEFORE if name not in story.ran]
    if missing:
        pytest.fail(f"{', '.join(missing)} did not run: the recording tests check what the story's "
                    "steps did - run the whole e2e directory", pytrace=False)
    code = story.stop_sidecar()
    assert code == 0, f"sidecar exit code {code} after SIGTERM\n{story.sidecar_log(40)}"
    errors = [line for line in story.sidecar_log(10_000).splitlines()
              if '"level":"error"' in line or '"level":"critical"' in line]
    assert not errors, "\n".join(errors)
    res = sessions(story, "list", "--namespace", story.ns, "--pod", "claude-1", "--json")
    assert res.returncode == 0, st.describe(res)
    found = json.loads(res.stdout)
    assert len(found) == 1, found
    session = found[0]
    ref = f"{story.ns}/claude-1/{session['session']}"
    replay = sessions(story, "replay", ref, "--json", "--body-limit", "100000")
    assert replay.returncode == 0, st.describe(replay)
    return {"summary": session, "ref": ref, "replay": json.loads(replay.stdout)}


def _raw_events(story) -> list[tuple[str, int, dict]]:
    """(key, line number, event) for every stored event line, straight from S3."""
    (bucket, prefix), s3, out = _where(story), _s3(story), []
    for obj in s3.list_objects_v2(Bucket=bucket, Prefix=f"{prefix}/sessions/{story.ns}/")["Contents"]:
        if obj["Key"].endswith(".jsonl"):
            body = s3.get_object(Bucket=bucket, Key=obj["Key"])["Body"].read().decode()
            out += [(obj["Key"], n, json.loads(line)) for n, line in enumerate(body.splitlines())]
    return out


def _row(rows: list[dict], *needles: str) -> dict:
    matches = [r for r in rows if all(n in (r.get("what") or "") for n in needles)]
    assert matches, f"no replay row for {needles}: {[r.get('what') for r in rows]}"
    return matches[0]


def test_the_session_is_closed_signed_and_shipped(story, recording):
    summary = recording["summary"]
    assert summary["status"] == "closed"
    assert summary["identity"] == {"creator": "dave", "namespace": story.ns, "pod": "claude-1",
                                   "podUID": story.pod["metadata"]["uid"],
                                   "serviceAccount": "claude-agent"}
    manifest = recording["replay"]["manifest"]
    assert manifest["signature"]["alg"] == "Ed25519"
    assert manifest["unrecordedEvents"] == 0
    bucket, prefix = _where(story)
    keys = [o["Key"] for o in _s3(story).list_objects_v2(Bucket=bucket)["Contents"]]
    assert f"{prefix}/sessions/{recording['ref']}/manifest.json" in keys
    text = sessions(story, "list")
    assert text.returncode == 0 and "dave" in text.stdout and "closed" in text.stdout, st.describe(text)
    show = sessions(story, "show", recording["ref"])
    assert show.returncode == 0, st.describe(show)
    assert "signature Ed25519" in show.stdout and f"events    {manifest['events']}" in show.stdout, show.stdout


def test_every_step_is_recorded_with_its_decision(story, recording):
    rows = recording["replay"]["timeline"]
    for row in rows:
        assert row["who"] == "dave", row  # the pod's creator, on every event

    assert _row(rows, "s3:ListBuckets")["status"] == 200
    delete = _row(rows, "s3:DeleteBucket", story.bucket)
    assert (delete["decision"], delete["status"]) == ("block", 403)
    assert delete["rule"] == f"{story.ns}/aws-guardrails#no-bucket-deletion"
    secret = _row(rows, "secretsmanager:GetSecretValue")
    assert (secret["decision"], secret["status"]) == ("allow", 200)
    assert json.loads(secret["responseBody"])["SecretString"].startswith("[MASKED:"), secret

    listing = _row(rows, "list pods in", story.ns)
    assert (listing["decision"], listing["status"]) == ("allow", 200)
    assert listing["rule"] == f"{story.ns}/cluster-readonly#reads"
    assert "claude-1" in listing["responseBody"]
    blocked = _row(rows, "delete", "namespaces", story.victim_ns)
    assert (blocked["decision"], blocked["status"]) == ("block", 403)
    assert blocked["rule"] == f"{story.ns}/cluster-readonly#never-delete-namespaces"


def test_replay_shows_who_approved_each_held_request(story, recording):
    rows = recording["replay"]["timeline"]
    for step, user in (("approval-patch", "alice"), ("approval-plugin", "bob")):
        done = story.steps.get(step)
        assert done, f"the step {step} failed; its recording cannot be checked"
        row = _row(rows, "iam:CreateRole", done["role"])
        assert row["decision"] in ("require_approval", "require-approval"), row
        assert row["rule"] == f"{story.ns}/aws-guardrails#new-roles-need-approval"
        assert row["status"] == 200 and done["request"] in (row.get("approval") or ""), row
        assert row["approver"] == user, (
            f"replay does not show who approved {done['request']} (expected {user}): {row}")


def test_every_event_carries_the_pods_identity(story, recording):
    events = _raw_events(story)
    assert len(events) == recording["replay"]["manifest"]["events"]
    for key, line, event in events:
        assert event["identity"] == recording["summary"]["identity"], (key, line)
    approvals = {e["data"].get("name"): e["data"] for _, _, e in events if e["type"] == "approval"}
    for step, user in (("approval-patch", "alice"), ("approval-plugin", "bob")):
        assert step in story.steps, f"the step {step} failed; its recording cannot be checked"
        data = approvals[story.steps[step]["request"]]
        assert user in json.dumps(data), data  # the approver is in the recording itself


def test_nothing_stored_holds_the_secret_or_a_credential(story, recording):
    (bucket, _), s3 = _where(story), _s3(story)
    token = story.cp.kubectl("get", "secret", "agent-kube-token", "-n", story.ns,
                             "-o", "jsonpath={.data.token}").stdout
    secrets = {"the secret value": story.secret_value,
               "the AWS secret access key": story.aws_secret_key,
               "the kube connection's token": base64.b64decode(token).decode()}
    listed = s3.list_objects_v2(Bucket=bucket)["Contents"]
    assert len(listed) >= 2
    for obj in listed:
        data = s3.get_object(Bucket=bucket, Key=obj["Key"])["Body"].read().decode()
        for what, value in secrets.items():
            assert value not in data, f"{what} is stored in {obj['Key']}"
    text = sessions(story, "replay", recording["ref"], "--body-limit", "100000")
    assert text.returncode == 0, st.describe(text)
    assert "[MASKED:" in text.stdout and story.secret_value not in text.stdout


def test_verify_passes_with_the_manifest_key_and_fails_with_another(story, recording, tmp_path):
    res = sessions(story, "verify", recording["ref"], "--key", str(story.manifest_public_key))
    assert res.returncode == 0, st.describe(res)
    assert res.stdout.startswith("OK") and "chain intact" in res.stdout, res.stdout

    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    other = tmp_path / "other.pub"
    other.write_bytes(Ed25519PrivateKey.generate().public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo))
    res = sessions(story, "verify", recording["ref"], "--key", str(other))
    assert res.returncode == 1 and "FAILED" in res.stdout, st.describe(res)


def test_altering_one_stored_object_breaks_verification_at_that_link(story, recording):
    """Last: it tampers with the stored recording."""
    target = next((k, n, e) for k, n, e in _raw_events(story)
                  if e["type"] == "response" and e["data"].get("status") == 200
                  and "GetSecretValue" not in json.dumps(e))
    key, line, event = target
    (bucket, prefix), s3 = _where(story), _s3(story)
    body = s3.get_object(Bucket=bucket, Key=key)["Body"].read()
    lines = body.split(b"\n")
    assert b'"status":200' in lines[line]
    lines[line] = lines[line].replace(b'"status":200', b'"status":201', 1)  # one byte
    s3.put_object(Bucket=bucket, Key=key, Body=b"\n".join(lines))

    res = sessions(story, "verify", recording["ref"], "--key", str(story.manifest_public_key))
    assert res.returncode == 1, st.describe(res)
    assert "FAILED" in res.stdout and "first broken link" in res.stdout, res.stdout
    first = res.stdout.splitlines()[1]
    store_key = key.removeprefix(f"{prefix}/")
    # Lines are counted from 1 in verify's report.
    assert store_key in first and f"line {line + 1} (seq {event['seq']})" in first, res.stdout
    assert "hash mismatch" in first, res.stdout



def test_the_ocsf_export_holds_the_blocked_and_the_approved_action(story, recording):
    """The chart's ``ocsf.file``: the sidecar's OCSF 1.8.0 API Activity events, each valid
    against the schema vendored in tests/, hold the blocked bucket deletion and the approved
    role creation with who did them and which rule decided - and no secret."""
    schema = json.loads((st.REPO_ROOT / "tests" / "sidecar" / "recording" / "ocsf" /
                         "api_activity-1.8.0.schema.json").read_text())
    validator = jsonschema.Draft202012Validator(schema)
    text = story.sidecar.path(story.installation.values["ocsf.file"]).read_text()
    events = [json.loads(line) for line in text.splitlines()]
    for event in events:
        assert not [e.message for e in validator.iter_errors(event)], event
    blocked = [e for e in events if e["api"]["operation"] == "s3:DeleteBucket"]
    assert blocked and all(e["disposition"] == "Blocked" and e["activity_id"] == 4 for e in blocked)
    assert blocked[0]["policy"]["data"]["rule"] == "no-bucket-deletion"
    approved = [e for e in events if e["api"]["operation"] == "iam:CreateRole"
                and e["disposition"] == "Approved"]
    assert approved and approved[0]["activity_id"] == 1 and approved[0]["status_id"] == 1
    assert approved[0]["policy"]["data"]["rule"] == "new-roles-need-approval"
    assert approved[0]["unmapped"]["chaperone"]["approval"]["approver"]
    assert {e["actor"]["user"]["name"] for e in blocked + approved} == {"dave"}
    assert {e["metadata"]["correlation_uid"] for e in events} == {recording["summary"]["session"]}
    assert story.aws_access_key not in text and story.secret_value not in text
