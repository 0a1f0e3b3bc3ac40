"""PostgreSQL through a real sidecar: psycopg and psql against the test bed's real server.

The sidecar is the ``chaperone proxy`` process (standalone: connections, policy and the
database password from files); its postgres listeners terminate the agent's connections and
log in upstream with SCRAM-SHA-256 over verify-full TLS. Every refusal is checked twice: what
the client reports (SQLSTATE, message naming the rule, hint naming the ApprovalRequest) and that
the server's data did not change (read as the superuser, not through the sidecar).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import psycopg
import pytest
import yaml
from psycopg import pq

from .pod import API, PYTHONPATH, base_env, free_port, standalone_proxy, wait_for

PASSWORD = "db-pw-held-by-the-sidecar-only"
KEY = "AKIAIOSFODNN7EXAMPLE"
HOLD = {"mode": "hold", "holdSeconds": 60, "timeoutSeconds": 120}

POLICY = {
    "apiVersion": API, "kind": "AccessPolicy", "metadata": {"name": "shop-db"},
    "spec": {"defaultEffect": "block", "approvers": {"users": ["alice"]}, "rules": [
        {"name": "reads", "match": {"postgres": {"kinds": ["read"]}}, "allow": {}},
        {"name": "prepare-reads", "match": {"postgres": {"statements": ["PREPARE", "SELECT"]}}, "allow": {}},
        {"name": "transactions", "match": {"postgres": {"statements": ["BEGIN", "COMMIT", "ROLLBACK"]}},
         "allow": {}},
        {"name": "writes", "match": {"postgres": {"kinds": ["write"], "tables": ["orders", "users"]}},
         "allow": {}},
        {"name": "no-mass-writes", "match": {"postgres": {"statements": ["DELETE", "UPDATE"],
                                                          "whereMissing": True}},
         "block": {"message": "DELETE/UPDATE without WHERE touches every row"}},
        {"name": "no-server-files", "match": {"postgres": {"functions": ["pg_read_file", "PROGRAM", "bump"]}},
         "block": {"message": "no server files or programs"}},
        {"name": "drop-needs-alice", "match": {"postgres": {"statements": ["DROP"], "tables": ["scratch*"]}},
         "requireApproval": {"mode": "defer"}},
        {"name": "drop-held", "match": {"postgres": {"statements": ["DROP"], "tables": ["held*"]}},
         "requireApproval": HOLD},
        {"name": "secrets", "match": {"postgres": {}},
         "mask": {"fields": ["$.password", "$.pin"], "detectors": ["aws-access-key-id"]}},
    ]}}


class DB:
    def __init__(self, server, conf: Path, ports: dict[str, int], log: Path):
        self.server, self.conf, self.ports, self.log = server, conf, ports, log

    def connect(self, connection: str = "shop", **kwargs) -> psycopg.Connection:
        kwargs.setdefault("sslmode", "disable")
        return psycopg.connect(host="127.0.0.1", port=self.ports[connection], user="anyone",
                               dbname="whatever", autocommit=True, connect_timeout=10, **kwargs)

    def truth(self, sql: str) -> str:
        """As the superuser, straight to the server."""
        return self.server.psql(sql, database="shop").strip()

    def psql(self, sql: str, connection: str = "shop", **env: str) -> subprocess.CompletedProcess:
        return subprocess.run(
            ["psql", "-X", "-h", "127.0.0.1", "-p", str(self.ports[connection]), "-U", "agent",
             "-d", "shop", "-c", sql],
            env={**base_env(), "PGSSLMODE": "disable", "PGCONNECT_TIMEOUT": "10", **env},
            capture_output=True, text=True, timeout=120)


def cli(*args: str) -> subprocess.CompletedProcess:
    env = base_env()
    env.update({"PYTHONPATH": PYTHONPATH, "USER": "alice"})
    return subprocess.run([sys.executable, "-m", "chaperone_sidecar.standalone_cli", *args], env=env,
                          capture_output=True, text=True, timeout=60)


def connection(name: str, server, port: int, **postgres) -> dict:
    return {"apiVersion": API, "kind": "ClaudeConnection", "metadata": {"name": name},
            "spec": {"type": "postgres",
                     "postgres": {"host": "localhost", "port": server.port, "database": "shop",
                                  "user": "shop_owner", "listenPort": port, **postgres},
                     "credentials": {"source": "secret", "secretRef": {"name": "db"}},
                     "upstreamCA": {"name": "db-ca", "key": "ca.crt"}}}


@pytest.fixture(scope="module")
def db(postgres_server, tmp_path_factory):
    root = tmp_path_factory.mktemp("pg")
    server = postgres_server
    if "shop_owner" not in server.psql("SELECT rolname FROM pg_roles"):
        server.create_user("shop_owner", PASSWORD, database="shop")
    conf = root / "conf"
    for sub in ("connections", "policies"):
        (conf / sub).mkdir(parents=True)
    ports = {"shop": free_port(), "shop-tls": free_port(), "shop-noca": free_port(), "shop-nopw": free_port(),
             "shop-gone": free_port()}
    conns = [connection("shop", server, ports["shop"]),
             connection("shop-tls", server, ports["shop-tls"], clientTLS=True),
             connection("shop-noca", server, ports["shop-noca"]),
             connection("shop-nopw", server, ports["shop-nopw"]),
             connection("shop-gone", server, ports["shop-gone"])]
    del conns[2]["spec"]["upstreamCA"]  # verify-full against the system CAs only: must fail
    conns[3]["spec"]["credentials"]["secretRef"]["name"] = "none-mounted"
    for conn in conns:
        name = conn["metadata"]["name"]
        (conf / "connections" / f"{name}.yaml").write_text(yaml.safe_dump(conn))
        if name != "shop-nopw":
            (conf / "credentials" / name).mkdir(parents=True)
            (conf / "credentials" / name / "password").write_text(PASSWORD)
        if name != "shop-noca":
            (conf / "upstream-ca" / name).mkdir(parents=True)
            (conf / "upstream-ca" / name / "ca.crt").write_bytes(server.ca_file.read_bytes())
    (conf / "chaperone.yaml").write_text(yaml.safe_dump({"namespace": "laptop", "user": "dana"}))
    (conf / "policies" / "db.yaml").write_text(yaml.safe_dump(POLICY))
    server.psql("DROP TABLE IF EXISTS users, orders; "
                "CREATE TABLE users (id int PRIMARY KEY, name text, password text, pin int, note text); "
                "CREATE TABLE orders (id int, total int); "
                f"INSERT INTO users VALUES (1, 'ann', 'hunter2', 1234, 'key {KEY}'), (2, 'bob', 'pw2', 42, 'x'); "
                "INSERT INTO orders VALUES (1, 10); ALTER TABLE users OWNER TO shop_owner; "
                "ALTER TABLE orders OWNER TO shop_owner", database="shop")
    with standalone_proxy(conf, root / "proxy.log") as proxy:
        yield DB(server, conf, ports, proxy.log)


# ---------------------------------------------------------------------------- allowed, masked

def test_reads_pass_with_columns_masked_by_name_and_detector(db):
    with db.connect() as conn:
        cur = conn.execute("SELECT id, name, password, pin, note FROM users ORDER BY id")
        rows = cur.fetchall()
        # The RowDescription is the server's: names and types as asked.
        assert [(d.name, d.type_code) for d in cur.description] == [
            ("id", 23), ("name", 25), ("password", 25), ("pin", 23), ("note", 25)]
    assert rows == [(1, "ann", "[MASKED:field]", None, "key [MASKED:aws-access-key-id]"),
                    (2, "bob", "[MASKED:field]", None, "x")]
    assert db.truth("SELECT password FROM users WHERE id = 1") == "hunter2"  # masked in transit only


def test_extended_protocol_binary_results_and_parameters(db):
    with db.connect() as conn:
        cur = conn.cursor(binary=True)
        cur.execute("SELECT name, password, note FROM users WHERE id = %s", (1,))
        assert cur.fetchone() == ("ann", "[MASKED:field]", "key [MASKED:aws-access-key-id]")
        cur = conn.execute("SELECT name FROM users WHERE id = %s", (2,), prepare=True)
        assert cur.fetchone() == ("bob",)


def test_psql_reads_through_the_sidecar_without_a_password(db):
    out = db.psql("SELECT name, password FROM users ORDER BY id")
    assert out.returncode == 0, out.stderr
    assert "ann  | [MASKED:field]" in out.stdout
    out = db.psql("SELECT current_user, current_database()")
    assert "shop_owner   | shop" in out.stdout  # the connection's role and database, not the agent's


# ---------------------------------------------------------------------------- refusals

@pytest.mark.parametrize("sql", [
    "DELETE FROM users",
    "delete /* sneaky */ from USERS",
    'DELETE FROM "users" WHERE 1 = 1',
    "SELECT 1; DELETE FROM users",
    "WITH d AS (DELETE FROM users RETURNING *) SELECT count(*) FROM d",
    "UPDATE users SET password = 'x'",
])
def test_writes_to_every_row_are_refused_with_the_rule_and_nothing_runs(db, sql):
    with db.connect() as conn:
        with pytest.raises(psycopg.errors.InsufficientPrivilege) as info:
            conn.execute(sql)
        diag = info.value.diag
        assert diag.sqlstate == "42501"
        assert "DELETE/UPDATE without WHERE touches every row" in diag.message_primary
        assert "shop-db#no-mass-writes" in diag.message_primary
        assert diag.message_hint and "nothing of this query was run" in diag.message_hint
        # the connection stays usable, idle
        assert conn.info.transaction_status == pq.TransactionStatus.IDLE
        assert conn.execute("SELECT count(*) FROM users").fetchone() == (2,)
    assert db.truth("SELECT count(*), min(password) FROM users") == "2|hunter2"


def test_psql_prints_the_refusal(db):
    out = db.psql("DELETE FROM users")
    assert out.returncode == 1
    assert "ERROR:  chaperone refused DELETE: DELETE/UPDATE without WHERE touches every row " \
           "(rule laptop/shop-db#no-mass-writes)" in out.stderr
    assert "HINT:" in out.stderr and "DETAIL:  Refused statement: DELETE users" in out.stderr


def test_a_refusal_inside_a_transaction_fails_it_as_the_server_would(db):
    with db.connect() as conn:
        conn.execute("BEGIN")
        conn.execute("INSERT INTO orders VALUES (99, 1)")
        with pytest.raises(psycopg.errors.InsufficientPrivilege):
            conn.execute("DELETE FROM users")
        assert conn.info.transaction_status == pq.TransactionStatus.INERROR
        with pytest.raises(psycopg.errors.InFailedSqlTransaction):
            conn.execute("SELECT 1")
        conn.execute("ROLLBACK")
        assert conn.info.transaction_status == pq.TransactionStatus.IDLE
        assert conn.execute("SELECT count(*) FROM orders WHERE id = 99").fetchone() == (0,)


def test_unparseable_sql_is_refused_with_the_parser_error(db):
    with db.connect() as conn:
        with pytest.raises(psycopg.errors.SyntaxError) as info:
            conn.execute("SELEC * FROM users")
        assert info.value.diag.message_primary.startswith(
            'chaperone cannot read this SQL, so it was not sent: syntax error at or near "SELEC"')
        assert conn.execute("SELECT 1").fetchone() == (1,)


# With standard_conforming_strings off, the server reads ``'a\\', '`` as ONE string and what
# follows as code: to a parser lexing as a fresh session does, this is a harmless SELECT of two
# strings; to the server it calls pg_read_file (which the policy blocks). set_config() is a
# SELECT (a "read"), so an agent can switch the setting off.
HIDDEN_CALL = ("SELECT 'a\\', ' || pg_read_file(chr(47)||chr(101)||chr(116)||chr(99)||chr(47)"
               "||chr(104)||chr(111)||chr(115)||chr(116)||chr(110)||chr(97)||chr(109)||chr(101)) --'")


def test_sql_the_server_would_lex_differently_is_refused(db):
    with db.connect() as conn:
        conn.execute("SELECT set_config('standard_conforming_strings', 'off', false)")
        with pytest.raises(psycopg.errors.SyntaxError) as info:
            conn.execute(HIDDEN_CALL)
        assert "standard_conforming_strings is off" in info.value.diag.message_primary
        conn.execute("SELECT set_config('standard_conforming_strings', 'on', false)")
        assert conn.execute(HIDDEN_CALL).fetchone()[0] == "a\\"  # read as the parser reads it


def test_a_pipelined_setting_change_cannot_slip_a_statement_past_the_parser(db):
    """The set_config and the statement in one pipeline: the sidecar judges the statement before
    the server's ParameterStatus says the setting changed."""
    with db.connect() as conn:
        with pytest.raises(psycopg.errors.SyntaxError) as info:
            with conn.pipeline():
                conn.execute("SELECT set_config('standard_conforming_strings', 'off', false)")
                conn.execute(HIDDEN_CALL)
        assert "still running (pipelined)" in info.value.diag.message_primary


def test_other_client_encodings_and_bytes_that_are_not_utf8_are_refused(db):
    with db.connect() as conn:
        result = conn.pgconn.exec_(b"SELECT 'caf\xe9'")  # latin-1 bytes
        assert result.error_field(pq.DiagnosticField.SQLSTATE) == b"42601"
        assert b"not valid UTF-8" in result.error_field(pq.DiagnosticField.MESSAGE_PRIMARY)
        conn.pgconn.exec_(b"SELECT set_config('client_encoding', 'GBK', false)")
        result = conn.pgconn.exec_(b"SELECT 1")
        assert b"client_encoding is GBK" in result.error_field(pq.DiagnosticField.MESSAGE_PRIMARY)


def test_server_files_and_programs_are_refused(db):
    with db.connect() as conn:
        for sql in ("SELECT pg_catalog.pg_read_file('/etc/passwd')",
                    "COPY users TO PROGRAM 'cat > /tmp/chaperone-exfil'"):
            with pytest.raises(psycopg.errors.InsufficientPrivilege):
                conn.execute(sql)


def test_opaque_statements_are_refused_by_default(db):
    with db.connect() as conn:
        for sql in ("DO $$ BEGIN DELETE FROM users; END $$", "CALL nothing()", "EXECUTE p"):
            with pytest.raises(psycopg.errors.InsufficientPrivilege) as info:
                conn.execute(sql)
            assert "no rule allowed" in info.value.diag.message_primary or "refused" in info.value.diag.message_primary
    assert db.truth("SELECT count(*) FROM users") == "2"


def test_a_statement_name_cannot_be_reused_to_run_what_was_judged_harmless(db):
    """Parse s1 = DELETE (forwarded: parsing runs nothing), Parse s1 = SELECT (the server refuses
    the duplicate and keeps the DELETE), Execute s1: the sidecar must judge the DELETE."""
    with db.connect() as conn:
        pgconn = conn.pgconn
        assert pgconn.prepare(b"s1", b"DELETE FROM users").status == pq.ExecStatus.COMMAND_OK
        again = pgconn.prepare(b"s1", b"SELECT 1")
        assert again.status == pq.ExecStatus.FATAL_ERROR  # prepared statement "s1" already exists
        result = pgconn.exec_prepared(b"s1", [])
        assert result.status == pq.ExecStatus.FATAL_ERROR
        assert result.error_field(pq.DiagnosticField.SQLSTATE) == b"42501"
        assert conn.execute("SELECT 1").fetchone() == (1,)
    assert db.truth("SELECT count(*) FROM users") == "2"


def test_a_refused_statement_is_never_planned(db):
    """The server plans a portal at Bind, and planning folds immutable functions - runs them -
    before any Execute. bump() is one, and it advances a sequence (not undone by the refusal's
    rollback): refused at Bind, it must not have run."""
    db.truth("CREATE SEQUENCE IF NOT EXISTS bumps; "
             "CREATE OR REPLACE FUNCTION bump() RETURNS bigint IMMUTABLE LANGUAGE plpgsql AS "
             "$$ BEGIN RETURN nextval('bumps'); END $$; GRANT USAGE ON SEQUENCE bumps TO PUBLIC")
    before = db.truth("SELECT last_value, is_called FROM bumps")
    with db.connect() as conn:
        with pytest.raises(psycopg.errors.InsufficientPrivilege) as info:
            conn.execute("SELECT bump() WHERE %s", (True,))  # parameters: the extended protocol
        assert "no-server-files" in info.value.diag.message_primary
    assert db.truth("SELECT last_value, is_called FROM bumps") == before


def test_a_statement_made_by_sql_prepare_is_opaque_when_executed(db):
    """What a SQL-level PREPARE made, the sidecar never saw a Parse of: executing it (by the
    protocol or by SQL EXECUTE) is judged as opaque, the strictest."""
    with db.connect() as conn:
        conn.execute("PREPARE p AS SELECT 1")  # allowed: the rule names both commands
        result = conn.pgconn.exec_prepared(b"p", [])
        assert result.error_field(pq.DiagnosticField.SQLSTATE) == b"42501"
        with pytest.raises(psycopg.errors.InsufficientPrivilege):
            conn.execute("EXECUTE p")
        assert conn.execute("SELECT 1").fetchone() == (1,)
        with pytest.raises(psycopg.errors.InsufficientPrivilege):  # PREPARE of a mass delete
            conn.execute("PREPARE q AS DELETE FROM users")


# ---------------------------------------------------------------------------- approvals

def pending(db, rule: str) -> list[dict]:
    out = cli("approvals", "--config-dir", str(db.conf), "--json")
    assert out.returncode == 0, out.stderr
    return [o for o in json.loads(out.stdout) if o["spec"]["rule"]["name"] == rule]


def test_drop_needs_approval_defer_names_the_request_then_the_retry_passes(db):
    db.truth("CREATE TABLE IF NOT EXISTS scratch_a (a int); ALTER TABLE scratch_a OWNER TO shop_owner")
    with db.connect() as conn:
        with pytest.raises(psycopg.errors.InsufficientPrivilege) as info:
            conn.execute("DROP TABLE scratch_a")
        diag = info.value.diag
    (request,) = pending(db, "drop-needs-alice")
    name = request["metadata"]["name"]
    assert request["spec"]["action"]["name"] == "postgres:DROP"
    assert "DROP TABLE scratch_a" in request["spec"]["action"]["summary"]
    assert f"ApprovalRequest {name}" in diag.message_primary and "alice" in diag.message_primary
    assert f"chaperone approve {name}" in diag.message_hint
    assert db.truth("SELECT count(*) FROM pg_tables WHERE tablename = 'scratch_a'") == "1"
    out = cli("approve", name, "--config-dir", str(db.conf), "--as", "alice")
    assert out.returncode == 0, out.stderr
    with db.connect() as conn:
        conn.execute("DROP TABLE scratch_a")  # the same statement: passes on the grant
    assert db.truth("SELECT count(*) FROM pg_tables WHERE tablename = 'scratch_a'") == "0"


def test_drop_held_until_approved_while_other_connections_keep_working(db):
    db.truth("CREATE TABLE IF NOT EXISTS held_b (a int); ALTER TABLE held_b OWNER TO shop_owner")
    result: dict[str, object] = {}

    def drop():
        try:
            with db.connect() as conn:
                conn.execute("DROP TABLE held_b")
                result["ok"] = True
        except Exception as exc:  # noqa: BLE001 - reported by the assertion below
            result["error"] = exc

    thread = threading.Thread(target=drop, daemon=True)
    thread.start()
    (request,) = wait_for(lambda: pending(db, "drop-held"), 30, "the held DROP's ApprovalRequest")
    with db.connect() as other:  # the hold holds one connection, not the listener
        assert other.execute("SELECT 1").fetchone() == (1,)
    assert db.truth("SELECT count(*) FROM pg_tables WHERE tablename = 'held_b'") == "1"
    out = cli("approve", request["metadata"]["name"], "--config-dir", str(db.conf), "--as", "alice")
    assert out.returncode == 0, out.stderr
    thread.join(60)
    assert result == {"ok": True}
    assert db.truth("SELECT count(*) FROM pg_tables WHERE tablename = 'held_b'") == "0"


def test_a_session_of_a_deleted_connection_is_refused_from_then_on(db):
    with db.connect("shop-gone") as conn:
        assert conn.execute("SELECT 1").fetchone() == (1,)
        (db.conf / "connections" / "shop-gone.yaml").unlink()

        def refused() -> bool:
            try:
                conn.execute("SELECT 1")
            except psycopg.errors.InsufficientPrivilege as exc:
                return "connection 'shop-gone' no longer exists" in exc.diag.message_primary
            return False
        wait_for(refused, 15, "the removed connection's session to be refused")
    with pytest.raises(psycopg.OperationalError):  # and its listener is gone
        db.connect("shop-gone")


# ---------------------------------------------------------------------------- TLS, login

def test_the_agent_can_use_tls_verified_against_the_sidecars_ca(db):
    ca = db.conf / "ca" / "mitmproxy-ca-cert.pem"
    with psycopg.connect(host="localhost", port=db.ports["shop-tls"], user="a", dbname="b",
                         sslmode="verify-full", sslrootcert=str(ca), autocommit=True) as conn:
        assert conn.pgconn.ssl_in_use
        assert conn.execute("SELECT name FROM users WHERE id = 1").fetchone() == ("ann",)
    with pytest.raises(psycopg.OperationalError, match="does not support SSL"):
        db.connect(sslmode="require")  # clientTLS is off on "shop"


def test_upstream_tls_is_verified_and_a_missing_password_is_a_clear_error(db):
    with pytest.raises(psycopg.OperationalError, match="TLS to the database server .* failed"):
        db.connect("shop-noca")
    with pytest.raises(psycopg.OperationalError, match="holds no password for this connection"):
        db.connect("shop-nopw")


def test_the_agents_password_and_replication_requests_change_nothing(db):
    with db.connect(password="whatever-the-agent-says") as conn:
        assert conn.execute("SELECT current_user").fetchone() == ("shop_owner",)
    with pytest.raises(psycopg.OperationalError, match="refuses replication connections"):
        db.connect(replication="database")
    with db.connect(options="-c default_transaction_read_only=off -c role=postgres") as conn:
        assert conn.execute("SELECT current_user").fetchone() == ("shop_owner",)  # options dropped


def test_a_cancel_request_reaches_the_server(db):
    with db.connect() as conn:
        timer = threading.Timer(0.5, conn.cancel)
        timer.start()
        started = time.monotonic()
        with pytest.raises(psycopg.errors.QueryCanceled):
            conn.execute("SELECT pg_sleep(20)")
        assert time.monotonic() - started < 10
        assert conn.execute("SELECT 1").fetchone() == (1,)


def test_copy_out_cannot_dodge_column_masks_and_copy_in_is_judged(db):
    with db.connect() as conn:
        with pytest.raises(psycopg.errors.InsufficientPrivilege) as info:
            with conn.cursor().copy("COPY users TO STDOUT") as copy:
                list(copy)
        assert "cannot be applied to COPY output" in info.value.diag.message_primary
        with conn.cursor().copy("COPY orders FROM STDIN") as copy:
            copy.write_row((7, 70))
    assert db.truth("SELECT total FROM orders WHERE id = 7") == "70"


@pytest.mark.parametrize("sql", [
    "SELECT id, password AS pw FROM users WHERE id = 1",
    "SELECT id, upper(password) FROM users WHERE id = 1",
    "SELECT id, p FROM (SELECT id, password AS p FROM users) s WHERE id = 1",
    "WITH x AS (SELECT id, password AS p FROM users) SELECT * FROM x WHERE id = 1",
    "SELECT id, row_to_json(u)::text FROM users u WHERE id = 1",
    "SELECT name FROM users WHERE id = 2 UNION ALL SELECT password FROM users WHERE id = 1",
])
def test_a_masked_column_under_another_label_masks_the_whole_result(db, sql):
    with db.connect() as conn:
        text = json.dumps(conn.execute(sql).fetchall(), default=str)
    assert "hunter2" not in text and "[MASKED:field]" in text


# ---------------------------------------------------------------------------- recording

def test_every_statement_is_recorded_with_its_decision_and_a_masked_result(db):
    with db.connect() as conn:
        conn.execute("SELECT id, password, note FROM users WHERE id = %s", (1,)).fetchall()
        with pytest.raises(psycopg.errors.InsufficientPrivilege):
            conn.execute("DELETE FROM users")
    spool = db.conf / "spool"
    events = []
    wait_for(lambda: list(spool.rglob("*.jsonl")) or list(spool.rglob("*")), 10, "the spool")

    def read_all():
        events.clear()
        for path in sorted(spool.rglob("*")):
            if path.is_file():
                for line in path.read_bytes().splitlines():
                    try:
                        events.append(json.loads(line))
                    except ValueError:
                        continue
        return [e for e in events if (e.get("data") or {}).get("protocol") == "postgres"]
    requests = wait_for(read_all, 10, "postgres events")
    by_flow: dict[str, list[dict]] = {}
    for e in events:
        if str(e.get("flow", "")).startswith("pg-"):
            by_flow.setdefault(e["flow"], []).append(e)
    select = next(f for f, es in by_flow.items()
                  if any(e["type"] == "request" and e["data"].get("parameters") == ["1"]
                         and "password, note" in json.dumps(e["data"]) for e in es))
    kinds = {e["type"]: e["data"] for e in by_flow[select]}
    assert kinds["request"]["url"].endswith("/shop") and kinds["request"]["extended"] is True
    assert kinds["decision"]["effect"] == "allow"
    response = kinds["response"]
    assert response["rows"] == 1 and response["status"] == "SELECT 1"
    assert "hunter2" not in json.dumps(response) and KEY not in json.dumps(response)
    assert "[MASKED:field]" in json.dumps(response)
    delete = next(f for f, es in by_flow.items()
                  if any(e["type"] == "decision" and e["data"].get("refused") == "42501"
                         and e["data"]["rule"] == {"policy": "laptop/shop-db", "name": "no-mass-writes"}
                         for e in es))
    statuses = [e["data"]["status"] for e in by_flow[delete] if e["type"] == "response"]
    assert statuses == ["ERROR 42501"]
    assert requests


# ---------------------------------------------------------------------------- node-postgres

NODE_SCRIPT = r"""
const { Client } = require('pg');
(async () => {
  const client = new Client({ host: '127.0.0.1', port: Number(process.argv[2]), user: 'agent', database: 'x' });
  await client.connect();
  const out = {};
  const rows = await client.query('SELECT name, password FROM users WHERE id = $1', [1]);
  out.rows = rows.rows;
  try { await client.query('DELETE FROM users'); out.deleted = true; }
  catch (err) { out.error = { code: err.code, message: err.message, hint: err.hint, detail: err.detail }; }
  out.after = (await client.query('SELECT count(*)::int AS n FROM users')).rows[0].n;
  await client.end();
  console.log(JSON.stringify(out));
})().catch((err) => { console.error(err); process.exit(2); });
"""


def node_modules() -> Path:
    """Where ``make node-deps`` installed node-postgres; a missing install fails the test."""
    default = Path(os.environ.get("CHAPERONE_CACHE", Path.home() / ".cache" / "chaperone")) / "node" / "node_modules"
    path = Path(os.environ.get("CHAPERONE_NODE_MODULES") or default)
    if not (path / "pg").is_dir():
        pytest.fail(f"node-postgres (pg) is not installed in {path}: run `make node-deps`")
    return path


def test_node_postgres_gets_masked_rows_and_the_refusal_as_an_error(db, tmp_path):
    script = tmp_path / "client.js"
    script.write_text(NODE_SCRIPT)
    out = subprocess.run(["node", str(script), str(db.ports["shop"])], capture_output=True, text=True,
                         env={**base_env(), "NODE_PATH": str(node_modules())}, timeout=60)
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout)
    assert result["rows"] == [{"name": "ann", "password": "[MASKED:field]"}]
    assert result["error"]["code"] == "42501"
    assert "(rule laptop/shop-db#no-mass-writes)" in result["error"]["message"]
    assert "nothing of this query was run" in result["error"]["hint"]
    assert result["after"] == 2 and "deleted" not in result
