"""`kubectl chaperone` through the REAL kubectl against the test bed's apiserver, plus unit tests.

kubectl finds the plugin as an executable `kubectl-chaperone` on PATH (a shim running this
checkout's module). Three parts, in this order (the order matters, see below):

1. Unit tests with a fake API: the exact merge patch approve/deny send, what is printed.
2. `TestWithoutOperator`: real objects created as admin, listed and shown as the personas; with
   no admission webhook registered the CRD's CEL rule refuses a decision without `decidedBy`,
   so approve/deny must print that apiserver refusal verbatim and exit 1 — exactly what the
   manual `kubectl patch` gets. Its class-scoped namespace is gone before part 3 starts.
3. With the operator running (tests/operator/conftest.py, module scope: it stays up until the
   module ends, so these tests come last): approve end to end, stamped by admission.
"""

from __future__ import annotations

import datetime as dt
import io
import json
import os
import shlex
import subprocess
import sys
import time
import tomllib
import uuid
from pathlib import Path

import pytest
import yaml
from kubernetes.client.exceptions import ApiException

from chaperone_operator import kubectl_plugin as plugin
from chaperone_operator.kubectl_format import clean, human_duration

AR = "approvalrequests.chaperone.dev"
NOW = dt.datetime(2030, 1, 1, 12, 0, tzinfo=dt.timezone.utc)


def ts(delta_seconds: float = 0, base: dt.datetime | None = None) -> str:
    when = (base or dt.datetime.now(dt.timezone.utc)) + dt.timedelta(seconds=delta_seconds)
    return when.strftime("%Y-%m-%dT%H:%M:%SZ")


def request(ns: str, name: str, *, base: dt.datetime | None = None, requested: float = -60,
            expires: float = 600, **spec) -> dict:
    body = {
        "requester": {"serviceAccount": f"system:serviceaccount:{ns}:agent",
                      "pod": {"namespace": ns, "name": "claude-1"}, "creator": "dave"},
        "connection": "aws",
        "action": {"name": "iam:CreateRole", "summary": "iam:CreateRole role/deployer",
                   "method": "POST", "host": "iam.amazonaws.com", "path": "/",
                   "resources": ["deployer"]},
        "requestDigest": "sha256:" + "ab" * 32,
        "rule": {"policy": f"{ns}/aws", "name": "iam-writes"},
        "approvers": {"groups": ["platform-approvers"]},
        "requestedAt": ts(requested, base), "expiresAt": ts(expires, base),
    }
    body.update(spec)
    return {"apiVersion": "chaperone.dev/v1alpha1", "kind": "ApprovalRequest",
            "metadata": {"name": name, "namespace": ns}, "spec": body}


# ---------------------------------------------------------------------------- 1. unit tests

class FakeAPI:
    """Records patches; answers with what admission would have stored."""

    def __init__(self, items=(), answer=None, error: ApiException | None = None):
        self.items, self.answer, self.error = list(items), answer, error
        self.patches: list[tuple[str, str, dict]] = []
        self.lists: list[str | None] = []

    def list(self, namespace):
        self.lists.append(namespace)
        return [o for o in self.items if namespace is None or o["metadata"]["namespace"] == namespace]

    def get(self, namespace, name):
        if self.error:
            raise self.error
        return next(o for o in self.items if o["metadata"]["name"] == name)

    def patch(self, namespace, name, body):
        self.patches.append((namespace, name, body))
        if self.error:
            raise self.error
        return self.answer


def run_fake(api: FakeAPI, *argv: str, namespace: str = "agents") -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    code = plugin.run(list(argv), connector=lambda args: plugin.Connection(
        api, args.namespace or namespace), now=lambda: NOW, out=out, err=err)
    return code, out.getvalue(), err.getvalue()


def test_console_script_is_declared():
    data = tomllib.loads((Path(__file__).parents[2] / "pyproject.toml").read_text())
    assert data["project"]["scripts"]["kubectl-chaperone"] == "chaperone_operator.kubectl_plugin:main"


def test_approve_and_deny_send_exactly_the_manual_merge_patch():
    stored = request("agents", "r1", base=NOW)
    stored["spec"].update(decision="Approved", decidedBy="alice", decidedAt=ts(base=NOW))
    api = FakeAPI(answer=stored)
    assert run_fake(api, "approve", "r1") == (
        0, "approvalrequest.chaperone.dev/r1 Approved by alice\n", "")
    assert run_fake(api, "approve", "r1", "-n", "team", "--reason", "ticket 42")[0] == 0
    stored["spec"].update(decision="Denied", decidedBy="bob")
    assert run_fake(api, "deny", "r1", "--reason", "")[1] == "approvalrequest.chaperone.dev/r1 Denied by bob\n"
    assert api.patches == [
        ("agents", "r1", {"spec": {"decision": "Approved"}}),
        ("team", "r1", {"spec": {"decision": "Approved", "reason": "ticket 42"}}),
        ("agents", "r1", {"spec": {"decision": "Denied", "reason": ""}}),
    ]


def test_n_of_m_progress_is_reported():
    stored = request("agents", "r2", base=NOW, minApprovals=2,
                     reviews=[{"user": "alice", "decision": "Approved", "time": ts(base=NOW)}])
    code, out, _ = run_fake(FakeAPI(answer=stored), "approve", "r2")
    assert code == 0
    assert out == ("approvalrequest.chaperone.dev/r2: 1/2 approvals recorded (alice); "
                   "waiting for 1 more approver(s)\n")
    code, out, _ = run_fake(FakeAPI(answer=request("agents", "r3", base=NOW)), "approve", "r3")
    assert "no decision or review was recorded" in out


def test_refusals_are_printed_verbatim_with_exit_code_1():
    status = {"kind": "Status", "status": "Failure", "reason": "Forbidden", "code": 403,
              "message": 'admission webhook "approvalrequest-validate.chaperone.dev" denied the '
                         "request: dave may not decide this request: self-approval"}
    error = ApiException(status=403, reason="Forbidden")
    error.body = json.dumps(status)
    code, out, err = run_fake(FakeAPI(error=error), "approve", "r1")
    assert (code, out) == (1, "")
    assert err == f"Error from server (Forbidden): {status['message']}\n"
    bare = ApiException(status=502, reason="Bad Gateway")
    bare.body = "upstream down"
    assert run_fake(FakeAPI(error=bare), "show", "x")[2] == "Error from server (502 Bad Gateway): upstream down\n"


def test_list_shows_pending_first_and_hides_decided_unless_all():
    soon = request("agents", "soon", base=NOW, expires=90)
    later = request("agents", "later", base=NOW, expires=3000, minApprovals=2,
                    reviews=[{"user": "alice", "decision": "Approved", "time": ts(base=NOW)}])
    done = request("agents", "done", base=NOW, decision="Denied", decidedBy="bob")
    gone = request("agents", "gone", base=NOW, requested=-900, expires=-300)
    api = FakeAPI([later, done, gone, soon])
    code, out, _ = run_fake(api, "list")
    lines = out.splitlines()
    assert code == 0 and lines[0].split() == ["NAME", "REQUESTER", "ACTION", "PHASE", "APPROVALS",
                                               "EXPIRES-IN"]
    assert [line.split()[0] for line in lines[1:]] == ["soon", "later"]
    assert lines[1].split()[1:] == ["dave", "iam:CreateRole", "role/deployer", "Pending", "0/1", "1m30s"]
    assert lines[2].split()[-2:] == ["1/2", "50m"]
    code, out, _ = run_fake(api, "list", "--all")
    assert [line.split()[0] for line in out.splitlines()[1:]] == ["soon", "later", "done", "gone"]
    assert [line.split()[-3] for line in out.splitlines()[3:]] == ["Denied", "Expired"]
    code, out, _ = run_fake(api, "list", "-A", "-o", "json")
    assert api.lists[-1] is None
    assert [o["metadata"]["name"] for o in json.loads(out)["items"]] == ["soon", "later"]
    code, out, err = run_fake(FakeAPI([done]), "list")
    assert (code, out, err) == (0, "", "No pending approval requests in namespace agents.\n")


def test_agent_controlled_text_cannot_drive_the_terminal():
    evil = request("agents", "evil", base=NOW, action={
        "name": "iam:CreateRole", "summary": "harmless\x1b[2K\rs3:ListBuckets \u202eelor",
        "bodyPreview": '{"RoleName": "x"}\n\x1b]8;;http://evil\x07'})
    _, out, _ = run_fake(FakeAPI([evil]), "show", "evil")
    assert "\x1b" not in out and "\u202e" not in out and "\x07" not in out
    assert "harmless\\x1b[2K\\x0ds3:ListBuckets \\u202eelor" in out
    assert '    {"RoleName": "x"}\n    \\x1b]8;;http://evil\\x07\n' in out
    _, out, _ = run_fake(FakeAPI([evil]), "list")
    assert "\x1b" not in out
    assert clean("a\tb\nc") == "a b\\x0ac"


def test_human_duration():
    assert [human_duration(s) for s in (0, 59, 60, 252, 3600, 7500, 86400, 97200)] == [
        "0s", "59s", "1m", "4m12s", "1h", "2h5m", "1d", "1d3h"]


def test_unreachable_apiserver_and_bad_kubeconfig_are_errors(tmp_path, capsys):
    config = tmp_path / "config"
    config.write_text(yaml.safe_dump({
        "apiVersion": "v1", "kind": "Config", "current-context": "dead",
        "clusters": [{"name": "dead", "cluster": {"server": "https://127.0.0.1:1"}}],
        "users": [{"name": "dead", "user": {"token": "t"}}],
        "contexts": [{"name": "dead", "context": {"cluster": "dead", "user": "dead",
                                                  "namespace": "team"}}]}))
    assert plugin.run(["list", "--kubeconfig", str(config)]) == 1
    assert capsys.readouterr().err.startswith("error: cannot reach the API server: ")
    assert plugin.run(["list", "--kubeconfig", str(tmp_path / "missing")]) == 1
    assert capsys.readouterr().err.startswith(f"error: cannot load kubeconfig {tmp_path / 'missing'}")
    conn = plugin.connect(plugin.build_parser().parse_args(
        ["list", "--kubeconfig", str(config), "--as", "alice", "--as-group", "platform-approvers"]))
    assert conn.namespace == "team"
    assert conn.api._api.api_client.default_headers["Impersonate-User"] == "alice"
    assert conn.api._api.api_client.default_headers["Impersonate-Group"] == "platform-approvers"


def test_usage_errors_exit_2():
    assert run_fake(FakeAPI(), "approve")[0] == 2
    assert run_fake(FakeAPI(), "list", "--as-group", "g")[0] == 2


# ---------------------------------------------------------------------------- kubectl harness

@pytest.fixture(scope="module")
def plugin_dir(tmp_path_factory, repo_root) -> Path:
    """A directory holding an executable `kubectl-chaperone` that runs this checkout."""
    bindir = tmp_path_factory.mktemp("plugin-bin")
    pythonpath = os.pathsep.join(str(repo_root / p) for p in ("operator", "sidecar"))
    shim = bindir / "kubectl-chaperone"
    shim.write_text("#!/bin/sh\n"
                    f"PYTHONPATH={shlex.quote(pythonpath)}${{PYTHONPATH:+:$PYTHONPATH}} "
                    f"exec {shlex.quote(sys.executable)} -m chaperone_operator.kubectl_plugin \"$@\"\n")
    shim.chmod(0o755)
    return bindir


@pytest.fixture(scope="module")
def kubectl_chaperone(control_plane, plugin_dir):
    """Run `kubectl chaperone ARGS` as a persona (flags after the plugin name, as kubectl needs)."""
    def run(*args: str, user="admin", env: dict | None = None, flags: bool = True):
        ref = user if not isinstance(user, str) else control_plane.user_kubeconfig(user)
        base = {**os.environ, "PATH": f"{plugin_dir}{os.pathsep}{os.environ.get('PATH', '')}"}
        base.pop("KUBECONFIG", None)
        argv = [control_plane.kubectl_binary, "chaperone", *args]
        if flags:
            argv += ["--kubeconfig", str(ref.path), "--context", ref.context]
        return subprocess.run(argv, capture_output=True, text=True, timeout=60,
                              env={**base, **(env or {})})
    return run


def chaperone_webhooks(cp) -> list[str]:
    res = cp.kubectl("get", "validatingwebhookconfigurations,mutatingwebhookconfigurations",
                     "-o", "name")
    return [n for n in res.stdout.split() if n.split("/")[-1].startswith("chaperone")]


# ---------------------------------------------------------------------------- 2. no operator

@pytest.fixture(scope="class")
def bare(control_plane, crds_installed):
    """A namespace (gone when the class ends) with requests created as admin; approvers may
    patch there through a RoleBinding of their own (the chart's roles are not installed)."""
    cp = control_plane
    assert not chaperone_webhooks(cp), (
        "these tests need no Chaperone webhook registered (they run before the module's "
        "running_operator fixture starts)")
    ns, role = f"plugin-{uuid.uuid4().hex[:6]}", f"plugin-test-approver-{uuid.uuid4().hex[:6]}"
    cp.create_namespace(ns)
    cp.kubectl("create", "clusterrole", role, "--verb=get,list,watch,patch", f"--resource={AR}")
    cp.kubectl("create", "rolebinding", "approvers", f"--clusterrole={role}",
               "--group=platform-approvers", "-n", ns)
    objs = [
        request(ns, "create-role", expires=900,
                action={"name": "iam:CreateRole", "summary": "iam:CreateRole role/deployer",
                        "method": "POST", "host": "iam.amazonaws.com", "path": "/",
                        "resources": ["deployer"],
                        "bodyPreview": 'Action=CreateRole&RoleName=deployer\n\x1b[31mred'},
                sessionID="s-plugin-1", grant={"scope": "exact", "ttlSeconds": 900}),
        request(ns, "urgent", expires=120, minApprovals=2),
        request(ns, "decided", decision="Approved", decidedBy="alice", decidedAt=ts(),
                reviews=[{"user": "alice", "decision": "Approved", "time": ts()}]),
        request(ns, "lapsed", requested=-1200, expires=-600),
    ]
    cp.kubectl("create", "-f", "-", input=yaml.safe_dump_all(objs))
    deadline = dt.datetime.now() + dt.timedelta(seconds=30)
    while cp.kubectl("auth", "can-i", "patch", AR, "-n", ns, user="approver",
                     check=False).stdout.strip() != "yes":
        assert dt.datetime.now() < deadline, "the approvers RoleBinding never took effect"
        time.sleep(0.2)
    yield ns
    cp.kubectl("delete", "namespace", ns, "--timeout=60s", check=False)
    cp.kubectl("delete", "clusterrole", role, check=False)


@pytest.mark.controlplane
class TestWithoutOperator:
    """Real objects created as admin; no admission webhook, so the CRD's CEL rules decide."""

    def test_list_as_approver_pending_first(self, bare, kubectl_chaperone):
        res = kubectl_chaperone("list", "-n", bare, user="approver")
        assert res.returncode == 0, res.stderr
        lines = res.stdout.splitlines()
        assert lines[0].split() == ["NAME", "REQUESTER", "ACTION", "PHASE", "APPROVALS", "EXPIRES-IN"]
        assert [line.split()[0] for line in lines[1:]] == ["urgent", "create-role"]
        assert lines[1].split()[1:6] == ["dave", "iam:CreateRole", "role/deployer", "Pending", "0/2"]
        every = kubectl_chaperone("list", "--all", "-n", bare, user="approver")
        rows = {line.split()[0]: line.split() for line in every.stdout.splitlines()[1:]}
        assert list(rows) == ["urgent", "create-role", "decided", "lapsed"]
        assert rows["decided"][-3:] == ["Approved", "1/1", "-"]
        assert rows["lapsed"][-3:] == ["Expired", "0/1", "-"]
        as_json = json.loads(kubectl_chaperone("list", "-o", "json", "-n", bare, user="approver").stdout)
        assert [o["metadata"]["name"] for o in as_json["items"]] == ["urgent", "create-role"]

    def test_kubeconfig_from_env_and_namespace_from_context(self, bare, control_plane,
                                                            kubectl_chaperone, tmp_path):
        config = yaml.safe_load(control_plane.kubeconfig_path.read_text())
        for ctx in config["contexts"]:
            if ctx["name"] == "approver":
                ctx["context"]["namespace"] = bare
        config["current-context"] = "approver"
        path = tmp_path / "alice.kubeconfig"
        path.write_text(yaml.safe_dump(config))
        res = kubectl_chaperone("list", env={"KUBECONFIG": str(path)}, flags=False)
        assert res.returncode == 0, res.stderr
        assert [line.split()[0] for line in res.stdout.splitlines()[1:]] == ["urgent", "create-role"]
        missing = kubectl_chaperone("list", "--context", "nobody", env={"KUBECONFIG": str(path)},
                                    flags=False)
        assert missing.returncode == 1 and "context 'nobody' not found" in missing.stderr

    def test_all_namespaces_as_admin(self, bare, kubectl_chaperone):
        res = kubectl_chaperone("list", "-A", user="admin")
        assert res.returncode == 0, res.stderr
        assert res.stdout.splitlines()[0].split()[:2] == ["NAMESPACE", "NAME"]
        assert [bare, "urgent"] in [line.split()[:2] for line in res.stdout.splitlines()]

    def test_show_has_everything_an_approver_needs(self, bare, kubectl_chaperone):
        res = kubectl_chaperone("show", "create-role", "-n", bare, user="approver")
        assert res.returncode == 0, res.stderr
        out = res.stdout
        for expected in (
            "Name:               create-role", f"Namespace:          {bare}",
            "Phase:              Pending (0/1 approvals)",
            f"  Service account:  system:serviceaccount:{bare}:agent",
            f"  Pod:              {bare}/claude-1", "  Pod created by:   dave",
            "Connection:         aws", "Session:            s-plugin-1",
            "  Summary:          iam:CreateRole role/deployer", "  Method:           POST",
            "  Host:             iam.amazonaws.com", "  Path:             /",
            "  Resources:        deployer", "  Request digest:   sha256:" + "ab" * 32,
            "    Action=CreateRole&RoleName=deployer\n    \\x1b[31mred\n",
            f"Rule:               iam-writes (policy {bare}/aws)",
            "Approvers:          groups platform-approvers",
            "Grant:              scope exact for 15m",
            f"  kubectl chaperone approve create-role -n {bare} [--reason TEXT]",
            f"  kubectl chaperone deny create-role -n {bare} [--reason TEXT]",
        ):
            assert expected in out, f"{expected!r} missing from:\n{out}"
        assert "Expires:" in out and "(in 1" in out and "\x1b" not in out
        decided = kubectl_chaperone("show", "decided", "-n", bare, user="approver").stdout
        assert "Decision:           Approved by alice at" in decided and "To decide" not in decided
        as_yaml = yaml.safe_load(kubectl_chaperone("show", "urgent", "-o", "yaml", "-n", bare,
                                                   user="approver").stdout)
        assert as_yaml["spec"]["minApprovals"] == 2

    def test_not_found_and_forbidden_are_errors(self, bare, kubectl_chaperone):
        res = kubectl_chaperone("show", "nope", "-n", bare, user="approver")
        assert (res.returncode, res.stdout) == (1, "")
        assert res.stderr == f'Error from server (NotFound): {AR} "nope" not found\n'
        res = kubectl_chaperone("list", "-n", bare, user="developer")
        assert res.returncode == 1
        assert res.stderr.startswith(f'Error from server (Forbidden): {AR} is forbidden: User "dave" '
                                     f'cannot list resource "approvalrequests" in API group '
                                     f'"chaperone.dev" in the namespace "{bare}"')

    def test_approve_and_deny_print_the_apiservers_refusal(self, bare, control_plane,
                                                           kubectl_chaperone):
        refusal = (f'ApprovalRequest.chaperone.dev "create-role" is invalid: spec.decidedBy: '
                   f'Invalid value: "object": a decision must carry decidedBy (stamped by admission)')
        for verb, extra in (("approve", ["--reason", "looks fine"]), ("deny", [])):
            res = kubectl_chaperone(verb, "create-role", "-n", bare, *extra, user="approver")
            assert (res.returncode, res.stdout) == (1, ""), res.stderr
            assert res.stderr == f"Error from server (Invalid): {refusal}\n"
        # The manual path gets the same refusal from the apiserver.
        manual = control_plane.kubectl("patch", "ar", "create-role", "-n", bare, "--type=merge",
                                       "-p", '{"spec":{"decision":"Approved"}}', user="approver",
                                       check=False)
        assert manual.returncode == 1
        assert "a decision must carry decidedBy (stamped by admission)" in manual.stderr
        stored = json.loads(control_plane.kubectl("get", AR, "create-role", "-n", bare, "-o",
                                                  "json").stdout)
        assert "decision" not in stored["spec"] and "reason" not in stored["spec"]
        res = kubectl_chaperone("approve", "create-role", "-n", bare, user="developer")
        assert res.returncode == 1 and res.stderr.startswith("Error from server (Forbidden): ")

    def test_impersonation_is_sent(self, bare, kubectl_chaperone):
        as_dave = kubectl_chaperone("list", "-n", bare, "--as", "dave", user="admin")
        assert as_dave.returncode == 1 and 'User "dave" cannot list' in as_dave.stderr
        as_alice = kubectl_chaperone("list", "-n", bare, "--as", "alice", "--as-group",
                                     "platform-approvers", user="admin")
        assert as_alice.returncode == 0, as_alice.stderr
        assert [line.split()[0] for line in as_alice.stdout.splitlines()[1:]] == ["urgent", "create-role"]


# ---------------------------------------------------------------------------- 3. with the operator

@pytest.fixture(scope="module")
def agent(running_operator):
    """An injected agent pod created by dave, and its sidecar's pod-bound identity."""
    op, cp = running_operator, running_operator.cp
    ns = op.namespace("plugin")
    cp.kubectl("create", "serviceaccount", "agent", "-n", ns)
    cp.kubectl("create", "role", "pod-creator", "--verb=create,get", "--resource=pods", "-n", ns)
    cp.kubectl("create", "rolebinding", "dave-pods", "--role=pod-creator", "--user=dave", "-n", ns)
    cp.kubectl("create", "rolebinding", "dave-approves", "--clusterrole=chaperone-approver",
               "--user=dave", "-n", ns)
    op.wait_for(lambda: cp.kubectl("auth", "can-i", "patch", AR, "-n", ns, user="developer",
                                   check=False).stdout.strip() == "yes", what="dave's RoleBindings")
    op.create({"apiVersion": "v1", "kind": "Pod",
               "metadata": {"name": "claude-1", "namespace": ns,
                            "labels": {"chaperone.dev/inject": "true"}},
               "spec": {"serviceAccountName": "agent",
                        "containers": [{"name": "claude", "image": "claude-code:test"}]}},
              user="developer")
    pod = op.get("pod", "claude-1", "-n", ns)
    op.wait_for(lambda: cp.kubectl("auth", "can-i", "create", AR, "-n", ns, "--as",
                                   f"system:serviceaccount:{ns}:agent", check=False
                                   ).stdout.strip() == "yes",
                what="the operator to bind chaperone-sidecar to the agent's service account")
    sidecar = op.pod_token_kubeconfig(ns, "agent", "claude-1", pod["metadata"]["uid"])
    return {"ns": ns, "sidecar": sidecar}


def open_request(op, agent, name: str, **spec) -> None:
    obj = request(agent["ns"], name, **spec)
    del obj["spec"]["requester"]["creator"]  # admission stamps it from the pod
    op.create(obj, user=agent["sidecar"])


@pytest.mark.controlplane
def test_approve_end_to_end_is_stamped_by_admission(running_operator, agent, kubectl_chaperone):
    op, ns = running_operator, agent["ns"]
    open_request(op, agent, "one")
    res = kubectl_chaperone("approve", "one", "-n", ns, "--reason", "ticket 7", user="approver")
    assert res.returncode == 0, res.stderr
    assert res.stdout == "approvalrequest.chaperone.dev/one Approved by alice\n"
    spec = op.get(AR, "one", "-n", ns)["spec"]
    assert (spec["decision"], spec["decidedBy"], spec["reason"]) == ("Approved", "alice", "ticket 7")
    assert [(r["user"], r.get("reason")) for r in spec["reviews"]] == [("alice", "ticket 7")]
    again = kubectl_chaperone("deny", "one", "-n", ns, user="approver2")
    assert again.returncode == 1
    assert again.stderr.startswith("Error from server (Forbidden): admission webhook ")
    assert "denied the request: this request is final: Approved by alice" in again.stderr
    shown = kubectl_chaperone("show", "one", "-n", ns, user="approver2").stdout
    assert "Reviews:\n  alice: Approved at " in shown and "(ticket 7)" in shown


@pytest.mark.controlplane
def test_two_of_two_and_self_approval_through_the_plugin(running_operator, agent, kubectl_chaperone):
    op, ns = running_operator, agent["ns"]
    open_request(op, agent, "two", minApprovals=2)
    first = kubectl_chaperone("approve", "two", "-n", ns, user="approver")
    assert first.stdout == ("approvalrequest.chaperone.dev/two: 1/2 approvals recorded (alice); "
                            "waiting for 1 more approver(s)\n"), first.stderr
    listed = kubectl_chaperone("list", "-n", ns, user="approver2").stdout
    assert [line.split()[0] for line in listed.splitlines()[1:]] == ["two"]
    assert listed.splitlines()[1].split()[-3:-1] == ["Pending", "1/2"]
    own = kubectl_chaperone("approve", "two", "-n", ns, user="developer")
    assert own.returncode == 1 and own.stdout == ""
    assert "dave may not decide this request: self-approval (dave created the requesting pod)" in own.stderr
    second = kubectl_chaperone("approve", "two", "-n", ns, user="approver2")
    assert second.stdout == "approvalrequest.chaperone.dev/two Approved by bob\n", second.stderr
    assert kubectl_chaperone("list", "-n", ns, user="approver").stderr == (
        f"No pending approval requests in namespace {ns}.\n")
