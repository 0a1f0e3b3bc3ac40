"""The git smart-HTTP classifier on real push bodies: commands written as git writes them and
packs made by the real ``git pack-objects`` (so the fast-forward proof reads real zlib objects)."""

from __future__ import annotations

import gzip
import subprocess
from pathlib import Path

import pytest

from chaperone_sidecar.policy.classify import classify
from chaperone_sidecar.policy.classify.git import classify_git, git_resources, git_service, valid_ref
from chaperone_sidecar.policy.model import HTTPRequest

ZERO = "0" * 40
CAPS = "report-status side-band-64k object-format=sha1 agent=git/2.39.5"


def pkt(line: bytes) -> bytes:
    return b"%04x" % (len(line) + 4) + line


def body(*lines: str, caps: str = CAPS, pack: bytes = b"", options: tuple[str, ...] = ()) -> bytes:
    out = b"".join(pkt(line.encode() + (b"\0" + caps.encode() if i == 0 else b"") + b"\n")
                   for i, line in enumerate(lines)) + b"0000"
    if options:
        out += b"".join(pkt(o.encode() + b"\n") for o in options) + b"0000"
    return out + pack


def post(data: bytes, path: str = "/org/app.git/git-receive-pack", **headers: str) -> HTTPRequest:
    hdrs = (("content-type", "application/x-git-receive-pack-request"),
            *((k.replace("_", "-"), v) for k, v in headers.items()))
    return HTTPRequest("POST", "https", "git.example", 443, path, "", hdrs, data)


class Repo:
    """A real repository to make commits and packs with."""

    def __init__(self, path: Path):
        self.path = path
        self.env = {"PATH": "/usr/bin:/bin", "HOME": str(path), "GIT_CONFIG_NOSYSTEM": "1",
                    "GIT_AUTHOR_NAME": "a", "GIT_AUTHOR_EMAIL": "a@x", "GIT_COMMITTER_NAME": "a",
                    "GIT_COMMITTER_EMAIL": "a@x"}
        self.git("init", "-q", "-b", "main")

    def git(self, *args: str, stdin: bytes = b"") -> bytes:
        return subprocess.run(["git", *args], cwd=self.path, env=self.env, input=stdin,
                              capture_output=True, check=True).stdout

    def commit(self, name: str) -> str:
        (self.path / name).write_text(name + "\n")
        self.git("add", name)
        self.git("commit", "-q", "-m", name)
        return self.git("rev-parse", "HEAD").decode().strip()

    def pack(self, new: str, *exclude: str) -> bytes:
        revs = "\n".join([new, *(f"^{e}" for e in exclude)]) + "\n"
        return self.git("pack-objects", "--stdout", "--revs", "-q", stdin=revs.encode())


@pytest.fixture
def repo(tmp_path):
    return Repo(tmp_path)


def test_which_requests_are_git():
    get = HTTPRequest("GET", "https", "h", 443, "/org/app.git/info/refs", "service=git-receive-pack")
    assert git_service(get) == ("push", "org/app", "advertisement")
    assert git_service(HTTPRequest("GET", "https", "h", 443, "/a/info/refs", "service=git-upload-pack")) == \
        ("fetch", "a", "advertisement")
    assert git_service(post(b"", "/org/app/git-upload-pack")) == ("fetch", "org/app", "rpc")
    assert git_service(post(b"", "/deep/org/app.git/git-receive-pack")) == ("push", "deep/org/app", "rpc")
    # conflicting service= values are judged as the push (the stricter)
    both = HTTPRequest("GET", "https", "h", 443, "/r/info/refs", "service=git-upload-pack&service=git-receive-pack")
    assert git_service(both)[0] == "push"
    for not_git in (HTTPRequest("GET", "https", "h", 443, "/r/info/refs", ""),  # dumb HTTP
                    HTTPRequest("GET", "https", "h", 443, "/r/git-receive-pack", ""),
                    HTTPRequest("POST", "https", "h", 443, "/r/info/refs", "service=git-receive-pack"),
                    HTTPRequest("POST", "https", "h", 443, "/r/xgit-receive-pack", "")):
        assert git_service(not_git) is None


def test_classify_names_and_summarises_a_push(repo):
    old = repo.commit("a")
    new = repo.commit("b")
    data = body(f"{old} {new} refs/heads/main", pack=repo.pack(new, old))
    action = classify(post(data, "//org/./app.git/git-receive-pack"), "http")
    assert action.name == "git:push" and action.git is not None
    assert action.git.repository == "org/app"  # the canonical path
    (cmd,) = action.git.commands
    assert (cmd.ref, cmd.old, cmd.new, cmd.operation, cmd.force, cmd.valid) == \
        ("refs/heads/main", old, new, "update", False, True)
    assert action.summary == f"git push org/app: refs/heads/main {old[:12]}..{new[:12]} (update)"
    assert "report-status" in action.git.capabilities and not action.errors
    assert git_resources(action.git) == ("push:org/app", f"refs/heads/main {old}..{new} update")
    # other connection types never classify git
    assert classify(post(data), "anthropic").git is None


def test_an_amended_commit_is_not_a_proven_fast_forward(repo):
    base = repo.commit("a")
    old = repo.commit("b")
    repo.git("commit", "-q", "--amend", "-m", "rewritten")
    new = repo.git("rev-parse", "HEAD").decode().strip()
    git = classify_git(post(body(f"{old} {new} refs/heads/main", pack=repo.pack(new, base, old))), [])
    assert git.commands[0].force is None
    assert "fast-forward not proven" in classify(post(body(f"{old} {new} refs/heads/main")), "http").summary


def test_a_fast_forward_over_many_commits_and_a_merge_is_proven(repo):
    old = repo.commit("a")
    repo.git("checkout", "-q", "-b", "side")
    repo.commit("s1")
    repo.git("checkout", "-q", "main")
    for i in range(5):
        repo.commit(f"m{i}")
    repo.git("merge", "-q", "--no-edit", "side")
    new = repo.git("rev-parse", "HEAD").decode().strip()
    git = classify_git(post(body(f"{old} {new} refs/heads/main", pack=repo.pack(new, old))), [])
    assert git.commands[0].force is False


def test_a_commit_the_server_has_is_unknown(repo):
    old = repo.commit("a")
    new = repo.commit("b")
    # the pack is empty: the server has new already (pushed to another branch before)
    git = classify_git(post(body(f"{old} {new} refs/heads/main", pack=repo.pack(new, new))), [])
    assert git.commands[0].force is None


def test_creates_deletes_and_several_refs(repo):
    a = repo.commit("a")
    data = body(f"{ZERO} {a} refs/heads/new", f"{a} {ZERO} refs/heads/old", f"{a} {a} refs/tags/v1",
                pack=repo.pack(a))
    git = classify_git(post(data), [])
    assert [(c.ref, c.operation, c.force) for c in git.commands] == [
        ("refs/heads/new", "create", False), ("refs/heads/old", "delete", False),
        ("refs/tags/v1", "update", False)]  # old == new: trivially a fast-forward


def test_gzip_push_options_shallow_and_sha256():
    a, b = "a" * 64, "b" * 64
    raw = pkt(b"shallow " + b"c" * 40 + b"\n") + body(f"{a} {b} refs/heads/x", caps="report-status push-options",
                                                     options=("ci.skip", "merge_request.create"))
    git = classify_git(post(gzip.compress(raw), content_encoding="gzip"), [])
    assert git.commands[0].ref == "refs/heads/x" and git.commands[0].old == a
    assert git.push_options == ("ci.skip", "merge_request.create")


def test_what_cannot_be_read_is_unknown():
    good = body(f"{'1' * 40} {'2' * 40} refs/heads/main")
    for req in (post(b""),  # streamed: the body was not read
                post(good, content_encoding="br"),  # an encoding git does not read
                post(b"not gzip", content_encoding="gzip"),
                post(good[:30]),  # cut off inside the commands
                post(b"zzzz"),  # not pkt-lines
                post(pkt(b"hello world\n") + b"0000"),  # not a command
                post(body(f"{ZERO} {ZERO} refs/heads/main")),  # null to null
                post(pkt(b"push-cert\0report-status\n") + pkt(b"certificate version 0.1\n") + b"0000")):
        errors: list[str] = []
        git = classify_git(req, errors)
        assert git is not None and git.service == "push" and git.commands is None, req
        assert errors
        assert "ref updates not read" in classify(req, "http").summary


def test_a_probe_without_commands_has_none():
    git = classify_git(post(b"0000"), [])
    assert git.commands == () and classify(post(b"0000"), "http").summary == "git push org/app: no ref updates"


def test_the_ref_ends_at_a_nul_like_the_servers():
    line2 = pkt(f"{'1' * 40} {'2' * 40} refs/heads/main\0junk\n".encode())
    data = pkt(f"{ZERO} {'3' * 40} refs/heads/ok\0report-status\0side-band-64k\n".encode()) + line2 + b"0000"
    git = classify_git(post(data), [])
    assert [c.ref for c in git.commands] == ["refs/heads/ok", "refs/heads/main"]
    assert git.capabilities == ("report-status",)  # a C string: the list ends at the next NUL


def test_a_push_certificate_carries_the_commands():
    cert = f"certificate version 0.1\npusher a\npushee b\nnonce n\n\n{'1' * 40} {ZERO} refs/heads/main\n" \
           "-----BEGIN PGP SIGNATURE-----\nxx\n-----END PGP SIGNATURE-----\n"
    data = pkt(b"push-cert\0report-status\n") + b"".join(pkt(line.encode() + b"\n") for line in cert.splitlines())
    data += pkt(b"push-cert-end\n") + b"0000"
    git = classify_git(post(data), [])
    assert [(c.ref, c.operation) for c in git.commands] == [("refs/heads/main", "delete")]


@pytest.mark.parametrize("ref,ok", [
    ("refs/heads/main", True), ("refs/heads/feature/x-1", True), ("refs/tags/v1.0", True),
    ("refs/heads//main", False), ("HEAD", False), ("main", False), ("refs/heads/main/", False),
    ("refs/heads/.main", False), ("refs/heads/a..b", False), ("refs/heads/main.lock", False),
    ("refs/heads/ma in", False), ("refs/heads/ma~1", False), ("refs/heads/a@{1}", False),
    ("refs/heads/*", False), ("refs/heads/main.", False), ("refs/heads/ma\x7fin", False),
])
def test_valid_ref_follows_check_ref_format(ref, ok, tmp_path):
    assert valid_ref(ref) is ok
    real = subprocess.run(["git", "check-ref-format", ref], capture_output=True)
    assert (real.returncode == 0) is ok  # the same verdict as git's own


def test_fetch_and_advertisements_carry_no_commands():
    adv = classify(HTTPRequest("GET", "https", "h", 443, "/org/app/info/refs", "service=git-receive-pack",
                               (("git-protocol", "version=2"),)), "http")
    assert adv.name == "git:push" and adv.git.phase == "advertisement" and adv.git.commands == ()
    assert adv.git.protocol == "version=2" and adv.summary == "git push org/app: ref advertisement"
    fetch = classify(post(pkt(b"command=fetch\n") + b"0000", "/org/app/git-upload-pack"), "http")
    assert fetch.name == "git:fetch" and fetch.summary == "git fetch org/app"
