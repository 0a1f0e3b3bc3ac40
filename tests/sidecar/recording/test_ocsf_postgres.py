"""OCSF mapping of PostgreSQL statements: the events ``postgres/record.py`` writes for a unit ->
one API Activity (6003), validated against the vendored OCSF 1.8.0 schema."""

from __future__ import annotations

import json
from pathlib import Path

import jsonschema
import pytest

from chaperone_sidecar.flowctx import RecordingSettings
from chaperone_sidecar.policy.classify.postgres import classify_sql
from chaperone_sidecar.policy.model import Decision, Identity, RuleRef
from chaperone_sidecar.postgres.decide import Verdict
from chaperone_sidecar.postgres.record import request_events, response_event
from chaperone_sidecar.recording.ocsf import FlowEvents

SCHEMA = json.loads((Path(__file__).parent / "ocsf" / "api_activity-1.8.0.schema.json").read_text())
VALIDATOR = jsonschema.Draft202012Validator(SCHEMA)
IDENTITY = Identity(service_account="team-a/claude", pod_namespace="team-a", pod_name="agent-0",
                    pod_uid="u-1", creator="alice")
KEY = "AKIAIOSFODNN7EXAMPLE"
RULE = RuleRef("team-a/shop-db", "no-mass-writes")


def validate(event: dict) -> None:
    errors = sorted(VALIDATOR.iter_errors(event), key=lambda e: list(e.path))
    assert not errors, "\n".join(f"{list(e.path)}: {e.message}" for e in errors[:5])


def unit(sql: str, *, effect: str = "allow", refused: bool = False, params=(), status="SELECT 1",
         error=None, sample=(), approval=None, settings=None) -> dict:
    """The OCSF event of one unit, from the events postgres/record.py builds for it."""
    actions = classify_sql(sql, host="db.internal", port=5432, database="shop")
    decisions = [Decision(effect, RULE if effect != "allow" else None, "no deletes")] * len(actions)
    verdict = Verdict(not refused, actions, decisions, effect=effect, approval=approval)
    if refused:
        verdict.refusal = {"C": "42501", "M": f"chaperone refused DELETE: no deletes (rule {RULE})"}
    events = request_events("pg-s1-1", identity=IDENTITY, connection="shop", url="postgres://db.internal:5432/shop",
                            sql=sql, params=list(params), verdict=verdict, settings=settings or RecordingSettings(),
                            extended=bool(params))
    events.append(response_event("pg-s1-1", identity=IDENTITY, status=status, rows=len(sample),
                                 columns=["id", "note"] if sample else [], sample=list(sample), masked=0,
                                 error=error, duration_ms=1.5, sample_limit=10))
    for seq, event in enumerate(events):
        event.update(session="s-1", seq=seq, time=f"2026-12-04T18:00:0{seq}.000000Z")
    out = FlowEvents().add(events)
    assert len(out) == 1
    validate(out[0])
    return out[0]


def test_allowed_select_is_a_read_with_the_masked_statement_and_never_a_row_value():
    event = unit(f"SELECT id, note FROM public.users WHERE note = '{KEY}' AND id = $1", params=["7"],
                 sample=[[1, "row-secret-value"]])
    assert (event["class_uid"], event["activity_id"], event["type_uid"]) == (6003, 2, 600302)
    assert event["api"]["operation"] == "postgres:SELECT" and event["api"]["service"] == {"name": "postgres"}
    assert (event["disposition_id"], event["status_id"], event["status_code"]) == (1, 1, "00000")
    data = event["api"]["request"]["data"]
    assert data["sql"].startswith("SELECT id, note FROM public.users") and "[MASKED:" in data["sql"]
    assert data["parameters"] == 1 and data["statements"][0]["kind"] == "read"
    assert event["api"]["response"] == {"message": "SELECT 1"}
    assert event["resources"] == [{"name": "public.users", "type": "table", "namespace": "shop"}]
    assert event["dst_endpoint"] == {"hostname": "db.internal", "port": 5432, "svc_name": "shop"}
    assert "http_request" not in event
    text = json.dumps(event)
    assert KEY not in text and "row-secret-value" not in text and '"7"' not in text


def test_refused_delete_is_a_blocked_delete_with_its_rule_and_sqlstate():
    event = unit("DELETE FROM users", effect="block", refused=True, status="ERROR 42501",
                 error={"C": "42501", "M": "chaperone refused DELETE"})
    assert (event["activity_id"], event["activity_name"]) == (4, "Delete")
    assert (event["disposition_id"], event["action_id"], event["status_id"]) == (2, 2, 2)
    assert event["status_code"] == "42501" and event["severity_id"] == 3
    assert "no-mass-writes" in event["status_detail"]
    assert event["policy"]["uid"] == "team-a/shop-db#no-mass-writes"
    assert event["api"]["response"] == {"message": "ERROR 42501", "error": "42501"}


def test_a_server_error_is_a_failure_without_its_text():
    """The server's error message can quote a value (invalid input syntax ... "v"): only the
    SQLSTATE is exported."""
    event = unit("INSERT INTO users VALUES ($1)", params=["value-in-error"], status="ERROR 22P02",
                 error={"C": "22P02", "M": 'invalid input syntax for type integer: "value-in-error"'})
    assert event["activity_id"] == 1 and event["disposition_id"] == 1 and event["status_id"] == 2
    assert event["status_code"] == "22P02" and "value-in-error" not in json.dumps(event)


@pytest.mark.parametrize(("sql", "activity"), [
    ("SELECT 1", 2), ("INSERT INTO t VALUES (1)", 1), ("UPDATE t SET a = 1 WHERE id = 2", 3),
    ("DELETE FROM t WHERE id = 1", 4), ("TRUNCATE t", 4), ("DROP TABLE t", 4), ("CREATE TABLE t (a int)", 1),
    ("ALTER TABLE t ADD COLUMN b int", 3), ("GRANT SELECT ON t TO x", 3), ("BEGIN", 99), ("DO $$ BEGIN END $$", 99),
    ("COPY t TO STDOUT", 2), ("COPY t FROM STDIN", 1),
    ("WITH d AS (DELETE FROM t RETURNING *) SELECT * FROM d", 4),  # a nested DELETE deletes
    ("SELECT 1; UPDATE t SET a = 2 WHERE id = 1", 3),
])
def test_activity_from_the_commands(sql, activity):
    event = unit(sql, status="OK")
    assert event["activity_id"] == activity


def test_pending_approval_is_delayed_and_granted_is_approved():
    pending = unit("DROP TABLE scratch", effect="require_approval", refused=True, status="ERROR 42501",
                   error={"C": "42501", "M": "waiting"}, approval={"name": "ar-1", "state": "pending"})
    assert pending["disposition_id"] == 14 and pending["activity_id"] == 4
    approved = unit("DROP TABLE scratch", effect="require_approval", status="DROP TABLE",
                    approval={"name": "ar-1", "state": "approved", "approver": "carol"})
    assert approved["disposition_id"] == 8 and approved["status_id"] == 1
    assert approved["unmapped"]["chaperone"]["approval"]["approver"] == "carol"


def test_long_sql_is_cut_and_unrecorded_bodies_stay_out():
    event = unit("SELECT " + ", ".join(f"c{i}" for i in range(2000)) + " FROM t")
    data = event["api"]["request"]["data"]
    assert len(data["sql"]) == 2048 and data["sqlTruncated"] is True
    none = unit("SELECT secret_col FROM t", settings=RecordingSettings(bodies="none"))
    assert "sql" not in none["api"]["request"]["data"]
