"""The git story: an agent pod pushes and fetches with the real ``git`` through its injected sidecar.

The installation is the e2e one (chart, operator and its webhooks; conftest.py). The platform
team puts a git server behind a ClaudeConnection (``type: http``; Debian's ``git http-backend``
over HTTPS, its CA in a ConfigMap as ``upstreamCA``) and an AccessPolicy that keeps main for
review, forbids branch deletion and rewriting ``release``, and holds pushes to ``prod`` for an
approver. dave creates the agent pod, the webhook injects the sidecar, and the sidecar runs with
exactly what was injected. The agent is the real ``git`` with nothing but the agent container's
injected environment (HTTPS_PROXY, GIT_SSL_CAINFO = the interception CA): it clones, pushes a
feature branch, is refused on main (git prints the rule), on deleting a branch and on a force
push; its push to prod waits while alice reads the refs and ids in the ApprovalRequest and
approves it with ``kubectl patch``; a 3 MiB push (streamed) is judged by its refs before any of it
leaves. Each refusal is also checked on the server: its refs did not move. The git server listens on 127.0.0.2 so the agent's NO_PROXY (localhost, 127.0.0.1) does not
let git around the sidecar.

Runs after the main story (conftest.py's STORY_ORDER; its sidecar has stopped by then, and this
one uses the same chart ports).
"""

from __future__ import annotations

import json
import os
import threading
from pathlib import Path

import pytest
import yaml

import story as st
from chaperone_testbed.git_http import GitHTTPServer, bare_repo, git_env, run_git
from chaperone_testbed.services import ManagedProcess

API = "chaperone.dev/v1alpha1"
POD, AGENT_SA, AGENT, SIDECAR = "claude-git", "claude-agent", "claude", "chaperone-sidecar"
HOST = "127.0.0.2"
HOLD = {"mode": "hold", "holdSeconds": 90, "timeoutSeconds": 300}
REPO_ROOT = Path(__file__).resolve().parents[1]


def _platform(ns: str, ca_pem: str) -> list[dict]:
    rbac = "rbac.authorization.k8s.io/v1"
    return [
        {"apiVersion": "v1", "kind": "ServiceAccount", "metadata": {"name": AGENT_SA, "namespace": ns}},
        {"apiVersion": rbac, "kind": "Role", "metadata": {"name": "developer", "namespace": ns},
         "rules": [{"apiGroups": [""], "resources": ["pods"], "verbs": ["create", "get", "list", "delete"]}]},
        {"apiVersion": rbac, "kind": "RoleBinding", "metadata": {"name": "developer-dave", "namespace": ns},
         "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": "developer"},
         "subjects": [{"apiGroup": "rbac.authorization.k8s.io", "kind": "User", "name": "dave"}]},
        {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "git-server-ca", "namespace": ns},
         "data": {"ca.crt": ca_pem}},
        {"apiVersion": API, "kind": "ClaudeConnection", "metadata": {"name": "git-server", "namespace": ns},
         "spec": {"type": "http", "hosts": [HOST], "credentials": {"source": "none"},
                  "upstreamCA": {"kind": "ConfigMap", "name": "git-server-ca", "key": "ca.crt"}}},
        {"apiVersion": API, "kind": "AccessPolicy", "metadata": {"name": "git-guardrails", "namespace": ns},
         "spec": {"connections": ["git-server"], "defaultEffect": "block",
                  "approvers": {"groups": ["platform-approvers"]},
                  "rules": [
                      {"name": "org-repositories", "match": {"git": {"repositories": ["org/*"]}}, "allow": {}},
                      {"name": "main-via-review", "match": {"git": {"refs": ["refs/heads/main"]}},
                       "block": {"message": "main changes only through a reviewed merge request"}},
                      {"name": "no-branch-deletion", "match": {"git": {"operations": ["delete"]}},
                       "block": {"message": "agents never delete branches"}},
                      {"name": "release-is-never-rewritten",
                       "match": {"git": {"refs": ["refs/heads/release"], "forcePush": True}},
                       "block": {"message": "release only moves forward"}},
                      {"name": "prod-needs-a-human", "match": {"git": {"refs": ["refs/heads/prod"]}},
                       "requireApproval": HOLD}]}},
    ]


class GitStory:
    def __init__(self, cp, ns: str, workdir: Path, server: GitHTTPServer, agent_env: dict[str, str]):
        self.cp, self.ns, self.workdir, self.server, self.env = cp, ns, workdir, server, agent_env
        self.url = server.url("org/app.git", host=HOST)
        self.sidecar: ManagedProcess | None = None

    def git(self, *args: str, cwd: Path | None = None):
        return run_git(list(args), self.env, cwd=cwd)

    def ok(self, *args: str, cwd: Path | None = None) -> str:
        out = self.git(*args, cwd=cwd)
        assert out.returncode == 0, f"git {' '.join(args)}: {out.stderr}\n{self.log()}"
        return out.stdout

    def server_ref(self, ref: str) -> str:
        out = run_git(["--git-dir", str(self.server.root / "org/app.git"), "rev-parse", "-q", "--verify", ref],
                      git_env(self.workdir / "home-admin"))
        return out.stdout.strip()

    def clone(self, name: str, branch: str = "") -> Path:
        work = self.workdir / name
        self.ok("clone", "-q", *(["-b", branch] if branch else []), self.url, str(work))
        return work

    def commit(self, work: Path, name: str) -> str:
        (work / name).write_text(f"{name}\n")
        self.ok("add", name, cwd=work)
        self.ok("commit", "-q", "-m", name, cwd=work)
        return self.ok("rev-parse", "HEAD", cwd=work).strip()

    def approval_requests(self) -> list[dict]:
        return json.loads(self.cp.kubectl("get", "approvalrequests", "-n", self.ns, "-o", "json").stdout)["items"]

    def log(self) -> str:
        return self.sidecar.log_tail(40) if self.sidecar else ""


@pytest.fixture(scope="module")
def gitstory(installation, tmp_path_factory):
    cp = installation.cp
    workdir = tmp_path_factory.mktemp("git-story")
    server = GitHTTPServer(workdir / "srv", workdir / "certs", host=HOST, names=())
    admin = git_env(workdir / "home-admin", ca_file=server.ca_file)
    bare_repo(server.root, "org/app.git", admin)
    seed = workdir / "seed"
    assert run_git(["clone", "-q", server.url("org/app.git", host=HOST), str(seed)], admin).returncode == 0
    (seed / "README").write_text("app\n")
    run_git(["add", "README"], admin, cwd=seed)
    run_git(["commit", "-q", "-m", "init"], admin, cwd=seed)
    out = run_git(["push", "-q", "origin", "HEAD:main", "HEAD:release", "HEAD:prod", "HEAD:old-experiment"],
                  admin, cwd=seed)
    assert out.returncode == 0, out.stderr

    ns = installation.namespace("git")
    cp.kubectl("apply", "-f", "-", input=yaml.safe_dump_all(_platform(ns, server.ca_file.read_text())))
    pod = {"apiVersion": "v1", "kind": "Pod",
           "metadata": {"name": POD, "namespace": ns, "labels": {"app": "claude", "chaperone.dev/inject": "true"}},
           "spec": {"serviceAccountName": AGENT_SA,
                    "containers": [{"name": AGENT, "image": "claude-code:e2e", "command": ["sleep", "infinity"]}]}}
    cp.kubectl("create", "-f", "-", input=json.dumps(pod), user="developer")
    pod = json.loads(cp.kubectl("get", "pod", POD, "-n", ns, "-o", "json").stdout)
    assert json.loads(pod["metadata"]["annotations"]["chaperone.dev/status"])["connections"] == ["git-server"]

    st.wait_for_pod_plumbing(cp, ns, AGENT_SA, detail=installation.log)
    assert not st.health_ready(installation.health_port), "another sidecar still holds the chart's ports"

    sidecar, agent = st.materialize_pod(cp, pod, workdir, SIDECAR, AGENT)
    env = st.sidecar_env(cp, sidecar)
    process = ManagedProcess(SIDECAR, st.chaperone_argv(*sidecar.argv[1:]), workdir / "sidecar.log", env=env,
                             cwd=sidecar.path("/tmp"))
    # The agent: git with the agent container's env only (proxy, GIT_SSL_CAINFO, NO_PROXY).
    agent_env = st.clean_env({**agent.env, **{k: v for k, v in git_env(workdir / "agent-home").items()
                                              if k.startswith(("GIT_", "HOME"))}})
    agent_env["GIT_SSL_CAINFO"] = agent.env["GIT_SSL_CAINFO"]
    story = GitStory(cp, ns, workdir, server, agent_env)
    story.sidecar = process
    process.start()
    try:
        process.wait_ready(lambda: st.health_ready(installation.health_port), 90, "ready (/ready 200)")
        yield story
    finally:
        process.stop(timeout=60)
        server.close()


def test_1_the_agent_clones_and_pushes_a_feature_branch(gitstory):
    assert gitstory.env["HTTPS_PROXY"].startswith("http://127.0.0.1:")
    work = gitstory.clone("feature")
    assert (work / "README").exists()
    new = gitstory.commit(work, "feature.txt")
    gitstory.ok("push", "-q", "origin", "HEAD:refs/heads/feature/login", cwd=work)
    assert gitstory.server_ref("refs/heads/feature/login") == new


def test_2_a_push_to_main_is_refused_and_git_says_by_which_rule(gitstory):
    work = gitstory.clone("main")
    before = gitstory.server_ref("refs/heads/main")
    gitstory.commit(work, "direct.txt")
    out = gitstory.git("push", "origin", "HEAD:main", cwd=work)
    assert out.returncode == 1
    assert "! [remote rejected] HEAD -> main (chaperone_blocked: main changes only through a reviewed merge " \
           f"request (rule main-via-review of AccessPolicy {gitstory.ns}/git-guardrails))" in out.stderr, out.stderr
    assert "remote: How to get access:" in out.stderr
    assert gitstory.server_ref("refs/heads/main") == before


def test_3_deleting_a_branch_and_rewriting_release_are_refused(gitstory):
    work = gitstory.clone("release", branch="release")
    out = gitstory.git("push", "origin", "--delete", "old-experiment", cwd=work)
    assert out.returncode == 1 and "(chaperone_blocked: agents never delete branches" in out.stderr, out.stderr
    assert gitstory.server_ref("refs/heads/old-experiment")
    forward = gitstory.commit(work, "release-notes.txt")
    gitstory.ok("push", "-q", "origin", "HEAD:release", cwd=work)  # a fast-forward: fine
    assert gitstory.server_ref("refs/heads/release") == forward
    gitstory.ok("reset", "-q", "--hard", "HEAD~1", cwd=work)
    gitstory.commit(work, "other-notes.txt")
    out = gitstory.git("push", "--force", "origin", "HEAD:release", cwd=work)
    assert out.returncode == 1 and "(chaperone_blocked: release only moves forward" in out.stderr, out.stderr
    assert gitstory.server_ref("refs/heads/release") == forward


def test_4_a_push_to_prod_waits_for_alice_who_sees_the_refs(gitstory):
    work = gitstory.clone("prod", branch="prod")
    old = gitstory.server_ref("refs/heads/prod")
    new = gitstory.commit(work, "hotfix.txt")
    result = {}
    pusher = threading.Thread(target=lambda: result.update(out=gitstory.git("push", "origin", "HEAD:prod", cwd=work)),
                              daemon=True)
    pusher.start()

    def pending():
        return [ar for ar in gitstory.approval_requests() if ar["spec"]["action"]["name"] == "git:push"]
    (ar,) = st.wait_for(pending, 60, "the push's ApprovalRequest", detail=gitstory.log)
    action = ar["spec"]["action"]
    assert action["summary"] == f"git push org/app: refs/heads/prod {old[:12]}..{new[:12]} (update)"
    assert f"refs/heads/prod {old}..{new} update" in action["resources"]
    assert gitstory.server_ref("refs/heads/prod") == old  # held, not forwarded
    gitstory.cp.kubectl("-n", gitstory.ns, "patch", "approvalrequest", ar["metadata"]["name"], "--type=merge",
                        "-p", json.dumps({"spec": {"decision": "Approved"}}), user="approver")
    pusher.join(90)
    assert result["out"].returncode == 0, result["out"].stderr + gitstory.log()
    assert gitstory.server_ref("refs/heads/prod") == new
    decided = next(a for a in gitstory.approval_requests() if a["metadata"]["name"] == ar["metadata"]["name"])
    assert decided["spec"]["decidedBy"] == "alice"


def test_5_a_large_push_is_judged_by_its_refs_before_any_of_it_leaves(gitstory):
    # 3 MiB: git chunks it (HTTP/2 to the sidecar), the sidecar streams it - the gate holds it
    # back until the commands are judged.
    work = gitstory.clone("large")
    (work / "assets.bin").write_bytes(os.urandom(3 * 1024 * 1024))
    gitstory.ok("add", "assets.bin", cwd=work)
    gitstory.ok("commit", "-q", "-m", "assets", cwd=work)
    new = gitstory.ok("rev-parse", "HEAD", cwd=work).strip()
    gitstory.ok("push", "-q", "origin", "HEAD:refs/heads/feature/assets", cwd=work)
    assert gitstory.server_ref("refs/heads/feature/assets") == new
    before = gitstory.server_ref("refs/heads/main")
    seen = len(gitstory.server.seen)
    out = gitstory.git("push", "origin", "HEAD:main", cwd=work)
    assert out.returncode == 1 and "! [remote rejected] HEAD -> main (chaperone_blocked: main changes only" in out.stderr
    assert gitstory.server_ref("refs/heads/main") == before
    assert [s for s in gitstory.server.posts(since=seen) if s.body_bytes > 4] == []
