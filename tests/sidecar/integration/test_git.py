"""git over HTTPS through a real sidecar: the real ``git`` client, a real ``git http-backend``.

The sidecar is the ``chaperone proxy`` process (standalone: connection and policy from files);
git reaches it as its HTTPS proxy and trusts the sidecar's CA (``GIT_SSL_CAINFO``); the
upstream is ``git http-backend`` behind HTTPS (``chaperone_testbed.git_http``). Every refusal
is checked twice: what ``git`` prints (``! [remote rejected] ... (chaperone_blocked: ...)``,
``remote error: ...``) and that the server's refs did not move (the push never reached it).
"""

from __future__ import annotations

import gzip
import json
import os
import ssl
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import pytest
import yaml

from chaperone_testbed.git_http import GitHTTPServer, bare_repo, git_env, run_git

from .pod import API, PYTHONPATH, base_env, standalone_proxy, wait_for

ZERO = "0" * 40
HOLD = {"mode": "hold", "holdSeconds": 60, "timeoutSeconds": 120}

POLICY = {
    "apiVersion": API, "kind": "AccessPolicy", "metadata": {"name": "git-guard"},
    "spec": {"defaultEffect": "block", "rules": [
        {"name": "org-repos", "match": {"git": {"repositories": ["org/*"]}}, "allow": {}},
        {"name": "main-via-review", "match": {"git": {"refs": ["refs/heads/main"]}},
         "block": {"message": "main only changes through review"}},
        {"name": "no-branch-deletes", "match": {"git": {"operations": ["delete"]}},
         "block": {"message": "branches are never deleted by agents"}},
        {"name": "release-no-force", "match": {"git": {"refs": ["refs/heads/release"], "forcePush": True}},
         "block": {"message": "release is never rewritten"}},
        {"name": "prod-needs-alice", "match": {"git": {"refs": ["refs/heads/prod"]}},
         "requireApproval": {"approvers": {"users": ["alice"]}, **HOLD}},
        {"name": "no-vault", "match": {"git": {"repositories": ["org/vault"], "services": ["fetch"]}},
         "block": {"message": "the vault repository is not for agents"}},
        {"name": "no-fetch-of-drafts", "match": {"methods": ["POST"], "git": {"repositories": ["org/drafts"]}},
         "block": {"message": "drafts are not fetched by agents"}},
        {"name": "held-repository", "match": {"git": {"repositories": ["org/held"], "services": ["push"]}},
         "requireApproval": {"approvers": {"users": ["alice"]}, **HOLD}},
        # A body rule on the same requests: it must not switch a streamed push's gate off.
        {"name": "no-tokens-in-bodies", "match": {"bodyRegex": "NEVER-IN-A-PUSH-[0-9a-f]{32}"},
         "block": {}},
    ]}}


class Git:
    """The git client of the test: env through the sidecar, a work tree per test."""

    def __init__(self, server: GitHTTPServer, env: dict[str, str], root: Path):
        self.server, self.env, self.root = server, env, root

    def __call__(self, *args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
        return run_git(list(args), self.env, cwd=cwd)

    def ok(self, *args: str, cwd: Path | None = None) -> str:
        out = self(*args, cwd=cwd)
        assert out.returncode == 0, f"git {' '.join(args)}: {out.stderr}"
        return out.stdout

    def server_ref(self, repo: str, ref: str) -> str:
        out = run_git(["--git-dir", str(self.server.root / f"{repo}.git"), "rev-parse", "--verify", "-q", ref],
                      self.env)
        return out.stdout.strip()

    def commit(self, work: Path, name: str) -> str:
        (work / name).write_text(f"{name} {time.monotonic_ns()}\n")
        self.ok("add", name, cwd=work)
        self.ok("commit", "-q", "-m", name, cwd=work)
        return self.ok("rev-parse", "HEAD", cwd=work).strip()


@pytest.fixture(scope="module")
def git(tmp_path_factory):
    root = tmp_path_factory.mktemp("git")
    server = GitHTTPServer(root / "srv", root / "certs")
    conf = root / "conf"
    for sub in ("connections", "policies", "upstream-ca/git"):
        (conf / sub).mkdir(parents=True)
    (conf / "upstream-ca" / "git" / "ca.crt").write_bytes(server.ca_file.read_bytes())
    (conf / "chaperone.yaml").write_text(yaml.safe_dump({"namespace": "laptop", "user": "dana"}))
    (conf / "connections" / "git.yaml").write_text(yaml.safe_dump(
        {"apiVersion": API, "kind": "ClaudeConnection", "metadata": {"name": "git"},
         "spec": {"type": "http", "hosts": ["localhost"], "credentials": {"source": "none"}}}))
    (conf / "policies" / "git.yaml").write_text(yaml.safe_dump(POLICY))
    plain = git_env(root / "home-admin")
    for repo in ("org/app.git", "org/vault.git", "org/held.git", "org/drafts.git"):
        bare_repo(server.root, repo, plain)
    try:
        with standalone_proxy(conf, root / "proxy.log") as proxy:
            env = git_env(root / "home", proxy=f"http://127.0.0.1:{proxy.port}",
                          ca_file=conf / "ca" / "mitmproxy-ca-cert.pem")
            client = Git(server, env, root)
            client.conf = conf  # type: ignore[attr-defined]
            client.proxy_port = proxy.port  # type: ignore[attr-defined]
            seed = root / "seed"
            client.ok("clone", "-q", server.url("org/app.git"), str(seed))
            client.commit(seed, "README")
            # The first push of main, straight to the server (the agent may not push main).
            direct = git_env(root / "home-direct", ca_file=server.ca_file)
            out = run_git(["push", "-q", server.url("org/app.git"), "HEAD:refs/heads/main",
                           "HEAD:refs/heads/release", "HEAD:refs/heads/old", "HEAD:refs/heads/prod"],
                          direct, cwd=seed)
            assert out.returncode == 0, out.stderr
            out = run_git(["push", "-q", server.url("org/drafts.git"), "HEAD:refs/heads/main"], direct, cwd=seed)
            assert out.returncode == 0, out.stderr
            yield client
    finally:
        server.close()


def work_tree(git: Git, name: str) -> Path:
    work = git.root / name
    git.ok("clone", "-q", git.server.url("org/app.git"), str(work))
    return work


def test_clone_and_fetch_are_allowed(git):
    work = work_tree(git, "clone-1")
    assert (work / "README").exists()
    assert git.ok("ls-remote", git.server.url("org/app.git"), "refs/heads/main").split()[0] == \
        git.server_ref("org/app", "refs/heads/main")
    git.ok("fetch", "-q", "origin", cwd=work)
    # protocol v2 (git's default since 2.26) and v0 both go through
    git.ok("-c", "protocol.version=0", "fetch", "-q", "origin", cwd=work)


def test_a_push_to_a_feature_branch_is_allowed(git):
    work = work_tree(git, "feature")
    new = git.commit(work, "feature.txt")
    out = git("push", "origin", "HEAD:refs/heads/feature/x", cwd=work)
    assert out.returncode == 0, out.stderr
    assert git.server_ref("org/app", "refs/heads/feature/x") == new


def test_a_push_to_main_is_refused_and_git_prints_the_rule(git):
    work = work_tree(git, "to-main")
    before = git.server_ref("org/app", "refs/heads/main")
    git.commit(work, "main.txt")
    posts = len(git.server.seen)
    out = git("push", "origin", "HEAD:main", cwd=work)
    assert out.returncode != 0
    assert "! [remote rejected] HEAD -> main (chaperone_blocked: main only changes through review " \
           "(rule main-via-review of AccessPolicy laptop/git-guard))" in out.stderr, out.stderr
    assert "remote: Chaperone refused this push" in out.stderr  # side-band 2: the explanation
    assert "How to get access" in out.stderr
    assert git.server_ref("org/app", "refs/heads/main") == before
    assert git.server.posts(since=posts) == []  # nothing of the push reached the server


def test_a_branch_deletion_is_refused(git):
    work = work_tree(git, "delete")
    out = git("push", "origin", "--delete", "old", cwd=work)
    assert out.returncode != 0
    assert "! [remote rejected] old (chaperone_blocked: branches are never deleted by agents" in out.stderr, \
        out.stderr
    assert git.server_ref("org/app", "refs/heads/old")


def test_a_fast_forward_to_release_passes_a_force_push_does_not(git):
    work = work_tree(git, "release")
    git.ok("checkout", "-q", "-b", "rel", "origin/release", cwd=work)
    ff = git.commit(work, "release-1.txt")
    out = git("push", "origin", "HEAD:release", cwd=work)
    assert out.returncode == 0, out.stderr
    assert git.server_ref("org/app", "refs/heads/release") == ff
    # rewrite it: amend and force
    (work / "release-1.txt").write_text("rewritten\n")
    git.ok("commit", "-q", "-a", "--amend", "-m", "rewritten", cwd=work)
    out = git("push", "--force", "origin", "HEAD:release", cwd=work)
    assert out.returncode != 0
    assert "(chaperone_blocked: release is never rewritten (rule release-no-force" in out.stderr, out.stderr
    assert git.server_ref("org/app", "refs/heads/release") == ff


def test_one_forbidden_ref_refuses_the_whole_push(git):
    work = work_tree(git, "multi")
    git.commit(work, "multi.txt")
    out = git("push", "origin", "HEAD:refs/heads/feature/multi", "HEAD:main", cwd=work)
    assert out.returncode != 0
    assert "! [remote rejected] HEAD -> feature/multi" in out.stderr
    assert "! [remote rejected] HEAD -> main" in out.stderr
    assert git.server_ref("org/app", "refs/heads/feature/multi") == ""


def test_a_fetch_refusal_is_a_remote_error(git):
    out = git("clone", "-q", git.server.url("org/vault.git"), str(git.root / "vault"))
    assert out.returncode != 0
    assert "remote error: chaperone_blocked: the vault repository is not for agents" in out.stderr, out.stderr
    assert "HTTP 403" not in out.stderr


@pytest.mark.parametrize("version", ["2", "0"])
def test_an_upload_pack_refusal_is_a_remote_error(git, version):
    # The advertisement passes (org/*), the fetch itself (POST git-upload-pack) is refused:
    # git prints the ERR line whichever protocol version it speaks.
    out = git("-c", f"protocol.version={version}", "clone", "-q", git.server.url("org/drafts.git"),
              str(git.root / f"drafts-{version}"))
    assert out.returncode != 0
    assert "remote error: chaperone_blocked: drafts are not fetched by agents" in out.stderr, out.stderr


def test_a_push_needing_approval_names_its_refs_and_passes_once_approved(git):
    work = work_tree(git, "prod")
    git.ok("checkout", "-q", "-b", "p", "origin/prod", cwd=work)
    old = git.server_ref("org/app", "refs/heads/prod")
    new = git.commit(work, "prod.txt")
    result: dict[str, subprocess.CompletedProcess] = {}
    thread = threading.Thread(target=lambda: result.setdefault("push", git("push", "origin", "HEAD:prod", cwd=work)),
                              daemon=True)
    thread.start()

    def pending():
        out = cli("approvals", "--config-dir", str(git.conf), "--json")
        return [o for o in json.loads(out.stdout) if o["spec"]["rule"]["name"] == "prod-needs-alice"]
    request = wait_for(pending, 30, "the push's ApprovalRequest")[0]
    action = request["spec"]["action"]
    assert action["name"] == "git:push"
    assert action["summary"] == f"git push org/app: refs/heads/prod {old[:12]}..{new[:12]} (update)"
    assert f"refs/heads/prod {old}..{new} update" in action["resources"]
    assert git.server_ref("org/app", "refs/heads/prod") == old  # held: not yet on the server
    out = cli("approve", request["metadata"]["name"], "--config-dir", str(git.conf), "--as", "alice")
    assert out.returncode == 0, out.stderr
    thread.join(60)
    assert result["push"].returncode == 0, result["push"].stderr
    assert git.server_ref("org/app", "refs/heads/prod") == new


# ---------------------------------------------------------------------------- adversarial

def raw_push(git: Git, body: bytes, headers: dict[str, str] | None = None,
             repo: str = "org/app.git") -> tuple[int, dict[str, str], bytes]:
    """A hand-made receive-pack POST through the sidecar (what a client other than git sends)."""
    handler = urllib.request.ProxyHandler({"https": f"http://127.0.0.1:{git.proxy_port}"})
    context = ssl.create_default_context(cafile=str(git.conf / "ca" / "mitmproxy-ca-cert.pem"))
    opener = urllib.request.build_opener(handler, urllib.request.HTTPSHandler(context=context))
    request = urllib.request.Request(
        git.server.url(f"{repo}/git-receive-pack"), data=body, method="POST",
        headers={"Content-Type": "application/x-git-receive-pack-request", **(headers or {})})
    with opener.open(request, timeout=60) as resp:
        return resp.status, dict(resp.headers), resp.read()


def pkt(line: bytes) -> bytes:
    return b"%04x" % (len(line) + 4) + line


def commands(*lines: str, caps: str = "report-status side-band-64k") -> bytes:
    out = b""
    for i, line in enumerate(lines):
        raw = line.encode("utf-8", "surrogateescape")
        out += pkt(raw + (b"\0" + caps.encode() if i == 0 else b"") + b"\n")
    return out + b"0000"


def delete_main() -> str:
    return f"{'1' * 40} {ZERO} refs/heads/main"


@pytest.mark.parametrize("ref", ["refs/heads//main", "HEAD", "refs/heads/main/", "refs/heads/./main",
                                 "refs/heads/main.lock", "refs/heads/ma in", "refs/heads/..main"])
def test_ref_name_tricks_are_refused(git, ref):
    # Names git would refuse ("funny refname"): the sidecar does not guess what another server
    # makes of them; they match every restricting refs pattern, so the main rule refuses them.
    posts = len(git.server.seen)
    status, headers, body = raw_push(git, commands(f"{ZERO} {'2' * 40} {ref}"))
    assert status == 200 and headers["X-Chaperone-Refused"] == "blocked", body
    assert b"ng " in body and b"main-via-review" in body
    assert git.server.posts(since=posts) == []


@pytest.mark.parametrize("first", [True, False])
def test_a_nul_inside_a_ref_is_cut_where_the_server_cuts_it(git, first):
    # receive-pack ends a ref at the first NUL on any line (what follows are capabilities), so
    # "refs/heads/main\0x" IS refs/heads/main - judged as main whichever line it is on.
    lines = [f"{ZERO} {'4' * 40} refs/heads/feature/ok", f"{'1' * 40} {'2' * 40} refs/heads/main\0x"]
    if first:
        lines.reverse()
    body = b"".join(pkt(line.encode() + (b"\0report-status side-band-64k" if i == 0 else b"") + b"\n")
                    for i, line in enumerate(lines)) + b"0000"
    posts = len(git.server.seen)
    status, headers, out = raw_push(git, body)
    assert headers["X-Chaperone-Refused"] == "blocked", out
    # On the first line the capabilities end at the second NUL too: "x", no report-status, so
    # the refusal is an ERR line (what git prints as "remote error: ...").
    expected = b"ERR chaperone_blocked: main only" if first else b"ng refs/heads/main chaperone_blocked"
    assert expected in out, out
    assert git.server.posts(since=posts) == []


def test_a_gzip_body_is_read_too(git):
    posts = len(git.server.seen)
    status, headers, body = raw_push(git, gzip.compress(commands(delete_main())),
                                     {"Content-Encoding": "gzip"})
    assert status == 200 and headers["X-Chaperone-Refused"] == "blocked"
    assert b"ng refs/heads/main chaperone_blocked: main only changes through review" in body
    assert git.server.posts(since=posts) == []


def test_an_unknown_encoding_is_judged_without_its_refs(git):
    # http-backend would hand a "br" body to receive-pack raw: the sidecar does not guess.
    posts = len(git.server.seen)
    status, headers, body = raw_push(git, commands(f"{ZERO} {'3' * 40} refs/heads/feature/y"),
                                     {"Content-Encoding": "br"})
    assert headers["X-Chaperone-Refused"] == "blocked" and b"\x03chaperone_blocked" in body  # side-band 3
    assert git.server.posts(since=posts) == []


def test_protocol_v2_header_changes_nothing_for_a_push(git):
    posts = len(git.server.seen)
    status, headers, body = raw_push(git, commands(delete_main()), {"Git-Protocol": "version=2"})
    assert headers["X-Chaperone-Refused"] == "blocked" and b"ng refs/heads/main" in body
    assert git.server.posts(since=posts) == []


def test_a_push_certificate_is_judged_by_its_commands(git):
    cert = (f"certificate version 0.1\npusher Agent 1 +0000\npushee x\nnonce 1\n\n{delete_main()}\n"
            "-----BEGIN PGP SIGNATURE-----\nx\n-----END PGP SIGNATURE-----\n")
    body = pkt(b"push-cert\0report-status side-band-64k\n")
    body += b"".join(pkt(line.encode() + b"\n") for line in cert.splitlines()) + pkt(b"push-cert-end\n") + b"0000"
    status, headers, out = raw_push(git, body)
    assert headers["X-Chaperone-Refused"] == "blocked" and b"ng refs/heads/main" in out


def cli(*args: str) -> subprocess.CompletedProcess:
    env = base_env()
    env.update({"PYTHONPATH": PYTHONPATH, "USER": "dana"})
    return subprocess.run([sys.executable, "-m", "chaperone_sidecar.standalone_cli", *args], env=env,
                          capture_output=True, text=True, timeout=60)


def large_commit(git: Git, name: str, branch: str = "") -> tuple[Path, str]:
    work = work_tree(git, name)
    if branch:
        git.ok("checkout", "-q", "-b", "b", f"origin/{branch}", cwd=work)
    (work / "blob.bin").write_bytes(os.urandom(3 * 1024 * 1024))  # incompressible: a 3 MiB pack
    git.ok("add", "blob.bin", cwd=work)
    git.ok("commit", "-q", "-m", name, cwd=work)
    return work, git.ok("rev-parse", "HEAD", cwd=work).strip()


@pytest.mark.parametrize("config", [(), ("-c", "http.version=HTTP/1.1"), ("-c", "http.postBuffer=67108864")],
                         ids=["http2-chunked", "http1-chunked", "content-length"])
def test_a_large_push_is_judged_by_its_refs_before_it_leaves(git, config):
    # Above 1 MiB git chunks the push and the sidecar streams it: the gate holds the body back
    # until the commands have arrived, judges them, then lets the pack through.
    name = f"large-{len(config) and config[1].split('=')[0]}"
    work, new = large_commit(git, name)
    out = git(*config, "push", "origin", f"HEAD:refs/heads/feature/{name}", cwd=work)
    assert out.returncode == 0, out.stderr
    assert git.server_ref("org/app", f"refs/heads/feature/{name}") == new
    assert any(s.body_bytes > 3 * 1024 * 1024 for s in git.server.posts())


@pytest.mark.parametrize("chunked", [True, False])
def test_a_large_push_to_main_is_refused_and_none_of_it_leaves(git, chunked):
    work, _ = large_commit(git, f"large-main-{chunked}")
    before = git.server_ref("org/app", "refs/heads/main")
    posts = len(git.server.seen)
    # a large http.postBuffer makes git send a Content-Length instead of chunks
    args = [] if chunked else ["-c", "http.postBuffer=67108864"]
    out = git(*args, "push", "origin", "HEAD:main", cwd=work)
    assert out.returncode != 0
    assert "! [remote rejected] HEAD -> main (chaperone_blocked: main only changes through review" in out.stderr, \
        out.stderr
    assert git.server_ref("org/app", "refs/heads/main") == before
    reached = [s for s in git.server.posts(since=posts) if s.body_bytes > 4]
    if chunked:
        assert reached == []  # only "0000" (git's probe, then the gate's no-op)
    else:
        # the declared length is kept: "0000" and zeros, never the agent's pack
        assert [s.body_bytes for s in reached] == [int(reached[0].headers["content-length"])]


def test_a_large_push_that_needs_approval_is_refused_saying_why(git):
    work, _ = large_commit(git, "large-prod", branch="prod")
    old = git.server_ref("org/app", "refs/heads/prod")
    out = git("push", "origin", "HEAD:prod", cwd=work)
    assert out.returncode != 0
    assert "a streamed push cannot be held for approval" in out.stderr, out.stderr
    assert git.server_ref("org/app", "refs/heads/prod") == old


def test_a_large_push_under_a_repository_approval_rule_is_refused_without_paging_anyone(git):
    # Judged on its headers, the push needs approval (the rule names no refs); its updates are
    # not known yet and its digest is one no retry shares, so an ApprovalRequest could never
    # let it through: refused at once, and nobody is asked.
    work = git.root / "held"
    git.ok("clone", "-q", git.server.url("org/held.git"), str(work))
    (work / "blob.bin").write_bytes(os.urandom(3 * 1024 * 1024))
    git.ok("add", "blob.bin", cwd=work)
    git.ok("commit", "-q", "-m", "large", cwd=work)
    out = git("push", "origin", "HEAD:refs/heads/feature/held", cwd=work)
    assert out.returncode != 0
    assert "a streamed push cannot be held for approval" in out.stderr, out.stderr
    assert git.server_ref("org/held", "refs/heads/feature/held") == ""
    listing = cli("approvals", "--config-dir", str(git.conf), "--json")
    assert [o for o in json.loads(listing.stdout) if o["spec"]["rule"]["name"] == "held-repository"] == []
    # a small push to it is held for approval as usual
    small = git.root / "held-small"
    git.ok("clone", "-q", git.server.url("org/held.git"), str(small))
    git.commit(small, "small.txt")
    result: dict[str, subprocess.CompletedProcess] = {}
    thread = threading.Thread(target=lambda: result.setdefault(
        "push", git("push", "origin", "HEAD:refs/heads/feature/small", cwd=small)), daemon=True)
    thread.start()

    def pending():
        out = cli("approvals", "--config-dir", str(git.conf), "--json")
        return [o for o in json.loads(out.stdout) if o["spec"]["rule"]["name"] == "held-repository"]
    request = wait_for(pending, 30, "the small push's ApprovalRequest")[0]
    assert "refs/heads/feature/small" in request["spec"]["action"]["summary"]
    assert cli("approve", request["metadata"]["name"], "--config-dir", str(git.conf), "--as", "alice").returncode == 0
    thread.join(60)
    assert result["push"].returncode == 0, result["push"].stderr
