"""The story, PostgreSQL: an agent pod using ``psql`` on a database it holds no password for.

Issue 15 part 2, on the e2e installation (the chart's operator and webhooks, recording to the
test bed's S3, Redis): the platform team adds a ``postgres`` ClaudeConnection (the password in a
Secret, the server's CA in a ConfigMap) and an AccessPolicy; dave creates the pod; the webhook
injects it - the agent container gets ``PGHOST``/``PGPORT`` pointing at its sidecar - and the
sidecar runs as a process with exactly what was injected, except its proxy and health ports,
moved to free ones because the main story's pod uses the chart's on this same host. The agent
is the real ``psql`` with nothing but the agent container's environment: no password, no host.
The server is the test bed's real PostgreSQL (SCRAM logins, TLS verified by the sidecar).

Steps: a SELECT passes with the password column masked; ``DELETE FROM users`` is refused with
the rule printed and nothing deleted; ``DROP TABLE`` is held for approval, alice approves it
with ``kubectl patch`` (the operator's admission stamps her) and the held ``psql`` completes;
then the sidecar is stopped as the kubelet would and the recording is read back with
``chaperone sessions replay``.
"""

from __future__ import annotations

import json
import subprocess
import uuid
from pathlib import Path

import pytest
import story as st
import yaml

from chaperone_testbed.services import ManagedProcess, free_port

API = "chaperone.dev/v1alpha1"
SIDECAR, AGENT = "chaperone-sidecar", "claude"
DB_PASSWORD = f"pg-{uuid.uuid4().hex}"
APPROVE = json.dumps({"spec": {"decision": "Approved"}})


def _b64(value: str | bytes) -> str:
    import base64

    return base64.b64encode(value if isinstance(value, bytes) else value.encode()).decode()


def _objects(ns: str, server, listen_port: int, s3) -> list[dict]:
    rbac = "rbac.authorization.k8s.io/v1"
    return [
        {"apiVersion": "v1", "kind": "ServiceAccount", "metadata": {"name": "claude-agent", "namespace": ns}},
        {"apiVersion": rbac, "kind": "Role", "metadata": {"name": "developer", "namespace": ns},
         "rules": [{"apiGroups": [""], "resources": ["pods"], "verbs": ["create", "get", "list", "delete"]}]},
        {"apiVersion": rbac, "kind": "RoleBinding", "metadata": {"name": "developer-dave", "namespace": ns},
         "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": "developer"},
         "subjects": [{"apiGroup": "rbac.authorization.k8s.io", "kind": "User", "name": "dave"}]},
        {"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "chaperone-sidecar", "namespace": ns},
         "type": "Opaque", "data": {"AWS_ACCESS_KEY_ID": _b64(s3.access_key),
                                    "AWS_SECRET_ACCESS_KEY": _b64(s3.secret_key)}},
        {"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "shop-db", "namespace": ns},
         "type": "Opaque", "data": {"password": _b64(DB_PASSWORD)}},
        {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "shop-db-ca", "namespace": ns},
         "data": {"ca.crt": server.ca_file.read_text()}},
        {"apiVersion": API, "kind": "ClaudeConnection", "metadata": {"name": "shop", "namespace": ns},
         "spec": {"type": "postgres",
                  "postgres": {"host": "localhost", "port": server.port, "database": f"shop_{ns.replace('-', '_')}",
                               "user": f"owner_{ns.replace('-', '_')}", "listenPort": listen_port,
                               "sslmode": "verify-full"},
                  "credentials": {"source": "secret", "secretRef": {"name": "shop-db"}},
                  "upstreamCA": {"kind": "ConfigMap", "name": "shop-db-ca", "key": "ca.crt"}}},
        {"apiVersion": API, "kind": "AccessPolicy", "metadata": {"name": "shop-db", "namespace": ns},
         "spec": {"connections": ["shop"], "defaultEffect": "block",
                  "approvers": {"groups": ["platform-approvers"]},
                  "rules": [
                      {"name": "reads", "match": {"postgres": {"kinds": ["read"]}}, "allow": {}},
                      {"name": "scoped-writes", "match": {"postgres": {"kinds": ["write"], "whereMissing": False}},
                       "allow": {}},
                      {"name": "no-mass-deletes",
                       "match": {"postgres": {"statements": ["DELETE", "UPDATE", "TRUNCATE"], "whereMissing": True}},
                       "block": {"message": "agents never touch every row"}},
                      {"name": "drops-need-a-human", "match": {"postgres": {"statements": ["DROP"]}},
                       "requireApproval": {"mode": "hold", "holdSeconds": 90, "timeoutSeconds": 300}},
                      {"name": "passwords", "match": {"postgres": {}}, "mask": {"fields": ["$.password"]}},
                  ]}},
    ]


class PgStory:
    def __init__(self, cp, installation, server, ns: str, workdir: Path):
        self.cp, self.installation, self.server, self.ns, self.workdir = cp, installation, server, ns, workdir
        self.database, self.owner = f"shop_{ns.replace('-', '_')}", f"owner_{ns.replace('-', '_')}"
        self.sidecar: st.Container | None = None
        self.agent: st.Container | None = None
        self.process: ManagedProcess | None = None
        self.exit: int | None = None
        self.listen_port = 0

    def truth(self, sql: str) -> str:
        return self.server.psql(sql, database=self.database).strip()

    def agent_env(self) -> dict[str, str]:
        assert self.agent is not None
        return st.clean_env({**self.agent.env, "HOME": str(self.workdir / "home")})

    def psql(self, sql: str) -> subprocess.CompletedProcess:
        """The agent's psql: host, port from the injected env; no user, no password of its own."""
        return st.run(["psql", "-X", "-d", self.database, "-c", sql], self.agent_env(), timeout=150)

    def stop(self) -> int:
        if self.exit is None and self.process is not None:
            proc = self.process.proc
            self.process.stop(timeout=60)
            self.exit = proc.returncode if proc is not None else -1
        return self.exit if self.exit is not None else -1


@pytest.fixture(scope="module")
def pg(installation, postgres_server, tmp_path_factory):
    cp, server = installation.cp, postgres_server
    workdir = tmp_path_factory.mktemp("pg-story")
    ns = installation.namespace("pg")
    s = PgStory(cp, installation, server, ns, workdir)
    server.create_user(s.owner, DB_PASSWORD, database=s.database)
    s.truth(f"CREATE TABLE users (id int PRIMARY KEY, name text, password text); "
            f"INSERT INTO users VALUES (1, 'ann', 'hunter2'), (2, 'bob', 'swordfish'); "
            f"CREATE TABLE scratch (a int); ALTER TABLE users OWNER TO {s.owner}; "
            f"ALTER TABLE scratch OWNER TO {s.owner}")
    listen_port = s.listen_port = free_port()
    cp.kubectl("apply", "-f", "-", input=yaml.safe_dump_all(_objects(ns, server, listen_port, installation.s3)))
    pod = {"apiVersion": "v1", "kind": "Pod",
           "metadata": {"name": "claude-db", "namespace": ns,
                        "labels": {"app": "claude", "chaperone.dev/inject": "true"}},
           "spec": {"serviceAccountName": "claude-agent",
                    "containers": [{"name": AGENT, "image": "claude-code:e2e", "command": ["sleep", "infinity"]}]}}
    cp.kubectl("create", "-f", "-", input=json.dumps(pod), user="developer")
    mutated = json.loads(cp.kubectl("get", "pod", "claude-db", "-n", ns, "-o", "json").stdout)

    st.wait_for_pod_plumbing(cp, ns, "claude-agent", detail=installation.log)
    s.sidecar, s.agent = st.materialize_pod(cp, mutated, workdir, SIDECAR, AGENT)
    argv = list(s.sidecar.argv)
    health = free_port()
    for flag, value in (("--port", free_port()), ("--health-port", health)):
        argv[argv.index(flag) + 1] = str(value)
    env = st.sidecar_env(cp, s.sidecar)
    s.process = ManagedProcess(SIDECAR, st.chaperone_argv(*argv[1:]), workdir / "sidecar.log", env=env,
                               cwd=s.sidecar.path("/tmp"))
    s.process.start()
    s.process.wait_ready(lambda: st.health_ready(health), 90, "ready (/ready 200)")
    try:
        yield s
    finally:
        s.stop()


def test_the_agent_is_pointed_at_its_sidecar_and_holds_no_password(pg):
    env = pg.agent_env()
    assert env["PGHOST"] == "127.0.0.1"
    assert env["PGPORT"] == str(pg.listen_port)  # the connection's spec.postgres.listenPort
    assert DB_PASSWORD not in json.dumps(env)
    assert "PGPASSWORD" not in env
    creds = json.loads(pg.sidecar.env["CHAPERONE_CONNECTIONS"])
    assert (Path(creds[0]["credentialsDir"]) / "password").read_text() == DB_PASSWORD  # the sidecar's only


def test_select_passes_with_the_password_column_masked(pg):
    out = pg.psql("SELECT id, name, password FROM users ORDER BY id")
    assert out.returncode == 0, st.describe(out)
    assert "ann  | [MASKED:field]" in out.stdout and "hunter2" not in out.stdout
    assert pg.truth("SELECT password FROM users WHERE id = 1") == "hunter2"


def test_delete_without_where_is_refused_with_the_rule_printed(pg):
    out = pg.psql("DELETE FROM users")
    assert out.returncode == 1
    assert (f"ERROR:  chaperone refused DELETE: agents never touch every row "
            f"(rule {pg.ns}/shop-db#no-mass-deletes)") in out.stderr, out.stderr
    assert pg.truth("SELECT count(*) FROM users") == "2"
    ok = pg.psql("DELETE FROM users WHERE id = 2")  # a scoped write is fine
    assert ok.returncode == 0 and "DELETE 1" in ok.stdout, st.describe(ok)


def test_drop_table_is_held_until_alice_approves(pg):
    held = subprocess.Popen(["psql", "-X", "-d", pg.database, "-c", "DROP TABLE scratch"],
                            env=pg.agent_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        def request():
            items = json.loads(pg.cp.kubectl("get", "approvalrequests", "-n", pg.ns, "-o", "json").stdout)["items"]
            return next((ar for ar in items if ar["spec"]["action"]["name"] == "postgres:DROP"), None)
        ar = st.wait_for(request, 60, "the DROP's ApprovalRequest",
                         detail=lambda: pg.process.log_tail(40) if pg.process else "")
        assert "DROP TABLE scratch" in ar["spec"]["action"]["summary"]
        assert ar["spec"]["rule"]["name"] == "drops-need-a-human"
        assert held.poll() is None  # psql is still waiting
        assert pg.truth("SELECT count(*) FROM pg_tables WHERE tablename = 'scratch'") == "1"
        name = ar["metadata"]["name"]
        res = pg.cp.kubectl("patch", "ar", name, "-n", pg.ns, "--type=merge", "-p", APPROVE, user="approver")
        assert res.returncode == 0, res.stderr
        out, err = held.communicate(timeout=60)
    finally:
        if held.poll() is None:
            held.kill()
    assert held.returncode == 0, err
    assert "DROP TABLE" in out
    assert pg.truth("SELECT count(*) FROM pg_tables WHERE tablename = 'scratch'") == "0"
    decided = json.loads(pg.cp.kubectl("get", "ar", name, "-n", pg.ns, "-o", "json").stdout)
    assert decided["spec"]["decidedBy"] == "alice"


def test_the_recording_holds_every_statement_its_decision_and_masked_results(pg):
    assert pg.stop() == 0, pg.process.log_tail(40) if pg.process else ""
    s3, values = pg.installation.s3, pg.installation.values
    env = st.clean_env({**s3.env(), "PYTHONPATH": str(st.REPO_ROOT / "sidecar")})
    where = ["--s3-bucket", values["recording.s3.bucket"], "--s3-endpoint", values["recording.s3.endpoint"],
             "--s3-prefix", values["recording.s3.prefix"]]
    listed = st.run(st.chaperone_argv("sessions", "list", "--namespace", pg.ns, "--pod", "claude-db",
                                      "--json", *where), env)
    assert listed.returncode == 0, st.describe(listed)
    (session,) = json.loads(listed.stdout)
    replay = st.run(st.chaperone_argv("sessions", "replay", f"{pg.ns}/claude-db/{session['session']}",
                                      "--json", "--body-limit", "100000", *where), env)
    assert replay.returncode == 0, st.describe(replay)
    rows = json.loads(replay.stdout)
    rows = rows["timeline"]
    text = json.dumps(rows)
    assert "hunter2" not in text and DB_PASSWORD not in text
    select = next(r for r in rows if "SELECT id, name, password FROM users" in json.dumps(r))
    assert select["decision"] == "allow" and "[MASKED:field]" in json.dumps(select)
    delete = next(r for r in rows if "DELETE FROM users" in json.dumps(r) and r.get("decision") == "block")
    assert delete["rule"].endswith("no-mass-deletes") and delete["status"] == "ERROR 42501"
    drop = next(r for r in rows if "DROP TABLE scratch" in json.dumps(r))
    assert drop["decision"] == "require_approval" and drop["approver"] == "alice"
    assert drop["status"] == "DROP TABLE"
