"""`chaperone sessions list|show|replay|verify` against the real S3 server and a directory."""

from __future__ import annotations

import argparse
import asyncio
import json
import uuid

import boto3
import pytest

from chaperone_sidecar.recording import Recorder
from chaperone_sidecar.recording.events import encode_body
from chaperone_sidecar.recording.manifest import key_from_bytes
from chaperone_sidecar.recording.sessions_cli import main, register
from chaperone_sidecar.recording.shipper import DirStore, S3Store, ShipperConfig
from chaperone_sidecar.recording.spool import SpoolConfig

SECRET = b"cli-test-hmac-secret-0123456789"
IDENTITY = {"namespace": "team-a", "pod": "claude-7", "serviceAccount": "agent", "creator": "alice"}


def record_story(tmp_path, store, session: str = "s-story") -> None:
    """One allowed call, one blocked, one masked, one approved: what the README demo records."""

    async def main_():
        rec = Recorder(SpoolConfig(tmp_path / f"spool-{session}", segment_bytes=1200),
                       namespace="team-a", pod="claude-7", session=session, identity=IDENTITY,
                       store=store, key=key_from_bytes(SECRET), shipping=ShipperConfig(poll_interval=0.02))
        await rec.start({"mode": "explicit", "connection": "aws-dev"})
        steps = [
            ("f1", "s3:ListBuckets", "GET", "https://s3.amazonaws.com/", "allow", "read-only", None, 200,
             '{"Buckets":[{"Name":"data"}]}'),
            ("f2", "s3:DeleteBucket", "DELETE", "https://s3.amazonaws.com/data", "block", "no-delete", None,
             403, '{"error":"blocked by Chaperone"}'),
            ("f3", "secretsmanager:GetSecretValue", "POST", "https://secretsmanager.us-east-1.amazonaws.com/",
             "allow", "read-only", None, 200, '{"SecretString":"****MASKED****","Name":"db"}' + " " * 400),
            ("f4", "iam:CreateRole", "POST", "https://iam.amazonaws.com/", "require-approval", "iam-changes",
             "bob", 200, "<CreateRoleResponse/>"),
        ]
        for flow, action, method, url, effect, rule, approver, status, body in steps:
            await rec.record("request", flow=flow, data={"action": action, "method": method, "url": url,
                                                         "body": encode_body(b"{}")})
            await rec.record("decision", flow=flow, data={"effect": effect, "rule": rule})
            if approver:
                await rec.record("approval", flow=flow, data={"name": "ar-x1", "state": "requested", "rule": rule})
                await rec.record("approval", flow=flow, data={"name": "ar-x1", "state": "approved",
                                                              "approver": approver})
            await rec.record("response", flow=flow, data={"status": status, "body": encode_body(body)})
        assert await rec.close()

    asyncio.run(main_())


@pytest.fixture
def s3_source(tmp_path, s3_server, monkeypatch):
    for name, value in s3_server.env().items():
        monkeypatch.setenv(name, value)
    bucket = f"cli-{uuid.uuid4().hex[:12]}"
    boto3.client("s3", **s3_server.client_kwargs()).create_bucket(Bucket=bucket)
    store = S3Store(bucket, **s3_server.client_kwargs())
    record_story(tmp_path, store)
    return store, ["--s3-bucket", bucket, "--s3-endpoint", s3_server.endpoint_url]


@pytest.fixture
def dir_source(tmp_path):
    store = DirStore(tmp_path / "recordings")
    record_story(tmp_path, store)
    return store, ["--dir", str(tmp_path / "recordings")]


@pytest.fixture
def key_file(tmp_path):
    path = tmp_path / "recording.key"
    path.write_bytes(SECRET + b"\n")
    return str(path)


@pytest.fixture(params=["s3", "dir"])
def source(request):
    return request.getfixturevalue(f"{request.param}_source")


def cli(capsys, *argv):
    code = main(["sessions", *argv])
    out, err = capsys.readouterr()
    return code, out, err


def test_list(capsys, source):
    _, args = source
    code, out, _ = cli(capsys, "list", *args)
    assert code == 0
    header, row = out.splitlines()
    assert header.split() == ["SESSION", "NAMESPACE", "POD", "STATUS", "EVENTS", "START", "WHO"]
    assert row.split()[:5] == ["s-story", "team-a", "claude-7", "closed", "16"] and row.endswith("alice")
    code, out, _ = cli(capsys, "list", *args, "--json", "--namespace", "team-a")
    assert code == 0 and json.loads(out)[0]["session"] == "s-story"
    code, out, _ = cli(capsys, "list", *args, "--namespace", "elsewhere")
    assert code == 0 and out.startswith("no sessions")


def test_show(capsys, source):
    _, args = source
    code, out, _ = cli(capsys, "show", "s-story", *args)
    assert code == 0
    assert "team-a/claude-7/s-story  (closed)" in out and "alice" in out
    assert "approval 2" in out and "request 4" in out and "HMAC-SHA256" in out
    code, out, _ = cli(capsys, "show", "team-a/claude-7/s-story", *args, "--json")
    info = json.loads(out)
    assert info["manifest"]["events"] == info["eventsStored"] == 16 and len(info["chunks"]) >= 3


def test_replay_timeline(capsys, source):
    _, args = source
    code, out, _ = cli(capsys, "replay", "s-story", *args, "--body-limit", "40")
    assert code == 0
    lines = out.splitlines()
    blocked = next(line for line in lines if "s3:DeleteBucket" in line)
    assert "alice" in blocked and "DELETE https://s3.amazonaws.com/data" in blocked
    assert "decision=block" in blocked and "rule=no-delete" in blocked and "status=403" in blocked
    approved = next(line for line in lines if "iam:CreateRole" in line)
    assert "decision=require-approval" in approved and "approver=bob" in approved
    assert "approval=ar-x1 approved" in approved
    masked = next(line for line in lines if "SecretString" in line)
    assert "****MASKED****" in masked and "... (+" in masked  # masked body, truncated
    assert lines[1].split()[3] == "session-start"

    code, out, _ = cli(capsys, "replay", "s-story", *args, "--json")
    rows = json.loads(out)["timeline"]
    assert [r["decision"] for r in rows if r["flow"]] == ["allow", "block", "allow", "require-approval"]
    assert rows[-1]["what"].startswith("session-end")
    code, out, _ = cli(capsys, "replay", "s-story", *args, "--events", "--json")
    assert len(json.loads(out)["timeline"]) == 16


def test_verify_intact_and_key_handling(capsys, source, key_file, tmp_path):
    _, args = source
    code, out, _ = cli(capsys, "verify", "s-story", *args, "--key", key_file)
    assert code == 0 and out.startswith("OK") and "16 events" in out and "signature valid" in out
    code, _, err = cli(capsys, "verify", "s-story", *args)
    assert code == 2 and "--key FILE" in err
    code, out, _ = cli(capsys, "verify", "s-story", *args, "--skip-signature")
    assert code == 0 and "signature not checked" in out
    wrong = tmp_path / "wrong.key"
    wrong.write_bytes(b"some-other-secret-entirely")
    code, out, _ = cli(capsys, "verify", "s-story", *args, "--key", str(wrong))
    assert code == 1 and "manifest signed by key" in out
    code, out, _ = cli(capsys, "verify", "--all", *args, "--key", key_file, "--json")
    assert code == 0 and [r["ok"] for r in json.loads(out)] == [True]


def test_verify_names_the_broken_link_of_a_tampered_object(capsys, source, key_file):
    """Someone with bucket access turns the recorded `block` into an `allow`."""
    store, args = source
    for key in sorted(k for k in store.list("sessions/team-a/claude-7/s-story/") if "/chunk-" in k):
        original = store.get(key)
        if b'"effect":"block"' in original:
            break
    lines = original.split(b"\n")
    line_no = next(i for i, line in enumerate(lines, 1) if b'"effect":"block"' in line)
    seq = json.loads(lines[line_no - 1])["seq"]
    lines[line_no - 1] = lines[line_no - 1].replace(b'"effect":"block"', b'"effect":"allow"')
    data = b"\n".join(lines)
    if isinstance(store, S3Store):  # overwrite in place
        store.client.put_object(Bucket=store.bucket, Key=key, Body=data)
    else:
        path = store._path(key)
        path.chmod(0o644)
        path.write_bytes(data)

    code, out, _ = cli(capsys, "verify", "s-story", *args, "--key", key_file)
    assert code == 1
    assert out.startswith("FAILED  team-a/claude-7/s-story")
    first = out.splitlines()[1]
    assert first.startswith(f"  - {key} line {line_no} (seq {seq}): hash mismatch: expected ")
    assert "found" in first
    assert any("chunk digest differs from the manifest" in line for line in out.splitlines())
    code, out, _ = cli(capsys, "verify", "s-story", *args, "--key", key_file, "--json")
    report = json.loads(out)
    assert report["ok"] is False
    assert {k: report["problems"][0][k] for k in ("where", "line", "seq", "kind")} == {
        "where": key, "line": line_no, "seq": seq, "kind": "hash mismatch"}


def test_errors_and_exit_codes(capsys, dir_source, tmp_path, monkeypatch):
    _, args = dir_source
    monkeypatch.delenv("CHAPERONE_RECORDING_BUCKET", raising=False)
    monkeypatch.delenv("CHAPERONE_RECORDING_DIR", raising=False)
    assert cli(capsys, "replay", "nope", *args)[0] == 3
    code, _, err = cli(capsys, "list")
    assert code == 2 and "exactly one source" in err
    assert cli(capsys, "list", *args, "--s3-bucket", "b")[0] == 2
    assert cli(capsys, "verify", *args, "--skip-signature")[0] == 2  # neither session nor --all
    code, _, err = cli(capsys, "verify", "s-story", *args, "--key", str(tmp_path / "missing"))
    assert code == 2 and "cannot read key file" in err
    monkeypatch.setenv("CHAPERONE_RECORDING_DIR", args[1])
    assert cli(capsys, "list")[0] == 0  # the source can come from the environment
    with pytest.raises(SystemExit):
        main(["sessions"])  # an action is required


def test_unreachable_s3_exits_3(capsys, monkeypatch, s3_server):
    for name, value in s3_server.env().items():
        monkeypatch.setenv(name, value)
    code, _, err = cli(capsys, "list", "--s3-bucket", "x", "--s3-endpoint", "http://127.0.0.1:9")
    assert code == 3 and "cannot read the store" in err


def test_register_plugs_into_a_chaperone_parser():
    parser = argparse.ArgumentParser(prog="chaperone")
    register(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["sessions", "verify", "s1", "--dir", "/x", "--skip-signature"])
    assert args.command == "sessions" and args.sessions_action == "verify" and callable(args.func)


def test_replay_reads_the_decision_inside_the_request_event_and_the_old_separate_one():
    """Since issue 16 the sidecar writes the decision into the request event; recordings made
    before keep their ``decision`` events; a decision changed later (a body judged again) is
    an event of its own and wins."""
    from chaperone_sidecar.recording.sessions_cli import timeline

    events = [
        {"seq": 1, "type": "request", "flow": "new", "data": {
            "method": "DELETE", "url": "https://x/y",
            "decision": {"effect": "block", "rule": {"policy": "ns/p", "name": "no-deletes"}}}},
        {"seq": 2, "type": "response", "flow": "new", "data": {"status": 403}},
        {"seq": 3, "type": "request", "flow": "old", "data": {"method": "GET", "url": "https://x/"}},
        {"seq": 4, "type": "decision", "flow": "old", "data": {"effect": "allow", "rule": "ns/p#reads"}},
        {"seq": 5, "type": "request", "flow": "later", "data": {
            "method": "POST", "url": "https://x/", "decision": {"effect": "allow", "rule": None}}},
        {"seq": 6, "type": "decision", "flow": "later", "data": {"effect": "block", "rule": {
            "policy": "ns/p", "name": "no-drops"}}},
    ]
    rows = {r["flow"]: r for r in timeline(events)}
    assert (rows["new"]["decision"], rows["new"]["rule"], rows["new"]["status"]) == ("block", "ns/p#no-deletes", 403)
    assert (rows["old"]["decision"], rows["old"]["rule"]) == ("allow", "ns/p#reads")
    assert (rows["later"]["decision"], rows["later"]["rule"]) == ("block", "ns/p#no-drops")
