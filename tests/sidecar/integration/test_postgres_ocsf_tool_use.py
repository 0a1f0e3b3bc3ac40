"""PostgreSQL statements in the OCSF export and linked to the model's tool_use, through a real
sidecar (standalone ``chaperone proxy``), the test bed's PostgreSQL and a real HTTPS server
playing the Messages API, read by the official ``anthropic`` SDK.

The model answers a ``tool_use`` asking for ``psql ... -c "DELETE FROM accounts"``; the agent
then runs that with the real ``psql`` through the sidecar's postgres listener (refused: no WHERE)
and a SELECT with psycopg (allowed). Checked: the OCSF file sink holds both statements as
API Activity events valid against the vendored OCSF 1.8.0 schema (Read/Allowed, Delete/Blocked
with the rule and SQLSTATE, no row value); the DELETE's recorded request carries ``causedBy``
naming the tool_use, the SELECT none; ``chaperone sessions replay`` shows the pair.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from pathlib import Path

import jsonschema
import psycopg
import pytest
import yaml

from chaperone_testbed.anthropic_api import AnthropicAPI

from .pod import API, PYTHONPATH, base_env, free_port, standalone_proxy
from .test_tool_use import PY_CLIENT, agent_env, run

SCHEMA = json.loads((Path(__file__).parents[1] / "recording" / "ocsf" / "api_activity-1.8.0.schema.json").read_text())
VALIDATOR = jsonschema.Draft202012Validator(SCHEMA)
API_KEY = "sk-ant-held-by-the-sidecar-pg"
HOST = "127.0.0.2"
PASSWORD = "ocsf-db-pw-held-by-the-sidecar"
ROW_SECRET = "row-value-never-exported"
DELETE = "DELETE FROM accounts"

POLICY = {"apiVersion": API, "kind": "AccessPolicy", "metadata": {"name": "db"},
          "spec": {"defaultEffect": "allow", "rules": [
              {"name": "no-mass-writes", "match": {"postgres": {"statements": ["DELETE", "UPDATE"],
                                                                "whereMissing": True}},
               "block": {"message": "DELETE/UPDATE without WHERE touches every row"}}]}}


@pytest.fixture(scope="module")
def sidecar(postgres_server, tmp_path_factory):
    root = tmp_path_factory.mktemp("pg-ocsf")
    server = postgres_server
    if "ocsf_owner" not in server.psql("SELECT rolname FROM pg_roles"):
        server.create_user("ocsf_owner", PASSWORD, database="ocsf_shop")
    server.psql("DROP TABLE IF EXISTS accounts; CREATE TABLE accounts (id int, note text); "
                f"INSERT INTO accounts VALUES (1, '{ROW_SECRET}'); ALTER TABLE accounts OWNER TO ocsf_owner",
                database="ocsf_shop")
    model = AnthropicAPI(root / "anthropic", api_key=API_KEY, host=HOST, split=3)
    pg_port = free_port()
    model.answer = lambda body: {"stop_reason": "tool_use", "content": [
        {"type": "tool_use", "id": "toolu_wipe", "name": "bash",
         "input": {"command": f'psql -h 127.0.0.1 -p {pg_port} -d ocsf_shop -c "{DELETE}"'}}]}
    conf = root / "conf"
    for sub in ("connections", "policies", "credentials/claude", "credentials/db", "upstream-ca/claude",
                "upstream-ca/db"):
        (conf / sub).mkdir(parents=True)
    (conf / "credentials" / "claude" / "token").write_text(API_KEY)
    (conf / "credentials" / "db" / "password").write_text(PASSWORD)
    (conf / "upstream-ca" / "claude" / "ca.crt").write_bytes(model.ca_file.read_bytes())
    (conf / "upstream-ca" / "db" / "ca.crt").write_bytes(server.ca_file.read_bytes())
    (conf / "chaperone.yaml").write_text(yaml.safe_dump({"namespace": "laptop", "user": "dana"}))
    for name, spec in {
        "claude": {"type": "anthropic", "hosts": [HOST],
                   "credentials": {"source": "secret", "secretRef": {"name": "claude", "tokenKey": "token"}}},
        "db": {"type": "postgres", "postgres": {"host": "localhost", "port": server.port, "database": "ocsf_shop",
                                                "user": "ocsf_owner", "listenPort": pg_port},
               "credentials": {"source": "secret", "secretRef": {"name": "db"}},
               "upstreamCA": {"name": "db-ca", "key": "ca.crt"}},
    }.items():
        (conf / "connections" / f"{name}.yaml").write_text(yaml.safe_dump(
            {"apiVersion": API, "kind": "ClaudeConnection", "metadata": {"name": name}, "spec": spec}))
    (conf / "policies" / "db.yaml").write_text(yaml.safe_dump(POLICY))
    ocsf = root / "ocsf" / "events.jsonl"
    try:
        with standalone_proxy(conf, root / "proxy.log", env={"CHAPERONE_OCSF_FILE": str(ocsf)}) as proxy:
            yield proxy, conf, model, server, pg_port, ocsf
    finally:
        model.close()


def test_statements_are_exported_as_ocsf_and_linked_to_the_tool_use(sidecar):
    proxy, conf, model, server, pg_port, ocsf = sidecar
    got = run([sys.executable, "-c", PY_CLIENT, model.url, "stream", "clean up the accounts"],
              agent_env(conf, proxy.port))
    command = got["content"][0]["input"]["command"]
    assert got["content"][0]["id"] == "toolu_wipe" and DELETE in command, got
    # the agent runs what the model asked for, with the real psql, through the sidecar
    argv = command.replace('"', "").split(" -c ")[0].split() + ["-X", "-U", "agent", "-c", DELETE]
    out = subprocess.run(argv, env={**base_env(), "PGSSLMODE": "disable", "PGCONNECT_TIMEOUT": "10"},
                         capture_output=True, text=True, timeout=60)
    assert out.returncode != 0 and "no-mass-writes" in out.stderr, out.stdout + out.stderr
    with psycopg.connect(host="127.0.0.1", port=pg_port, user="agent", dbname="x", sslmode="disable",
                         autocommit=True, connect_timeout=10) as conn:
        assert conn.execute("SELECT id, note FROM accounts WHERE id = %s", (1,)).fetchall() == [(1, ROW_SECRET)]
    assert server.psql("SELECT count(*) FROM accounts", database="ocsf_shop").strip() == "1"

    proxy.proc.send_signal(signal.SIGTERM)  # the exporter drains and the session is shipped
    assert proxy.proc.wait(60) == 0

    events = [json.loads(line) for line in ocsf.read_text().splitlines() if line.strip()]
    sql = [e for e in events if (e["unmapped"]["chaperone"].get("connectionType")) == "postgres"]
    for event in sql:
        errors = sorted(VALIDATOR.iter_errors(event), key=lambda e: list(e.path))
        assert not errors, "\n".join(f"{list(e.path)}: {e.message}" for e in errors[:5])
    assert ROW_SECRET not in json.dumps(sql)  # the sample rows stay in the recording
    select = next(e for e in sql if e["api"]["operation"] == "postgres:SELECT")
    delete = next(e for e in sql if e["api"]["operation"] == "postgres:DELETE")
    assert (select["activity_id"], select["disposition_id"], select["status_id"], select["status_code"]) == \
        (2, 1, 1, "00000")
    assert select["api"]["request"]["data"]["sql"] == "SELECT id, note FROM accounts WHERE id = $1"
    assert select["api"]["request"]["data"]["parameters"] == 1
    assert select["resources"] == [{"name": "accounts", "type": "table", "namespace": "ocsf_shop"}]
    assert (delete["activity_id"], delete["disposition_id"], delete["status_id"], delete["status_code"]) == \
        (4, 2, 2, "42501")
    assert delete["policy"]["uid"] == "laptop/db#no-mass-writes" and "no-mass-writes" in delete["status_detail"]
    assert delete["api"]["request"]["data"]["sql"] == DELETE
    assert delete["unmapped"]["chaperone"]["causedBy"]["toolUseId"] == "toolu_wipe"
    assert delete["dst_endpoint"]["svc_name"] == "db" and "http_request" not in delete

    recorded = []
    for path in sorted((conf / "recordings").rglob("*.jsonl*")):
        recorded += [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    requests = {e["data"]["action"]["name"]: e for e in recorded
                if e["type"] == "request" and e["data"].get("protocol") == "postgres"}
    cause = requests["postgres:DELETE"]["data"]["causedBy"]
    assert cause["toolUseId"] == "toolu_wipe" and "statement text" in cause["reason"]
    assert "table accounts" in cause["reason"]
    assert "causedBy" not in requests["postgres:SELECT"]["data"]  # nothing the model asked for names it

    session = requests["postgres:DELETE"]["session"]
    out = subprocess.run([sys.executable, "-m", "chaperone_sidecar.recording.sessions_cli", "sessions", "replay",
                          "--dir", str(conf / "recordings"), session],
                         env=base_env() | {"PYTHONPATH": PYTHONPATH}, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    at = next(i for i, line in enumerate(lines) if "tool_use toolu_wipe bash" in line)
    assert "the model asked -> the agent did:" in lines[:at]
    assert "SQL postgres://localhost:" in lines[at + 1] and "DELETE accounts" in lines[at + 1]
    assert "[block]" in lines[at + 1], lines[at:at + 3]
